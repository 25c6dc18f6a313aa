"""LoRA for ChatGLM-6B: adapter layers, injection, merge/unmerge, PEFT-compatible adapter files.

    python lora.py merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype bfloat16]

In code:

    model = glm.ChatGLM.from_pretrained(base_dir)
    lora.inject_lora(model, targets=("query_key_value",), r=8, alpha=16)   # base frozen, adapter trainable
    lora.save_adapter(model, out_dir)            # adapter_model.safetensors + adapter_config.json
    lora.load_adapter(model, out_dir, name="critic")
    lora.set_adapter(model, "default")           # which adapter the forward uses
    with lora.adapters_off(model): ...           # the frozen base (reference / reward roles)
    lora.merge_lora(model); lora.unmerge_lora(model)

A LoRA layer computes y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with A [r, in] and
B [out, r]. B starts at zero, so a fresh adapter leaves the model unchanged.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import flags
import glm
import quant

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
VALID_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# the linear layers of a block that may carry LoRA; lm_head and the embedding never do
LAYER_LINEAR = re.compile(r"transformer\.layers\.(\d+)\."
                          r"(attention\.query_key_value|attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)")
# PEFT saves `base_model.model.<module path>.lora_A.weight`: its two wrapper prefixes, no adapter name
PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# tensors that identify the base an adapter was trained on: LoRA never touches or merges into them
FINGERPRINTED = ("transformer.word_embeddings.weight", "lm_head.weight")


# -----------------------------------------------------------------------------
# the layer


class LoRALinear(nn.Linear):
    """nn.Linear plus named low-rank adapters; `weight`/`bias` keep their names so base checkpoints load."""

    def __init__(self, in_features, out_features, bias=True, r=0, alpha=1.0, dropout=0.0,
                 name="default", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_lora()
        if r > 0:
            self.add_adapter(name, r, alpha, dropout)

    @classmethod
    def convert(cls, linear):
        """Turn an nn.Linear (or a quant.QuantLinear) into a LoRALinear (QuantLoRALinear) in place: same
        module object, same weight tensor (no copy), so it works on the meta device and on loaded weights alike."""
        if not isinstance(linear, LoRALinear):
            linear.__class__ = QuantLoRALinear if isinstance(linear, quant.QuantLinear) else cls
            linear._init_lora()
        return linear

    def _init_lora(self):
        # one entry per adapter name: PPO keeps the policy and the critic on one frozen base
        self.lora_A = nn.ParameterDict()  # name -> [r, in]
        self.lora_B = nn.ParameterDict()  # name -> [out, r]
        self.r, self.alpha, self.scaling, self.dropout = {}, {}, {}, {}
        self.active = None  # adapter the forward adds, None = base only
        self.merged = None  # adapter currently folded into `weight`, None = weight is the base

    def add_adapter(self, name, r, alpha, dropout=0.0, dtype=None, generator=None):
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"adapter name '{name}' must be a Python identifier "
                             "(it becomes part of parameter names)")
        if name in self.lora_A:
            raise ValueError(f"adapter '{name}' already exists on this layer; pick another name")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {r}")
        dtype = dtype or self.weight.dtype
        A = torch.empty(r, self.in_features, device=self.weight.device, dtype=dtype)
        if A.device.type == "meta":
            pass  # filled by load_adapter
        elif generator is None:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own init, as loralib and PEFT use
        else:  # drawn on the CPU from the caller's generator: the same A on every rank and device
            A.copy_(nn.init.kaiming_uniform_(torch.empty(A.shape), a=math.sqrt(5), generator=generator))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=self.weight.device, dtype=dtype))
        self.r[name], self.alpha[name], self.dropout[name] = r, alpha, dropout
        self.scaling[name] = alpha / r
        if self.active is None and len(self.lora_A) == 1:
            self.active = name

    def delta_weight(self, name):
        """(alpha / r) * B @ A in float32: [out, in]."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]

    def base_forward(self, x):
        return glm.project(x, self.weight, self.bias)

    def forward(self, x):
        if self.merged is not None and self.merged != self.active:  # weight holds another adapter's delta
            raise RuntimeError(f"adapter '{self.merged}' is merged into the weight but '{self.active}' is "
                               "active. HINT: unmerge_lora(model) before switching or disabling adapters.")
        y = self.base_forward(x)
        name = self.active
        if name is None or name == self.merged:  # merged: the delta is already inside `weight`
            return y
        # the low-rank path runs in the input's dtype (bf16 on GPUs, as autocast would); gradients
        # still reach the float32 factors through the casts
        A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        h = F.dropout(x, self.dropout[name], self.training)
        return y + F.linear(F.linear(h, A), B) * self.scaling[name]  # [.., in] -> [.., r] -> [.., out]

    @torch.no_grad()
    def merge(self):
        """Fold the active adapter into `weight` (float32 arithmetic, then the weight's dtype). Idempotent."""
        if self.active is None or self.merged == self.active:
            return
        if self.merged is not None:
            raise RuntimeError(f"adapter '{self.merged}' is already merged; "
                               f"unmerge it before merging '{self.active}'")
        self.weight.copy_((self.weight.float() + self.delta_weight(self.active)).to(self.weight.dtype))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self):
        """Take the merged adapter back out of `weight`. Idempotent. Exact up to rounding in float32;
        in bf16/fp16 the round trip loses low bits, so reload the base when bit-exactness matters."""
        if self.merged is None:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight(self.merged)).to(self.weight.dtype))
        self.merged = None

    def extra_repr(self):
        adapters = ", ".join(f"{n}: r={self.r[n]} alpha={self.alpha[n]}" for n in self.lora_A)
        return f"{super().extra_repr()}, adapters=[{adapters}], active={self.active}, merged={self.merged}"


class QuantLoRALinear(LoRALinear, quant.QuantLinear):
    """LoRA adapters (float, trainable) on a frozen int8 / int4 quant.QuantLinear. Merging is refused:
    the sum would have to be quantized again, losing the adapter's small update in the rounding."""

    def base_forward(self, x):
        return quant.QuantLinear.forward(self, x)

    def add_adapter(self, name, r, alpha, dropout=0.0, dtype=None, generator=None):
        super().add_adapter(name, r, alpha, dropout, dtype or self.compute_dtype, generator)

    def merge(self):
        if self.active is not None:
            raise RuntimeError("a LoRA adapter cannot be merged into an int8 / int4 base. HINT: run it unmerged, "
                               "or write a bf16 merged model with `python lora.py merge`")

    def unmerge(self):
        pass  # never merged


# -----------------------------------------------------------------------------
# model-level helpers


def lora_modules(model):
    """(module path, LoRALinear) pairs of the model, in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def find_targets(model, targets):
    """{path: nn.Linear} of the block linears that `targets` name (PEFT's rule: the path equals a target
    or ends with '.' + target, so 'dense' is attention.dense, never mlp.dense_h_to_4h)."""
    if isinstance(targets, str):
        targets = [targets]  # a bare string would otherwise be read one character at a time
    found = {}
    for t in targets:
        hits = {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, quant.QuantLinear))
                and LAYER_LINEAR.fullmatch(p) and (p == t or p.endswith("." + t))}
        if not hits:
            raise ValueError(f"LoRA target '{t}' matches no module; valid: {', '.join(VALID_TARGETS)}")
        found.update(hits)
    return found


def mark_only_lora_trainable(model, names=None):
    """Freeze every parameter except the LoRA factors of the adapters in `names` (None: of every adapter)."""
    names = (names,) if isinstance(names, str) else names
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in lora_modules(model):
        for n in m.lora_A:
            if names is None or n in names:
                m.lora_A[n].requires_grad_(True)
                m.lora_B[n].requires_grad_(True)


def inject_lora(model, targets=("query_key_value",), r=8, alpha=16, dropout=0.0, name="default", dtype=None,
                seed=None):
    """Add adapter `name` to the target linears, freeze the base, make `name` trainable and active.

    On a meta-device model the factors stay on meta until load_adapter; base weights are never
    copied. Earlier adapters keep their requires_grad, so a policy and a critic can both train.
    With `seed`, A comes from (seed, module path): each stage or replica draws what one process would."""
    for path, linear in find_targets(model, targets).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode())) if seed is not None else None
        LoRALinear.convert(linear).add_adapter(name, r, alpha, dropout, dtype, generator=g)
    lora_params = {id(p) for _, m in lora_modules(model) for d in (m.lora_A, m.lora_B) for p in d.values()}
    for p in model.parameters():
        if id(p) not in lora_params:
            p.requires_grad_(False)
    set_adapter(model, name)
    return model


def _check_unmerged(model, allowed=None):
    for path, m in lora_modules(model):
        if m.merged is not None and m.merged != allowed:
            raise RuntimeError(f"{path}: adapter '{m.merged}' is merged into the weight. "
                               "HINT: call unmerge_lora(model) first.")


def set_adapter(model, name):
    """Make adapter `name` the one the forward uses (None: none). Layers without it run as the base."""
    mods = lora_modules(model)
    if name is not None and not any(name in m.lora_A for _, m in mods):
        have = sorted({n for _, m in mods for n in m.lora_A})
        raise KeyError(f"no adapter named '{name}' in the model; it has {have or 'none'}")
    _check_unmerged(model, allowed=name)
    for _, m in mods:
        m.active = name if name in m.lora_A else None


@contextlib.contextmanager
def adapters_off(model):
    """Run the frozen base: the reference and reward roles reuse the actor's and critic's base this way."""
    _check_unmerged(model)  # a merged weight is not the base any more
    saved = [(m, m.active) for _, m in lora_modules(model)]
    for m, _ in saved:
        m.active = None
    try:
        yield model
    finally:
        for m, active in saved:
            m.active = active


def merge_lora(model):
    """Fold each layer's active adapter into its weight (for fast generation). Idempotent."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model):
    """Undo merge_lora. Idempotent."""
    for _, m in lora_modules(model):
        m.unmerge()


def remove_lora(model):
    """Turn every LoRALinear back into a plain nn.Linear (keeping `weight`, merged or not), e.g. before
    save_pretrained, whose checkpoints hold base keys only."""
    for _, m in lora_modules(model):
        for attr in ("lora_A", "lora_B", "r", "alpha", "scaling", "dropout", "active", "merged"):
            delattr(m, attr)
        m.__class__ = quant.QuantLinear if isinstance(m, quant.QuantLinear) else nn.Linear
    return model


# -----------------------------------------------------------------------------
# adapter files (PEFT layout)


def peft_key(path, which):
    return f"base_model.model.{path}.lora_{which}.weight"


def adapter_state_dict(model, name="default"):
    """{PEFT key: tensor} of adapter `name` (only the layers this model or pipeline stage holds)."""
    state = {}
    for path, m in lora_modules(model):
        if name in m.lora_A:
            state[peft_key(path, "A")] = m.lora_A[name].detach()
            state[peft_key(path, "B")] = m.lora_B[name].detach()
    return state


def base_fingerprint(model):
    """{key: short hash} of 16 rows spread over each FINGERPRINTED tensor this model (or stage) holds.
    Hashed as bf16, so one base loaded in float32 or bfloat16 gives the same fingerprint."""
    params, out = dict(model.named_parameters()), {}
    for key in FINGERPRINTED:
        w = params.get(key)
        if w is not None and not w.is_meta:
            rows = w.detach()[:: max(1, w.shape[0] // 16)].to(torch.bfloat16).view(torch.int16).cpu()
            out[key] = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
    return out


def adapter_metadata(model):
    """The adapter file's safetensors metadata: the base's fingerprint rides there, not in
    adapter_config.json, whose unknown keys older PEFT releases refuse."""
    return {"format": "pt", "base_model_fingerprint": json.dumps(base_fingerprint(model))}


def check_base(model, cfg, path):
    """Refuse an adapter whose file records another base; files without a fingerprint (PEFT's)
    pass, and only the tensors this model or stage holds are compared."""
    with glm.open_safetensors(path) as f:
        recorded = (f.metadata() or {}).get("base_model_fingerprint")
    try:
        recorded = json.loads(recorded) if recorded else {}
        assert isinstance(recorded, dict)
    except (ValueError, AssertionError):
        raise ValueError(f"{path}: the metadata's base_model_fingerprint is not a JSON object. "
                         "HINT: write the adapter again, or drop that metadata entry.") from None
    ours = base_fingerprint(model)
    differ = [k for k in ours if k in recorded and recorded[k] != ours[k]]
    if differ:
        raise ValueError(f"{path}: the adapter was trained on base "
                         f"{cfg.get('base_model_name_or_path') or '(unnamed)'}, whose '{differ[0]}' differs from "
                         f"this model's ({getattr(model, 'name_or_path', 'built in memory')}). {BASE_DIFFERS}")


def adapter_config(model, name="default", base_model_name_or_path=None):
    """adapter_config.json contents in PEFT's LoRA schema. PEFT holds one r/alpha/dropout per adapter."""
    mods = [(p, m) for p, m in lora_modules(model) if name in m.lora_A]
    if not mods:
        raise KeyError(f"the model has no adapter named '{name}'")
    settings = {(m.r[name], m.alpha[name], m.dropout[name]) for _, m in mods}
    if len(settings) > 1:
        raise ValueError(f"adapter '{name}' mixes settings {sorted(settings)} (r, alpha, dropout); "
                         "PEFT's adapter_config.json holds one of each. HINT: inject it with one call.")
    r, alpha, dropout = settings.pop()
    base_model_name_or_path = base_model_name_or_path or getattr(model, "name_or_path", None)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p, _ in mods}), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True,  # PEFT writes true in saved configs
        "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
    }


def save_adapter(model, out_dir, name="default", base_model_name_or_path=None):
    """adapter_model.safetensors + adapter_config.json of adapter `name`, written atomically."""
    from safetensors.torch import save_file
    config = adapter_config(model, name, base_model_name_or_path)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}

    def write(tmp):
        save_file(state, os.path.join(tmp, ADAPTER_FILE), metadata=adapter_metadata(model))
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    glm.atomic_dir(out_dir, write)


def read_adapter_config(adapter_dir):
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file. HINT: pass the folder written by save_adapter "
                                "(or PEFT's save_pretrained), holding adapter_config.json and "
                                "adapter_model.safetensors.")
    cfg = glm.read_json(path, "HINT: write the adapter again (save_adapter or PEFT's save_pretrained).")
    problems = [
        (cfg.get("peft_type") != "LORA", f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'"),
        (not isinstance(cfg.get("target_modules"), list), "target_modules is not a list of module names"),
        (cfg.get("fan_in_fan_out", False), "fan_in_fan_out is true (ChatGLM's linears are not transposed)"),
        (cfg.get("bias", "none") != "none", f"bias is {cfg.get('bias')!r}; only 'none' is supported"),
        (cfg.get("use_rslora") or cfg.get("use_dora"), "rsLoRA / DoRA adapters are not supported"),
        (cfg.get("rank_pattern") or cfg.get("alpha_pattern"), "per-module rank/alpha patterns are not supported"),
        (cfg.get("modules_to_save"), "modules_to_save (full trained modules) is not supported"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{path}: {what}. HINT: this loader reads plain LoRA adapters of ChatGLM-6B.")
    return cfg


BASE_DIFFERS = "HINT: the adapter was trained on a different base model; load it onto the base it was made for."


def read_adapter_tensors(path, shapes, name, num_layers, held, targets):
    """The adapter file's tensors of the blocks this model holds, checked against shapes
    {PEFT key: shape}: every key must fit a LoRA layer of the full model, every wanted key be present."""
    state = {}
    with glm.open_safetensors(path) as f:
        for key in f.keys():
            m = PEFT_KEY.fullmatch(key)
            layer = m and LAYER_LINEAR.fullmatch(m.group(1))
            if not layer or int(layer.group(1)) >= num_layers:
                raise KeyError(f"{path}: tensor '{key}' matches no LoRA layer of a {num_layers}-layer "
                               f"ChatGLM-6B. {BASE_DIFFERS}")
            if layer.group(1) not in held:
                continue  # a block another pipeline stage holds
            if key not in shapes:
                raise KeyError(f"{path}: tensor '{key}' has no LoRA layer for adapter '{name}' in this model "
                               f"(targets here: {targets}). HINT: adapter_config.json's target_modules "
                               "disagree with the file, or the model was injected with other targets.")
            got = tuple(f.get_slice(key).get_shape())
            if got != shapes[key]:
                raise ValueError(f"{path}: tensor '{key}' has shape {list(got)}, the model expects "
                                 f"{list(shapes[key])}. {BASE_DIFFERS} (hidden size differs) or "
                                 "adapter_config.json's r does not match the file.")
            state[key] = glm.checked_tensor(f, path, key)
    missing = [k for k in shapes if k not in state]
    if missing:
        raise KeyError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all); adapter "
                       f"'{name}' needs lora_A and lora_B for every targeted layer. {BASE_DIFFERS}")
    return state


def load_adapter(model, adapter_dir, name="default", device=None):
    """Load an adapter folder as adapter `name`, injecting it first if the model lacks it; make it active.

    Strict: every tensor in the file must fit a LoRA layer, every such layer gets both factors, and
    shapes must match. On a pipeline stage, tensors of blocks held elsewhere are skipped; keys that
    fit no block of the full model are still errors."""
    cfg = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file. HINT: adapters are read from safetensors; an "
                                "adapter_model.bin can be converted with safetensors.torch.save_file.")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # PEFT's defaults when a field is omitted
    num_layers, held = model.config.num_layers, set(model.transformer.layers.keys())
    existing = {p: m for p, m in lora_modules(model) if name in m.lora_A}
    for p, m in existing.items():
        if (m.r[name], m.alpha[name]) != (r, alpha):
            raise ValueError(f"{p}: adapter '{name}' exists with r={m.r[name]}, alpha={m.alpha[name]}, but "
                             f"{adapter_dir} has r={r}, lora_alpha={alpha}. HINT: load it under another name.")
    # the layers that must receive the file's tensors: as injected already, or as the config targets
    wanted = existing if existing or not held else find_targets(model, cfg["target_modules"])
    shapes = {}
    for p, m in wanted.items():
        shapes[peft_key(p, "A")] = (r, m.in_features)
        shapes[peft_key(p, "B")] = (m.out_features, r)

    state = read_adapter_tensors(path, shapes, name, num_layers, held, sorted({p.rsplit(".", 1)[-1] for p in wanted}))
    check_base(model, cfg, path)  # after the shapes, whose errors say more
    if not existing and held:
        inject_lora(model, cfg["target_modules"], r, alpha, cfg.get("lora_dropout", 0.0), name)
    for p, m in wanted.items():  # now all hold adapter `name`: injected above, or before the call
        for which, params in (("A", m.lora_A), ("B", m.lora_B)):
            old, new = params[name], state[peft_key(p, which)]
            if old.is_meta:  # injected on the meta device: the file's tensor becomes the parameter
                dev = device or (m.weight.device if not m.weight.is_meta else "cpu")
                params[name] = nn.Parameter(new.to(device=dev, dtype=old.dtype), requires_grad=old.requires_grad)
            else:
                with torch.no_grad():
                    old.copy_(new)
    if held:
        set_adapter(model, name)
    return model


# -----------------------------------------------------------------------------
# command line: merge an adapter into the base and write full HF weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(model_dir):
    """The dtype the base checkpoint stores its weights in (so a merged fp16 release stays fp16)."""
    key, file = next(iter(glm.safetensors_files(model_dir).items()))
    with glm.open_safetensors(file) as f:
        return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)


def merge_to_dir(model_dir, adapter_dir, out_dir, dtype=None):
    """Base + adapter -> a plain HF model folder whose weights carry the adapter. An int8 / int4 base
    is dequantized first (default bf16): the merged model is a float one."""
    stored = quant.stored_scheme(model_dir)
    dtype = dtype or (torch.bfloat16 if stored.bits else stored_dtype(model_dir))
    model = quant.from_pretrained(model_dir, dtype=dtype)
    if stored.bits:
        quant.dequantize_model(model, dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"{model_dir} is int{stored.bits}: its weights were dequantized to {name} and the adapter added, "
              f"so {out_dir} is a {name} model (the int{stored.bits} rounding stays in it)")
    load_adapter(model, adapter_dir)
    merge_lora(model)  # float32 arithmetic per layer, then cast back to `dtype`
    remove_lora(model)
    tok_path = os.path.join(model_dir, "ice_text.model")
    tokenizer = glm.Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    model.save_pretrained(out_dir, tokenizer=tokenizer)


def main(argv=None):
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model and write HF weights")
    m.add_argument("--model", required=True, help="base model folder (config.json, model*.safetensors)")
    m.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json, adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output model folder")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the base's stored dtype")
    args = p.parse_args(argv)
    merge_to_dir(args.model, args.adapter, args.out, None if args.dtype == "auto" else DTYPES[args.dtype])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    flags.run(main)
