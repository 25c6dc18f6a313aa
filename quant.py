"""Weight-only int8 / int4 quantization of ChatGLM-6B's block linears: a frozen base for LoRA and RLHF.

    python quant.py quantize --bits 8 IN_DIR OUT_DIR                    # int8, one scale per output row
    python quant.py quantize --bits 4 IN_DIR OUT_DIR                    # int4, one scale per 128 inputs of a row
    python quant.py quantize --bits 4 --group_size 0 IN_DIR OUT_DIR     # int4 per row, as chatglm-6b-int4
    python quant.py quantize --bits 4 --head IN_DIR OUT_DIR             # lm_head in int8 too (per row)
    python train_sft.py --model BF16_DIR --quantize 4 --lora_rank 8 ... # or quantize while loading
    python quant.py convert RELEASE_DIR OUT_DIR                         # chatglm-6b-int4 / -int8 .bin -> safetensors

The four linears of every block (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) are stored
as int8 codes q and float16 scales s, w = q * s; the embedding, LayerNorms, biases and lm_head stay
in the model's dtype (--quantize_head / --head: lm_head too, int8 with one scale per row, 0.5 GB
instead of 1 GB at 6B). On disk, under the HF names the released chatglm-6b-int8 / -int4 use:
    <linear>.weight        int8 [out, in] (int8), or [out, in / 2] (int4: two codes a byte)
    <linear>.weight_scale  float16 [out] (one scale per row: absmax / 127 or absmax / 7),
                           or [out, in / group] (int4 per group, this project's own)
and config.json's "quantization_bit" (4 or 8) with "quantization_group_size" (0 or absent: per row),
and "quantization_head" (this project's own: lm_head.weight int8 [V, h], lm_head.weight_scale [V]).

A quantized linear is frozen: its forward dequantizes the weight to the compute dtype and runs one
matmul, its backward gives the input's gradient only (it dequantizes again rather than keeping a
float copy of the weight per micro-batch in flight). LoRA (lora.py) sits on top, in float. On CUDA,
quant_kernels.py (Triton) does both faster: a one-pass dequantization for many rows, and for few
rows (decoding) a matmul that reads the codes directly and never writes the float weight.
"""
import argparse
import json
import os
import re
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import flags
import glm

BLOCK_LINEAR = re.compile(r"transformer\.layers\.(\d+)\."
                          r"(attention\.query_key_value|attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)")
SCALE_KEY = re.compile(BLOCK_LINEAR.pattern + r"\.weight_scale")
DEFAULT_GROUP = {8: 0, 4: 128}  # --group_size -1 (auto): int8 one scale per row, int4 groups of 128
# bits 0: not quantized; group_size 0: one scale per row; head: lm_head in int8 (per row) too
Scheme = namedtuple("Scheme", "bits group_size head", defaults=(False,))
FLOAT = Scheme(0, 0)
HEAD = Scheme(8, 0)  # the scheme of a quantized lm_head
# On CUDA, x with at most this many rows (tokens) multiplies the codes directly (quant_kernels.linear:
# one row the GEMV, a few int8 rows the tensor-core kernel); more rows dequantize the weight once, then
# cuBLAS multiplies. Crossovers on an H200 at 6B shapes, us a block's four linears: int8 259 against
# 294 at 128 rows, 516 against 333 at 256; int4's tensor-core version (nibbles unpacked) lost at 16
# rows per row and 32 in groups, so it was dropped (docs/bench/h200_x1_quant_probe_2026-11-30.jsonl).
FUSED_ROWS = {8: 128, 4: 1}
USE_KERNELS = True  # False: the plain torch path on CUDA too (tests and benchmarks compare the two)


# -----------------------------------------------------------------------------
# codes and scales


def check_scheme(bits, group_size=-1, flag="--quantize"):
    """Scheme(bits, group size) of a request, -1 resolved; anything else than 0, 4 or 8 bits is an error."""
    if bits not in (0, 4, 8):
        raise ValueError(f"{flag} {bits}: expected 4 or 8 (bits per weight; 0: no quantization). HINT: int8 "
                         "halves the base's memory, int4 quarters it")
    if group_size < -1:
        raise ValueError(f"group size {group_size}: expected a positive number of inputs per scale, 0 (one scale "
                         "per row) or -1 (int8: per row, int4: 128)")
    if not bits:
        return FLOAT
    return Scheme(bits, DEFAULT_GROUP[bits] if group_size == -1 else group_size)


def pack_int4(q):
    """int8 codes in [-8, 7], [out, in] -> int8 [out, in / 2], two codes a byte.

    Nibble order of the chatglm-6b-int4 release: code 2j in the HIGH nibble, 2j+1 in the low one,
    both read back sign-extended. The release's quantization.py loads its kernels
    (int4WeightCompression, int4WeightExtractionHalf) compiled; their source, published by the same
    lab in THUDM/GLM-130B (cuda/quantization.cu), packs (q[2j] << 4) | (q[2j+1] & 0xF) and extracts
    byte >> 4 as element 2j, (byte << 4) >> 4 as element 2j+1."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)


def unpack_int4(packed):
    """int8 [out, in / 2] -> int8 codes [out, in] in [-8, 7] (see pack_int4 for the order)."""
    high = packed >> 4          # arithmetic shift on int8: sign-extends
    low = (packed << 4) >> 4    # the low nibble moved up (wrapping) and back down, sign-extended
    return torch.stack([high, low], dim=-1).flatten(-2)  # [out, in/2, 2] -> [out, in]


def quantize(w, bits, group_size=0, name="weight"):
    """w [out, in] -> (codes int8 [out, in * bits / 8], scales float16 [out] or [out, in / group_size]).

    Symmetric, round to nearest: s = absmax / (2^(bits-1) - 1) over a row (or a group of it), as the
    release computes it, q = round(w / s) in [-127, 127] or [-7, 7]."""
    bits, group_size, _ = check_scheme(bits, group_size)
    out, n = w.shape
    g = group_size or n
    if bits == 4 and n % 2:
        raise ValueError(f"{name}: int4 packs two inputs a byte, but its input width {n} is odd. "
                         "HINT: use --quantize 8")
    if n % g:
        raise ValueError(f"{name}: group size {group_size} does not divide its input width {n}. HINT: pick a "
                         f"--quant_group_size that divides {n} (e.g. {_divisor(n, g)}), or 0 for one scale per row")
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().float().view(out, n // g, g)  # [out, G, g]
    scale = (groups.abs().amax(dim=-1) / qmax).half()  # [out, G], stored as the release stores it
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name}: a weight's magnitude overflows a float16 scale (or is NaN/Inf). HINT: the "
                         "weights are corrupt; use the release's")
    s = torch.where(scale == 0, 1.0, scale.float())  # an all-zero group keeps codes 0
    q = torch.round(groups / s[..., None]).clamp(-qmax, qmax).to(torch.int8).view(out, n)
    return (pack_int4(q) if bits == 4 else q), (scale[:, 0] if g == n else scale)


def _divisor(n, g):
    """The largest power of two <= g that divides n (a group size to suggest)."""
    d = 1
    while d * 2 <= g and n % (d * 2) == 0:
        d *= 2
    return d


def dequantize(codes, scale, bits, dtype=torch.float32):
    """(codes, scales) -> weight [out, in] in dtype: w = q * s, each scale over its row or group."""
    kernels = _kernels(codes, dtype)
    if kernels:  # one Triton pass, bit for bit the ops below
        return kernels.dequantize(codes, scale, bits, dtype)
    q = unpack_int4(codes) if bits == 4 else codes  # [out, in]
    out, n = q.shape
    G = scale.shape[1] if scale.dim() == 2 else 1
    # int8 x float is one kernel (type promotion), formed in float16 for half-precision models (the
    # codes and the float16 scale exact, one rounding), else in the compute dtype itself
    prod = torch.float16 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = q.view(out, G, n // G) * scale.view(out, G, 1).to(prod)  # [out, G, g]
    return w.view(out, n).to(dtype)


def _kernels(codes, dtype):
    """The Triton kernels for CUDA codes and a half-precision compute dtype, else None (torch ops)."""
    if not (USE_KERNELS and codes.is_cuda and dtype in (torch.float16, torch.bfloat16)):
        return None
    return glm.triton_module("quant_kernels")


# -----------------------------------------------------------------------------
# the frozen quantized linear


class _FrozenMatmul(torch.autograd.Function):
    """x @ dequantize(codes)^T + bias. Backward gives x's gradient only (codes, scales and bias are
    frozen) and dequantizes again: saving the float weight would keep one copy of every layer's
    weight per micro-batch in flight, the memory quantization is there to save."""

    @staticmethod
    def forward(ctx, x, codes, scale, bits, bias):
        ctx.save_for_backward(codes, scale)
        ctx.bits = bits
        bias = None if bias is None else bias.to(x.dtype)
        kernels = _kernels(codes, x.dtype)
        rows = x.numel() // x.shape[-1]
        if kernels and 0 < rows <= FUSED_ROWS[bits]:  # decoding: read the codes, never write the float weight
            y = kernels.linear(x.reshape(rows, x.shape[-1]), codes, scale, bits, bias)
            if y is not None:
                return y.view(*x.shape[:-1], codes.shape[0])
        return F.linear(x, dequantize(codes, scale, bits, x.dtype), bias)  # [.., in] -> [.., out]

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale = ctx.saved_tensors
        return grad_out @ dequantize(codes, scale, ctx.bits, grad_out.dtype), None, None, None, None  # [.., in]


class QuantLinear(nn.Module):
    """A frozen linear y = x W^T + b with W stored as int8 / int4 codes and float16 scales.

    Buffers `weight` and `weight_scale` carry the release's HF names, so checkpoints load strictly;
    `bias` stays a (frozen) float parameter. The plain path dequantizes the whole weight each call
    and then multiplies: simple and exact. On CUDA the Triton kernels take over (_FrozenMatmul)."""

    def __init__(self, in_features, out_features, bits, group_size=0, bias=True, device=None, dtype=None):
        super().__init__()
        bits, group_size, _ = check_scheme(bits, group_size)
        g = group_size or in_features
        if not bits or in_features % g or (bits == 4 and in_features % 2):
            raise ValueError(f"QuantLinear({in_features}, {out_features}): bits {bits} / group size {group_size} "
                             "do not fit; see quant.quantize")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.compute_dtype = dtype or torch.get_default_dtype()  # LoRA factors and biases: float
        self.register_buffer("weight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.int8,
                                                   device=device))
        scale_shape = (out_features, in_features // g) if group_size else (out_features,)
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.compute_dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, bits, group_size=0, name="weight"):
        """The quantized copy of an nn.Linear (on its device; its float weight can then be freed)."""
        codes, scale = quantize(linear.weight, bits, group_size, name)
        q = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                device="meta", dtype=linear.weight.dtype)
        q.weight, q.weight_scale = codes, scale  # the meta buffers replaced by the real ones
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return q

    def dequantized(self, dtype=None):
        """The float weight [out, in] these codes stand for."""
        return dequantize(self.weight, self.weight_scale, self.bits, dtype or self.compute_dtype)

    def forward(self, x):
        return _FrozenMatmul.apply(x, self.weight, self.weight_scale, self.bits, self.bias)

    def extra_repr(self):
        per = f"groups of {self.group_size}" if self.group_size else "per row"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} {per}"


# -----------------------------------------------------------------------------
# swapping modules in a built model (as lora.py converts layers in place)


def _swap(model, path, new):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def quantize_model(model, bits, group_size=-1, prefix=""):
    """Replace every block linear nn.Linear of `model` (a model, stage or block whose names start
    after `prefix`) by its QuantLinear; the float weights are dropped as each one is done."""
    bits, group_size, _ = check_scheme(bits, group_size)
    if not bits:
        return model
    for path, m in list(model.named_modules()):
        if type(m) is nn.Linear and BLOCK_LINEAR.fullmatch(prefix + path):
            _swap(model, path, QuantLinear.from_linear(m, bits, group_size, name=prefix + path + ".weight"))
    return model


def dequantize_model(model, dtype):
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight in dtype."""
    for path, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.dequantized(dtype), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
            _swap(model, path, lin)
    return model


def quantize_head(model):
    """lm_head (if this model or stage holds a float one) -> an int8 QuantLinear, one scale per row."""
    if type(getattr(model, "lm_head", None)) is nn.Linear:
        model.lm_head = QuantLinear.from_linear(model.lm_head, *HEAD[:2], name="lm_head.weight")
    return model


def quantize_as(model, scheme):
    """A float model (or stage) quantized in place as `scheme` says: its block linears, and lm_head
    with scheme.head. FLOAT leaves it as it is."""
    if scheme.bits:
        quantize_model(model, scheme.bits, scheme.group_size)
        if scheme.head:
            quantize_head(model)
    return model


def is_quantized(model):
    return any(isinstance(m, QuantLinear) for m in model.modules())


# -----------------------------------------------------------------------------
# loading: a quantized checkpoint as it is, or a float one quantized block by block


def stored_scheme(model_dir):
    """Scheme of the checkpoint in model_dir, from its config.json (FLOAT if it has none)."""
    path = os.path.join(glm.check_model_dir(model_dir), "config.json")
    raw = glm.read_json(path, "HINT: restore the release's config.json.") if os.path.isfile(path) else {}
    bits, group = raw.get("quantization_bit") or 0, raw.get("quantization_group_size") or 0
    if type(bits) is not int or type(group) is not int:
        raise ValueError(f"{path}: quantization_bit {bits!r} / quantization_group_size {group!r} must be whole numbers")
    if raw.get("quantization_embeddings"):
        raise ValueError(f"{path}: quantization_embeddings is true (a release whose embedding is quantized too); "
                         "only quantized block linears are supported. HINT: use chatglm-6b-int4 or -int8")
    return check_scheme(bits, group, flag=f"{path}: quantization_bit")._replace(
        head=bool(bits and raw.get("quantization_head")))


def scheme(model_dir, bits=0, group_size=-1, mode="lora", head=False):
    """The scheme a run uses: --quantize / --quant_group_size on a float checkpoint, or the stored
    one of a quantized checkpoint (whose flags must agree); --quantize_head (head) puts lm_head in
    int8 too, as stored or while loading. A quantized base only carries adapters: training it in
    full or last-N mode is refused."""
    asked, stored = check_scheme(bits, group_size), stored_scheme(model_dir)
    if head and not (bits or stored.bits):
        raise ValueError(f"--quantize_head without --quantize: {model_dir} stays float. HINT: add --quantize 8 "
                         "(or 4): the int8 head comes with a quantized base")
    if not bits and group_size > 0 and not stored.bits:
        raise ValueError(f"--quant_group_size {group_size} without --quantize: {model_dir} stays float. HINT: add "
                         "--quantize 4 (or 8), or drop --quant_group_size")
    if stored.bits and ((bits and bits != stored.bits) or group_size not in (-1, stored.group_size)):
        raise ValueError(f"{model_dir} is already quantized (int{stored.bits}, group size {stored.group_size}); "
                         f"--quantize {bits} --quant_group_size {group_size} asks for another scheme. HINT: drop "
                         "--quantize to use it as it is, or quantize the float checkpoint")
    use = (stored if stored.bits else asked)._replace(head=bool(head or stored.head))
    if use.bits and mode != "lora":
        raise ValueError(f"an int{use.bits} base is frozen: {mode.replace('_n', '-N')} training would change its "
                         "weights. HINT: train LoRA adapters on it (--lora_rank 8), or drop --quantize and train "
                         "the float model")
    return use


def from_pretrained(model_dir, dtype=torch.float32, device="cpu", bits=0, group_size=-1, head=False,
                    layer_ids=None, first=True, last=True):
    """glm.ChatGLM.from_pretrained, with the block linears quantized: read as stored from a
    quantized checkpoint, or quantized as each block is read from a float one (so at most one
    block's float weights exist beside the codes); head: lm_head in int8 too. bits 0 on a float
    checkpoint: the float model."""
    use = scheme(model_dir, bits, group_size, head=head)
    kwargs = dict(layer_ids=layer_ids, first=first, last=last)
    if not use.bits:
        return glm.ChatGLM.from_pretrained(model_dir, dtype=dtype, device=device, **kwargs)
    cfg = glm.GLMConfig.from_json(os.path.join(model_dir, "config.json"))
    if os.path.isfile(os.path.join(model_dir, "ice_text.model")):
        glm.check_tokenizer(glm.Tokenizer(os.path.join(model_dir, "ice_text.model")), cfg, model_dir)
    with torch.device("meta"):
        model = glm.ChatGLM(cfg, **kwargs)
    stored = stored_scheme(model_dir)
    if stored.bits:
        _load_quantized(model, model_dir, stored, dtype, device)
    else:
        _load_quantizing(model, model_dir, use, dtype, device)
    if use.head:  # a float head read from either kind of checkpoint (a stored int8 head is one already)
        quantize_head(model)
    model.name_or_path = str(model_dir)
    return model.to(device)


def _load_quantizing(model, model_dir, use, dtype, device):
    """Fill a meta model from a float checkpoint: the rest first, then each block read and quantized."""
    shapes = glm.expected_shapes(model)
    rest = {k: s for k, s in shapes.items() if not glm.LAYER_KEY.fullmatch(k)}
    state = glm.read_safetensors(model_dir, rest, device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    for i, block in model.transformer.layers.items():
        prefix = f"transformer.layers.{i}."
        state = glm.read_safetensors(model_dir, {k: s for k, s in shapes.items() if k.startswith(prefix)}, device)
        block.load_state_dict({k[len(prefix):]: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        quantize_model(block, use.bits, use.group_size, prefix=prefix)


def known_key(key, num_layers):
    """glm.is_model_key, plus the scale of each block linear and of an int8 head: True to read, False
    to drop, else an error."""
    m = SCALE_KEY.fullmatch(key)
    return (m is not None and int(m.group(1)) < num_layers) or key == "lm_head.weight_scale" or \
        glm.is_model_key(key, num_layers)


def quantized_shapes(model, use, dtype):
    """Swap a meta model's block linears (and lm_head if use.head) for meta QuantLinears; {key: shape}
    of its checkpoint."""
    for path, m in list(model.named_modules()):
        quantized = HEAD if use.head and path == "lm_head" else use if BLOCK_LINEAR.fullmatch(path) else FLOAT
        if type(m) is nn.Linear and quantized.bits:
            _swap(model, path, QuantLinear(m.in_features, m.out_features, quantized.bits, quantized.group_size,
                                           bias=m.bias is not None, device="meta", dtype=dtype))
    return {k: tuple(v.shape) for k, v in glm.base_state_dict(model).items()}


def _load_quantized(model, model_dir, use, dtype, device):
    """Fill a meta model from a quantized checkpoint (stored scheme `use`): codes int8 as stored,
    scales float16, the rest in dtype."""
    shapes = quantized_shapes(model, use, dtype)
    codes = {p + ".weight" for p, m in model.named_modules() if isinstance(m, QuantLinear)}

    def read(f, path, key):
        if key not in codes:
            return glm.checked_tensor(f, path, key)  # floats (scales included): finite, or an error
        t = f.get_tensor(key)
        if t.dtype != torch.int8:
            raise ValueError(f"{path}: tensor '{key}' has dtype {t.dtype}, but config.json's quantization_bit "
                             f"{use.bits} means int8 codes. HINT: config.json does not match the weights")
        return t

    state = glm.read_safetensors(model_dir, shapes, device, known=known_key, read=read)
    for k, v in state.items():  # codes as they are, scales float16 (as the release stores them), the rest dtype
        state[k] = v if k in codes else v.half() if k.endswith(".weight_scale") else v.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)


def convert(src, dst):
    """The released chatglm-6b-int8 / -int4 (pytorch_model*.bin) -> this project's safetensors layout."""
    use = stored_scheme(src)
    if not use.bits:
        raise ValueError(f"{src}: config.json has no quantization_bit. HINT: a float release converts with "
                         "`python glm.py convert`")
    _, cfg = glm.release_config(src)
    with torch.device("meta"):
        shapes = quantized_shapes(glm.ChatGLM(cfg), use, torch.float16)
    glm.convert(src, dst, shapes, known_key)


def save_quantized(model, out_dir, tokenizer=None, max_shard_bytes=2 << 30):
    """config.json (with the scheme) + sharded model-*.safetensors + index (+ ice_text.model), atomically."""
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))

    def write(tmp):
        config = model.config.to_json(str(q.compute_dtype).removeprefix("torch."))
        config.update(quantization_bit=q.bits, quantization_group_size=q.group_size)
        if isinstance(getattr(model, "lm_head", None), QuantLinear):
            config.update(quantization_head=True)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        glm.write_safetensors_shards(glm.base_state_dict(model), tmp, max_shard_bytes)
        if tokenizer is not None:
            glm.copy_tokenizer(tokenizer.path, tmp)
    glm.atomic_dir(out_dir, write)


def weight_dtype(model_dir):
    """The dtype a float checkpoint stores its embedding in (the quantized copy keeps it for the rest)."""
    key = "transformer.word_embeddings.weight"
    with glm.open_safetensors(glm.safetensors_files(model_dir)[key]) as f:
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(f.get_slice(key).get_dtype(), torch.float32)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("quantize", help="a float checkpoint -> an int8 / int4 one (block linears only)")
    c.add_argument("--bits", type=int, required=True, help="8 or 4")
    c.add_argument("--group_size", type=int, default=-1,
                   help="inputs per scale; 0: one per row; -1 (default): int8 per row, int4 128")
    c.add_argument("--head", "--quantize_head", action="store_true", help="lm_head in int8 too (one scale per row)")
    c.add_argument("src", help="float model folder (config.json, model*.safetensors, ice_text.model)")
    c.add_argument("dst", help="the folder to write (written whole, or not at all)")
    v = sub.add_parser("convert", help="the released chatglm-6b-int8 / -int4 (.bin) -> safetensors")
    v.add_argument("src", help="the release folder: config.json (quantization_bit), pytorch_model*.bin, ice_text.model")
    v.add_argument("dst", help="the folder to write (written whole, or not at all)")
    args = p.parse_args(argv)
    if args.cmd == "convert":
        convert(args.src, args.dst)
        return print(f"wrote {args.dst}")
    use = check_scheme(args.bits, args.group_size, flag="--bits")
    if not use.bits:
        raise ValueError("--bits 0: expected 4 or 8")
    if stored_scheme(args.src).bits:
        raise ValueError(f"{args.src} is already quantized. HINT: quantize the float checkpoint")
    model = from_pretrained(args.src, dtype=weight_dtype(args.src), bits=use.bits, group_size=use.group_size,
                            head=args.head)
    tok = os.path.join(args.src, "ice_text.model")
    save_quantized(model, args.dst, glm.Tokenizer(tok) if os.path.isfile(tok) else None)
    per = f"groups of {use.group_size}" if use.group_size else "one scale per row"
    print(f"wrote {args.dst} (int{use.bits}, {per}" + (", lm_head int8)" if args.head else ")"))


if __name__ == "__main__":
    flags.run(main)
