"""quant.py: int8 / int4 codes and scales, the frozen quantized linear, the released checkpoint
layout, LoRA on a quantized base, and the mistakes a user can make with them. (P = 2 with a
quantized base: tests/test_pipeline.py.)"""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import dist
import flags
import glm
import lora
import plan
import quant
import train_sft
from conftest import head_lines, load_tensors, sft_argv, write_jsonl

build_stage = dist.build_stage

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


# -----------------------------------------------------------------------------
# a test-side implementation of the formulas (numpy, never quant.py)


def ref_quantize(w, bits):
    """The release's per-row formula: s = float16(absmax / (2^(bits-1) - 1)), q = round(w / s)."""
    w = w.detach().double().numpy()
    s = (np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float16)
    return np.round(w / s.astype(np.float64)[:, None]).astype(np.int8), s


def ref_pack(q):
    """Two int4 codes a byte, code 2j in the high nibble (the release's kernels)."""
    hi, lo = q[:, 0::2].astype(np.int16), q[:, 1::2].astype(np.int16)
    return (((hi & 0xF) << 4) | (lo & 0xF)).astype(np.uint8).view(np.int8)


def ref_dequantize(q, s):
    """q * s in float32: scales s [out] (one a row) or [out, G] (one per in / G inputs of a row)."""
    s = s.astype(np.float32).reshape(len(s), -1)
    return torch.from_numpy(q.astype(np.float32) * np.repeat(s, q.shape[1] // s.shape[1], axis=1))


def write_release(src, dst, bits, tamper=None):
    """src's float weights as the released chatglm-6b-int{bits} (pytorch_model.bin): per block linear
    `weight` int8 codes (int4 packed) and `weight_scale` float16 [out]. Returns {key: the dequantized
    weight}. tamper(state) may spoil the state before it is written."""
    state, want = load_tensors(src), {}
    for k in list(state):
        if k.endswith(".weight") and k.split(".", 3)[-1][:-len(".weight")] in LINEARS:
            q, s = ref_quantize(state[k], bits)
            want[k] = ref_dequantize(q, s)
            state[k] = torch.from_numpy(ref_pack(q) if bits == 4 else q)
            state[k[:-len("weight")] + "weight_scale"] = torch.from_numpy(s)
    if tamper:
        tamper(state)
    os.makedirs(dst)
    torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    shutil.copy(os.path.join(src, "ice_text.model"), dst)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_bit"] = bits  # the release's field; no group size: per row
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return want


# -----------------------------------------------------------------------------
# codes and scales


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16), (8, 32)])
def test_round_trip_error_is_at_most_half_a_step(bits, group):
    torch.manual_seed(0)
    w = torch.randn(12, 64) * torch.rand(12, 1)  # rows of different magnitudes
    w[3] = 0.0  # an all-zero row stays zero
    codes, scale = quant.quantize(w, bits, group)
    assert codes.dtype == torch.int8 and codes.shape == (12, 64 * bits // 8)
    assert scale.dtype == torch.float16 and scale.shape == ((12, 64 // group) if group else (12,))
    g = group or 64
    absmax = w.view(12, -1, g).abs().amax(-1)  # [12, G]
    step = absmax / (2 ** (bits - 1) - 1)  # the scale before float16 rounding
    err = (quant.dequantize(codes, scale, bits) - w).abs().view(12, -1, g).amax(-1)
    assert (err <= step / 2 * (1 + 2e-3) + 1e-7).all()  # float16 scales: a relative 1e-3 more
    assert quant.dequantize(codes, scale, bits)[3].abs().max() == 0


def test_int4_packs_the_first_code_in_the_high_nibble():
    q = torch.arange(-8, 8, dtype=torch.int8).view(1, 16)
    packed = quant.pack_int4(q)
    assert np.array_equal(packed.numpy(), ref_pack(q.numpy()))
    assert packed[0, 7].item() == 0x67 and packed[0, 0].item() == 0x89 - 256  # bytes of (6, 7) and (-8, -7)
    assert torch.equal(quant.unpack_int4(packed), q)


# -----------------------------------------------------------------------------
# the frozen quantized linear


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 16)])
def test_quantized_linear_output_and_input_gradient_equal_the_dequantized_float_linear(bits, group):
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    q = quant.QuantLinear.from_linear(lin, bits, group)
    codes = q.weight.numpy()
    codes = np.stack([codes >> 4, (codes << 4).astype(np.int8) >> 4], -1).reshape(48, 64) if bits == 4 else codes
    w = ref_dequantize(codes, q.weight_scale.numpy())  # unpacked test-side
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = q(x), F.linear(x2, w, lin.bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in q.parameters()) and q.bias.grad is None  # frozen


def test_lora_gradients_on_a_quantized_base_equal_those_on_its_dequantized_copy(base):
    torch.manual_seed(2)
    qmodel = quant.quantize_model(glm.ChatGLM.from_pretrained(base), 4, 16)
    fmodel = quant.dequantize_model(copy.deepcopy(qmodel), torch.float32)
    assert not quant.is_quantized(fmodel) and isinstance(fmodel.transformer.layers["0"].mlp.dense_h_to_4h, nn.Linear)
    ids = torch.tensor([[20, 31, 45, 5, 8, 60, 61], [3, 3, 22, 40, 5, 8, 70]])
    grads = []
    for m in (qmodel, fmodel):
        lora.inject_lora(m, targets=("query_key_value", "dense_4h_to_h"), r=4, alpha=8, seed=0)
        for _, layer in lora.lora_modules(m):  # B = 0 would give A no gradient
            nn.init.normal_(layer.lora_B["default"], generator=torch.Generator().manual_seed(3))
        m(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8 and all(".lora_" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        lora.merge_lora(qmodel)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 128)])
def test_the_planner_prices_the_codes_and_scales_of_a_quantized_6b_base(bits, group):
    cfg = glm.GLMConfig()
    h, f, L = cfg.hidden_size, cfg.inner_hidden_size, cfg.num_layers
    plans = [plan.plan_pipeline(cfg, 1, 4, 512, 1, train="lora", quantize=q) for q in ((0, 0), (bits, group))]
    weights = L * (4 * h * h + 2 * h * f)  # the block linears' weights, 2 bytes each in bf16
    scales = weights // group if group else L * (3 * h + h + f + h)  # one per group of inputs, or per output row
    saved = weights * (2 - bits / 8) - 2 * scales
    assert plans[0].stages[0].mem["params"] - plans[1].stages[0].mem["params"] == pytest.approx(saved, rel=1e-9)


# -----------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("bits", [8, 4])
def test_the_released_layout_loads_and_equals_its_dequantized_weights(base, tmp_path, bits):
    want = write_release(base, str(tmp_path / "rel"), bits)
    quant.main(["convert", str(tmp_path / "rel"), str(tmp_path / "conv")])
    model = quant.from_pretrained(str(tmp_path / "conv"))
    layers = dict(model.named_modules())
    assert len(want) == 8
    for k, w in want.items():
        m = layers[k[:-len(".weight")]]
        assert isinstance(m, quant.QuantLinear) and m.bits == bits
        torch.testing.assert_close(m.dequantized(), w, atol=0, rtol=0, msg=k)
    ref = glm.ChatGLM.from_pretrained(base)  # the float model with the dequantized weights put in
    with torch.no_grad():
        for k, w in want.items():
            layers_ref = dict(ref.named_modules())
            layers_ref[k[:-len(".weight")]].weight.copy_(w)
    ids = torch.tensor([[20, 31, 45, 5, 8, 60]])
    torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_glm_py_hands_quantize_and_quantized_releases_to_quant_py(base, tmp_path, monkeypatch):
    """`python glm.py quantize ...` and `python glm.py convert` of a chatglm-6b-int8 / -int4 release run
    quant.py in glm.py's place (glm.py imports no project module); a float release converts there."""
    calls = []
    monkeypatch.setattr(glm, "run_elsewhere", lambda file, argv: calls.append((file, argv)))
    write_release(base, str(tmp_path / "rel"), 8)
    glm.main(["convert", str(tmp_path / "rel"), str(tmp_path / "conv")])
    glm.main(["quantize", "--bits", "4", base, str(tmp_path / "q4")])
    assert calls == [("quant.py", ["convert", str(tmp_path / "rel"), str(tmp_path / "conv")]),
                     ("quant.py", ["quantize", "--bits", "4", base, str(tmp_path / "q4")])]
    assert not os.path.exists(tmp_path / "conv") and not os.path.exists(tmp_path / "q4")


def test_quantize_command_writes_what_loading_with_quantize_builds(base, tmp_path, capsys):
    quant.main(["quantize", "--bits", "4", "--group_size", "32", base, str(tmp_path / "q4")])
    assert "int4, groups of 32" in capsys.readouterr().out
    with open(tmp_path / "q4" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert (config["quantization_bit"], config["quantization_group_size"]) == (4, 32)
    assert os.path.isfile(tmp_path / "q4" / "model.safetensors.index.json")
    stored = quant.from_pretrained(str(tmp_path / "q4")).state_dict()
    fly = quant.from_pretrained(base, bits=4, group_size=32).state_dict()
    assert stored.keys() == fly.keys()
    assert all(torch.equal(stored[k], fly[k]) for k in stored)


def test_lora_merge_onto_a_quantized_base_writes_a_float_model(base, tmp_path, capsys):
    q8 = str(tmp_path / "q8")
    quant.main(["quantize", "--bits", "8", base, q8])
    model = quant.from_pretrained(q8)
    lora.inject_lora(model, r=2, alpha=4, seed=0)
    for _, layer in lora.lora_modules(model):
        nn.init.normal_(layer.lora_B["default"], std=0.1, generator=torch.Generator().manual_seed(4))
    lora.save_adapter(model, str(tmp_path / "ad"))
    lora.main(["merge", "--model", q8, "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged"),
               "--dtype", "float32"])
    assert "dequantized to float32" in capsys.readouterr().out
    merged = glm.ChatGLM.from_pretrained(str(tmp_path / "merged"))  # a plain float checkpoint
    ids = torch.tensor([[20, 31, 45, 5, 8, 60]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# mistakes: one line each


def one_line_error(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        flags.run(fn, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_bits_other_than_4_or_8_and_a_group_size_that_does_not_divide_are_one_line_errors(base, tmp_path, capsys):
    assert "--bits 3: expected 4 or 8" in one_line_error(capsys, quant.main, ["quantize", "--bits", "3", base,
                                                                              str(tmp_path / "x")])
    err = one_line_error(capsys, quant.main, ["quantize", "--bits", "4", "--group_size", "48", base,
                                              str(tmp_path / "x")])
    assert "group size 48 does not divide its input width 64" in err and "query_key_value.weight" in err
    assert not os.path.exists(tmp_path / "x")


def test_full_and_last_n_training_on_a_quantized_base_are_refused(base, data8, tmp_path, capsys):
    for extra in ([], ["--train_layers", "1"]):
        err = one_line_error(capsys, train_sft.main, sft_argv(base, data8, tmp_path / f"r{len(extra)}", *extra,
                                                              quantize=4, quant_group_size=16))
        assert "int4 base is frozen" in err and "--lora_rank" in err


def test_mismatched_scales_and_codes_are_one_line_errors_that_name_the_tensor(base, tmp_path, capsys):
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"

    def short_scale(state):
        state[key + "_scale"] = state[key + "_scale"][:-1]

    def float_codes(state):
        state[key] = state[key].float()

    def convert_and_load(src):
        quant.convert(src, src + "_conv")
        quant.from_pretrained(src + "_conv")

    for name, tamper, says in (("short", short_scale, "has shape [63], expected [64]"),
                               ("float", float_codes, "dtype torch.float32")):
        write_release(base, str(tmp_path / name), 8, tamper)
        err = one_line_error(capsys, convert_and_load, str(tmp_path / name))
        assert key in err and says in err, err


# -----------------------------------------------------------------------------
# an int8 lm_head (--quantize_head)


def greedy_without_cache(model, ids, n):
    """The argmax of a full forward, n times: the no-cache path generation must equal."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_an_int8_head_is_within_its_rounding_of_the_float_head_and_generates_greedily(base):
    model = quant.from_pretrained(base, bits=8, head=True)
    assert isinstance(model.lm_head, quant.QuantLinear) and model.lm_head.bits == 8
    w = glm.ChatGLM.from_pretrained(base).lm_head.weight.detach()  # the float head, [V, h]
    ids = torch.tensor([[20, 31, 45, 5, 8, 60], [3, 3, 22, 40, 5, 8]])
    with torch.no_grad():
        h = model(ids, return_hidden=True)                        # [B, T, h]
        err = (model.lm_head(h) - h @ w.t()).abs()                # [B, T, V]
    # |sum_k h_k (q_k s - w_k)| <= s / 2 * sum_k |h_k| with s = absmax / 127 of the row (float16: 1e-3 more)
    bound = h.abs().sum(-1, keepdim=True) * (w.abs().amax(1) / 127 / 2 * (1 + 2e-3))
    assert (err <= bound + 1e-6).all() and err.max() > 0
    out = model.generate(ids[:1], max_new_tokens=4, stop_at_eop=False)
    assert torch.equal(out, greedy_without_cache(model, ids[:1], 4))


def test_lora_gradients_through_an_int8_head_equal_those_through_its_dequantized_float_copy(base):
    qmodel = quant.from_pretrained(base, bits=4, group_size=16, head=True)
    fmodel = quant.dequantize_model(copy.deepcopy(qmodel), torch.float32)
    assert type(fmodel.lm_head) is nn.Linear
    ids = torch.tensor([[20, 31, 45, 5, 8, 60, 61], [3, 3, 22, 40, 5, 8, 70]])
    labels = ids.clone()
    labels[:, :4] = -100
    grads = []
    for m in (qmodel, fmodel):
        lora.inject_lora(m, r=2, alpha=4, seed=0)
        for _, layer in lora.lora_modules(m):
            nn.init.normal_(layer.lora_B["default"], generator=torch.Generator().manual_seed(3))
        data.lm_loss(m.lm_head, m(ids, return_hidden=True), labels).backward()  # the SFT loss, chunked
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_an_int8_head_saves_loads_and_trains_from_the_command_line(base, data8, tmp_path, monkeypatch, capsys):
    dst = str(tmp_path / "q8h")
    quant.main(["quantize", "--bits", "8", "--head", base, dst])
    assert "lm_head int8" in capsys.readouterr().out
    with open(os.path.join(dst, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["quantization_head"] is True
    stored = quant.from_pretrained(dst)
    q, s = ref_quantize(load_tensors(base)["lm_head.weight"], 8)  # the test-side formula
    assert np.array_equal(stored.lm_head.weight.numpy(), q) and np.array_equal(stored.lm_head.weight_scale.numpy(), s)
    fly = quant.from_pretrained(base, bits=8, head=True).state_dict()
    assert stored.state_dict().keys() == fly.keys()
    assert all(torch.equal(v, fly[k]) for k, v in stored.state_dict().items())
    built, two = [], write_jsonl(tmp_path / "two.jsonl", head_lines(data8, 2))  # the stage train_sft.py builds
    monkeypatch.setattr(dist, "build_stage", lambda *a, **k: built.append(build_stage(*a, **k)) or built[-1])
    train_sft.main(sft_argv(base, two, tmp_path / "run", quantize=8, quantize_head=True, lora_rank=2, max_steps=1,
                            micro_batch_size=1, grad_accum=1, max_len=32))
    assert isinstance(built[0].lm_head, quant.QuantLinear)
    assert os.path.isfile(tmp_path / "run" / "final" / "adapter_config.json")


def test_quantize_head_needs_a_quantized_base_and_the_planner_prices_an_int8_head(base, capsys):
    err = one_line_error(capsys, quant.from_pretrained, base, torch.float32, "cpu", 0, -1, True)
    assert "--quantize_head without --quantize" in err
    cfg = glm.GLMConfig()
    V, h = cfg.vocab_size, cfg.hidden_size
    plans = [plan.plan_pipeline(cfg, 1, 4, 512, 1, train="lora", quantize=q) for q in ((8, 0), (8, 0, True))]
    (a, b) = (p.stages[0].mem for p in plans)
    assert a["params"] - b["params"] == pytest.approx(V * h * 2 - (V * h + 2 * V), rel=1e-9)  # bf16 -> int8 + scales
    assert b["logits"] - a["logits"] == pytest.approx(V * h * 2)  # the weight dequantized for a call's logits


# -----------------------------------------------------------------------------
# the Triton kernels (CUDA only; the device's check, skipped on CPUs)

cuda_kernels = pytest.mark.skipif(not torch.cuda.is_available() or glm.triton_module("quant_kernels") is None,
                                  reason="needs CUDA and Triton")


@cuda_kernels
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 128), (8, 64), (4, 32)])
def test_cuda_kernels_equal_the_plain_torch_path(bits, group, monkeypatch):
    torch.manual_seed(5)
    w = torch.randn(300, 1024, device="cuda")
    codes, scale = quant.quantize(w, bits, group)
    monkeypatch.setattr(quant, "USE_KERNELS", False)
    plain = quant.dequantize(codes, scale, bits, torch.bfloat16)
    kernels = glm.triton_module("quant_kernels")
    assert torch.equal(kernels.dequantize(codes, scale, bits, torch.bfloat16), plain)  # bit for bit
    bias = torch.randn(300, device="cuda").bfloat16()
    x = torch.randn(64, 1024, device="cuda").bfloat16()
    ref = x.double() @ plain.double().t() + bias.double()
    close = lambda y, r: y.dtype == torch.bfloat16 and ((y.double() - r).norm() / r.norm()) < 1e-2
    assert close(kernels.gemv(x[:1], codes, scale, bits, bias), ref[:1])
    if bits == 8:  # the tensor-core kernel, one row and many
        assert close(kernels.matmul(x[:1], codes, scale, bias), ref[:1])
        assert close(kernels.matmul(x, codes, scale), ref - bias.double())


@cuda_kernels
def test_cuda_decoding_with_kernels_matches_the_plain_path(base, monkeypatch):
    model = quant.from_pretrained(base, torch.bfloat16, "cuda", bits=4, group_size=32, head=True)
    ids = torch.tensor([[20, 31, 45, 5, 8, 60]], device="cuda")
    with torch.no_grad():
        fused = model(ids[:, -1:])  # one row: the GEMV
        monkeypatch.setattr(quant, "USE_KERNELS", False)
        plain = model(ids[:, -1:])
    assert ((fused.float() - plain.float()).norm() / plain.float().norm()) < 1e-2
