"""Triton kernels for quant.py's frozen int8 / int4 linears on CUDA. quant.py imports this module
only for CUDA tensors, and keeps its plain torch ops wherever Triton is missing (the CPU build).

Which kernel runs depends on how many rows (tokens) x has; quant.FUSED_ROWS holds the limits.
- one row (decoding, batch 1): `gemv` reads the codes as int32 words and never writes the float
  weight; decoding reads every weight once a token, so reading a half (int8) or a quarter (int4)
  of bf16's bytes is the speed-up.
- a few rows, int8 (decoding in batches): `matmul` turns tiles of codes into bf16 in registers
  (|q| <= 127 is exact there) and multiplies on the tensor cores, scaling the float32 sums by row.
- many rows (training, prefill): `dequantize` writes the float weight in one pass (codes and scales
  read once) and cuBLAS multiplies. It equals quant.dequantize's torch ops bit for bit: q * s is
  rounded to float16 first, then to the compute dtype.
int4 bytes hold code 2j in the high nibble and 2j+1 in the low one (quant.pack_int4).

Measured on an H200 at ChatGLM-6B's shapes (docs/bench/h200_x1_quant*_2026-11-30.jsonl): dequantize
moves ~3.8 TB/s (int8), 2.7 (int4, groups of 128), against 1.2 ms a layer for the torch ops. The
four linears of a block at batch 1 take 60 us int4 (groups of 128) and 68 us int8 through `gemv`,
104 us bf16 (glm_kernels' GEMV); a decode step 2.47 ms int4, 2.70 int8, 3.72 bf16 (fused kernels).
"""
import torch
import triton
import triton.language as tl

DEQUANT_BLOCK = (4, 1024, 4)  # (rows, weights of a row, num_warps) a program of `dequantize`
GEMV_BLOCK = (256, 8, 4)      # (int32 words of a row, rows, num_warps) a tile of `gemv`: the best or within 7%
                              # of 30 tiles at each of 6B's linears, int8 and int4 (H200, 2026-11-30)
MATMUL_CONFIGS = {16: (32, 256, 4, 4), 128: (32, 128, 4, 4)}  # rows <= key: (BLOCK_N, BLOCK_K, warps, stages),
                                                              # the probe's best of 5-6 at 1, 16 and 64 rows


def linear(x, codes, scale, bits, bias=None):
    """x [M, K] (bf16 / fp16, few rows) @ dequantize(codes, scale)^T (+ bias) -> [M, N] in x's dtype,
    without writing the float weight; None where no kernel fits (the caller then dequantizes)."""
    y = gemv(x, codes, scale, bits, bias) if x.shape[0] == 1 else None
    return y if y is not None or bits != 8 else matmul(x, codes, scale, bias)


@triton.jit
def _dequantize_kernel(codes, scales, out, N, K, BITS: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = float16(q[n, k] * s[n, k // GROUP]) in out's dtype (GROUP 0: one scale a row)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)            # [BN]
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)            # [BK] weight columns
    mask = (rows[:, None] < N) & (cols[None, :] < K)                      # [BN, BK]
    if BITS == 8:
        q = tl.load(codes + rows[:, None] * K + cols[None, :], mask=mask, other=0).to(tl.int32)
    else:  # BLOCK_K / 2 bytes hold BLOCK_K codes: high nibbles (b >> 4) the even columns, low the odd
        byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        b = tl.load(codes + rows[:, None] * (K // 2) + byte[None, :],
                    mask=(rows[:, None] < N) & (byte[None, :] < K // 2), other=0).to(tl.int32)
        q = tl.interleave(b >> 4, (b << 28) >> 28)                        # [BN, BK]
    if GROUP:
        s = tl.load(scales + rows[:, None] * (K // GROUP) + cols[None, :] // GROUP, mask=mask, other=0)
    else:
        s = tl.load(scales + rows, mask=rows < N, other=0)[:, None]
    w = (q.to(tl.float32) * s.to(tl.float32)).to(tl.float16).to(tl.float32)  # the product torch forms
    tl.store(out + rows[:, None] * K + cols[None, :], w.to(out.dtype.element_ty), mask=mask)


def dequantize(codes, scale, bits, dtype):
    """Codes [N, K * bits / 8] and float16 scales [N] or [N, G] -> the weight [N, K] in dtype."""
    N, K = codes.shape[0], codes.shape[1] * 8 // bits
    group = K // scale.shape[1] if scale.dim() == 2 else 0
    out = torch.empty(N, K, dtype=dtype, device=codes.device)
    bn, bk, warps = DEQUANT_BLOCK
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _dequantize_kernel[grid](codes, scale, out, N, K, bits, group, bn, bk, num_warps=warps)
    return out


# KW unspecialised: with its alignment unproven, the word loads stay plain and coalesced
@triton.jit(do_not_specialize=["KW", "EXP"])
def _gemv_kernel(x, words, scales, bias, out, N, K, KW, EXP, BITS: tl.constexpr, GROUP: tl.constexpr,
                 SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum_k x[k] q[n, k] s[n, k // GROUP] (+ bias[n]) for ONE row x [K]: the codes read as
    int32 words (KW a row), [TILE words, BLOCK_N rows] a tile whatever the groups: a tile spans several
    groups of a row (or a group several tiles), so that enough bytes are in flight. Words run down axis
    0: Triton then lays the scales' load (constant along a group) out as the words' (both fastest on
    axis 0); a [rows, words] tile would send the products through shared memory every step to meet
    the scales' layout.
    Decoding a code costs one integer instruction (the integer units run at half the float rate; a
    shift, a mask, a sign flip and an OR a code bounded the loop): one XOR a word flips every code's
    sign bit (q + 2^(BITS-1) >= 0), and code p sits in bits BITS*j.. of the word's low half (p = j)
    or of its high half shifted down once (p = j + PER/2); (half & mask) | EXP, one LOP3, then puts
    (q + 2^(BITS-1)) * 2^(BITS*j) into the low mantissa of the float 2^23. EXP (its bits, 0x4B000000)
    comes as an argument: as a literal the compiler splits the AND and the OR over two instructions,
    each holding one immediate. Subtracting 2^23 + 2^(BITS-1+BITS*j) leaves q * 2^(BITS*j) exactly,
    and x comes scaled by 2^-(BITS*j), so each product and the sum are bit for bit those of q * x."""
    PER: tl.constexpr = 32 // BITS                                          # codes a word
    HALF: tl.constexpr = PER // 2                                           # codes in 16 bits
    FLIP: tl.constexpr = (0x88888888 if BITS == 4 else 0x80808080) - (1 << 32)  # the sign bits, as int32
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                 # [BN]
    acc = tl.zeros((TILE, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, KW, TILE):
        c = w0 + tl.arange(0, TILE)                                         # [TILE] word columns
        mask = (c[:, None] < KW) & (rn[None, :] < N)                         # [TILE, BN]
        low = tl.load(words + rn[None, :] * KW + c[:, None], mask=mask, other=0) ^ FLIP
        high = low >> 16
        part = tl.zeros((TILE, BLOCK_N), dtype=tl.float32) if GROUP else acc  # per row: straight into acc
        for p in tl.static_range(PER):  # code p of each word; int4: input p ^ 1 (pack_int4)
            shift = BITS * (p % HALF)
            magic = 8388608.0 + (1 << (BITS - 1 + shift))                 # 2^23 + 2^(BITS-1+shift)
            half = low if p < HALF else high
            q = ((half & (((1 << BITS) - 1) << shift)) | EXP).to(tl.float32, bitcast=True) - magic
            xp = tl.load(x + c * PER + (p ^ SWAP), mask=c < KW, other=0.0).to(tl.float32) * (1.0 / (1 << shift))
            part += q * xp[:, None]
        if GROUP:  # word c lies in group c // (GROUP / PER) of its row: the scales gathered to the tile's
            # shape, in the words' layout (see above); a warp's lanes on one group read one address
            g = c // (GROUP // PER)                                         # [TILE] groups of the words
            s = tl.load(scales + rn[None, :] * (K // GROUP) + g[:, None], mask=mask, other=0)
            acc += part * s.to(tl.float32)
        else:
            acc = part
    y = tl.sum(acc, axis=0)                                                 # [BN]
    if not GROUP:
        y *= tl.load(scales + rn, mask=rn < N, other=0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias + rn, mask=rn < N, other=0).to(tl.float32)
    tl.store(out + rn, y.to(out.dtype.element_ty), mask=rn < N)


def gemv(x, codes, scale, bits, bias=None):
    """x [1, K] @ dequantize(codes, scale)^T (+ bias) -> [1, N] in x's dtype, or None where the codes
    cannot be read as int32 words (a row of codes not a multiple of 4 bytes) or a group does not hold
    whole words (not a power of two, or under a word: 4 int8 / 8 int4 codes)."""
    K, N, per = x.shape[1], codes.shape[0], 32 // bits
    group = K // scale.shape[1] if scale.dim() == 2 else 0
    if K % per or not codes.is_contiguous() or codes.storage_offset() % 4 or \
            (group and (group < per or group & (group - 1))):
        return None
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    words, rows, warps = GEMV_BLOCK
    _gemv_kernel[(triton.cdiv(N, rows),)](x if x.stride(1) == 1 else x.contiguous(), codes.view(torch.int32), scale,
                                          bias if bias is not None else scale, out, N, K, K // per, 0x4B000000, bits,
                                          group, int(bits == 4), bias is not None, words, rows, num_warps=warps)
    return out


@triton.jit
def _matmul_kernel(x, codes, scales, bias, out, M, N, K, stride_xm, stride_om, GROUP: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] q[n, k] s[n, k // GROUP] (+ bias[n]) for int8 codes q, float32 sums."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)              # [BM] rows of x
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)              # [BN] rows of the weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)                                                                   # [BM, BK]
        q = tl.load(codes + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        part = tl.dot(a, tl.trans(q.to(tl.float32).to(a.dtype)))                                 # [BM, BN]
        if GROUP:  # this K tile lies inside group k0 // GROUP of every row
            s = tl.load(scales + rn * (K // GROUP) + k0 // GROUP, mask=rn < N, other=0)
            acc += part * s.to(tl.float32)[None, :]
        else:
            acc += part
    if not GROUP:
        acc *= tl.load(scales + rn, mask=rn < N, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None] * stride_om + rn[None, :], acc.to(out.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(x, codes, scale, bias=None):
    """x [M, K] @ dequantize(int8 codes, scale)^T (+ bias) -> [M, N], or None for groups under 16
    inputs or not a power of two (a K tile must lie inside one group)."""
    (M, K), N = x.shape, codes.shape[0]
    group = K // scale.shape[1] if scale.dim() == 2 else 0
    if group and (group < 16 or group & (group - 1)):
        return None
    bn, bk, warps, stages = MATMUL_CONFIGS[min((m for m in MATMUL_CONFIGS if m >= M), default=max(MATMUL_CONFIGS))]
    bk, bm = min(bk, group or bk), min(64, max(16, triton.next_power_of_2(M)))
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _matmul_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
        x, codes, scale, bias if bias is not None else scale, out, M, N, K, x.stride(0), out.stride(0), group,
        bias is not None, bm, bn, bk, num_warps=warps, num_stages=stages)
    return out
