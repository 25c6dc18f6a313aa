"""The optimiser: what trains, AdamW with fp32 masters, gradient sync and clipping, the lr schedule.

A master and its moments may be kept on another stage of the replica (the planner chooses).

    trained = optim.select_trainable(model, mode, ...)       # LoRA, the last N blocks, or all
    opt = optim.AdamW(optim.named_trainables(model), lr, weight_decay, d, plan.hosts)
    loss = dist.train_step(model, d, microbatches, loss_fn)  # gradients accumulate
    loss, norm, bad = optim.optimizer_step(opt, loss, lr, grad_clip, d, bad, step)
"""
import glob
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import ckpt
import dist
import glm
import lora


def lr_at(step, lr, warmup_steps, total_steps, min_ratio=0.1):
    """Linear warm-up, then cosine decay to min_ratio * lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# the learning rates that usually work when fine-tuning a pretrained ChatGLM-6B, by what trains
USUAL_LR = {"lora": (1e-5, 3e-3), "last_n": (1e-6, 3e-4), "full": (1e-6, 1e-4)}


def warn_settings(total_steps, warmup_steps, lr, mode, n_eval, pretrained=True):
    """Settings that quietly waste a run, said before it starts: a run that never leaves its warmup,
    a held-out set too small to mean anything, a learning rate far from the usual range."""
    warnings = []
    if total_steps < warmup_steps:  # equal: the last step reaches --lr
        warnings.append(f"the run's {total_steps} steps end inside the {warmup_steps}-step warmup, so the learning "
                        f"rate peaks at {lr_at(total_steps - 1, lr, warmup_steps, total_steps):.2g}, not --lr {lr:g}. "
                        "HINT: lower --warmup_steps")
    if 0 < n_eval < 8:
        warnings.append(f"only {n_eval} held-out examples: the eval loss will be mostly noise. HINT: raise "
                        "--holdout or pass a larger --eval_data")
    lo, hi = USUAL_LR[mode]
    if pretrained and not lo <= lr <= hi:
        warnings.append(f"--lr {lr:g} is far from the usual {lo:g}..{hi:g} for {mode} fine-tuning of a pretrained "
                        "model. HINT: check the exponent")
    for w in warnings:
        dist.print0(f"warning: {w}")
    return warnings


# -----------------------------------------------------------------------------
# what trains, and the optimiser step


def train_mode(lora_rank, train_layers, num_layers):
    """"lora" (frozen base + adapters), "last_n" (only the last blocks) or "full"."""
    if lora_rank > 0 and train_layers > 0:
        raise ValueError("--lora_rank and --train_layers are exclusive: pick one way to train")
    if train_layers > num_layers:
        raise ValueError(f"--train_layers {train_layers} is larger than the model's {num_layers} blocks; "
                         f"use 1..{num_layers}, or 0 to train everything")
    if train_layers < 0 or lora_rank < 0:
        raise ValueError("--train_layers and --lora_rank must be >= 0")
    return "lora" if lora_rank > 0 else "last_n" if train_layers > 0 else "full"


def select_trainable(model, mode, lora_rank=8, lora_alpha=16.0, lora_targets=("query_key_value",),
                     lora_dropout=0.0, train_layers=0, seed=0, adapter_dir=None, adapter="default"):
    """Mark what trains (LoRA adapters, the last train_layers blocks, or everything), route the
    trained bf16 linears' weight gradients into fp32 (fuse_weight_grads) and return those
    parameters (their fp32 masters are the optimiser's: see AdamW). adapter_dir: resume the
    adapter from there."""
    if mode == "lora":
        lora.inject_lora(model, targets=tuple(lora_targets), r=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                         name=adapter, dtype=torch.float32, seed=seed)
        if adapter_dir is not None:
            lora.load_adapter(model, adapter_dir, name=adapter)
    else:
        first_trained = model.config.num_layers - train_layers if mode == "last_n" else 0
        for name, p in model.named_parameters():
            m = glm.LAYER_KEY.fullmatch(name)
            p.requires_grad_(mode == "full" or (m is not None and int(m.group(1)) >= first_trained))
    fuse_weight_grads(model)
    return [p for p in model.parameters() if p.requires_grad]


def check_sft_adapter(cfg, what):
    """Where a run that continues an SFT result starts: cfg.model (an HF folder) plus, for LoRA,
    cfg.sft_adapter, whose r, alpha and targets the run's adapter (`what`) takes. Mismatches are errors."""
    if os.path.isfile(os.path.join(cfg.model, lora.CONFIG_FILE)) and \
            not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise ValueError(f"--model {cfg.model} holds a LoRA adapter, not a model. HINT: pass the base it was "
                         f"trained on as --model and this folder as --sft_adapter")
    if not cfg.sft_adapter:
        return cfg
    if cfg.train_layers:
        raise ValueError("--sft_adapter continues a LoRA adapter, --train_layers trains blocks: pick one. HINT: "
                         "for --train_layers, merge the adapter first (python lora.py merge) and pass it as --model")
    acfg = lora.read_adapter_config(cfg.sft_adapter)
    r, alpha = int(acfg.get("r", 8)), float(acfg.get("lora_alpha", 8))  # PEFT's defaults
    if cfg.lora_rank not in (0, r):  # the adapter continues the SFT adapter: its shape is given
        raise ValueError(f"--lora_rank {cfg.lora_rank}, but --sft_adapter {cfg.sft_adapter} has r={r}: {what} "
                         "continues that adapter, so it keeps its rank. HINT: leave out --lora_rank")
    cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = r, alpha, ",".join(acfg["target_modules"])
    return cfg


def named_trainables(model, heads=None):
    """{name: parameter} of what trains on this stage: the model's trained tensors plus those of
    extra head modules ({prefix: module}); the names under which optimiser state is saved."""
    named = dict(model.named_parameters())
    for prefix, module in (heads or {}).items():
        named.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
    return {n: p for n, p in named.items() if p.requires_grad}


def unit_of(name):
    """The planner's unit of optimiser state a parameter belongs to ("embedding", "head",
    "layer i/attention" with the input LayerNorm, "layer i/mlp" with the post-attention one);
    None for tensors outside the model (reward and value heads)."""
    m = glm.LAYER_KEY.fullmatch(name)
    if m:
        mlp = m.group(2).startswith(("mlp.", "post_attention_layernorm."))
        return f"layer {m.group(1)}/{'mlp' if mlp else 'attention'}"
    if name.startswith("transformer.word_embeddings."):
        return "embedding"
    if name.startswith(("transformer.final_layernorm.", "lm_head.")):
        return "head"
    return None


# -----------------------------------------------------------------------------
# the optimiser: fp32 masters of bf16 weights, kept on this stage or on another
#
# On GPUs a stage computes in bf16, trained weights included. (Under autocast every micro-batch
# would cast each fp32 weight to bf16 again and keep that copy for its backward: one copy per
# micro-batch in flight, most of them on stage 0.) Precision lives in fp32 tensors beside each
# trained bf16 weight w:
#   w.main_grad  the gradient accumulator (bf16 sums of M terms would lose the late ones): the
#                weight-gradient GEMM of a MainGradLinear adds into it directly; for other tensors
#                a hook adds each micro-batch's bf16 gradient and frees it at once
#   master       the weight AdamW updates; w is refreshed from it, rounded to bf16, after a step
#   m, v         AdamW's moments
# A float32 weight (CPU runs, LoRA adapters, heads) is its own master and sums in .grad.
#
# Master and moments are 12 of the 18 bytes a trained weight costs, and only the optimiser step
# touches them. So they can live on another stage of the replica (`hosts`, chosen by the
# planner): at the step the owner sends the summed fp32 gradient to the host, which runs AdamW
# and sends the new weight back, 6 bytes per weight over P2P once per step. That evens out the
# memory the layer split cannot: stage 0 holds the 9 GiB embedding, which costs no compute to
# balance it against, on top of the most micro-batches in flight.


def _accumulate_fp32(p):
    """Post-accumulate hook of a bf16 trained weight: fold its fresh gradient into main_grad."""
    if p.grad is None:  # a MainGradLinear weight, whose GEMM already added into main_grad
        return
    if p.main_grad is None:
        p.main_grad = p.grad.float()
    else:
        p.main_grad.add_(p.grad)
    p.grad = None


@torch.no_grad()
def adamw_update(params, grads, states, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """One AdamW step (Loshchilov & Hutter) on fp32 tensors in place, each with its gradient and its
    state {"step", "exp_avg", "exp_avg_sq"}:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p (1 - lr wd) - lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)
    in torch's fused kernel (one launch for all tensors: a per-tensor loop costs ~8 ms a step over
    the 56 LoRA tensors of ChatGLM-6B on an H200), called without torch.optim's classes, which
    import the compiler stack: ~2 s of start-up in every process."""
    if not params:
        return
    for p, st in zip(params, states):
        if "exp_avg" not in st:
            st.update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                      exp_avg_sq=torch.zeros_like(p))
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1.0)
    torch._fused_adamw_(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
                        steps, lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
                        amsgrad=False, maximize=False)


class AdamW:
    """AdamW (betas 0.9, 0.95; decay on matrices only) over this stage's trained tensors
    {name: parameter}, through fp32 masters. hosts {unit: stage} keeps the masters and moments
    of those units (see unit_of) on another stage of the replica (every stage passes the same
    dict)."""

    def __init__(self, named, lr, weight_decay, d=None, hosts=None):
        self.d = d = d or dist.get()
        self.owned = dict(named)
        hosts = hosts or {}
        self.away = {n: hosts[unit_of(n)] for n in sorted(self.owned)
                     if hosts.get(unit_of(n), d.pp_rank) != d.pp_rank}  # {name: host stage}
        for p in self.owned.values():
            if p.dtype != torch.float32:
                p.main_grad = None
                p.register_post_accumulate_grad_hook(_accumulate_fp32)  # embedding, LayerNorms, biases
        self.masters = {n: p if p.dtype == torch.float32 else p.detach().float()
                        for n, p in self.owned.items() if n not in self.away}
        self.guests = {}  # {name: (owner stage, owner dtype)} of the masters kept here for others
        if hosts and d.P > 1:
            self._adopt_guests()
        self.weight_decay = weight_decay
        self.state = {}  # {master: {"step", "exp_avg", "exp_avg_sq"}}, as torch's AdamW names them

    def _adopt_guests(self):
        """Every stage learns which tensors it hosts (name, shape, dtype, owner); owners send
        their starting values."""
        mine = {n: (h, tuple(self.owned[n].shape), str(self.owned[n].dtype)) for n, h in self.away.items()}
        recvs = []
        for owner, table in enumerate(dist.gather_stage_objects(mine, self.d)):
            for n, (h, shape, dtype) in sorted(table.items()):
                if h == self.d.pp_rank:
                    self.guests[n] = (owner, getattr(torch, dtype.split(".")[-1]))
                    self.masters[n] = torch.empty(shape, device=self.d.device)
                    recvs.append((self.masters[n], owner))
        dist.exchange(self.d, [(self.owned[n].detach().float(), h) for n, h in self.away.items()], recvs)

    def grads(self):
        """This stage's summed fp32 gradients, one per trained tensor (zeros where none arrived)."""
        out = []
        for p in self.owned.values():
            attr = "grad" if p.dtype == torch.float32 else "main_grad"  # an fp32 weight sums in .grad
            if getattr(p, attr) is None:
                setattr(p, attr, torch.zeros_like(p, dtype=torch.float32))
            out.append(getattr(p, attr))
        return out

    def step(self, lr):
        grads = dict(zip(self.owned, self.grads()))
        # gradients of tensors kept elsewhere go to their hosts; our guests' gradients come here
        inbox = {n: torch.empty_like(self.masters[n]) for n in self.guests}
        dist.exchange(self.d, [(grads[n], h) for n, h in self.away.items()],
                      [(inbox[n], owner) for n, (owner, _) in self.guests.items()])
        for matrices in (True, False):  # decay on matrices only, never on biases and LayerNorms
            names = [n for n, t in self.masters.items() if (t.dim() >= 2) == matrices]
            adamw_update([self.masters[n] for n in names], [inbox[n] if n in inbox else grads[n] for n in names],
                         [self.state.setdefault(self.masters[n], {}) for n in names], lr,
                         self.weight_decay if matrices else 0.0)
        # the new weights: back to their owners, and into this stage's own bf16 copies
        dist.exchange(self.d, [(self.masters[n].to(dtype), owner) for n, (owner, dtype) in self.guests.items()],
                      [(self.owned[n].detach(), h) for n, h in self.away.items()])
        self._refresh_working()

    def _refresh_working(self):
        with torch.no_grad():
            for n, t in self.masters.items():
                p = self.owned.get(n)
                if p is not None and p is not t:
                    p.copy_(t)

    def zero_grad(self):
        for p in self.owned.values():
            p.grad = None
            if p.dtype != torch.float32:
                p.main_grad = None

    def state_by_name(self):
        """AdamW state of every master kept here (own or hosted), keyed by parameter name, so any
        other pipeline split finds its share; with the master itself where the saved weight is
        only its bf16 rounding."""
        out = {}
        for n, t in self.masters.items():
            st = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.state.get(t, {}).items()}
            if self.owned.get(n) is not t:
                st["master"] = t.detach().cpu()
            out[n] = st
        return out

    def load(self, ckpt_dir, prefix="optim"):
        """Fill the state from every {prefix}-stage*.pt file of a checkpoint (written with any P)."""
        merged = {}
        for path in sorted(glob.glob(os.path.join(ckpt_dir, f"{prefix}-stage*.pt"))):
            merged.update(ckpt.read_pt(path))
        for n, t in self.masters.items():
            if n not in merged:
                raise KeyError(f"{ckpt_dir}: no optimiser state for '{n}'. HINT: resume with the same "
                               "training mode (--lora_rank / --train_layers) the checkpoint was written with")
            st = dict(merged[n])
            master = st.pop("master", None)
            if master is not None:
                with torch.no_grad():
                    t.copy_(master)
            self.state[t] = {k: torch.as_tensor(v, dtype=torch.float32).to(t.device) if k == "step" else v.to(t.device)
                             for k, v in st.items()}
        self._refresh_working()


def sync_grads(grads, d, bucket=1 << 26):
    """Sum fp32 gradients over the data-parallel replicas in place (losses are already scaled by
    the global token count), in all-reduces of up to `bucket` elements."""
    if d.D == 1:
        return
    group, size = [], 0

    def flush():
        if len(group) == 1:
            dist.all_reduce(group[0], "sum", d.dp_group)
        else:
            flat = dist.all_reduce(torch.cat([g.reshape(-1) for g in group]), "sum", d.dp_group)
            for g, part in zip(group, flat.split([g.numel() for g in group])):
                g.copy_(part.view_as(g))
        group.clear()

    for g in grads:
        if group and size + g.numel() > bucket:
            flush()
            size = 0
        group.append(g)
        size += g.numel()
    if group:
        flush()


def clip_grad_norm(grads, max_norm, d):
    """Global gradient norm over all stages (each holds different tensors); clip to max_norm."""
    sq = torch.zeros((), device=d.device)
    # one multi-tensor kernel (a norm kernel per tensor took ~15 us on CUDA, 0.8 ms a LoRA step),
    # the squares summed in order as before
    for n in torch._foreach_norm(grads) if grads else ():
        sq += n.square()
    norm = dist.all_reduce(sq, "sum", d.pp_group).sqrt()
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))  # one kernel, as g.mul_ each
    return norm


def optimizer_step(opt, loss, lr, grad_clip, d, bad_steps, step, max_bad=10):
    """After train_step: global loss, replica-summed and clipped gradients, then the update,
    skipped (and counted) when the loss or gradient is not finite. Returns (loss, grad norm,
    consecutive bad steps); stops the run after max_bad bad steps in a row."""
    loss = dist.all_reduce(loss.detach().clone(), "sum", d.dp_group).item()
    grads = opt.grads()
    sync_grads(grads, d)
    norm = float(clip_grad_norm(grads, grad_clip, d))
    if math.isfinite(loss) and math.isfinite(norm):
        opt.step(lr)
        bad_steps = 0
    else:
        bad_steps += 1
        dist.print0(f"step {step}: non-finite loss/gradient ({loss}, {norm}); update skipped ({bad_steps} in a row)")
        if bad_steps >= max_bad:
            raise ValueError(f"step {step}: the loss or gradient was not finite for {max_bad} steps in a row; the "
                             "run stops and writes no final/. HINT: lower --lr (or raise --warmup_steps), check the "
                             "data, and --resume from the last checkpoint")
    opt.zero_grad()
    return loss, norm, bad_steps


# -----------------------------------------------------------------------------
# weight gradients summed straight into fp32 accumulators


def add_weight_grad(main_grad, g, x, fp32_gemm=False):
    """main_grad [out, in] (fp32) += g^T x, with g [N, out] and x [N, in] in bf16: with fp32_gemm one
    GEMM that reads and writes the fp32 accumulator itself (no bf16 gradient tensor, no second
    pass to add it), else an fp32 matmul."""
    if fp32_gemm:
        torch.addmm(main_grad, g.t(), x, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.addmm_(g.t().float(), x.float())


def fp32_accumulating_gemm(device):
    """Does this torch build sum a bf16 GEMM into an fp32 output in place on `device`? Checked
    against a float64 product, so a build without it (or with other semantics) takes the fallback."""
    try:
        a, b = (torch.randn(64, 32, device=device).bfloat16(), torch.randn(32, 48, device=device).bfloat16())
        c = torch.randn(64, 48, device=device)
        want = c.double() + a.double() @ b.double()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return torch.allclose(c.double(), want, rtol=1e-3, atol=1e-3)
    except (RuntimeError, TypeError):
        return False


class _LinearIntoMainGrad(torch.autograd.Function):
    """y = x W^T + b whose backward adds dL/dW straight into W.main_grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, fp32_gemm):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.fp32_gemm = bias is not None, fp32_gemm
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # [N, out]
        if ctx.needs_input_grad[1]:  # the weight trains (it may have been frozen after fusing)
            if getattr(weight, "main_grad", None) is None:
                weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            add_weight_grad(weight.main_grad, g2, x.reshape(-1, x.shape[-1]), ctx.fp32_gemm)
        gx = g @ weight if ctx.needs_input_grad[0] else None  # [..., in]
        return gx, None, g2.sum(0) if ctx.has_bias else None, None


class MainGradLinear(nn.Linear):
    """nn.Linear whose trained bf16 weight receives its gradient straight into `main_grad`."""

    fp32_gemm = False  # may its GEMM add into the fp32 accumulator itself? (set by fuse_weight_grads)

    def forward(self, x):
        if torch.is_grad_enabled():
            return _LinearIntoMainGrad.apply(x, self.weight, self.bias, self.fp32_gemm)
        return F.linear(x, self.weight, self.bias)


def fuse_weight_grads(model):
    """Turn every plain nn.Linear whose bf16 weight trains into a MainGradLinear, in place (the class
    changes, the tensors stay), as lora.py turns layers into LoRA layers; the fused GEMM checked once."""
    checked = {}  # {device: does the fused GEMM work there?}
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.requires_grad and m.weight.dtype != torch.float32:
            m.__class__ = MainGradLinear
            dev = m.weight.device
            if dev not in checked:
                checked[dev] = dev.type == "cuda" and fp32_accumulating_gemm(dev)
            m.fp32_gemm = checked[dev]
    return model
