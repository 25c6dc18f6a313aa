"""Preference training for ChatGLM-6B straight from ranked answers: DPO, listwise DPO, IPO, SimPO.

No reward model and no critic: the policy (the SFT model) learns from the ranking itself, held
near a frozen reference (the SFT model too) whose log-probs are computed once, before training.

    python train_dpo.py                                   # toy: the toy SFT model on the toy rankings (CPU, seconds)
    python train_dpo.py --model SFT_DIR --data FILE --out DIR                 # full fine-tune of an SFT folder
    python train_dpo.py --model SFT_DIR --data FILE --out DIR --train_layers 4
    python train_dpo.py --model BASE_DIR --sft_adapter SFT_OUT/final --data FILE --out DIR --lr 5e-5   # LoRA
    python train_dpo.py --model SFT_DIR --lora_rank 8 --data FILE --out DIR   # LoRA; the reference: adapter off
    python train_dpo.py ... --loss listwise | ipo | simpo   [--pairs adjacent] [--beta 0.1]
    torchrun --nproc_per_node=8 train_dpo.py --model DIR --data FILE --out DIR --pp 4   # 4 stages x 2 replicas
    ... --resume                                          # continue from the newest OUT/checkpoint-STEP

Data: train_rm.py's ranked files (K >= 2 answers best first, optional "ranks" and "history"; or
{prompt, chosen, rejected}). For an answer y to prompt x, log pi(y|x) sums the log-probs of its
tokens and <eop>; r = beta (log pi(y|x) - log pi_ref(y|x)) is its implicit reward, and for each
ordered pair (w better than l), with h = r_w - r_l:
    dpo       -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)            eps = --label_smoothing
    ipo       (h / beta - 1 / (2 beta))^2
    simpo     -(1 - eps) log sigmoid(z) - eps log sigmoid(-z),  z = beta (log pi_w / |y_w| - log pi_l / |y_l|)
              - gamma: length-normalised, and no reference at all      gamma = --simpo_gamma
    listwise  per prompt, -sum_k log softmax_{j >= k} r_j over its answers best first (Plackett-Luce,
              the DPO paper's appendix; K = 2 is dpo)
dpo, ipo and simpo average over the global batch's pairs (all K(K-1)/2 of a prompt, or its K-1
neighbours with --pairs adjacent), listwise over its prompts; --sft_coef adds that much of the best
answers' mean token NLL. A line's "margin" (train_rm.py's) plays no part here.

Reference: in LoRA mode the frozen SFT adapter (--sft_adapter), or the bare base when the policy's
adapter is new; in full and last-N modes the --model weights. A first pass writes its per-token
log-probs of every train and held-out answer to OUT/ref_logps.pt, keyed by the answers' tokens and
the reference's files, so training runs one model; a later run or --resume reads it back, or says
it is stale and computes it again. --no_ref_cache runs the reference every step instead (full and
last-N: a second, frozen copy of the model). A prompt's K answers share one row, the prompt computed
once (data.shared_prompt_row); --no_shared_prompt gives each answer its own row.
"""
import contextlib
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import ckpt
import data
import dist
import flags
import glm
import lora
import optim
import plan
import quant

LOSSES = ("dpo", "listwise", "ipo", "simpo")
REF_FILE = "ref_logps.pt"


@dataclass
class Config:
    # ---- model
    model: str = ""                 # HF folder: a full / last-N SFT result, or the base of a LoRA one; "" = toy
    sft_adapter: str = ""           # a LoRA SFT result: the policy's adapter starts there; a frozen copy: the reference
    quantize: int = 0               # 8 / 4: the frozen base's block linears in int8 / int4 (LoRA only); 0 = off
    quant_group_size: int = -1      # inputs per int scale: 0 = one per row; -1 = int8 per row, int4 128
    quantize_head: bool = False     # with --quantize: lm_head in int8 too (one scale per row)
    out: str = "runs/dpo"           # the run's folder: checkpoints, metrics, ref_logps.pt, final/
    # ---- data
    data: str = ""                  # ranked jsonl (train_rm.py's formats); "" = the bundled toy ranking set
    eval_data: str = ""             # held-out jsonl; "" = hold out `holdout` of --data
    holdout: float = 0.05           # share of --data held out for evaluation when no --eval_data
    max_len: int = 512              # per answer: prompt + answer + <eop>; the prompt is cut first
    no_shared_prompt: bool = False  # one row per answer instead of one per prompt (the prompt computed K times)
    # ---- the loss
    loss: str = "dpo"               # dpo, listwise, ipo or simpo
    pairs: str = "all"              # all: every ordered pair of a prompt's answers; adjacent: neighbours only
    beta: float = 0.1               # the implicit reward's scale (dpo, listwise, simpo); IPO's target is 1/(2 beta)
    label_smoothing: float = 0.0    # dpo, simpo: the share of labels taken as flipped (conservative DPO)
    simpo_gamma: float = 0.5        # simpo: the target margin gamma of the length-normalised rewards
    sft_coef: float = 0.0           # weight of the best answer's mean token NLL added to the loss
    no_ref_cache: bool = False      # run the reference every step instead of reading OUT/ref_logps.pt
    # ---- what trains: LoRA (lora_rank > 0), the last N blocks (train_layers > 0), else everything
    lora_rank: int = 0              # with --sft_adapter, 0 takes the adapter's own r, alpha and targets
    lora_alpha: float = 16.0        # LoRA scale is alpha / r
    lora_dropout: float = 0.0       # dropout on the LoRA branch's input
    lora_targets: str = "query_key_value"  # comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    train_layers: int = 0           # train only the last N blocks (0: all, unless LoRA)
    # ---- optimiser (the DPO paper: lr 1e-6 full, beta 0.1; LoRA ~5e-5)
    max_steps: int = 0              # 0 = run `epochs` epochs
    epochs: float = 1.0             # passes over --data (when max_steps is 0)
    micro_batch_size: int = 2       # prompts per micro-batch; each brings all of its K answers
    grad_accum: int = 8             # micro-batches per step and replica (the M of 1F1B)
    lr: float = 1e-6                # peak learning rate
    warmup_steps: int = 20          # linear warmup, then cosine decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.1       # the cosine schedule's floor, as a share of lr
    weight_decay: float = 0.0       # AdamW's decoupled weight decay
    grad_clip: float = 1.0          # clip the global gradient norm to this (0: off)
    seed: int = 0                   # data order, initialisation and sampling
    # ---- memory and the pipeline
    checkpoint: bool = False        # activation checkpointing in every block (the planner may add some)
    pp: int = 1                     # pipeline stages; data-parallel replicas = world size / pp
    plan: str = "auto"              # "auto" (balanced memory and time) or "naive" (equal layer counts)
    gpu_mem_gib: float = 0.0        # memory budget per GPU for the planner; 0 = the card's
    # ---- logs and checkpoints
    log_every: int = 10             # write metrics.jsonl every N steps
    eval_every: int = 100           # evaluate on the held-out set every N steps
    save_every: int = 200           # checkpoint every N steps and at the end
    resume: bool = False            # continue from the newest complete checkpoint in --out
    overwrite: bool = False         # write into an --out that holds something else
    keep_checkpoints: int = 2       # the newest N checkpoints stay on disk
    allow_data_change: bool = False  # --resume on data files whose contents changed
    keep_best: bool = False         # final/ = the checkpoint with the best held-out loss, not the last
    timeout_min: float = 10.0       # a rank silent this long (stalled, dead) ends the run
    threads: int = 0                # CPU threads per process (0: torch's default; the toy run: 1)


# flags that must be > 0, and >= 0 (every number must be finite)
POSITIVE = ("timeout_min", "max_len", "micro_batch_size", "grad_accum", "epochs", "log_every", "eval_every",
            "save_every", "keep_checkpoints", "pp", "lora_alpha", "beta")
NON_NEGATIVE = ("threads", "lr", "max_steps", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "holdout",
                "lora_rank", "lora_dropout", "train_layers", "gpu_mem_gib", "label_smoothing", "simpo_gamma",
                "sft_coef")


def check_config(cfg):
    """The loss flags, checked before any work."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss {cfg.loss!r} is not one of {', '.join(LOSSES)}. HINT: e.g. --loss dpo")
    if cfg.pairs not in ("all", "adjacent"):
        raise ValueError(f"--pairs {cfg.pairs!r} is not 'all' or 'adjacent'. HINT: e.g. --pairs adjacent")
    if cfg.label_smoothing and cfg.loss not in ("dpo", "simpo"):
        raise ValueError(f"--label_smoothing is for --loss dpo and simpo, not {cfg.loss}. HINT: leave it out")
    if cfg.label_smoothing >= 0.5:
        raise ValueError(f"--label_smoothing {cfg.label_smoothing}: at 0.5 or more the labels count as flipped. "
                         "HINT: use a small share such as 0.1")
    return cfg


# -----------------------------------------------------------------------------
# the losses, on per-answer log-probs (pure functions of tensors: the tests check them in float64)


def pair_losses(pi, ref, length, better, worse, loss, beta, label_smoothing=0.0, gamma=0.0):
    """Per pair loss [P] of dpo, ipo or simpo from the answers' summed log-probs pi, ref [N] and
    their token counts length [N] (with <eop>); better/worse [P] index the answers."""
    if loss == "simpo":  # reference-free: mean token log-probs, and a target margin gamma
        avg = pi / length
        z = beta * (avg[better] - avg[worse]) - gamma
    else:
        logr = pi - ref  # [N] log pi / pi_ref
        h = logr[better] - logr[worse]
        if loss == "ipo":  # squared distance of the log-ratio gap from its target 1/(2 beta)
            return (h - 1 / (2 * beta)) ** 2
        z = beta * h
    # logsigmoid stays exact for any gap, where log(sigmoid(z)) underflows to -inf
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def listwise_losses(pi, ref, sizes, beta):
    """Per prompt Plackett-Luce loss [G]: -sum_k log softmax over answers k..K of r = beta (pi - ref),
    the answers of each prompt contiguous and best first (sizes: K per prompt)."""
    out = []
    for r in (beta * (pi - ref)).split(sizes):
        tail = torch.logcumsumexp(r.flip(0), 0).flip(0)  # [K]: logsumexp of r[k:]
        out.append((tail - r).sum())  # the k = K term is 0: the worst answer alone is its own softmax
    return torch.stack(out)


def token_logps(model, h, mb):
    """log pi of every answer token [N_tok] in float32: lm_head only at the columns that predict one,
    in chunks (glm.head_logprobs: no [T, V] logits of whole rows, which would be mostly prompt)."""
    return glm.head_logprobs(model.lm_head, h[mb["pred_row"], mb["pred_col"]], mb["target"])[0]  # [N_tok]


def per_answer(tok_values, mb):
    """Per-token values [N_tok] summed per answer [N]."""
    out = torch.zeros(len(mb["answer_len"]), dtype=tok_values.dtype, device=tok_values.device)
    return out.index_add_(0, mb["tok_answer"], tok_values)


def mb_loss(cfg, pi_tok, mb, n_pairs, n_groups):
    """One micro-batch's share of the step's loss, from its policy token log-probs: summed terms over
    the global batch's pair count (or, listwise and the SFT term, its prompt count)."""
    pi = per_answer(pi_tok, mb)
    ref = per_answer(mb["ref_tok"], mb) if "ref_tok" in mb else torch.zeros_like(pi)  # simpo: none
    if cfg.loss == "listwise":
        loss = listwise_losses(pi, ref, mb["sizes"], cfg.beta).sum() / n_groups
    else:
        use = mb["adjacent"] if cfg.pairs == "adjacent" else slice(None)
        loss = pair_losses(pi, ref, mb["answer_len"].float(), mb["better"][use], mb["worse"][use], cfg.loss,
                           cfg.beta, cfg.label_smoothing, cfg.simpo_gamma).sum() / n_pairs
    if cfg.sft_coef:  # NLL per token of each prompt's best answer, so long answers do not dominate
        best = mb["best"]
        loss = loss + cfg.sft_coef * (-pi[best] / mb["answer_len"][best]).sum() / n_groups
    return loss


def dpo_loss(cfg, n_pairs, n_groups):
    """The last stage's loss_fn for dist.train_step."""
    return lambda model, h, mb: mb_loss(cfg, token_logps(model, h, mb), mb, n_pairs, n_groups)


# -----------------------------------------------------------------------------
# micro-batches


def microbatches(groups, idx, micro_batch_size, pad_id, device, gcfg=None, ref=None):
    """The prompts idx -> micro-batches of micro_batch_size prompts with all their answers:
    data.group_rows (with gcfg one row per prompt, the prompt shared), every ordered pair (better,
    worse, pair_group; adjacent marks neighbours), best [G] (each prompt's first answer), sizes, and
    with ref (per prompt: its answers' reference token log-probs) ref_tok [N_tok]."""
    out = []
    for m in range(0, len(idx), micro_batch_size):
        chunk = idx[m:m + micro_batch_size]
        mb, sizes = data.group_rows([(groups[i]["prompt"], groups[i]["answers"]) for i in chunk], pad_id, gcfg)
        better, worse, group = data.ranked_pairs(sizes)  # [P] each
        mb.update(better=better, worse=worse, pair_group=group, adjacent=worse == better + 1,
                  best=torch.tensor([0] + sizes[:-1]).cumsum(0))
        if ref is not None:
            mb["ref_tok"] = torch.cat([ref[i] for i in chunk])
        out.append({**{k: v.to(device) for k, v in mb.items()}, "sizes": sizes})
    return out


def counts(mbs, pairs, group=None):
    """(pairs the loss takes, prompts) in these micro-batches, summed over the replicas of `group`
    (None: none), each at least 1: the loss's denominators."""
    n_pairs = sum(int(mb["adjacent"].sum()) if pairs == "adjacent" else len(mb["better"]) for mb in mbs)
    n = torch.tensor([float(n_pairs), float(sum(len(mb["sizes"]) for mb in mbs))],
                     device=mbs[0]["input_ids"].device if mbs else "cpu")
    n = (n if group is None else dist.all_reduce(n, "sum", group)).clamp(min=1)
    return n[0], n[1]


# -----------------------------------------------------------------------------
# the reference: where it runs, its fingerprint, the cache


@contextlib.contextmanager
def running_as_reference(model, lora_mode, ref_adapter):
    """The stage model as the reference, in eval mode: in LoRA mode its adapter ref_adapter, or no
    adapter (None); otherwise the model as it is (a frozen copy, or the policy before its first step)."""
    was = model.training
    model.eval()
    active = {m: m.active for _, m in lora.lora_modules(model)}
    try:
        if lora_mode:
            lora.set_adapter(model, ref_adapter)
        yield model
    finally:
        for m, name in active.items():
            m.active = name
        model.train(was)


def file_head_tail(path, h, n=1 << 20):
    """Hash a file's size and its first and last n bytes into h (weights: a cheap, strong enough identity)."""
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(n))
        f.seek(max(size - n, 0))
        h.update(f.read(n))


def ref_key(cfg, groups, dtype):
    """What cached reference log-probs depend on: every answer's tokens (data, split, template and
    truncation), the reference's files (--model's config and weights, --sft_adapter's), the dtype and
    the base's quantization."""
    toks = hashlib.sha256(json.dumps([[g["prompt"], g["answers"]] for gs in groups.values() for g in gs]).encode())
    ref = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(cfg.model, "*.safetensors"))) + [os.path.join(cfg.model, "config.json")]
    if cfg.sft_adapter:
        files.append(os.path.join(cfg.sft_adapter, lora.ADAPTER_FILE))
    for path in files:
        file_head_tail(path, ref)
    return {"answers": toks.hexdigest(), "reference": ref.hexdigest(), "dtype": str(dtype),
            "quantize": [cfg.quantize, cfg.quant_group_size] + [1] * cfg.quantize_head}  # int8 / int4 score otherwise


def split_tokens(flat, groups):
    """A flat [sum of tokens] tensor -> one [tokens] tensor per group, in order."""
    return list(flat.split([sum(map(len, g["answers"])) for g in groups]))


def compute_reference(ref_run, groups, cfg, pad_id, gcfg, d):
    """{split: per group [tokens] reference log-probs}: each replica runs its share of the groups."""
    out = {}
    for split, gs in groups.items():
        sizes = [sum(map(len, g["answers"])) for g in gs]
        starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
        flat = torch.zeros(starts[-1], device=d.device)
        mine = list(range(d.dp_rank, len(gs), d.D))
        mbs = microbatches(gs, mine, cfg.micro_batch_size, pad_id, d.device, gcfg)
        for m, lp in enumerate(ref_run(mbs) if mbs else ()):
            chunk = mine[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
            for i, part in zip(chunk, lp.split([sizes[i] for i in chunk])):
                flat[starts[i]:starts[i + 1]] = part
        out[split] = split_tokens(dist.all_reduce(flat, "sum", d.dp_group).cpu(), gs)  # each slot filled once
    return out


def reference_cache(path, key, ref_run, groups, cfg, pad_id, gcfg, d, sample=None):
    """The reference log-probs ({split: per group [tokens]}), read from path when its key matches,
    else computed and written there (rank 0, atomically), saying why. sample: () -> groups of
    answers drawn from the reference, computed with the rest and kept in the file: their groups
    under "kl_groups", their log-probs under "kl"."""
    if os.path.isfile(path):
        cached = ckpt.read_pt(path)
        if cached.get("key") == key and (sample is None or "kl_groups" in cached):
            dist.print0(f"reference log-probs: read {path}")
            groups = dict(groups, kl=cached["kl_groups"]) if sample else groups
            kept = {"kl_groups": groups["kl"]} if sample else {}
            return {**{s: split_tokens(cached[s], gs) for s, gs in groups.items()}, **kept}
        differ = [k for k in key if cached.get("key", {}).get(k) != key[k]] or ["the reference's samples"]
        dist.print0(f"reference log-probs: {path} is stale ({' and '.join(differ)} changed): computing them again")
    t0 = time.perf_counter()
    groups = dict(groups, kl=sample()) if sample else groups
    kept = {"kl_groups": groups["kl"]} if sample else {}
    out = compute_reference(ref_run, groups, cfg, pad_id, gcfg, d)
    if dist.is_main():
        tmp = path + ".tmp"
        torch.save({"key": key, **{s: torch.cat(v) if v else torch.zeros(0) for s, v in out.items()}, **kept}, tmp)
        os.replace(tmp, path)
    dist.barrier()
    dist.print0(f"reference log-probs: computed in {time.perf_counter() - t0:.1f} s, wrote {path}")
    return {**out, **kept}


class Reference:
    """The run's frozen reference. Called on micro-batches: its per-token log-probs of their answers
    ([N_tok] each, on every stage). .sample(): answers drawn from it. LoRA: the policy's model with
    the SFT adapter loaded again, frozen, as "reference" (or no adapter at all); full and last-N: the
    policy itself while untouched (fresh: before its first step), else a frozen copy of --model,
    built at first use."""

    def __init__(self, cfg, lora_mode, model, stage, d, fresh):
        self.lora_mode, self.adapter, self.d, self.held = lora_mode, None, d, []
        self.build = lambda: (model if lora_mode or fresh else  # else a frozen copy
                              dist.build_stage(cfg.model, stage, d).requires_grad_(False))
        if lora_mode and cfg.sft_adapter:
            lora.load_adapter(model, cfg.sft_adapter, name="reference")  # refuses an adapter of another base
            lora.mark_only_lora_trainable(model, "default")
            lora.set_adapter(model, "default")
            self.adapter = "reference"

    def running(self):
        if not self.held:
            self.held.append(self.build())
        return running_as_reference(self.held[0], self.lora_mode, self.adapter)

    def __call__(self, mbs):
        with self.running() as model:
            return dist.forward(model, self.d, mbs, token_logps, lambda mb: (len(mb["target"]),))

    def sample(self, groups, pad_id, eop_id, seed, batch_size=64):
        """One answer to each group's prompt, sampled at temperature 1, as groups {prompt, answers:
        [ids ending at <eop>]}; as long as the group's longest answer at most. Every rank gets rank
        0's samples (replicas sample alike from one seed, unless their kernels differ in rounding)."""
        out, g = [], torch.Generator(device=self.d.device).manual_seed(seed)
        with self.running() as model:
            for i in range(0, len(groups), batch_size):
                chunk = groups[i:i + batch_size]
                ids = glm.left_pad([c["prompt"] for c in chunk], pad_id).to(self.d.device)  # [b, T]
                n = max(len(a) for c in chunk for a in c["answers"])
                new, _ = dist.generate(model, self.d, ids, n, do_sample=True, generator=g)
                for c, row in zip(chunk, new[:, ids.shape[1]:].tolist()):
                    end = row.index(eop_id) + 1 if eop_id in row else len(row)
                    out.append({"prompt": c["prompt"], "answers": [row[:end]]})
        return dist.broadcast_object(out, self.d)


def reference_runner(cfg, mode, model, stage, d, fresh):
    """The run's Reference, or None for simpo (which uses none)."""
    return None if cfg.loss == "simpo" else Reference(cfg, mode == "lora", model, stage, d, fresh)


def reference_once(cfg, ref_run, live, groups, pad_id, eop_id, d, layout, dtype):
    """(the reference's cached log-probs {split: per group [tokens]}, {} when live or without a
    reference; the micro-batches of the KL: one answer sampled from the reference per held-out
    prompt, with their reference log-probs, or None without a reference)."""
    if ref_run is None:
        return {}, None
    sample = lambda: ref_run.sample(groups["eval"], pad_id, eop_id, cfg.seed)
    ref = {} if live else reference_cache(os.path.join(cfg.out, REF_FILE), ref_key(cfg, groups, dtype), ref_run,
                                          groups, cfg, pad_id, layout, d, sample)
    kl_g = sample() if live else ref["kl_groups"]
    kl_mbs = microbatches(kl_g, list(range(len(kl_g))), cfg.micro_batch_size, pad_id, d.device, layout, ref.get("kl"))
    return ref, attach_reference(kl_mbs, ref_run) if live else kl_mbs


def attach_reference(mbs, ref_run):
    """The live reference's token log-probs into each micro-batch, as ref_tok."""
    for mb, lp in zip(mbs, ref_run(mbs)):
        mb["ref_tok"] = lp
    return mbs


# -----------------------------------------------------------------------------
# evaluation


def preference_metrics(cfg, pi_toks, mbs):
    """Held-out metrics from each micro-batch's policy token log-probs: the loss; pairwise and
    full-ranking accuracy of the implicit reward over every pair (a tie counts as wrong); its mean
    margin r_better - r_worse; the drift log pi - log pi_ref of the best and of the other answers
    (nats per answer). Without a reference (simpo) the last two are None."""
    n_pairs, n_groups = counts(mbs, cfg.pairs)
    has_ref = all("ref_tok" in mb for mb in mbs)
    s = dict.fromkeys(("loss", "right", "pairs", "whole", "prompts", "margin", "chosen", "n_chosen", "rejected",
                       "n_rejected"), 0.0)
    for lp, mb in zip(pi_toks, mbs):
        s["loss"] += float(mb_loss(cfg, lp, mb, n_pairs, n_groups))
        pi = per_answer(lp, mb)
        ref = per_answer(mb["ref_tok"], mb) if has_ref else torch.zeros_like(pi)
        r = cfg.beta * pi / mb["answer_len"] if cfg.loss == "simpo" else cfg.beta * (pi - ref)  # [N]
        gap = r[mb["better"]] - r[mb["worse"]]  # [P]
        wrong = torch.zeros(len(mb["sizes"]), device=gap.device).index_add_(0, mb["pair_group"], (gap <= 0).float())
        s["right"], s["pairs"], s["margin"] = s["right"] + float((gap > 0).sum()), s["pairs"] + len(gap), \
            s["margin"] + float(gap.sum())
        s["whole"], s["prompts"] = s["whole"] + float((wrong == 0).sum()), s["prompts"] + len(mb["sizes"])
        if has_ref:
            best = torch.zeros(len(pi), dtype=torch.bool, device=pi.device)
            best[mb["best"]] = True
            drift = pi - ref  # [N]
            s["chosen"], s["n_chosen"] = s["chosen"] + float(drift[best].sum()), s["n_chosen"] + int(best.sum())
            s["rejected"], s["n_rejected"] = s["rejected"] + float(drift[~best].sum()), \
                s["n_rejected"] + int((~best).sum())
    per = lambda a, b: s[a] / max(s[b], 1) if has_ref else None
    return dict(loss=s["loss"], pair_acc=s["right"] / max(s["pairs"], 1), rank_acc=s["whole"] / max(s["prompts"], 1),
                margin=s["margin"] / max(s["pairs"], 1), chosen_drift=per("chosen", "n_chosen"),
                rejected_drift=per("rejected", "n_rejected"))


def kl_to_reference(model, d, kl_mbs):
    """KL(pi_ref || pi) per token, estimated on answers sampled from the reference (kl_mbs, with
    their ref_tok): k3 = r - 1 - log r with r = pi / pi_ref per token, unbiased on the reference's
    own samples and never negative. (The other direction would need fresh samples of the policy,
    and the reference live, at every evaluation.)"""
    lp = torch.cat(dist.forward(model, d, kl_mbs, token_logps, lambda mb: (len(mb["target"]),)))
    log_r = lp - torch.cat([mb["ref_tok"] for mb in kl_mbs])  # [tokens]
    return float((log_r.exp() - 1 - log_r).mean())


def evaluate(cfg, model, d, mbs, ref_run=None, kl_mbs=None):
    """Held-out metrics; every replica scores the whole set. ref_run: the live reference, run first.
    kl_mbs: the reference's samples for the KL (None: no reference, no KL)."""
    if ref_run is not None:
        attach_reference(mbs, ref_run)
    was = model.training
    model.eval()
    pi_toks = dist.forward(model, d, mbs, token_logps, lambda mb: (len(mb["target"]),))
    kl = kl_to_reference(model, d, kl_mbs) if kl_mbs else None
    model.train(was)
    return dict(preference_metrics(cfg, pi_toks, mbs), kl=kl)


def print_eval(ev, when):
    f = lambda k, fmt: "n/a" if ev.get(k) is None else format(ev[k], fmt)
    dist.print0(f"{when}: held-out pairwise accuracy {ev['pair_acc']:.1%}, full-ranking {ev['rank_acc']:.1%}, "
                f"loss {ev['loss']:.4f}, margin {ev['margin']:+.3f}, drift chosen {f('chosen_drift', '+.3f')} "
                f"rejected {f('rejected_drift', '+.3f')}, KL(ref||pi)/token {f('kl', '.4f')}")
    return ev


def toy_accuracy(model, tok, cfg, d, when):
    """Exact-match accuracy of greedy answers to the toy's held-out questions, said."""
    held = data.load_ranked(cfg.eval_data)
    prompts = [data.encode_prompt(tok, e, cfg.max_len) for e in held]
    acc = data.toy_accuracy(held, dist.greedy_answers(model, d, tok, prompts, max_new_tokens=6))
    dist.print0(f"toy held-out exact-match accuracy {when} training: {acc:.1%}")
    return acc


def report_tables(before, after, acc):
    """The held-out scores before and after training (and the toy's accuracy), for OUT/report.html."""
    cell = lambda e, k: "n/a" if not e or e.get(k) is None else f"{e[k]:.3g}"
    rows = [[name, cell(before, k), cell(after, k)] for name, k in (
        ("pairwise accuracy", "pair_acc"), ("full-ranking accuracy", "rank_acc"), ("loss", "loss"),
        ("reward margin", "margin"), ("chosen log-prob drift", "chosen_drift"),
        ("rejected log-prob drift", "rejected_drift"), ("KL(ref || pi) per token, on the reference's samples", "kl"))]
    if acc is not None:
        rows.append(["toy exact-match accuracy", *(f"{a:.1%}" if a is not None else "n/a" for a in acc)])
    return [("held-out rankings", ["", "before", "after"], rows)]


def log_eval(log, step, ev):
    log.log(step, eval_loss=ev["loss"], eval_pair_acc=ev["pair_acc"], eval_rank_acc=ev["rank_acc"],
            eval_margin=ev["margin"], **{f"eval_{k}": ev[k] for k in ("chosen_drift", "rejected_drift", "kl")
                                          if ev[k] is not None})
    return print_eval(ev, f"\nstep {step}")


# -----------------------------------------------------------------------------
# training


def build_policy(cfg, d, gcfg, k_max, live, resume_dir):
    """(plan, stage, this rank's stage of the policy with what trains marked, mode, ref_run). A
    micro-batch holds micro_batch_size prompts of up to k_max answers; a live reference in full and
    last-N modes is a second, frozen copy."""
    mode = optim.train_mode(cfg.lora_rank, cfg.train_layers, gcfg.num_layers)
    qs = quant.scheme(cfg.model, cfg.quantize, cfg.quant_group_size, mode, cfg.quantize_head)  # the base's scheme
    the_plan = plan.plan_for_run(gcfg, d.P, d.device, cfg.micro_batch_size * k_max, cfg.max_len, cfg.grad_accum,
                                 mode, cfg.lora_rank, cfg.lora_targets.split(","), cfg.train_layers,
                                 cfg.gpu_mem_gib, cfg.plan, copies=(1, int(live and mode != "lora")), quantize=qs)
    dist.print0(the_plan.format_table())
    stage = the_plan.stages[d.pp_rank]
    model = dist.build_stage(resume_dir if resume_dir and mode != "lora" else cfg.model, stage, d, cfg.checkpoint, qs)
    optim.select_trainable(model, mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), cfg.lora_dropout,
                           cfg.train_layers, cfg.seed, adapter_dir=resume_dir or cfg.sft_adapter or None)
    return the_plan, stage, model, mode, reference_runner(cfg, mode, model, stage, d, fresh=not (resume_dir or live))


def load_data(cfg, tok):
    """(train groups, held-out groups) of the ranked files, said on rank 0; with no held-out
    prompts, evaluation uses the training ones."""
    train_g, eval_g, said = data.load_groups(tok, cfg.data, cfg.eval_data, cfg.holdout, cfg.seed, cfg.max_len)
    dist.print0(f"data: {said}")
    if any(g["margin"] for g in train_g):  # said, not silently dropped
        dist.print0("note: the lines' 'margin' (a reward gap for train_rm.py) plays no part in these losses")
    if not eval_g:
        dist.print0("no held-out prompts: evaluation uses the training prompts")
    return train_g, eval_g or train_g


def main(argv=None):
    cfg = flags.parse(Config, argv, preset=lambda c: {} if c.model else data.TOY_DPO,
                      positive=POSITIVE, non_negative=NON_NEGATIVE)
    toy = not cfg.model
    d = dist.setup(cfg.pp, cfg.timeout_min, cfg.threads)
    cfg = optim.check_sft_adapter(check_config(data.toy_ranked_start(cfg) if toy else cfg), "the policy")
    ckpt.check_out(cfg.out, "train_dpo", asdict(cfg), cfg.resume, cfg.overwrite)  # before any work
    if toy and dist.is_main() and not os.path.isdir(cfg.model):
        print("no toy SFT result next to --out: starting from a random toy model. HINT: run python train_sft.py first")
        data.write_toy_model(cfg.model)
    dist.barrier()
    torch.manual_seed(cfg.seed + d.rank)
    dist.print0(f"config: {asdict(cfg)}")

    # ---- tokenizer and data (checked in full before any model is built)
    tok = glm.Tokenizer.from_dir(cfg.model)
    train_g, eval_g = load_data(cfg, tok)
    batches = data.Batches(len(train_g), cfg.micro_batch_size * cfg.grad_accum, cfg.seed, rank=d.dp_rank, world=d.D)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(batches))

    # ---- the plan, this rank's stage, what trains, the reference, the optimiser, resume
    gcfg = glm.GLMConfig.from_json(os.path.join(cfg.model, "config.json"))
    live = cfg.no_ref_cache and cfg.loss != "simpo"
    resume_dir = ckpt.checkpoint_dir(cfg.out, cfg.resume)
    the_plan, stage, model, mode, ref_run = build_policy(cfg, d, gcfg, max(len(g["answers"]) for g in train_g),
                                                         live, resume_dir)
    optim.warn_settings(total_steps, cfg.warmup_steps, cfg.lr, mode, len(eval_g), pretrained=not toy)
    first_trainable = dist.first_trainable_stage(model, d)
    opt = optim.AdamW(optim.named_trainables(model), cfg.lr, cfg.weight_decay, d, the_plan.hosts)
    lora_name = "default" if mode == "lora" else None
    hashes = ckpt.file_hashes({"data": data.data_file(cfg.data)})  # recorded by each checkpoint, checked on resume
    state = ckpt.resume(resume_dir, d, {"optim": opt}, {"data": batches}, hashes,
                        cfg.allow_data_change) if resume_dir else {}
    step, bad_steps = state.get("step", 0), state.get("bad_steps", 0)
    best = state.get("best") if cfg.keep_best else None  # {"step", "eval_loss"} of OUT/best

    # ---- the reference's log-probs, once (unless live or simpo), then the held-out micro-batches
    log = ckpt.start_run(cfg.out, "train_dpo", asdict(cfg), state["step"] if resume_dir else None)
    layout = None if cfg.no_shared_prompt else gcfg  # one row per prompt, or per answer
    ref, kl_mbs = reference_once(cfg, ref_run, live, {"train": train_g, "eval": eval_g}, tok.pad_id, tok.eop_id, d,
                                 layout, dist.stage_dtype(model))
    eval_mbs = microbatches(eval_g, list(range(len(eval_g))), cfg.micro_batch_size, tok.pad_id, d.device, layout,
                            ref.get("eval"))
    live_run = ref_run if live else None

    # ---- loop
    # the held-out scores (and the toy's accuracy) before training, measured once and carried by the checkpoints
    if resume_dir:
        ev_before, acc_before = state.get("ev_before"), state.get("toy_before")
    else:
        ev_before = print_eval(evaluate(cfg, model, d, eval_mbs, live_run, kl_mbs), "before training")
        acc_before = toy_accuracy(model, tok, cfg, d, "before") if toy else None
    model.train()
    t_start, ev, stopped = dist.start_clock(), None, 0
    ahead = data.Ahead(batches, lambda idx: microbatches(train_g, idx, cfg.micro_batch_size, tok.pad_id, d.device,
                                                         layout, ref.get("train")))
    with dist.Progress(total_steps, step) as bar, dist.StopSignal() as stop:
        while step < total_steps and not stopped:
            t0 = time.perf_counter()
            mbs, data_state = ahead.take()
            if live:
                attach_reference(mbs, ref_run)
            n_pairs, n_groups = counts(mbs, cfg.pairs, d.dp_group)
            lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
            loss = dist.train_step(model, d, mbs, dpo_loss(cfg, n_pairs, n_groups), first_trainable)
            if step + 1 < total_steps:
                ahead.prepare()  # the next step's batch, on the CPU while the GPU runs this one
            loss, norm, bad_steps = optim.optimizer_step(opt, loss, lr, cfg.grad_clip, d, bad_steps, step)
            step += 1
            answers, dt = sum(len(mb["answer_len"]) for mb in mbs) * d.D, time.perf_counter() - t0
            tokens = int(sum((mb["input_ids"] != tok.pad_id).sum() for mb in mbs)) * d.D  # the rows' real tokens
            bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total_steps:
                log.log(step, loss=loss, lr=lr, grad_norm=norm, pairs=int(n_pairs), skipped=bad_steps,
                        answers_per_s=answers / dt, tokens_per_s=tokens / dt)
            if step % cfg.eval_every == 0 or step == total_steps:
                ev = log_eval(log, step, evaluate(cfg, model, d, eval_mbs, live_run, kl_mbs))
                if cfg.keep_best:
                    best = ckpt.save_if_best(cfg.out, best, step, ev["loss"], d, tok.path, {"": (model, lora_name)})
            stopped = step < total_steps and stop.requested(d)  # a signal in the last step: just finish
            if stopped or step % cfg.save_every == 0 or step == total_steps:
                ckpt.save_checkpoint(cfg.out, step, d, tok.path, {"": (model, lora_name)}, optimizers={"optim": opt},
                                     train_state=dict(step=step, bad_steps=bad_steps, data=data_state,
                                                      data_hashes=hashes, config=asdict(cfg), best=best,
                                                      ev_before=ev_before, toy_before=acc_before),
                                     keep=cfg.keep_checkpoints)
    if stopped:
        stop.exit(stopped, step, cfg.out, d)
    wall = time.perf_counter() - t_start

    # ---- the result: PEFT adapter (LoRA) or HF weights, loadable with glm.py + lora.py
    final = os.path.join(cfg.out, "final")
    if ckpt.restore_best(cfg.out, best, step, d, {"": (model, lora_name)}) or ev is None:
        ev = evaluate(cfg, model, d, eval_mbs, live_run, kl_mbs)
    ckpt.save(final, d, tok.path, {"": (model, lora_name)})
    dist.print0(f"wrote {final} ({'LoRA adapter' if mode == 'lora' else 'full HF weights'}); {wall:.1f} s of training")
    print_eval(ev, "after training")
    acc_after = toy_accuracy(model, tok, cfg, d, "after") if toy else None
    ckpt.finish_run(cfg.out, d, stage, wall, report_tables(ev_before, ev, (acc_before, acc_after) if toy else None))
    return dict(ev, toy_before=acc_before, toy_after=acc_after, before=ev_before)


if __name__ == "__main__":
    flags.run(main)
