"""glm_kernels (Triton) against glm.py's plain torch ops, on the GPU; skipped on CPUs, unless Triton's
interpreter runs the kernels there: with triton installed (and numpy < 2, which the interpreter needs
for loops of a runtime length), `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`.

float32: equal up to float rounding; bfloat16: each kernel rounds where the torch ops do, but the
compiler may fuse a multiply and an add that torch rounds in between: a few results a bf16 step apart."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import glm
import lora

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEV == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(glm.triton_module("glm_kernels") is None or not (DEV == "cuda" or INTERPRET),
                                reason="needs Triton, and CUDA or TRITON_INTERPRET=1")


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.fixture(autouse=True)
def kernels_on_the_cpu(monkeypatch, request):
    """Under the interpreter glm dispatches CPU tensors to the kernels too (glm.FUSED still decides),
    the GEMV keeps one configuration (autotuning times the others on a GPU), and bf16 is skipped: the
    interpreter does not round to it as the GPU does."""
    if INTERPRET:
        if "bfloat16" in request.node.name:
            pytest.skip("the interpreter's bf16 rounding differs from the GPU's")
        monkeypatch.setattr(glm, "kernels_for", lambda x, heads=True: glm_kernels() if glm.FUSED else None)
        monkeypatch.setattr(glm_kernels()._gemv_kernel, "configs", glm_kernels()._gemv_kernel.configs[:1])


def both(monkeypatch, fn):
    """fn() with the kernels, then with the torch ops."""
    fused = fn()
    monkeypatch.setattr(glm, "FUSED", False)
    plain = fn()
    monkeypatch.setattr(glm, "FUSED", True)
    return fused, plain


def assert_near(a, b, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # a bf16 rounding step of the terms (~1) apart, where a fused multiply-add rounds once
        diff = (a.float() - b.float()).abs()
        assert (diff <= 2 ** -6 * (b.float().abs() + 1)).all(), diff.max()
        assert (a != b).float().mean() < 0.25, (a != b).float().mean()


@DTYPES
def test_rotary_heads_and_their_gradient(dtype, monkeypatch):
    torch.manual_seed(0)
    B, T, NH, HS = 3, 37, 6, 64
    qkv = torch.randn(B, T, NH, 3, HS, device=DEV, dtype=dtype, requires_grad=True)
    rope = glm.rotary_tables(torch.randint(0, 300, (B, 2, T), device=DEV), HS // 2)
    g = torch.randn(3, B, NH, T, HS, device=DEV, dtype=dtype)

    def run():
        q, k, v = glm.rotary_heads(qkv, rope)
        grad, = torch.autograd.grad([q, k, v], qkv, [g[0], g[1], g[2]])
        return q, k, v, grad
    for a, b in zip(*both(monkeypatch, run)):
        assert a.shape == b.shape
        assert_near(a, b, dtype)


@DTYPES
def test_rotary_into_cache_writes_the_slots(dtype, monkeypatch):
    torch.manual_seed(1)
    B, T, NH, HS, S = 2, 5, 4, 32, 12
    qkv = torch.randn(B, T, NH, 3, HS, device=DEV, dtype=dtype)
    rope = glm.rotary_tables(torch.randint(0, 50, (B, 2, T), device=DEV), HS // 2)
    slots = torch.tensor([3, 4, 5, 6, 7], device=DEV)

    def run():
        cache = glm.KVCache(B, NH, S, HS, dtype, DEV)
        q, k, v = glm.rotary_heads(qkv, rope, cache, (slots, 10))
        return q, k, v, cache.k, cache.v
    fused, plain = both(monkeypatch, run)
    for a, b in zip(fused, plain):
        assert_near(a, b, dtype)
    assert fused[3][:, :3].abs().sum() == 0 and fused[3][:, 8:].abs().sum() == 0  # only the slots written


@DTYPES
def test_layer_norm_of_a_residual_sum(dtype):
    torch.manual_seed(2)
    ln = torch.nn.LayerNorm(4096, device=DEV, dtype=dtype)
    ln.weight.data.normal_()
    ln.bias.data.normal_()
    a, b = (torch.randn(3, 1, 4096, device=DEV, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        ref = F.layer_norm(torch.add(a, b, alpha=7.48).double(), (4096,), ln.weight.double(), ln.bias.double())
        for fused, want in ((glm.layer_norm(ln, a, b, 7.48, decoding=True), ref),
                            (glm.layer_norm(ln, a, decoding=True), F.layer_norm(a.double(), (4096,), ln.weight.double(),
                                                                               ln.bias.double()))):
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            assert ((fused.double() - want).abs() <= tol * want.abs().clamp(min=1)).all()


@DTYPES
@pytest.mark.parametrize("B", [3, 40])  # keys split into chunks and merged; one program per (row, head)
def test_decode_attention_against_float64(dtype, B):
    torch.manual_seed(3)
    NH, HS, S = 8, 128, 200
    q = torch.randn(B, NH, 1, HS, device=DEV, dtype=dtype)
    kc, vc = (torch.randn(B, S, NH, HS, device=DEV, dtype=dtype) for _ in range(2))  # the cache layout
    valid = torch.rand(B, S, device=DEV) > 0.3
    valid[0, :150] = False  # left padding longer than a block of keys
    valid[:, -1] = True
    mask = torch.zeros(B, 1, 1, S, device=DEV, dtype=dtype).masked_fill_(~valid[:, None, None], float("-inf"))
    k, v = kc.transpose(1, 2), vc.transpose(1, 2)  # [B, nh, S, hs] views
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    got = glm_kernels().decode_attention(q, k, v, mask)
    assert (got.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@DTYPES
def test_gemv_against_float64(dtype):
    torch.manual_seed(4)
    lin = torch.nn.Linear(300, 1000, device=DEV, dtype=dtype)  # neither a multiple of the tiles
    x = torch.randn(1, 1, 300, device=DEV, dtype=dtype)
    with torch.no_grad():
        for bias in (lin.bias, None):
            ref = F.linear(x.double(), lin.weight.double(), None if bias is None else bias.double())
            got = glm_kernels().gemv(x, lin.weight, bias)
            assert got.shape == (1, 1, 1000)
            assert ((got.double() - ref).norm() / ref.norm()) < (1e-6 if dtype == torch.float32 else 4e-3)
        want = glm_kernels().gemv(x, lin.weight, lin.bias)
        assert torch.equal(glm.linear(lin, x), want)  # a decode step's row takes the kernel
        before = lin.weight.clone()
        lora.LoRALinear.convert(lin).add_adapter("a", 4, 8.0)
        lin.lora_B["a"].data.normal_()
        lin.merge()  # an adapter folded into the weight, as `glm.py chat --adapter` runs it
        assert not torch.equal(lin.weight, before)
        assert torch.equal(glm.linear(lin, x), glm_kernels().gemv(x, lin.weight, lin.bias))


def glm_kernels():
    return glm.triton_module("glm_kernels")


def toy_model(dtype):
    cfg = dataclasses.replace(glm.GLMConfig.toy(), hidden_size=256, inner_hidden_size=1024)  # 4 heads of 64
    with torch.device("meta"):
        model = glm.ChatGLM(cfg)
    return model.to_empty(device=DEV).to(dtype).init_weights(seed=0, std=0.05)


def test_model_forward_gradients_and_greedy_tokens(monkeypatch):
    """A whole model, float32: the same logits and gradients, and the same greedy tokens through the
    captured decode steps (decode attention, LayerNorm and the cache writes fused)."""
    model = toy_model(torch.float32)
    ids = torch.tensor([[20, 31, 45, 77, 5, 8], [3, 3, 60, 61, 5, 8]], device=DEV)

    def run():
        model.zero_grad()
        logits = model(ids)
        logits.float().logsumexp(-1).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, stop_at_eop=False, cuda_graph=True)
        return logits, grads, out
    (l1, g1, o1), (l0, g0, o0) = both(monkeypatch, run)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(o1, o0)


def test_bf16_generation_stays_close(monkeypatch):
    model = toy_model(torch.bfloat16)
    ids = torch.tensor([[20, 31, 45, 77, 5, 8]], device=DEV)

    def run():
        with torch.no_grad():
            dec = glm.Decoder(model, 1, 16, use_graph=True)
            layout = glm.derive_layout(ids, model.config)
            first = dec.prefill(ids, layout)
            tok = first.argmax(-1)
            return first, dec.step(tok, glm.new_token_positions(layout, 6), 6).clone()
    for a, b in zip(*both(monkeypatch, run)):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
