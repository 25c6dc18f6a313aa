"""Reward-model training for ChatGLM-6B on ranked answers, with InstructGPT's pairwise loss.

The GLM plus a scalar head read at each answer's final <eop>; the loss covers all K(K-1)/2 pairs
of a prompt's K answers.

    python train_rm.py                                    # toy: the toy SFT model (or a random one) on the bundled toy ranking set
    python train_rm.py --model SFT_DIR --data FILE --out DIR                    # full fine-tune from an SFT folder
    python train_rm.py --model SFT_DIR --data FILE --out DIR --train_layers 4   # only the last 4 blocks (and the head)
    python train_rm.py --model BASE_DIR --sft_adapter SFT_OUT/final --data FILE --out DIR --lr 1e-4   # LoRA, from the SFT adapter
    torchrun --nproc_per_node=8 train_rm.py --model DIR --data FILE --out DIR --pp 4   # 4 stages x 2 replicas
    ... --resume                                          # continue from the newest OUT/checkpoint-STEP
    python train_rm.py score --model DIR --data FILE [--adapter DIR]          # print the score of every (prompt, answer)

One optimiser step = grad_accum micro-batches of micro_batch_size prompts on each of the D
data-parallel replicas. All K answers of a prompt go through the same forward, and the loss is
the mean over every ordered pair (better b, worse w) of that global batch of
    -log sigmoid(r_b - r_w - margin),
with r the head's score at the answer's final <eop> and margin the line's optional "margin" (0).

OUT/final holds the backbone (HF weights, or the LoRA adapter: a complete delta from --model, the
SFT adapter's share included), reward_head.safetensors (weight [1, C], bias [1]) and
reward_stats.json (mean and std of the rewards on the held-out answers; PPO normalises by them).
"""
import argparse
import itertools
import json
import math
import os
import sys
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


@dataclass
class Config:
    # ---- model
    model: str = ""                 # HF folder: the base, or a full / last-N SFT result; "" = toy
    sft_adapter: str = ""           # a LoRA SFT result (its final/): the RM's adapter starts from it
    out: str = "runs/rm"            # the run's folder: checkpoints, metrics, final/
    quantize: int = 0               # 8 / 4: the frozen base's block linears in int8 / int4 (LoRA only); 0 = off
    quant_group_size: int = -1      # inputs per int scale: 0 = one per row; -1 = int8 per row, int4 128
    quantize_head: bool = False     # with --quantize: lm_head in int8 too (one scale per row)
    # ---- data
    data: str = ""                  # ranked jsonl; "" = the bundled toy ranking set
    eval_data: str = ""             # held-out jsonl; "" = hold out `holdout` of --data
    holdout: float = 0.05           # share of --data held out for evaluation when no --eval_data
    max_len: int = 512              # per answer: prompt + answer + <eop>; the prompt is cut first
    no_shared_prompt: bool = False  # one row per answer instead of one per prompt (the prompt computed K times)
    # ---- what trains: LoRA (lora_rank > 0), the last N blocks (train_layers > 0), else everything
    lora_rank: int = 0              # with --sft_adapter, 0 takes the adapter's own r, alpha and targets
    lora_alpha: float = 16.0        # LoRA scale is alpha / r
    lora_dropout: float = 0.0       # dropout on the LoRA branch's input
    lora_targets: str = "query_key_value"  # comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    train_layers: int = 0           # train only the last N blocks (0: all, unless LoRA)
    # ---- optimiser (InstructGPT's 6B RM: lr 9e-6, one epoch; LoRA wants ~1e-4)
    max_steps: int = 0              # 0 = run `epochs` epochs
    epochs: float = 1.0             # passes over --data (when max_steps is 0)
    micro_batch_size: int = 2       # prompts per micro-batch; each brings all of its K answers
    grad_accum: int = 8             # micro-batches per step and replica (the M of 1F1B)
    lr: float = 1e-5                # peak learning rate (LoRA ~1e-4..1e-3, full ~1e-5)
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
    resume: bool = False           # continue from the newest complete checkpoint in --out
    overwrite: bool = False        # write into an --out that holds something else
    keep_checkpoints: int = 2      # the newest N checkpoints stay on disk
    allow_data_change: bool = False  # --resume on data files whose contents changed
    keep_best: bool = False         # final/ = the checkpoint with the best held-out loss, not the last
    timeout_min: float = 10.0       # a rank silent this long (stalled, dead) ends the run
    threads: int = 0                # CPU threads per process (0: torch's default; the toy run: 1)


# flags that must be > 0, and >= 0 (every number must be finite)
POSITIVE = ("timeout_min", "max_len", "micro_batch_size", "grad_accum", "epochs", "log_every", "eval_every",
            "save_every", "keep_checkpoints", "pp", "lora_alpha")
NON_NEGATIVE = ("threads", "lr", "max_steps", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "holdout",
                "lora_rank", "lora_dropout", "train_layers", "gpu_mem_gib")


HEAD = "reward_head"        # the head's file prefix: reward_head.safetensors
STATS_FILE = "reward_stats.json"


def toy_model_and_data(cfg):
    """The toy run (no --model): the toy SFT result next to --out when there is one (its adapter on
    the toy base, for a LoRA toy run), else a random toy model; the bundled toy rankings."""
    return data.toy_ranked_start(cfg)


def check_init(cfg):
    """Where the RM starts: --model (an HF folder) plus, for LoRA, --sft_adapter. Mismatches are errors."""
    return optim.check_sft_adapter(cfg, "the reward model")


# -----------------------------------------------------------------------------
# the loss


def pair_loss(r, better, worse, margin):
    """Sum over pairs of -log sigmoid(r[better] - r[worse] - margin); logsigmoid stays finite and
    exact for any gap, where log(sigmoid(x)) underflows to -inf below x = -100 or so."""
    return -F.logsigmoid(r[better] - r[worse] - margin).sum()


def rm_loss(head, n_pairs):
    """The last stage's loss_fn for dist.train_step: one micro-batch's summed pair loss divided by
    the global batch's pair count, so a step's loss is the mean over all of its pairs."""
    def loss_fn(model, h, mb):
        r = rewards(head, h, mb)
        return pair_loss(r, mb["better"], mb["worse"], mb["margin"]) / n_pairs
    return loss_fn


# -----------------------------------------------------------------------------
# data: ranked examples -> micro-batches of whole prompts


RankStats = data.RankStats  # what truncation did to rankings
best_first = data.best_first  # the answers best first, by "ranks" where the line has them


def encode_examples(tok, examples, max_len, stats, ranks):
    """Examples -> [{"prompt", "answers", "ids": [prompt + answer, best first], "margin", "source"}]
    (data.encode_groups: every answer ends in <eop>, duplicates after truncation are dropped)."""
    return data.encode_groups(tok, examples, max_len, stats, ranks)


def rewards(head, h, mb):
    """Scores r [N] of a micro-batch's answers, read at each answer's own <eop> (one row may hold a group)."""
    return head(h[mb["eop_row"], mb["eop_col"]].float())[:, 0]  # [N]


def microbatches(encoded, idx, micro_batch_size, tok, device, gcfg=None):
    """The step's prompts -> micro-batches of micro_batch_size prompts, all answers of a prompt in one:
    data.group_rows (one row per answer, or with gcfg one row per prompt sharing its tokens), and per
    ordered pair better/worse answers, margin and pair_prompt (the prompt's index in the micro-batch) [P]."""
    out = []
    for m in range(0, len(idx), micro_batch_size):
        chunk = [encoded[i] for i in idx[m:m + micro_batch_size]]
        mb, sizes = data.group_rows([(e["prompt"], e["answers"]) for e in chunk], tok.pad_id, gcfg)
        better, worse, prompt = data.ranked_pairs(sizes)  # [P] each
        margin = torch.tensor([chunk[e]["margin"] for e in prompt.tolist()], dtype=torch.float32)
        mb.update(better=better, worse=worse, margin=margin, pair_prompt=prompt)
        out.append({**{k: v.to(device) for k, v in mb.items()}, "n_prompts": len(chunk)})
    return out


def count_pairs(mbs, group):
    """Ordered pairs (the loss's denominator) in these micro-batches, summed over the replicas of `group`."""
    n = torch.tensor(float(sum(len(mb["better"]) for mb in mbs)), device=mbs[0]["input_ids"].device)
    return dist.all_reduce(n, "sum", group).clamp(min=1)


def load_rankings(cfg, tok):
    """The train and held-out rankings, read, checked and encoded; what truncation did is printed.
    With no held-out prompts the training prompts stand in for them."""
    train_enc, eval_enc, said = data.load_groups(tok, cfg.data, cfg.eval_data, cfg.holdout, cfg.seed, cfg.max_len)
    dist.print0(f"data: {said}")
    if not eval_enc:
        dist.print0("no held-out prompts: evaluation and reward statistics use the training prompts")
        eval_enc = train_enc
    return train_enc, eval_enc


# -----------------------------------------------------------------------------
# evaluation


def ranking_metrics(rewards, mbs):
    """Pair loss, pairwise accuracy, full-ranking accuracy (every pair of a prompt in the label's
    order) and the rewards' mean and std, from per-micro-batch rewards [N]. A tie counts as wrong."""
    loss = right = pairs = whole = prompts = 0.0
    for r, mb in zip(rewards, mbs):
        r = r.float()
        ok = r[mb["better"]] > r[mb["worse"]]  # [P]
        loss += float(pair_loss(r, mb["better"], mb["worse"], mb["margin"]))
        right, pairs = right + float(ok.sum()), pairs + len(ok)
        wrong = torch.zeros(mb["n_prompts"], device=r.device).index_add_(0, mb["pair_prompt"], (~ok).float())
        whole, prompts = whole + float((wrong == 0).sum()), prompts + mb["n_prompts"]
    allr = torch.cat([r.float() for r in rewards])
    return dict(loss=loss / max(pairs, 1), pair_acc=right / max(pairs, 1), rank_acc=whole / max(prompts, 1),
                mean=float(allr.mean()), std=float(allr.std(unbiased=False)), count=len(allr))


def evaluate(model, head, d, mbs):
    """Held-out metrics; every replica scores the whole set, so no cross-replica sums are needed."""
    was_training = model.training
    model.eval()
    scores = dist.forward(model, d, mbs, lambda m, h, mb: rewards(head, h, mb), lambda mb: (len(mb["eop_row"]),))
    model.train(was_training)
    return ranking_metrics(scores, mbs)


def eval_table(before, after):
    """The held-out scores before and after training, for OUT/report.html (before: None if not measured)."""
    rows = [[name, *(f"{e[k]:.3g}" if e else "n/a" for e in (before, after))] for name, k in (
        ("pairwise accuracy", "pair_acc"), ("full-ranking accuracy", "rank_acc"), ("loss", "loss"),
        ("reward mean", "mean"), ("reward std", "std"))]
    return [("held-out rankings", ["", "before", "after"], rows)]


def print_eval(ev, when):
    dist.print0(f"{when}: held-out pairwise accuracy {ev['pair_acc']:.1%}, full-ranking accuracy "
                f"{ev['rank_acc']:.1%}, loss {ev['loss']:.4f}, reward mean {ev['mean']:+.3f} std {ev['std']:.3f}")
    return ev


def log_eval(log, ev):
    """An evaluation into metrics.jsonl and onto the screen."""
    log.log(ev["step"], eval_loss=ev["loss"], eval_pair_acc=ev["pair_acc"], eval_rank_acc=ev["rank_acc"],
            reward_mean=ev["mean"], reward_std=ev["std"])
    return print_eval(ev, f"\nstep {ev['step']}")


def reward_head_of(model, hidden_size, seed, d, resume_dir):
    """{HEAD: the reward head} on the last stage (the checkpoint's when resuming), else {}. The RM
    computes no logits: lm_head stays frozen, and is saved so that final/ is a whole HF folder."""
    if not d.last:
        return {}
    model.lm_head.requires_grad_(False)
    head = glm.reward_head(hidden_size, seed, d.device)
    if resume_dir:
        ckpt.load_head(head, resume_dir, HEAD)
    return {HEAD: head}


# -----------------------------------------------------------------------------
# training


def rm_plan(cfg, gcfg, d, mode, qs, k_max):
    """The run's plan, printed: a micro-batch holds micro_batch_size prompts of up to k_max answers
    (one sequence each, or one row each with the prompt shared) and computes no logits."""
    the_plan = plan.plan_for_run(gcfg, d.P, d.device, cfg.micro_batch_size * k_max, cfg.max_len, cfg.grad_accum,
                                 mode, cfg.lora_rank, cfg.lora_targets.split(","), cfg.train_layers,
                                 cfg.gpu_mem_gib, cfg.plan, lm_head=False, quantize=qs)
    dist.print0(the_plan.format_table())
    return the_plan


def main(argv=None):
    cfg = flags.parse(Config, argv, preset=lambda c: {} if c.model else data.TOY_RM,
                      positive=POSITIVE, non_negative=NON_NEGATIVE)
    toy = not cfg.model
    d = dist.setup(cfg.pp, cfg.timeout_min, cfg.threads)
    cfg = check_init(toy_model_and_data(cfg) if toy else cfg)
    ckpt.check_out(cfg.out, "train_rm", asdict(cfg), cfg.resume, cfg.overwrite)  # before any work
    if toy and dist.is_main():
        data.write_toy_model(cfg.model)  # a random toy model, unless the toy SFT result is there
    dist.barrier()
    torch.manual_seed(cfg.seed + d.rank)
    dist.print0(f"config: {asdict(cfg)}")

    # ---- tokenizer and data (checked in full before any model is built)
    tok = glm.Tokenizer.from_dir(cfg.model)
    train_enc, eval_enc = load_rankings(cfg, tok)
    batches = data.Batches(len(train_enc), cfg.micro_batch_size * cfg.grad_accum, cfg.seed,
                           rank=d.dp_rank, world=d.D)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(batches))

    # ---- the plan (a micro-batch holds K answers per prompt: micro_batch_size * K sequences, no
    # logits), this rank's stage, what trains (LoRA continues the SFT adapter), the head, resume
    gcfg = glm.GLMConfig.from_json(os.path.join(cfg.model, "config.json"))
    mode = optim.train_mode(cfg.lora_rank, cfg.train_layers, gcfg.num_layers)
    qs = quant.scheme(cfg.model, cfg.quantize, cfg.quant_group_size, mode, cfg.quantize_head)  # the base's scheme
    the_plan = rm_plan(cfg, gcfg, d, mode, qs, max(len(e["ids"]) for e in train_enc))
    stage = the_plan.stages[d.pp_rank]
    resume_dir = ckpt.checkpoint_dir(cfg.out, cfg.resume)
    model = dist.build_stage(resume_dir if resume_dir and mode != "lora" else cfg.model, stage, d, cfg.checkpoint, qs)
    optim.select_trainable(model, mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), cfg.lora_dropout,
                           cfg.train_layers, cfg.seed, adapter_dir=resume_dir or cfg.sft_adapter or None)
    head = (heads := reward_head_of(model, gcfg.hidden_size, cfg.seed, d, resume_dir)).get(HEAD)
    optim.warn_settings(total_steps, cfg.warmup_steps, cfg.lr, mode, len(eval_enc), pretrained=not toy)
    first_trainable = dist.first_trainable_stage(model, d)
    opt = optim.AdamW(optim.named_trainables(model, heads), cfg.lr, cfg.weight_decay, d, the_plan.hosts)
    lora_name = "default" if mode == "lora" else None
    hashes = ckpt.file_hashes({"data": data.data_file(cfg.data)})  # recorded by each checkpoint, checked on resume
    state = ckpt.resume(resume_dir, d, {"optim": opt}, {"data": batches}, hashes,
                        cfg.allow_data_change) if resume_dir else {}
    step, bad_steps = state.get("step", 0), state.get("bad_steps", 0)
    best = state.get("best") if cfg.keep_best else None  # {"step", "eval_loss"} of OUT/best
    layout = None if cfg.no_shared_prompt else gcfg  # one row per prompt, or per answer
    eval_mbs = microbatches(eval_enc, list(range(len(eval_enc))), cfg.micro_batch_size, tok, d.device, layout)

    # ---- loop
    log = ckpt.start_run(cfg.out, "train_rm", asdict(cfg), state["step"] if resume_dir else None)
    # the toy run's held-out scores before training, measured once and carried by the checkpoints
    ev_before = print_eval(evaluate(model, head, d, eval_mbs), "toy, before training") if toy and not resume_dir \
        else state.get("toy_before")
    model.train()
    t_start, tokens_seen, ev, stopped = dist.start_clock(), 0, None, 0
    ahead = data.Ahead(batches, lambda idx: microbatches(train_enc, idx, cfg.micro_batch_size, tok, d.device, layout))
    with dist.Progress(total_steps, step) as bar, dist.StopSignal() as stop:
        while step < total_steps and not stopped:
            t0 = time.perf_counter()
            mbs, data_state = ahead.take()
            n_pairs = count_pairs(mbs, d.dp_group)
            lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
            loss = dist.train_step(model, d, mbs, rm_loss(head, n_pairs), first_trainable)
            if step + 1 < total_steps:
                ahead.prepare()  # the next step's batch, on the CPU while the GPU runs this one
            loss, norm, bad_steps = optim.optimizer_step(opt, loss, lr, cfg.grad_clip, d, bad_steps, step)
            step += 1
            tokens = sum(mb["input_ids"].numel() for mb in mbs) * d.D
            tokens_seen += tokens
            bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total_steps:
                log.log(step, loss=loss, lr=lr, grad_norm=norm, pairs=int(n_pairs), skipped=bad_steps,
                        tokens_per_s=tokens / (time.perf_counter() - t0))
            if step % cfg.eval_every == 0 or step == total_steps:
                ev = log_eval(log, dict(evaluate(model, head, d, eval_mbs), step=step))
                if cfg.keep_best:
                    best = ckpt.save_if_best(cfg.out, best, step, ev["loss"], d, tok.path, {"": (model, lora_name)},
                                             heads)
            stopped = step < total_steps and stop.requested(d)  # a signal in the last step: just finish
            if stopped or step % cfg.save_every == 0 or step == total_steps:
                ckpt.save_checkpoint(cfg.out, step, d, tok.path, {"": (model, lora_name)}, heads, {"optim": opt},
                                     dict(step=step, bad_steps=bad_steps, data=data_state, data_hashes=hashes,
                                          config=asdict(cfg), best=best, toy_before=ev_before),
                                     keep=cfg.keep_checkpoints)
    if stopped:
        stop.exit(stopped, step, cfg.out, d)
    wall = time.perf_counter() - t_start

    # ---- the result: backbone (HF weights or adapter) + reward head + reward statistics for PPO
    if ckpt.restore_best(cfg.out, best, step, d, {"": (model, lora_name)}, heads):
        ev = dict(evaluate(model, head, d, eval_mbs), step=best["step"])
    elif ev is None or ev["step"] != step:  # a run resumed at its end has not evaluated yet
        ev = dict(evaluate(model, head, d, eval_mbs), step=step)
    final = os.path.join(cfg.out, "final")
    held_out = cfg.eval_data or (f"{cfg.data} (held out)" if eval_enc is not train_enc else cfg.data)
    ckpt.save(final, d, tok.path, {"": (model, lora_name)}, heads, extra_json={STATS_FILE: dict(
        mean=ev["mean"], std=ev["std"], count=ev["count"], pair_accuracy=ev["pair_acc"],
        ranking_accuracy=ev["rank_acc"], step=ev["step"], data=held_out)})
    dist.print0(f"wrote {final} ({'LoRA adapter' if mode == 'lora' else 'full HF weights'} + {HEAD}.safetensors "
                f"+ {STATS_FILE}); {tokens_seen / max(wall, 1e-9):.0f} tokens/s over the run")
    print_eval(ev, "toy, after training" if toy else "final")
    ckpt.finish_run(cfg.out, d, stage, wall, eval_table(ev_before, ev))
    return ev


# -----------------------------------------------------------------------------
# scoring, for inspection


def load_reward_model(model_dir, adapter_dir="", device="cpu", dtype=torch.float32):
    """(model, head, stats or None) of a train_rm.py result: --model an HF folder (full / last-N
    run's final/, or the base of a LoRA run whose final/ is adapter_dir)."""
    if os.path.isfile(os.path.join(model_dir, lora.CONFIG_FILE)) and not adapter_dir:
        raise ValueError(f"{model_dir} holds a LoRA adapter. HINT: pass the base model as --model and "
                         f"this folder as --adapter")
    model = quant.from_pretrained(model_dir, dtype, device).eval()  # an int8 / int4 base loads as stored
    if adapter_dir:
        lora.load_adapter(model, adapter_dir)
    head_dir = adapter_dir or model_dir
    head = glm.reward_head(model.config.hidden_size, device=device)
    ckpt.load_head(head, head_dir, HEAD)
    stats_path, stats = os.path.join(head_dir, STATS_FILE), None
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
    return model, head, stats


@torch.no_grad()
def score_examples(model, head, tok, examples, max_len=512, batch_size=8):
    """Scores of every answer: a list, per example, of float rewards in the answers' stored order."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        groups = [data.encode_ranked(tok, e, max_len) for e in chunk]
        ids, sizes = data.collate_ranked(groups, tok.pad_id)
        ids = ids.to(device)
        h = model(ids, return_hidden=True)
        r = glm.rewards_at(head, h, glm.eop_index(ids, tok.eop_id)).tolist()
        for k in sizes:
            out.append(r[:k])
            r = r[k:]
    return out


def load_scorable(path):
    """Ranked and SFT lines, in any mix, each read by its own shape -> examples with "answers" (an SFT
    line's response is its one answer)."""
    examples = []
    for where, obj in data.read_jsonl(path):
        kind = data.line_kind(obj)
        if kind is None:
            raise data.DataError(f"{where}: the line is neither ranked answers nor an SFT example (it has no "
                                 f"'answers', 'chosen', 'response', 'output', 'messages' or 'conversations'). "
                                 f"HINT: write {data.RM_SHAPE}, or {data.SFT_SHAPE}")
        if kind == "rm":
            examples.append(data.ranked_example(obj, where))
        else:
            ex = data.sft_example(obj, where)
            examples.append(dict(ex, answers=[ex["response"]]))
    return examples


def score(argv=None):
    """`python train_rm.py score`: print the score of every (prompt, answer) of a ranked or SFT file."""
    p = argparse.ArgumentParser(prog="train_rm.py score", description=score.__doc__)
    p.add_argument("--model", required=True, help="a train_rm.py final/ (full or last-N), or the base of a LoRA run")
    p.add_argument("--adapter", default="", help="a LoRA train_rm.py final/ (adapter + reward head)")
    p.add_argument("--data", required=True, help="jsonl of ranked lines (answers or chosen/rejected) and/or "
                   "SFT lines (prompt + response, Alpaca, messages: one answer each), each scored by its own shape")
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args(argv)
    examples = load_scorable(args.data)  # before the weights: a bad line fails at once
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, head, stats = load_reward_model(args.model, args.adapter, device, dtype)
    tok = glm.Tokenizer.from_dir(args.model)
    scores = score_examples(model, head, tok, examples, args.max_len, args.batch_size)
    z = (lambda r: f"  z {(r - stats['mean']) / max(stats['std'], 1e-6):+.2f}") if stats else (lambda r: "")
    right = pairs = 0
    for ex, rs in zip(examples, scores):
        print(f"{ex['source']}  {ex['prompt'][:70]!r}")
        order = best_first(ex) if len(rs) > 1 else ex["answers"]
        for k, (a, r) in enumerate(zip(ex["answers"], rs)):
            label = f"rank {order.index(a) + 1}" if len(rs) > 1 else "answer"
            print(f"    {r:+9.4f}{z(r)}  {label}: {a[:70]!r}")
        by_label = [r for _, r in sorted(zip(ex["answers"], rs), key=lambda t: order.index(t[0]))]
        for better, worse in itertools.combinations(by_label, 2):
            right, pairs = right + (better > worse), pairs + 1
    if pairs:
        print(f"pairwise accuracy {right / pairs:.1%} over {pairs} pairs")
    return scores


if __name__ == "__main__":
    args = sys.argv[1:]
    flags.run(score, args[1:]) if args[:1] == ["score"] else flags.run(main, args)
