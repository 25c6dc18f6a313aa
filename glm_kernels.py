"""Triton kernels for glm.py's small steps on CUDA: each replaces a chain of elementwise torch ops
that read and write the same tensors several times. glm.py imports this module only for CUDA tensors
(glm.kernels_for) and keeps its plain torch ops on the CPU and where Triton is missing.

- `RotaryHeads`: the 2-D rotary of q and k straight from the fused QKV output, written in the
  [B, nh, T, hs] layout attention reads, and its backward straight into the QKV gradient. The torch
  ops (a float16 copy of the tables, mul, a flip, addcmul, the slices' zero-filled gradients, the
  transposes) took ~12% of a LoRA SFT step at 4 x 512 (H200 profile, 2026-11-30).
- `rotary_into_cache`: the same rotation for generation, writing k and v into the KV cache slots.
- `layer_norm`: LayerNorm of a + alpha * b in one pass, for generation: torch's kernel takes ~8 us
  for a decode step's single row, and the residual add is another.
- `decode_attention`: one new query per row against the cache window, its keys split into chunks
  at small batches.
- `gemv`: a linear layer on a single row (decoding at batch 1), faster than cuBLAS at these shapes.
Each follows the rounding of the torch ops it replaces (tests/test_kernels.py compares them on a GPU).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _partner(j, HS: tl.constexpr):
    """Index of the element j trades places with in rotate-half: the other quarter of j's half."""
    return (j // (HS // 2)) * (HS // 2) + (j + HS // 4) % (HS // 2)


@triton.jit
def _rotary_kernel(qkv, cos, sin, q_out, k_out, v_out, slots, T, NH,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                   HS: tl.constexpr, HEADS: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """q, k of token (b, t) rotated, and v copied, from qkv [B, T, nh, 3, hs] into outputs with
    strides (s?b, s?h, s?t) and contiguous heads; k and v go to time slots[t] when HAS_SLOTS.
    As glm.apply_rotary_2d: y = x * cos + swap(x) * sin, cos and sin rounded to x's dtype, x * cos
    rounded before the add (addcmul)."""
    bt = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements: long prompts in large batches
    b, t = bt // T, bt % T
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)                    # [H]
    j = tl.arange(0, HS)                                                  # [HS]
    hm = (h < NH)[:, None]                                                # [H, 1]
    dt = q_out.dtype.element_ty
    c = tl.load(cos + bt * HS + j).to(dt).to(tl.float32)[None, :]         # [1, HS]
    s = tl.load(sin + bt * HS + j).to(dt).to(tl.float32)[None, :]
    row = qkv + (bt * NH + h[:, None]) * 3 * HS                           # [H, 1] pointers
    ts = tl.load(slots + t) if HAS_SLOTS else t
    for w in tl.static_range(2):                                          # q, then k
        x = tl.load(row + w * HS + j[None, :], mask=hm, other=0.0).to(tl.float32)            # [H, HS]
        xs = tl.load(row + w * HS + _partner(j, HS)[None, :], mask=hm, other=0.0).to(tl.float32)
        y = ((x * c).to(dt).to(tl.float32) + xs * s).to(dt)
        if w == 0:
            tl.store(q_out + b * sqb + h[:, None] * sqh + t * sqt + j[None, :], y, mask=hm)
        else:
            tl.store(k_out + b * skb + h[:, None] * skh + ts * skt + j[None, :], y, mask=hm)
    v = tl.load(row + 2 * HS + j[None, :], mask=hm, other=0.0)
    tl.store(v_out + b * svb + h[:, None] * svh + ts * svt + j[None, :], v.to(dt), mask=hm)


@triton.jit
def _rotary_backward_kernel(dq, dk, dv, cos, sin, dqkv, T, NH, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                            HS: tl.constexpr, HEADS: tl.constexpr):
    """dqkv [B, T, nh, 3, hs] from the gradients of q, k, v [B, nh, T, hs] (strides s?b, s?h, s?t):
    dx = dy * cos + swap(dy * sin), each product rounded as autograd rounds it through the torch ops."""
    bt = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements: long prompts in large batches
    b, t = bt // T, bt % T
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    j = tl.arange(0, HS)
    p = _partner(j, HS)
    hm = (h < NH)[:, None]
    dt = dqkv.dtype.element_ty
    c = tl.load(cos + bt * HS + j).to(dt).to(tl.float32)[None, :]
    sp = tl.load(sin + bt * HS + p).to(dt).to(tl.float32)[None, :]        # sin at the partner
    row = dqkv + (bt * NH + h[:, None]) * 3 * HS
    for w in tl.static_range(2):
        if w == 0:
            g = dq + b * sqb + h[:, None] * sqh + t * sqt
        else:
            g = dk + b * skb + h[:, None] * skh + t * skt
        dy = tl.load(g + j[None, :], mask=hm, other=0.0).to(tl.float32)
        dyp = tl.load(g + p[None, :], mask=hm, other=0.0).to(tl.float32)
        dx = (dy * c).to(dt).to(tl.float32) + (dyp * sp).to(dt).to(tl.float32)
        tl.store(row + w * HS + j[None, :], dx.to(dt), mask=hm)
    g = tl.load(dv + b * svb + h[:, None] * svh + t * svt + j[None, :], mask=hm, other=0.0)
    tl.store(row + 2 * HS + j[None, :], g.to(dt), mask=hm)


HEADS = 4  # heads a program of the rotary kernels


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


class RotaryHeads(torch.autograd.Function):
    """qkv [B, T, nh, 3, hs] (the fused QKV output) and the float32 tables cos, sin [B, T, 1, 1, hs]
    -> q, k rotated and v, each [B, nh, T, hs] contiguous; backward writes dqkv in one pass."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        B, T, NH, _, HS = qkv.shape
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        q, k, v = (torch.empty(B, NH, T, HS, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
        grid = (B * T, triton.cdiv(NH, HEADS))
        _rotary_kernel[grid](qkv, cos, sin, q, k, v, cos, T, NH, *_strides(q), *_strides(k), *_strides(v),
                             HS, HEADS, False)
        ctx.save_for_backward(cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        B, NH, T, HS = dq.shape
        dq, dk, dv = (g.contiguous() if g.stride(-1) != 1 else g for g in (dq, dk, dv))
        dqkv = torch.empty(B, T, NH, 3, HS, dtype=dq.dtype, device=dq.device)
        grid = (B * T, triton.cdiv(NH, HEADS))
        _rotary_backward_kernel[grid](dq, dk, dv, cos, sin, dqkv, T, NH, *_strides(dq), *_strides(dk),
                                      *_strides(dv), HS, HEADS)
        return dqkv, None, None


def rotary_into_cache(qkv, cos, sin, k_cache, v_cache, slots):
    """Generation: q [B, nh, T, hs] rotated; k rotated and v written into the caches [B, S, nh, hs] at
    time slots [T] (a tensor, so a captured decode step reads the slot of each replay)."""
    B, T, NH, _, HS = qkv.shape
    q = torch.empty(B, NH, T, HS, dtype=qkv.dtype, device=qkv.device)
    kc, vc = k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3)  # [B, nh, S, hs] views
    grid = (B * T, triton.cdiv(NH, HEADS))
    _rotary_kernel[grid](qkv.contiguous(), cos.contiguous(), sin.contiguous(), q, k_cache, v_cache, slots, T, NH,
                         *_strides(q), *_strides(kc), *_strides(vc), HS, HEADS, True)
    return q


@triton.jit
def _layer_norm_kernel(a, b, w, bias, out, C, alpha, eps, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """out[r] = LayerNorm(a[r] + alpha * b[r]) over C features, the sum rounded to out's dtype first
    (as torch.add's result is) and the statistics in float32."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < C
    dt = out.dtype.element_ty
    x = tl.load(a + r * C + c, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        x = (x + alpha * tl.load(b + r * C + c, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(m, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
    wt, bs = tl.load(w + c, mask=m, other=0.0).to(tl.float32), tl.load(bias + c, mask=m, other=0.0).to(tl.float32)
    y = xc * rstd * wt + bs
    tl.store(out + r * C + c, y.to(dt), mask=m)


def layer_norm(ln, a, b=None, alpha=1.0):
    """ln(a + alpha * b) (ln(a) without b) for a, b [..., C]: one read of each, one write."""
    a = a.contiguous()
    C = a.shape[-1]
    out = torch.empty_like(a)
    block = triton.next_power_of_2(C)
    _layer_norm_kernel[(a.numel() // C,)](a, a if b is None else b.contiguous(), ln.weight, ln.bias, out, C,
                                          float(alpha), ln.eps, b is not None, block,
                                          num_warps=min(16, max(1, block // 256)))
    return out


@triton.jit
def _decode_attention_kernel(q, k, v, mask, out, part, S, CHUNK, NH, sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sms,
                             scale, HS: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr):
    """Row b, head h, keys [c * CHUNK, (c + 1) * CHUNK) for c = program_id(1): softmax(q k^T * scale + mask) v
    online in float32 (running max m, normaliser den), BLOCK_S keys a step. One chunk (SPLIT = 1) writes the
    output; several write (m, den, unnormalised sum) to `part` for _combine_kernel."""
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = bh // NH, bh % NH
    d = tl.arange(0, HS)
    qv = tl.load(q + b * sqb + h * sqh + d).to(tl.float32) * scale                   # [HS]
    m = tl.full((), float("-inf"), tl.float32)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((HS,), tl.float32)
    for s0 in range(c * CHUNK, tl.minimum((c + 1) * CHUNK, S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)                                               # [BS]
        ok = s < tl.minimum((c + 1) * CHUNK, S)
        kt = tl.load(k + b * skb + h * skh + s[:, None] * sks + d[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(v + b * svb + h * svh + s[:, None] * svs + d[None, :], mask=ok[:, None], other=0.0)
        score = tl.sum(kt.to(tl.float32) * qv[None, :], axis=1)                      # [BS]
        score += tl.load(mask + b * smb + s * sms, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # only masked keys so far: no NaN
        p = tl.exp(score - ref)                                                      # [BS]
        corr = tl.exp(m - ref)
        den = den * corr + tl.sum(p, axis=0)
        acc = acc * corr + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
        m = m_new
    if SPLIT == 1:
        tl.store(out + bh * HS + d, (acc / den).to(out.dtype.element_ty))
    else:
        row = part + (bh * SPLIT + c) * (HS + 2)
        tl.store(row + d, acc)
        tl.store(row + HS, m)
        tl.store(row + HS + 1, den)


@triton.jit
def _combine_kernel(part, out, HS: tl.constexpr, SPLIT: tl.constexpr):
    """The chunks of row b, head h merged: sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) den_c."""
    bh = tl.program_id(0).to(tl.int64)
    c, d = tl.arange(0, SPLIT), tl.arange(0, HS)
    rows = part + (bh * SPLIT + c) * (HS + 2)                                        # [SPLIT] pointers
    m, den = tl.load(rows + HS), tl.load(rows + HS + 1)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.max(m, axis=0)))           # empty chunks weigh 0
    y = tl.sum(tl.load(rows[:, None] + d[None, :]) * w[:, None], axis=0) / tl.sum(den * w, axis=0)
    tl.store(out + bh * HS + d, y.to(out.dtype.element_ty))


def decode_attention(q, k, v, mask):
    """q [B, nh, 1, hs], keys and values [B, nh, S, hs] (any strides, contiguous heads), the additive
    mask [B, 1, 1, S] -> [B, nh, 1, hs]: what F.scaled_dot_product_attention gives for one query.

    Small tiles and one warp a program keep many programs in flight: at batch 64 a program per (row,
    head) is enough (37 us for 128 keys against SDPA's 55, H200); at small batches the keys are split
    into up to 16 chunks so that ~256 programs run (batch 1: 4.6 vs 5.5 us for 128 keys, 7.7 vs 10.1 for
    1,024), merged by a second kernel."""
    B, NH, _, HS = q.shape
    S = k.shape[2]
    split = min(16, triton.next_power_of_2(triton.cdiv(256, B * NH)), triton.next_power_of_2(triton.cdiv(S, 32)))
    block = 16 if split == 1 else 32
    chunk = triton.cdiv(triton.cdiv(S, split), block) * block
    out = torch.empty(B, NH, 1, HS, dtype=q.dtype, device=q.device)
    part = torch.empty(B * NH * split, HS + 2, dtype=torch.float32, device=q.device) if split > 1 else out
    mask = mask.expand(B, 1, 1, S)
    _decode_attention_kernel[(B * NH, split)](q, k, v, mask, out, part, S, chunk, NH, q.stride(0), q.stride(1),
                                              *_strides(k), *_strides(v), mask.stride(0), mask.stride(3), HS ** -0.5,
                                              HS, block, split, num_warps=1 if split == 1 else 2)
    if split > 1:
        _combine_kernel[(B * NH,)](part, out, HS, split)
    return out


# the best of 36 (BLOCK_N, BLOCK_K, warps) at the block's four shapes (H200), and one between them
GEMV_CONFIGS = [(16, 256, 4), (2, 512, 2), (4, 512, 2), (4, 1024, 4), (8, 512, 4)]


@triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in GEMV_CONFIGS],
                 key=["N", "K"])
@triton.jit
def _gemv_kernel(x, w, bias, out, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = sum_k w[n, k] x[k] (+ bias[n]) for one row x, float32 sums; autotuned per shape."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)            # [BN]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)                                               # [BK]
        wt = tl.load(w + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc += wt.to(tl.float32) * tl.load(x + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)                                                           # [BN]
    if HAS_BIAS:
        y += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out + rn, y.to(out.dtype.element_ty), mask=rn < N)


def gemv(x, weight, bias=None):
    """x [..., K] holding one row @ weight [N, K]^T (+ bias) -> [..., N]. Decoding at batch 1 reads every
    weight once a token: cuBLAS moved 3.1-3.9 TB/s at the block's shapes, this kernel 4.0-5.4 (H200)."""
    N, K = weight.shape
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _gemv_kernel[grid](x.contiguous(), weight, weight if bias is None else bias, out, N, K, bias is not None)
    return out
