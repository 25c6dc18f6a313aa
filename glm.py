"""The ChatGLM-6B (v1) model: config, tokenizer, network, reward head, generation, checkpoint files.

    python glm.py convert SRC_DIR DST_DIR     # official pytorch_model-*.bin release -> safetensors
    python glm.py chat --model DIR            # interactive multi-turn chat, streamed (infer.py, as are:)
    python glm.py predict --model DIR --data in.jsonl --out out.jsonl
    python glm.py serve --model DIR --port 8000
    python glm.py quantize --bits 8|4 IN_DIR OUT_DIR   # int8 / int4 block linears (quant.py; convert takes the
                                                       # released chatglm-6b-int8 / -int4 there too)

Shape vocabulary in comments: B batch, T query length, S key length, C hidden size,
nh heads, hs head size, V vocabulary.

On CUDA, a few steps run as Triton kernels (glm_kernels.py) where they fit: the rotary and its
gradient, and for decoding LayerNorm, attention and single-row linears. The torch ops beside them
are the reference (CPU, and glm.FUSED = False).
"""
import argparse
import functools
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# config


@dataclass
class GLMConfig:
    hidden_size: int = 4096            # config.json: hidden_size
    inner_hidden_size: int = 16384     # inner_hidden_size (MLP width)
    num_attention_heads: int = 32      # num_attention_heads
    num_layers: int = 28               # num_layers
    vocab_size: int = 130528           # vocab_size
    layernorm_epsilon: float = 1e-5    # layernorm_epsilon
    max_sequence_length: int = 2048    # max_sequence_length
    bos_token_id: int = 130004         # <sop>
    eos_token_id: int = 130005         # <eop>
    mask_token_id: int = 130000        # [MASK]
    gmask_token_id: int = 130001       # [gMASK]
    pad_token_id: int = 3              # <pad>

    def __post_init__(self):
        for fd in fields(self):  # types and ranges first: config.json is read as it is written
            v, is_id = getattr(self, fd.name), fd.name.endswith("_id")
            ok = type(v) is int or (fd.type is float and type(v) is float and math.isfinite(v))  # no bools
            if not ok or not (0 <= v < self.vocab_size if is_id else v > 0):
                kind = "a whole number" if fd.type is int else "a finite number"
                rule = f"in [0, vocab_size {self.vocab_size})" if is_id else "> 0"
                raise ValueError(f"{fd.name} is {v!r}; it must be {kind} {rule}. HINT: ChatGLM-6B's "
                                 f"config.json has \"{fd.name}\": {fd.default}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 4:
            raise ValueError(f"head size {self.head_dim} must be divisible by 4 for 2-D rotary "
                             "(two halves, each rotated half against half)")
        self.rotary_dim = self.head_dim // 2  # each of the two position channels rotates half a head

    @classmethod
    def toy(cls):
        """A 2-layer model with the golden fixture's shapes and token ids, for tests and demos."""
        return cls(hidden_size=64, inner_hidden_size=256, num_attention_heads=4, num_layers=2,
                   vocab_size=1200, bos_token_id=8, eos_token_id=9, mask_token_id=4,
                   gmask_token_id=5, pad_token_id=3)

    @classmethod
    def from_json(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file. HINT: a model folder needs the "
                                    "config.json of the HF release next to its weights.")
        return cls.from_dict(read_json(path, "HINT: restore the release's config.json."), path)

    @classmethod
    def from_dict(cls, raw, path):
        """The config of config.json's contents `raw`; errors name `path`."""
        if raw.get("position_encoding_2d", True) is not True:
            raise ValueError(f"{path}: position_encoding_2d is false; only ChatGLM-6B v1 "
                             "(2-D rotary positions) is supported")
        kwargs = {}
        for fd in fields(cls):
            if fd.name not in raw:
                raise KeyError(f"{path}: field '{fd.name}' is missing. HINT: use the "
                               "config.json of the ChatGLM-6B release (or `glm.py convert`).")
            kwargs[fd.name] = raw[fd.name]
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, torch_dtype="float32"):
        """config.json: these fields plus what the release's own loading code (configuration_chatglm.py
        and modeling_chatglm.py placed beside the weights, with trust_remote_code) expects. Without
        tie_word_embeddings false, transformers ties lm_head to the embedding and the logits go wrong."""
        d = {fd.name: getattr(self, fd.name) for fd in fields(self)}
        d.update(model_type="chatglm", architectures=["ChatGLMModel"], position_encoding_2d=True,
                 auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                           "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                           "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
                 torch_dtype=torch_dtype, tie_word_embeddings=False, use_cache=True, pre_seq_len=None,
                 prefix_projection=False, quantization_bit=0)
        return d


# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """ChatGLM's sentencepiece tokenizer: `\\n`, tab and runs of spaces become pieces of their own."""

    SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>")
    MAX_BLANK = 80

    def __init__(self, path):
        import sentencepiece as spm
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no tokenizer file. HINT: copy ice_text.model from "
                                    "the ChatGLM-6B release into the model folder.")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e}). HINT: use the release's "
                             "ice_text.model.") from None
        self.special = {}
        for name in self.SPECIAL:
            i = self.sp.piece_to_id(name)
            if self.sp.id_to_piece(i) != name:
                raise ValueError(f"{path}: the model has no '{name}' piece; it is not a ChatGLM tokenizer")
            self.special[name] = i
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def from_dir(cls, model_dir):
        """The model folder's ice_text.model, checked against its config.json when it has one."""
        tok = cls(os.path.join(check_model_dir(model_dir), "ice_text.model"))
        if os.path.isfile(os.path.join(model_dir, "config.json")):
            check_tokenizer(tok, GLMConfig.from_json(os.path.join(model_dir, "config.json")), model_dir)
        return tok

    mask_id = property(lambda self: self.special["[MASK]"])
    gmask_id = property(lambda self: self.special["[gMASK]"])
    sop_id = property(lambda self: self.special["<sop>"])
    eop_id = property(lambda self: self.special["<eop>"])
    pad_id = property(lambda self: self.special["<pad>"])
    bos_id = sop_id
    eos_id = eop_id

    def _to_pieces_text(self, text):
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(self.MAX_BLANK, 1, -1):  # longest run first, so 5 spaces never become 2+3
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    def encode_text(self, text):
        """Token ids of `text` alone. Typed special strings ([gMASK], <sop> ...) map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        # The reference tokenizer, built directly (transformers 4.33), has no no-split tokens, so the
        # whole text goes to sentencepiece: [MASK] <sop> <eop> [gMASK] are user-defined pieces, matched
        # whole and keeping the "▁" before them; <pad>/<unk> are control/unknown pieces, so stay text.
        return self.sp.encode(self._to_pieces_text(text))

    def encode(self, text):
        """A prompt: its ids, then [gMASK] <sop>, where generation starts."""
        return self.encode_text(text) + [self.gmask_id, self.sop_id]

    def encode_pair(self, prompt, answer):
        """A training pair: prompt [gMASK] <sop> answer <eop>."""
        return self.encode(prompt) + self.encode_text(answer) + [self.eop_id]

    def decode(self, ids, skip_special_tokens=False):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {self.vocab_size}")
        if skip_special_tokens:
            drop = set(self.special.values())
            ids = [i for i in ids if i not in drop]
        text = self.sp.decode(ids)  # user-defined pieces such as [gMASK] decode as literal text
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, self.MAX_BLANK + 1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text


CONFIG_SPECIAL = {"bos_token_id": "<sop>", "eos_token_id": "<eop>", "mask_token_id": "[MASK]",
                  "gmask_token_id": "[gMASK]", "pad_token_id": "<pad>"}  # config.json field -> piece


def check_model_dir(model_dir):
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such model folder. HINT: pass the folder that "
                                "holds config.json and model*.safetensors (see `glm.py convert`).")
    return model_dir


def check_tokenizer(tok, cfg, model_dir):
    """Refuse a tokenizer that does not fit the model's config.json: ids past its embedding rows
    (an IndexError deep inside the model otherwise), or special ids that differ."""
    config, hint = os.path.join(model_dir, "config.json"), "HINT: use the tokenizer and config.json of one release."
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tok.path} has {tok.vocab_size} pieces but {config} has vocab_size {cfg.vocab_size}, "
                         f"so some ids have no embedding row. {hint}")
    for field, piece in CONFIG_SPECIAL.items():
        if getattr(cfg, field) != tok.special[piece]:
            raise ValueError(f"{config}: {field} is {getattr(cfg, field)}, but {tok.path} has "
                             f"'{piece}' at id {tok.special[piece]}. {hint}")


def chat_prompt(query, history=()):
    """ChatGLM's chat template: the bare query, or numbered rounds of 问/答 when there is history."""
    if not history:
        return query
    prompt = ""
    for i, (q, a) in enumerate(history):
        prompt += f"[Round {i}]\n问：{q}\n答：{a}\n"
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def left_pad(seqs, pad_id):
    """List of id lists -> LongTensor [B, T], padded on the left as the reference tokenizer does."""
    T = max(len(s) for s in seqs)
    return torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long)


# -----------------------------------------------------------------------------
# positions, prefix-LM mask, rotary


@dataclass
class Layout:
    """Where each row's context, mask token and padding are; derived once from the ids."""
    position_ids: torch.Tensor  # [B, 2, T] long: (position, block position)
    attend: torch.Tensor        # [B, 1, T, T] bool, True = may attend (PyTorch's convention)
    key_valid: torch.Tensor     # [B, T] bool, False on left padding
    ctx: torch.Tensor           # [B] index of the first <sop> (T when there is none)
    mask_pos: torch.Tensor      # [B] position id that every token from <sop> on keeps


def first_index(hit, default):
    """Index of the first True per row of hit [B, T], or `default` where a row has none."""
    T = hit.shape[1]
    idx = torch.where(hit, torch.arange(T, device=hit.device), T).min(dim=1).values  # [B]
    return torch.where(hit.any(dim=1), idx, default)


def derive_layout(input_ids, cfg):
    """ChatGLM's positions and prefix-LM mask for left-padded ids [B, T]."""
    B, T = input_ids.shape
    t = torch.arange(T, device=input_ids.device)  # [T]
    is_pad = torch.cumprod(input_ids == cfg.pad_token_id, dim=1).bool()  # leading pads only
    n_pad = is_pad.sum(dim=1)  # [B]
    ctx = first_index(input_ids == cfg.bos_token_id, torch.full_like(n_pad, T))  # [B]
    # the mask token is the first [gMASK], else the first [MASK]; else the token before <sop>
    mask_idx = first_index(input_ids == cfg.mask_token_id, ctx - 1)
    mask_idx = first_index(input_ids == cfg.gmask_token_id, mask_idx)
    # position: counts over the context, then stays at the mask token; pads sit at 0
    pos = torch.where(t < ctx[:, None], t - n_pad[:, None], (mask_idx - n_pad)[:, None])  # [B, T]
    block = torch.where(t >= ctx[:, None], t - ctx[:, None] + 1, 0)  # [B, T]: 0 ... 0 1 2 3 ...
    position_ids = torch.stack([pos, block], dim=1).masked_fill(is_pad[:, None, :], 0)  # [B, 2, T]
    # query i sees key j if j is context or j <= i (causal from <sop> on), and j is not padding
    sees = (t[None, :] < ctx[:, None, None]) | (t[None, :] <= t[:, None])  # [B, T, T]
    attend = sees & ~is_pad[:, None, :]
    attend = attend | torch.eye(T, dtype=torch.bool, device=input_ids.device)  # pad rows see themselves, never NaN
    return Layout(position_ids, attend[:, None], ~is_pad, ctx, mask_idx - n_pad)


def repeat_rows(layout, n):
    """The layout with each row repeated n times in place (row i -> rows i*n .. i*n + n-1): the n
    completions of one prompt."""
    return Layout(*(getattr(layout, f.name).repeat_interleave(n, 0) for f in fields(layout)))


def rotary_inv_freq(rotary_dim, device):
    """1 / 10000^(2i/d), rounded through float16 as the released model computes it."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    return inv_freq.half().float()  # [rotary_dim / 2]


def rotary_tables(position_ids, rotary_dim):
    """cos, sin [B, T, 1, 1, 2 * rotary_dim] from float32 angles, computed once per forward for all blocks.

    The last axis spans a whole head: its first half rotates by `position`, its second half by
    `block position`. rotate-half's minus sign is folded into sin (see apply_rotary_2d)."""
    B, _, T = position_ids.shape
    inv_freq = rotary_inv_freq(rotary_dim, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # [B, 2, T, rd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, 2, T, rd]
    sign = torch.ones(rotary_dim, device=position_ids.device)
    sign[: rotary_dim // 2] = -1.0  # rotate_half(x) = [-x2, x1]
    cos, sin = angles.cos(), angles.sin() * sign
    # [B, 2, T, rd] -> [B, T, 1, 1, 2rd]: broadcast over heads and over the q/k pair
    return tuple(t.transpose(1, 2).reshape(B, T, 1, 1, 2 * rotary_dim) for t in (cos, sin))


def apply_rotary_2d(x, cos, sin):
    """GPT-NeoX rotary on each half of the head, x [..., hs]: x*cos + rotate_half(x)*sin per half.

    Computed in x's dtype, as the released model does in half precision: the angles were formed
    in float32, only the rotation runs in bf16 on GPUs (float32 copies of q and k would be kept
    for backward and add ~12 s*b*h bytes of activations per block)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rd = x.shape[-1] // 2
    # rotate_half within each half: swap its two quarters; the minus sign lives in `sin`
    swapped = x.unflatten(-1, (2, 2, rd // 2)).flip(-2).flatten(-3)
    return torch.addcmul(x * cos, swapped, sin)


def rotary_heads(qkv, rope, cache=None, pos=None):
    """The fused QKV output [B, T, nh, 3, hs] -> q, k, v [B, nh, T, hs] with q and k rotated; with a
    cache, k and v are first written into it at pos and the cache's window [B, nh, S, hs] returned."""
    kernels = kernels_for(qkv) if rope[0].shape[:2] == qkv.shape[:2] else None  # tables per row, not broadcast
    if kernels and cache is None:  # one pass forward, one backward, instead of ~10 elementwise ops
        return kernels.RotaryHeads.apply(qkv, *rope)
    if kernels:
        q = kernels.rotary_into_cache(qkv, *rope, cache.k, cache.v, pos[0])
        return q, cache.k[:, :pos[1]].transpose(1, 2), cache.v[:, :pos[1]].transpose(1, 2)
    qk = apply_rotary_2d(qkv[:, :, :, :2], *rope)  # q and k rotated together: [B, T, nh, 2, hs]
    q, k, v = qk[:, :, :, 0], qk[:, :, :, 1], qkv[:, :, :, 2]  # [B, T, nh, hs]
    if cache is not None:
        k, v = cache.update(pos, k, v)  # [B, S, nh, hs]: S = the window's end
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


# -----------------------------------------------------------------------------
# fused kernels (CUDA)


FUSED = True  # False: the plain torch ops on CUDA too (tests and benchmarks compare the two)


@functools.cache
def triton_module(name):
    """The Triton kernel module `name` (glm_kernels, quant_kernels), or None where Triton cannot be
    imported: the CPU build of torch ships without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def kernels_for(x, heads=True):
    """glm_kernels for x on the current CUDA device (Triton launches there), else None (torch ops);
    heads: x [..., hs] must have a power-of-two head size (the kernels' tiles)."""
    hs = x.shape[-1]
    if not (FUSED and x.is_cuda and x.device.index == torch.cuda.current_device()
            and (not heads or hs & (hs - 1) == 0)):
        return None
    return triton_module("glm_kernels")


def linear(layer, x):
    """layer(x); a plain nn.Linear goes through `project` (LoRA and quantized layers have their own)."""
    return project(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


def project(x, weight, bias=None):
    """F.linear(x, weight, bias); a decode step's single row (no autograd, CUDA) takes the Triton GEMV."""
    one_row = x.numel() == x.shape[-1] and not torch.is_grad_enabled() and weight.is_contiguous()
    kernels = kernels_for(x, heads=False) if one_row else None
    return kernels.gemv(x, weight, bias) if kernels else F.linear(x, weight, bias)


def layer_norm(ln, a, b=None, alpha=1.0, decoding=False):
    """ln(a + alpha * b), or ln(a); one kernel when decoding (torch's takes ~8 us for one row). Other
    forwards keep torch's: PPO's old and new log-probs, with and without autograd, agree bit for bit."""
    kernels = kernels_for(a, heads=False) if decoding and not torch.is_grad_enabled() else None
    if kernels:
        return kernels.layer_norm(ln, a, b, alpha)
    return ln(a if b is None else torch.add(a, b, alpha=alpha))


def attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hs) + mask) v for q [B, nh, T, hs], k and v [B, nh, S, hs] and the
    additive mask [B, 1, T, S] (or a BlockMask) -> [B, nh, T, hs]."""
    if isinstance(mask, BlockMask):
        return flex(q, k, v, mask)
    kernels = kernels_for(q) if q.shape[2] == 1 and not torch.is_grad_enabled() else None
    if kernels:  # a decode step: one query a row
        return kernels.decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# -----------------------------------------------------------------------------
# the model


# Attention kernel of full-sequence forwards (training, scoring; no KV cache): "dense" (SDPA with
# the additive mask) or "flex" (FlexAttention, which skips the 128 x 128 tiles the mask rules out;
# forward only on the CPU). Decoding with a KV cache always runs dense. Dense is the default because
# it measured faster (H200, torch 2.11, 2026-11-30): SDPA's kernel computes the masked tiles too, but
# at these lengths attention is ~10% of a step and flex's per-call cost (building the BlockMask,
# ~4 ms a forward; the compiled call) outweighs the skipped tiles: LoRA DPO on shared-prompt groups
# 50.4 vs 51.5 answers/s, LoRA SFT on packed 3 x 1024 rows 6.7k vs 17.4k tokens/s.
ATTENTION = "dense"
_compiled_flex = None  # flex_attention compiled on first use: uncompiled, it is a slow reference


def block_mask(attend):
    """attend [B, 1, T, S] bool (True = may attend) as a FlexAttention BlockMask: 128 x 128 tiles with
    no True are skipped, tiles all True run unmasked, only the rest read attend."""
    a = attend[:, 0]  # [B, T, S]: the same mask for every head
    B, T, S = a.shape
    return create_block_mask(lambda b, h, q, kv: a[b, q, kv], B, None, T, S, device=attend.device)


def flex(q, k, v, mask):
    """FlexAttention of q, k, v [B, nh, T, hs] under a BlockMask, compiled once on CUDA."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask)
    if _compiled_flex is None:
        # dynamic: one kernel for every batch size and length (batches vary; past 8 recompiles
        # dynamo would fall back to the uncompiled form)
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(q, k, v, block_mask=mask)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.hs, self.rd = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, rope, mask, cache=None, pos=None):
        """mask: the additive float mask [B, 1, T, S] (0 or -inf), or a BlockMask (no cache)."""
        B, T, C = x.shape
        # fused QKV is interleaved per head: [q_h k_h v_h] for each head h, not [Q K V]
        qkv = linear(self.query_key_value, x).view(B, T, self.nh, 3, self.hs)  # [B, T, nh, 3, hs]
        q, k, v = rotary_heads(qkv, rope, cache, pos)  # [B, nh, T or S, hs]
        # scores q.k / sqrt(hs); the release's extra scaling by layer_id+1 cancels in softmax
        y = attention(q, k, v, mask)  # [B, nh, T, hs]
        return linear(self.dense, y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x):
        return linear(self.dense_4h_to_h, F.gelu(linear(self.dense_h_to_4h, x), approximate="tanh"))


class GLMBlock(nn.Module):
    # The release builds every block with its default num_layers=28, never the model's own,
    # so the residual scale is sqrt(2 * 28) at every depth, also for a 2-layer toy model.
    alpha = math.sqrt(2 * 28)

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, h, rope, mask, cache=None, pos=None):
        # pre-LN with a scaled residual: the *normalised* input is what is carried forward
        x = layer_norm(self.input_layernorm, h, decoding=cache is not None)
        a = self.attention(x, rope, mask, cache, pos)
        y = layer_norm(self.post_attention_layernorm, a, x, self.alpha, cache is not None)  # LN(x*alpha + attn(x))
        return torch.add(self.mlp(y), y, alpha=self.alpha)  # y*alpha + mlp(y)


class GLMTransformer(nn.Module):
    """Embedding, blocks and final LayerNorm. A pipeline stage holds a contiguous slice of them;
    blocks keep their global index as their name, so checkpoint keys never change."""

    def __init__(self, cfg, layer_ids=None, embed=True, final_norm=True):
        super().__init__()
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        # an empty weight, filled by the checkpoint or init_weights: nn.Embedding's own N(0, 1) draw
        # on the meta device (where models are built) costs seconds of start-up in every process
        self.word_embeddings = (nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                             _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)) if embed else None)
        self.layers = nn.ModuleDict({str(i): GLMBlock(cfg) for i in layer_ids})
        self.final_layernorm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
                                if final_norm else None)

    def forward(self, x, rope, attend, caches=None, pos=None, checkpoint=()):
        """x: ids [B, T] on the first stage, hidden states [B, T, C] after it; attend: bool
        [B, 1, T, S], True = may attend; caches {block id: KVCache} written at pos = (slots,
        end). checkpoint: the global ids of the blocks whose activations are recomputed in
        backward instead of kept."""
        h = self.word_embeddings(x) if self.word_embeddings is not None else x
        if caches is None and ATTENTION == "flex":
            # one BlockMask for all blocks: FlexAttention skips the tiles the mask rules out (other
            # examples of a packed row, other answers of a group, the future), which SDPA computes
            mask = block_mask(attend)
        else:  # one additive mask for all blocks (0 or -inf), so attention never re-converts the bool one
            mask = torch.zeros(attend.shape, dtype=h.dtype, device=h.device).masked_fill_(~attend, float("-inf"))
        for name, block in self.layers.items():
            cache = caches[int(name)] if caches is not None else None
            if int(name) in checkpoint and torch.is_grad_enabled():  # the mask passes through as it is
                h = torch.utils.checkpoint.checkpoint(block, h, rope, mask, use_reentrant=False)
            else:
                h = block(h, rope, mask, cache, pos)
        if self.final_layernorm is None:
            return h
        return layer_norm(self.final_layernorm, h, decoding=caches is not None)


class ChatGLM(nn.Module):
    """ChatGLM-6B: `transformer` (embedding, blocks, final LN) and an untied `lm_head`. Its weights
    are not initialised: load them (from_pretrained) or draw them (init_weights).

    With `layer_ids` / `first` / `last` it builds one pipeline stage: only its own blocks,
    the embedding only on the first stage, the final LN and lm_head only on the last."""

    def __init__(self, cfg, layer_ids=None, first=True, last=True):
        super().__init__()
        self.config = cfg
        self.transformer = GLMTransformer(cfg, layer_ids, embed=first, final_norm=last)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if last else None
        self.checkpoint_activations = frozenset()  # global ids of blocks recomputed in backward

    @torch.no_grad()
    def init_weights(self, seed=0, std=0.02):
        """Random init for models trained from scratch (toy runs, benchmarks): N(0, std) matrices,
        zero biases, unit LayerNorms. Checkpoints load over it unchanged."""
        g = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)
        return self

    def check_ids(self, input_ids, max_new_tokens=0):
        """Ids [B, T] inside the vocabulary, and T (+ the tokens to generate) within the positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {self.config.vocab_size}). HINT: the tokenizer does not match this model.")
        T, N = input_ids.shape[1], max_new_tokens
        if T + N > self.config.max_sequence_length:
            raise ValueError(f"{T} tokens" + (f" + max_new_tokens {N}" if N else "") + " exceed "
                             f"max_sequence_length {self.config.max_sequence_length}; shorten the input"
                             + (" or max_new_tokens" if N else ""))

    def inputs(self, input_ids, position_ids=None, attention_mask=None, attend=None):
        """(rope, attend) for a forward: derived from the ids unless given, either in the release's
        form (position_ids [B, 2, T]; attention_mask bool [B, 1, T, T] with True = masked) or as
        `attend` (bool [B, 1, T, T], True = may attend: packed rows, shared-prompt groups)."""
        if position_ids is None or (attention_mask is None and attend is None):
            layout = derive_layout(input_ids, self.config)
        position_ids = layout.position_ids if position_ids is None else position_ids
        if attend is None and attention_mask is None:
            attend = layout.attend
        elif attend is None:  # flip to True = attend; the diagonal keeps fully padded rows finite
            T = attention_mask.shape[-1]
            attend = ~attention_mask.bool() | torch.eye(T, dtype=torch.bool, device=attention_mask.device)
        return rotary_tables(position_ids, self.config.rotary_dim), attend

    def batch_inputs(self, mb):
        """(rope, attend) of a micro-batch dict: its own "position_ids" / "attend" where it carries
        them (several sequences laid out in one row), else derived from its "input_ids"."""
        return self.inputs(mb["input_ids"], mb.get("position_ids"), attend=mb.get("attend"))

    def forward(self, input_ids, position_ids=None, attention_mask=None, return_hidden=False):
        """Logits [B, T, V] (or final hidden states [B, T, C]) of a full, unpipelined model."""
        self.check_ids(input_ids)
        rope, attend = self.inputs(input_ids, position_ids, attention_mask)
        h = self.transformer(input_ids, rope, attend, checkpoint=self.checkpoint_activations)
        return h if return_hidden else self.lm_head(h)

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=128, do_sample=False, temperature=1.0,
                 top_p=1.0, top_k=0, generator=None, return_logprobs=False, stop_at_eop=True,
                 streamer=None, cuda_graph=None, group_size=1):
        """Extend left-padded prompts [B, T] by up to max_new_tokens with a fixed-shape KV cache.

        Returns ids [B, T + N], N <= max_new_tokens (pad after a row's <eop>) and, with return_logprobs, the
        log-probabilities [B, N] of the chosen tokens under softmax(logits / temperature).
        group_size n: n completions of every prompt, rows i*n .. i*n + n-1 of [B*n, T + N], each prompt
        computed once. On CUDA each decode step replays a captured CUDA graph unless cuda_graph=False."""
        self.check_ids(input_ids, max_new_tokens)
        cfg, device = self.config, input_ids.device
        use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        B, T = input_ids.shape[0] * group_size, input_ids.shape[1]
        decoder = Decoder(self, B, T + max_new_tokens, use_graph)
        layout = derive_layout(input_ids, cfg)
        logits = decoder.prefill(input_ids, layout, group_size)  # [B, V]
        layout, input_ids = repeat_rows(layout, group_size), input_ids.repeat_interleave(group_size, 0)

        out = torch.full((B, max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        for i in range(max_new_tokens):
            tok = next_token(logits, done if stop_at_eop else None, cfg, out[:, i], logprobs[:, i], **sampling)
            if streamer is not None:
                streamer(tok)
            # checking costs a GPU sync: do it every few steps (finished rows only emit pad)
            if stop_at_eop and (i % 8 == 7 or streamer is not None) and bool(done.all()):
                break
            if i < max_new_tokens - 1:
                logits = decoder.step(tok, new_token_positions(layout, T + i), T + i)
        if stop_at_eop:
            out, logprobs = trim_finished(out, logprobs, cfg.eos_token_id)
        ids = torch.cat([input_ids, out], dim=1)
        return (ids, logprobs) if return_logprobs else ids

    # -- checkpoints -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, device="cpu", layer_ids=None,
                        first=True, last=True):
        """Build on the meta device, then read this model's (or stage's) tensors straight into place;
        a tokenizer in the folder must agree with config.json."""
        cfg = GLMConfig.from_json(os.path.join(check_model_dir(model_dir), "config.json"))
        if os.path.isfile(os.path.join(model_dir, "ice_text.model")):
            check_tokenizer(Tokenizer(os.path.join(model_dir, "ice_text.model")), cfg, model_dir)
        with torch.device("meta"):
            model = cls(cfg, layer_ids, first, last)
        state = read_safetensors(model_dir, expected_shapes(model), device)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.name_or_path = str(model_dir)  # named in errors, e.g. an adapter made for another base
        return model.to(device)

    def save_pretrained(self, out_dir, tokenizer=None, max_shard_bytes=2 << 30):
        """config.json + sharded model-*.safetensors + index (+ ice_text.model), written atomically."""
        def write(tmp):
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config.to_json(str(next(self.parameters()).dtype).removeprefix("torch.")), f, indent=2)
            write_safetensors_shards(base_state_dict(self), tmp, max_shard_bytes)
            if tokenizer is not None:
                copy_tokenizer(tokenizer.path, tmp)
        atomic_dir(out_dir, write)


# -----------------------------------------------------------------------------
# reward head: a scalar score of a whole answer, read at its final <eop>


def reward_head(hidden_size, seed=0, device="cpu"):
    """Linear hidden -> 1 in float32, weight ~ N(0, 1/(C+1)), bias 0.

    Not zeros: a zero head scores every answer 0, so the backbone gets no gradient until the head
    has moved; with this scale the first rewards are about unit size and differ between answers
    (the scale of lm-human-preferences' reward head). The bias gets no gradient from a ranking
    loss, but PPO's critic starts from this head and needs one for its values. The seed makes the
    head the same whatever the number of pipeline stages."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden_size + 1))
        head.bias.zero_()
    return head.to(device)


def eop_index(input_ids, eop_id):
    """Column of each row's last <eop> [N]: where its score is read (the last column under left
    padding; computed, so right-padded rows work too). A row without one is an error."""
    T = input_ids.shape[1]
    hit = input_ids == eop_id  # [N, T]
    if not bool(hit.any(dim=1).all()):
        row = int((~hit.any(dim=1)).nonzero()[0])
        raise ValueError(f"answer row {row} has no <eop> token: its score has nowhere to be read. HINT: encode "
                         "answers with data.encode_ranked, which keeps <eop> and cuts the prompt first")
    return torch.where(hit, torch.arange(T, device=input_ids.device), -1).max(dim=1).values  # [N]


def rewards_at(head, h, idx):
    """Scores r [N] from final hidden states h [N, T, C] at column idx [N] of each row, in float32."""
    x = h[torch.arange(h.shape[0], device=h.device), idx]  # [N, C]
    return head(x.float())[:, 0]  # [N]


# -----------------------------------------------------------------------------
# the head's log-probabilities, a chunk of tokens at a time


def _wide(x):
    """x in float32 at least (bf16 logits are widened before softmax; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_log_softmax(hc, weight, tau):
    """log softmax(hc W^T / tau) [n, V], in float32 (or wider)."""
    z = _wide(hc @ weight.t())
    return torch.log_softmax(z.div_(tau) if tau != 1 else z, dim=-1)


def _grad_logits(logp_all, targets, g_logp, g_ent, tau, dtype):
    """d/d logits of sum(g_logp * log p_target + g_ent * H), with z = logits / tau:
    d log p_t / dz = onehot_t - p and dH / dz = -p (log p + H)."""
    p = logp_all.exp()
    ent = -(p * logp_all).sum(-1, keepdim=True)                       # [n, 1]
    gz = -p * (g_logp[:, None] + g_ent[:, None] * (logp_all + ent))  # [n, V]
    gz.scatter_add_(1, targets[:, None], g_logp[:, None])
    return (gz / tau).to(dtype)


class HeadLogProbs(torch.autograd.Function):
    """log softmax(h W^T / tau) at the target ids (and the distribution's entropy), for hidden
    states h [N, C], a chunk of tokens at a time: never the whole [N, V] float32 logits (1 GB at
    2,048 tokens of ChatGLM's vocabulary). A frozen head (LoRA, last N blocks) gets d/dh of each
    output in the forward, [N, C] each, so backward only scales them; a trained head recomputes
    each chunk's logits in backward, where its weight gradient needs the incoming gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets, tau, chunk, entropy):
        ctx.tau, ctx.chunk, ctx.recompute = tau, chunk, weight.requires_grad
        now = h.requires_grad and not ctx.recompute  # the frozen head's gradients, taken here
        logp, ent, d_logp, d_ent = [], [], [], []
        for hc, tc in zip(h.split(chunk), targets.split(chunk)):
            logp_all = _chunk_log_softmax(hc, weight, tau)              # [n, V]
            logp.append(logp_all.gather(1, tc[:, None])[:, 0])
            if entropy:
                ent.append(-(logp_all.exp() * logp_all).sum(-1))
            if now and entropy == "grad":
                zero, one = torch.zeros_like(ent[-1]), torch.ones_like(ent[-1])
                d_ent.append(_grad_logits(logp_all, tc, zero, one, tau, weight.dtype) @ weight)   # [n, C]
            if now:  # d log p_t / dh = (W_t - p W) / tau, with p in place of the log-probs
                p = logp_all.exp_().to(weight.dtype)
                d_logp.append((weight[tc] - p @ weight) / tau)          # [n, C]
        ctx.save_for_backward(*((h, weight, targets) if ctx.recompute else
                                [torch.cat(d) for d in (d_logp, d_ent) if d]))
        logp = torch.cat(logp)
        ent = torch.cat(ent) if entropy else torch.zeros_like(logp)
        if entropy != "grad":
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        if not ctx.recompute:
            d_logp, *d_ent = ctx.saved_tensors
            g_h = g_logp[:, None].to(d_logp.dtype) * d_logp
            return (g_h + g_ent[:, None].to(g_h.dtype) * d_ent[0] if d_ent else g_h), None, None, None, None, None
        h, weight, targets = ctx.saved_tensors
        g_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        g_w = _wide(torch.zeros_like(weight))
        for i in range(0, h.shape[0], ctx.chunk):
            hc, sl = h[i:i + ctx.chunk], slice(i, i + ctx.chunk)
            gz = _grad_logits(_chunk_log_softmax(hc, weight, ctx.tau), targets[sl], g_logp[sl], g_ent[sl],
                              ctx.tau, weight.dtype)                    # [n, V]
            if g_h is not None:
                g_h[sl] = gz @ weight
            g_w += gz.t() @ hc                                          # [V, C], summed over chunks in fp32
        if hasattr(weight, "main_grad"):  # a bf16 weight whose optimiser sums its gradients in fp32
            weight.main_grad = g_w if weight.main_grad is None else weight.main_grad.add_(g_w)
            return g_h, None, None, None, None, None
        return g_h, g_w.to(weight.dtype), None, None, None, None


def head_logprobs(lm_head, h, targets, temperature=1.0, entropy=False):
    """(log pi(target), entropy of pi), each [N], with pi = softmax(lm_head(h) / temperature), for
    hidden states h [N, C] and target ids [N]; in chunks of ~256 MB of float32 logits. entropy:
    False (zeros), True (its value, no gradient) or "grad" (an entropy bonus trains on it)."""
    # an int8 head (quant.QuantLinear, frozen) is dequantized once per call: 1 GB of bf16 at 6B, briefly
    weight = lm_head.dequantized(h.dtype) if hasattr(lm_head, "dequantized") else lm_head.weight
    chunk = max(1, (1 << 26) // weight.shape[0])
    return HeadLogProbs.apply(h, weight, targets, float(temperature), chunk, entropy)


# -----------------------------------------------------------------------------
# generation: KV caches, prefill and decode steps, sampling


class KVCache:
    """Fixed-shape key/value buffers of one block, [B, S, nh, hs], filled as generation proceeds."""

    def __init__(self, B, nh, S, hs, dtype, device):
        self.k = torch.zeros(B, S, nh, hs, dtype=dtype, device=device)
        self.v = torch.zeros(B, S, nh, hs, dtype=dtype, device=device)

    def update(self, pos, k, v):
        """Write k, v [B, t, nh, hs] at pos = (slots [t], end); return keys/values [B, end, nh, hs].

        The slots are a tensor and `end` a window that may run past them (masked there), so a
        decode step's shapes never change and it can be captured in a CUDA graph."""
        slots, end = pos
        self.k.index_copy_(1, slots, k)
        self.v.index_copy_(1, slots, v)
        return self.k[:, :end], self.v[:, :end]


class Decoder:
    """Prefill and one-token decode steps of a (stage of a) model over fixed-shape KV caches.

    Eager steps attend to exactly the filled slots. Graph steps read static input buffers and
    attend to a window of the cache rounded up to `bucket` slots (masked beyond the filled
    ones), so one captured graph serves `bucket` consecutive steps: a whole decode step becomes
    one launch instead of hundreds of small kernels, which is what bounds batch-1 decoding."""

    bucket = 32  # cache slots per captured graph: fewer graphs vs. fewer masked slots read

    def __init__(self, model, B, S, use_graph=False):
        cfg, p = model.config, next(model.parameters())
        self.model, self.S, self.use_graph = model, S, use_graph
        self.caches = {int(i): KVCache(B, cfg.num_attention_heads, S, cfg.head_dim, p.dtype, p.device)
                       for i in model.transformer.layers}
        self.key_valid = torch.zeros(B, S, dtype=torch.bool, device=p.device)  # [B, S]
        self.x = (torch.zeros(B, 1, dtype=torch.long, device=p.device) if model.transformer.word_embeddings
                  is not None else torch.zeros(B, 1, cfg.hidden_size, dtype=p.dtype, device=p.device))
        self.pos_ids = torch.zeros(B, 2, 1, dtype=torch.long, device=p.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=p.device)
        self.graphs, self.pool = {}, None

    def run(self, x, rope, attend, pos, caches=None):
        """Logits [B, V] at the last position (hidden states [B, T, C] on a stage without the head)."""
        h = self.model.transformer(x, rope, attend, caches or self.caches, pos)
        return linear(self.model.lm_head, h[:, -1]) if self.model.lm_head is not None else h

    def prefill(self, x, layout, group=1):
        """The whole prompt in one pass; logits [B, V] at its last position (or hidden states).

        group = n: x and layout hold B/n distinct prompts, each the start of n completions (a GRPO
        group). Each prompt is computed once, into a cache of its own, whose keys and values then fill
        the n cache rows of its completions; the logits are repeated n times, while hidden states for
        the next stage stay one per prompt (that stage repeats them in its own cache)."""
        T = layout.position_ids.shape[-1]
        rope = rotary_tables(layout.position_ids, self.model.config.rotary_dim)
        pos = (torch.arange(T, device=layout.attend.device), T)
        self.key_valid[:, :T] = layout.key_valid.repeat_interleave(group, 0)
        if group == 1:
            return self.run(x, rope, layout.attend, pos)
        some = next(iter(self.caches.values())).k  # [B, S, nh, hs]
        once = {i: KVCache(x.shape[0], some.shape[2], T, some.shape[3], some.dtype, some.device) for i in self.caches}
        out = self.run(x, rope, layout.attend, pos, once)
        for i, c in once.items():  # [B/n, T, nh, hs] -> [B, T, nh, hs]
            self.caches[i].k[:, :T] = c.k.repeat_interleave(group, 0)
            self.caches[i].v[:, :T] = c.v.repeat_interleave(group, 0)
        return out.repeat_interleave(group, 0) if self.model.lm_head is not None else out

    def step(self, x, pos_ids, slot):
        """One new token per row (ids [B] or hidden [B, 1, C]) at cache slot `slot`."""
        self.key_valid[:, slot] = True
        if not self.use_graph:
            rope = rotary_tables(pos_ids, self.model.config.rotary_dim)
            return self.run(x.view_as(self.x), rope, self.key_valid[:, None, None, :slot + 1],
                            pos=(self.slot.fill_(slot), slot + 1))
        self.x.copy_(x.view_as(self.x))
        self.pos_ids.copy_(pos_ids)
        self.slot.fill_(slot)
        end = min(self.S, (slot // self.bucket + 1) * self.bucket)
        if self.x.device.type != "cuda":  # the same static-shape step, uncaptured (tests run it on CPU)
            return self.static_step(end)
        if end not in self.graphs:
            self.graphs[end] = self.capture(end)
        graph, out = self.graphs[end]
        graph.replay()
        return out

    def static_step(self, end):
        rope = rotary_tables(self.pos_ids, self.model.config.rotary_dim)
        return self.run(self.x, rope, self.key_valid[:, None, None, :end], pos=(self.slot, end))

    def capture(self, end):
        # warm up on a side stream (rewriting the same slot is harmless), then record
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.static_step(end)
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = self.pool or torch.cuda.graph_pool_handle()  # graphs replay in capture order
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.static_step(end)
        return graph, out


def trim_finished(out, logprobs, eos_id):
    """Drop trailing columns in which every row had already emitted <eop> (all padding).
    The result does not depend on how often the decode loop checked for the end."""
    N = out.shape[1]
    t = torch.arange(N, device=out.device)
    ended = torch.where(out == eos_id, t, N).min(dim=1).values  # [B]: first <eop>, N if none
    keep = int(ended.max().clamp(max=N - 1)) + 1 if N else 0
    return out[:, :keep], logprobs[:, :keep]


def new_token_positions(layout, slot):
    """Position ids [B, 2, 1] of a generated token at cache slot `slot`: its position stays at the
    mask token's, its block position counts on from <sop> (which has block position 1)."""
    return torch.stack([layout.mask_pos, slot - layout.ctx + 1], dim=1)[:, :, None]


def next_token(logits, done, cfg, out, logprobs, **sampling):
    """Pick the next token [B] from logits [B, V] (see sample_next) and write it and its
    log-probability into out [B] and logprobs [B]. Rows already done (done [B] bool, or None
    to never stop) emit padding with log-probability 0; rows that emit <eop> become done."""
    tok, lp = sample_next(logits.float(), **sampling)
    if done is not None:
        tok = tok.masked_fill(done, cfg.pad_token_id)
        lp = lp.masked_fill(done, 0.0)
        done |= tok == cfg.eos_token_id
    out.copy_(tok)
    logprobs.copy_(lp)
    return tok


def sample_next(logits, do_sample, temperature, top_p, top_k, generator=None):
    """Next token [B] and its log-probability under softmax(logits / temperature), from logits [B, V]."""
    if not do_sample:
        tok = logits.argmax(dim=-1)
        return tok, torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    filtered = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        filtered[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)  # [B, V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        filtered.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(filtered, dim=-1)
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]  # [B]
    return tok, logp.gather(1, tok[:, None])[:, 0]


# -----------------------------------------------------------------------------
# checkpoint files: one table of key templates; every key used or dropped on purpose

LAYER_KEYS = [
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
]
GLOBAL_KEYS = {
    "transformer.word_embeddings.weight": "first",
    "transformer.final_layernorm.weight": "last",
    "transformer.final_layernorm.bias": "last",
    "lm_head.weight": "last",
}
DROPPED = re.compile(r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq")  # recomputed, fp16-rounded
LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def is_model_key(key, num_layers):
    """True for a key of the ChatGLM table (any stage), False for one to drop; else an error."""
    if DROPPED.fullmatch(key):
        return False
    m = LAYER_KEY.fullmatch(key)
    if key in GLOBAL_KEYS or (m and m.group(2) in LAYER_KEYS and int(m.group(1)) < num_layers):
        return True
    raise KeyError(f"unexpected tensor '{key}' in the checkpoint: it is not part of a "
                   f"{num_layers}-layer ChatGLM-6B. HINT: is this the right model, and does "
                   "config.json's num_layers match the weights?")


def base_state_dict(model):
    """The model's checkpoint tensors under HF names: adapter factors (".lora_") live in adapter files."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


def expected_shapes(model):
    """{key: shape} of every tensor this model (or stage) must read, by the key table."""
    shapes = {k: tuple(p.shape) for k, p in base_state_dict(model).items()}
    for k in shapes:  # the module tree and the table must agree: a guard against drift
        assert is_model_key(k, model.config.num_layers), k
    return shapes


def read_json(path, hint):
    """The JSON object in file `path`; anything else is a one-line error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e}). {hint}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object. {hint}")
    return obj


def open_safetensors(path, device="cpu"):
    """safe_open, naming the file when it is empty, truncated or has a bad header."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(path, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}). HINT: it is truncated or "
                         "corrupt; copy or write it again.") from None


def checked_tensor(f, path, key):
    """Tensor `key` of an open file, refused unless it is floating point and finite (one pass over it)."""
    t = f.get_tensor(key)
    if not t.is_floating_point():
        raise ValueError(f"{path}: tensor '{key}' has dtype {t.dtype}; weights are floating point. "
                         "HINT: the file is corrupt or holds something else; copy or write it again.")
    lo, hi = torch.aminmax(t) if t.numel() else (0.0, 0.0)  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{path}: tensor '{key}' holds NaN or Inf values. HINT: the file is corrupt or "
                         "was saved from a diverged run; use an earlier checkpoint or the release's weights.")
    return t


def read_index(index):
    """weight_map {key: file name} of model.safetensors.index.json; every file inside its folder."""
    hint = "HINT: restore the index from the release (or write the model again)."
    weight_map = read_json(index, hint).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: it has no 'weight_map' object. {hint}")
    for key, name in weight_map.items():
        if not isinstance(name, str) or os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
            raise ValueError(f"{index}: '{key}' maps to {name!r}, not a file in the model folder. {hint}")
    return weight_map


def safetensors_files(model_dir):
    """{key: file} from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(check_model_dir(model_dir), "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        return {k: os.path.join(model_dir, v) for k, v in read_index(index).items()}
    if os.path.isfile(single):
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    shards = [n for n in os.listdir(model_dir) if re.fullmatch(r"model-.+\.safetensors", n)]
    raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json"
                            + (f" (but {len(shards)} model-*.safetensors shards). HINT: copy their index "
                               "into the folder too." if shards else ". HINT: convert the official .bin "
                               "release with `python glm.py convert SRC DST`."))


def read_safetensors(model_dir, shapes, device="cpu", known=None, read=None):
    """Read exactly the tensors in `shapes`, checking every key of the files against the table
    and every tensor's shape, dtype and values. known(key, num_layers) / read(file, path, key)
    replace is_model_key / checked_tensor for a checkpoint with more keys (quant.py's int8 codes)."""
    known, read = known or is_model_key, read or checked_tensor
    where = safetensors_files(model_dir)
    num_layers = GLMConfig.from_json(os.path.join(model_dir, "config.json")).num_layers
    for key in where:
        known(key, num_layers)  # raises on keys that belong to no ChatGLM
    missing = [k for k in shapes if k not in where]
    if missing:
        raise KeyError(f"{model_dir}: tensor '{missing[0]}' is missing from the checkpoint "
                       f"({len(missing)} missing in all). HINT: the files are incomplete or from another model.")
    state, by_file = {}, {}
    for k in shapes:
        by_file.setdefault(where[k], []).append(k)
    for path, keys in by_file.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing but the index maps '{keys[0]}' ({len(keys)} tensors) to it. "
                                    "HINT: the checkpoint is incomplete (a stage's file was not written or "
                                    "copied); use a complete folder or write it again")
        with open_safetensors(path, device) as f:
            held = set(f.keys())
            absent = [k for k in keys if k not in held]
            if absent:
                raise KeyError(f"{path}: the index maps tensor '{absent[0]}' to this file, but it does not hold "
                               "it. HINT: the index and the files are from different saves; write them again.")
            for k in keys:
                got = tuple(f.get_slice(k).get_shape())
                if got != shapes[k]:
                    raise ValueError(f"{path}: tensor '{k}' has shape {list(got)}, the model expects "
                                     f"{list(shapes[k])}. HINT: config.json does not match the weights.")
                state[k] = read(f, path, k)
    return state


def write_safetensors_shards(state, out_dir, max_shard_bytes=2 << 30, prefix="model"):
    """state -> {prefix}-0000i-of-0000n.safetensors + {prefix}.safetensors.index.json in out_dir."""
    from safetensors.torch import save_file
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v.detach().contiguous().cpu(), size + nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k], total = name, total + v.numel() * v.element_size()
    with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# tokenizer_config.json for the release's own tokenizer code (tokenization_chatglm.py placed beside)
TOKENIZER_CONFIG = {"tokenizer_class": "ChatGLMTokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
                    "bos_token": "<sop>", "eos_token": "<eop>", "mask_token": "[MASK]", "gmask_token": "[gMASK]",
                    "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "left", "remove_space": False,
                    "do_lower_case": False}


def copy_tokenizer(path, out_dir):
    """ice_text.model into a model folder, with the tokenizer_config.json HF's AutoTokenizer reads."""
    shutil.copy(path, os.path.join(out_dir, "ice_text.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)


def make_temp_dir(out_dir):
    """A temporary folder beside out_dir, written and then renamed into place."""
    return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=os.path.dirname(out_dir))


def share_modes(tmp):
    """Folders 0755 and files 0644 under a umask of 022 (as the umask allows): mkdtemp and safetensors
    make them private (0700 / 0600), and teammates on a shared cluster must be able to read results."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def atomic_dir(out_dir, write):
    """Run write(tmp_dir), then move tmp_dir to out_dir: readers never see a half-written folder."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(out_dir)
    try:
        write(tmp)
        share_modes(tmp)
        if os.path.exists(out_dir):  # replace: move the old one aside first, drop it once the new is in place
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -----------------------------------------------------------------------------
# convert the official release (pytorch_model-*.bin) to safetensors

IMAGE_TOKENS = 20000  # an early release put 20000 image tokens in front of the text vocabulary


def release_config(src):
    """(config.json as written, GLMConfig) of an official release, the early release's image
    tokens removed from the vocabulary and the special ids shifted; checked before heavy work."""
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no such file. HINT: SRC is the folder of the official "
                                "release (config.json, pytorch_model-*.bin, ice_text.model)")
    raw = read_json(config_path, "HINT: restore the release's config.json.")
    tok_path = os.path.join(src, "ice_text.model")
    pieces = Tokenizer(tok_path).vocab_size if os.path.isfile(tok_path) else 130528
    if raw.get("vocab_size") == pieces + IMAGE_TOKENS:  # early release: trim the image rows, shift ids
        raw["vocab_size"] = pieces
        for k in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
            if type(raw.get(k)) is int and raw[k] >= IMAGE_TOKENS:
                raw[k] -= IMAGE_TOKENS
    return raw, GLMConfig.from_dict(raw, config_path)


def convert(src, dst, shapes=None, known=None):
    """Official .bin shards -> model-*.safetensors + index, config.json and ice_text.model in dst.
    shapes {key: shape} / known(key, num_layers) replace the float model's table and is_model_key
    for a release with more keys (quant.py convert: chatglm-6b-int8 / -int4)."""
    raw, cfg = release_config(src)
    tok_path = os.path.join(src, "ice_text.model")
    known = known or is_model_key
    if shapes is None:
        with torch.device("meta"):
            shapes = expected_shapes(ChatGLM(cfg))
    index = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, "HINT: the release's index is damaged; copy it again").get("weight_map")
        bins = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not bins or any(not isinstance(b, str) or os.path.basename(b) != b for b in bins):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to .bin files in {src}. HINT: the "
                             "release's index is damaged; copy it again")
    elif os.path.isfile(os.path.join(src, "pytorch_model.bin")):
        bins = ["pytorch_model.bin"]
    else:
        raise FileNotFoundError(f"{src}: neither pytorch_model.bin.index.json nor pytorch_model.bin")

    def write(tmp):
        weight_map, seen = {}, set()
        for i, name in enumerate(bins):
            try:
                state = torch.load(os.path.join(src, name), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # truncated or foreign: RuntimeError, EOFError, UnpicklingError ...
                raise ValueError(f"{src}/{name}: not a readable PyTorch weight file ({type(e).__name__}). HINT: it "
                                 "is truncated or damaged; copy it again") from None
            out = {}
            for k, v in state.items():
                if not known(k, cfg.num_layers):
                    continue
                if k in ("transformer.word_embeddings.weight", "lm_head.weight") and \
                        v.shape[0] == cfg.vocab_size + IMAGE_TOKENS:
                    v = v[IMAGE_TOKENS:]  # the leading rows are image tokens
                if tuple(v.shape) != shapes[k]:
                    raise ValueError(f"{src}/{name}: tensor '{k}' has shape {list(v.shape)}, "
                                     f"expected {list(shapes[k])} for this config.json")
                out[k] = v.contiguous()
            shard = f"model-{i + 1:05d}-of-{len(bins):05d}.safetensors"
            from safetensors.torch import save_file
            save_file(out, os.path.join(tmp, shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in out})
            seen.update(out)
        missing = sorted(set(shapes) - seen)
        if missing:
            raise KeyError(f"{src}: tensor '{missing[0]}' is missing ({len(missing)} in all)")
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2)
        if os.path.isfile(tok_path):
            copy_tokenizer(tok_path, tmp)
        else:
            print(f"warning: {tok_path} not found; copy the tokenizer into {dst} by hand", file=sys.stderr)
    atomic_dir(dst, write)


# -----------------------------------------------------------------------------
# command line: convert here; chat, predict and serve live in infer.py

INFER_COMMANDS = {"chat": "interactive chat in the terminal (--adapter: with a LoRA adapter)",
                  "predict": "answer every line of a jsonl file, resumable (torchrun: --pp)",
                  "serve": "OpenAI-compatible chat-completions server"}
ELSEWHERE = {**{name: ("infer.py", text) for name, text in INFER_COMMANDS.items()},  # command -> (file, help)
             "quantize": ("quant.py", "a float model -> an int8 / int4 one (--bits 8|4 IN OUT)")}


def run_elsewhere(file, argv):
    """Run a sibling script in this process's place: glm.py imports no project module."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), file)
    return os.execv(sys.executable, [sys.executable, path, *argv])


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other mistake (not the usage block)."""

    def error(self, message):
        self.exit(2, f"error: {message}. HINT: {self.prog} --help\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ELSEWHERE:
        return run_elsewhere(ELSEWHERE[argv[0]][0], argv)
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="official pytorch_model-*.bin release -> safetensors",
                       description="The official release (pytorch_model-*.bin) -> this project's layout: sharded "
                                   "safetensors, config.json, ice_text.model, tokenizer_config.json.")
    c.add_argument("src", help="the release folder: config.json, pytorch_model*.bin (+ index), ice_text.model")
    c.add_argument("dst", help="the folder to write (written whole, or not at all)")
    for name, (_, text) in ELSEWHERE.items():  # listed in --help; `glm.py NAME --help` shows their flags
        sub.add_parser(name, help=text)
    args = p.parse_args(argv)
    if release_config(args.src)[0].get("quantization_bit"):  # chatglm-6b-int8 / -int4: its codes and scales
        return run_elsewhere("quant.py", argv)
    convert(args.src, args.dst)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError) as e:  # a user's mistake: one line and exit 2 (DEBUG=1: traceback)
        if os.environ.get("DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same mistake
            print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(2)
