"""Supervised fine-tuning of ChatGLM-6B: LoRA, the last N blocks, or the whole model.

    python train_sft.py                                   # toy model on the bundled toy task (CPU, minutes)
    python train_sft.py --model DIR --data FILE --out DIR --lora_rank 8
    python train_sft.py --model DIR --data FILE --out DIR --train_layers 4
    torchrun --nproc_per_node=8 train_sft.py --model DIR --data FILE --out DIR --pp 8
    torchrun --nproc_per_node=8 train_sft.py --model DIR --data FILE --out DIR --pp 4   # 4 stages x 2 replicas
    ... --resume                                          # continue from the newest OUT/checkpoint-STEP
    python data.py tokenize --kind sft FILE --out DIR --tokenizer MODEL/ice_text.model --max_len 512
    python train_sft.py --model MODEL --data DIR --out OUT --pack   # a tokenised folder, examples packed in rows

One optimiser step = grad_accum micro-batches of micro_batch_size examples (packed rows with
--pack) on each of the D data-parallel replicas; the loss is the mean over every response token
of that global batch.
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

import ckpt
import data
import dist
import flags
import glm
import optim
import plan
import quant


@dataclass
class Config:
    # ---- model
    model: str = ""                 # HF folder (config.json, model*.safetensors, ice_text.model); "" = toy
    quantize: int = 0               # 8 / 4: the frozen base's block linears in int8 / int4 (LoRA only); 0 = off
    quant_group_size: int = -1      # inputs per int scale: 0 = one per row; -1 = int8 per row, int4 128
    quantize_head: bool = False     # with --quantize: lm_head in int8 too (one scale per row)
    out: str = "runs/sft"           # the run's folder: checkpoints, metrics, final/
    # ---- data
    data: str = ""                  # SFT jsonl or tokenised folder (data.py tokenize); "" = the bundled toy task
    eval_data: str = ""             # held-out jsonl or folder; "" = hold out `holdout` of --data
    holdout: float = 0.05           # share of --data held out for evaluation when no --eval_data
    max_len: int = 512              # tokens per example; longer ones lose the prompt's start
    pack: bool = False              # rows of max_len tokens holding several examples (micro_batch_size = rows)
    group_by_length: bool = False   # micro-batches of examples of similar length (less padding, no packing)
    # ---- what trains: LoRA (lora_rank > 0), the last N blocks (train_layers > 0), else everything
    lora_rank: int = 0              # LoRA rank r (0: no LoRA)
    lora_alpha: float = 16.0        # LoRA scale is alpha / r
    lora_dropout: float = 0.0       # dropout on the LoRA branch's input
    lora_targets: str = "query_key_value"   # comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    train_layers: int = 0           # train only the last N blocks (0: all, unless LoRA)
    # ---- optimiser
    max_steps: int = 0              # 0 = run `epochs` epochs
    epochs: float = 1.0             # passes over --data (when max_steps is 0)
    micro_batch_size: int = 4       # examples per forward
    grad_accum: int = 8             # micro-batches per step and replica (the M of 1F1B)
    lr: float = 1e-4                # peak learning rate (LoRA ~1e-4..1e-3, full ~1e-5)
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


def toy_model_and_data(cfg):
    """The toy run (no --model): a random toy ChatGLM next to --out and the bundled toy task,
    unless --data names other data."""
    cfg.model = os.path.join(data.toy_runs(cfg.out), "toy_base")  # written by main once --out is checked
    if not cfg.data:
        cfg.data, cfg.eval_data = data.toy_file("sft_train"), cfg.eval_data or data.toy_file("sft_eval")
    return cfg


def sft_loss(n_tokens):
    """Summed next-token cross-entropy of one micro-batch over its response tokens, divided by the
    global batch's response-token count, so the step's loss is their mean."""
    return lambda model, h, mb: data.lm_loss(model.lm_head, h, mb["labels"]) / n_tokens


def microbatches(examples, idx, micro_batch_size, pad_id, device):
    """The step's examples (or packed rows) -> micro-batches {input_ids, labels (, position_ids, attend)}
    on the device."""
    out = []
    for m in range(0, len(idx), micro_batch_size):
        mb = data.collate_sft([examples[i] for i in idx[m:m + micro_batch_size]], pad_id)
        out.append({k: v.to(device) for k, v in mb.items()})
    return out


def count_label_tokens(mbs, group=None):
    """Response tokens (the loss's denominator) in these micro-batches, summed over `group` if given."""
    n = sum((data.count_labels(mb["labels"]) for mb in mbs), torch.zeros((), device=mbs[0]["labels"].device)).float()
    return (n if group is None else dist.all_reduce(n, "sum", group)).clamp(min=1)  # None: no reduction at all


def toy_accuracy(model, tok, examples, max_len, d, when):
    """Exact-match accuracy of greedy answers on the toy task (through the pipeline if P > 1), said."""
    prompts = [data.encode_prompt(tok, e, max_len) for e in examples]
    acc = data.toy_accuracy(examples, dist.greedy_answers(model, d, tok, prompts, max_new_tokens=6))
    dist.print0(f"toy held-out accuracy {when} training: {acc:.1%}")
    return acc


def toy_table(before, after):
    """The toy run's result, for OUT/report.html (before is None after a resume of an older run)."""
    return [("toy task: held-out exact-match accuracy of greedy answers", ["before", "after"],
             [[f"{before:.1%}" if before is not None else "n/a", f"{after:.1%}"]])]


def load_data(cfg, tok, toy, d):
    """(train and held-out examples, encoded; the toy's held-out questions; what batches draw: the
    examples or, with --pack, rows of them; the batches of this replica), said on rank 0. A jsonl
    is read and encoded here; a tokenised folder is mapped and read lazily."""
    stats = data.TruncationStats()
    train_enc, eval_enc = data.load_train_eval(lambda path: data.sft_dataset(tok, path, cfg.max_len, stats),
                                               cfg.data, cfg.eval_data, cfg.holdout, cfg.seed)
    eval_ex = data.load_train_eval(data.load_sft, cfg.data, cfg.eval_data, cfg.holdout, cfg.seed)[1] if toy else []
    rows = data.Packed(train_enc, cfg.max_len, cfg.seed, tok) if cfg.pack else train_enc
    dist.print0(f"data: {len(train_enc)} train / {len(eval_enc)} held-out examples; {stats}"
                + (f"; packed into {len(rows)} rows of {cfg.max_len} tokens" if cfg.pack else ""))
    if not eval_enc:
        dist.print0("no held-out examples (raise --holdout or pass --eval_data): evaluation is off")
    size = cfg.micro_batch_size * cfg.grad_accum
    batches = (data.LengthGrouped(data.lengths(train_enc), size, cfg.seed, rank=d.dp_rank, world=d.D)
               if cfg.group_by_length else data.Batches(len(rows), size, cfg.seed, rank=d.dp_rank, world=d.D))
    return train_enc, eval_enc, eval_ex, rows, batches


def main(argv=None):
    cfg = flags.parse(Config, argv, preset=lambda c: {} if c.model else data.TOY_SFT,
                      positive=POSITIVE, non_negative=NON_NEGATIVE)
    if cfg.pack and cfg.group_by_length:
        raise ValueError("--pack and --group_by_length are two ways to cut padding. HINT: pass one of them")
    toy = not cfg.model
    d = dist.setup(cfg.pp, cfg.timeout_min, cfg.threads)
    cfg = toy_model_and_data(cfg) if toy else cfg
    ckpt.check_out(cfg.out, "train_sft", asdict(cfg), cfg.resume, cfg.overwrite)  # before any work
    if toy and dist.is_main():
        data.write_toy_model(cfg.model)  # a random toy model, unless one is there
    dist.barrier()
    torch.manual_seed(cfg.seed + d.rank)
    dist.print0(f"config: {asdict(cfg)}")

    # ---- tokenizer and data (checked in full before any model is built)
    tok = glm.Tokenizer.from_dir(cfg.model)
    train_enc, eval_enc, eval_ex, rows, batches = load_data(cfg, tok, toy, d)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(batches))

    # ---- the plan, this rank's stage, what trains, the optimiser, resume
    gcfg = glm.GLMConfig.from_json(os.path.join(cfg.model, "config.json"))
    mode = optim.train_mode(cfg.lora_rank, cfg.train_layers, gcfg.num_layers)
    qs = quant.scheme(cfg.model, cfg.quantize, cfg.quant_group_size, mode, cfg.quantize_head)  # the base's scheme
    the_plan = plan.plan_for_run(gcfg, d.P, d.device, cfg.micro_batch_size, cfg.max_len, cfg.grad_accum, mode,
                                 cfg.lora_rank, cfg.lora_targets.split(","), cfg.train_layers, cfg.gpu_mem_gib,
                                 cfg.plan, quantize=qs)
    dist.print0(the_plan.format_table())
    stage = the_plan.stages[d.pp_rank]
    resume_dir = ckpt.checkpoint_dir(cfg.out, cfg.resume)
    model = dist.build_stage(resume_dir if resume_dir and mode != "lora" else cfg.model, stage, d, cfg.checkpoint, qs)
    optim.select_trainable(model, mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), cfg.lora_dropout,
                           cfg.train_layers, cfg.seed, adapter_dir=resume_dir)
    optim.warn_settings(total_steps, cfg.warmup_steps, cfg.lr, mode, len(eval_enc), pretrained=not toy)
    first_trainable = dist.first_trainable_stage(model, d)
    opt = optim.AdamW(optim.named_trainables(model), cfg.lr, cfg.weight_decay, d, the_plan.hosts)
    lora_name = "default" if mode == "lora" else None
    hashes = ckpt.file_hashes({"data": data.data_file(cfg.data)})  # recorded by each checkpoint, checked on resume
    state = ckpt.resume(resume_dir, d, {"optim": opt}, {"data": batches}, hashes,
                        cfg.allow_data_change) if resume_dir else {}
    step, bad_steps = state.get("step", 0), state.get("bad_steps", 0)
    best = state.get("best") if cfg.keep_best else None  # {"step", "eval_loss"} of OUT/best

    def evaluate():  # every replica scores the whole held-out set: no cross-replica sums needed
        mbs = microbatches(eval_enc, list(range(len(eval_enc))), cfg.micro_batch_size, tok.pad_id, d.device)
        return float(sum(dist.forward(model, d, mbs, sft_loss(count_label_tokens(mbs)), lambda mb: ())))

    # ---- loop
    log = ckpt.start_run(cfg.out, "train_sft", asdict(cfg), state["step"] if resume_dir else None)
    # the toy run's accuracy before training, measured once and carried by the checkpoints
    acc_before = toy_accuracy(model, tok, eval_ex, cfg.max_len, d, "before") if toy and not resume_dir else \
        state.get("toy_before")
    model.train()
    t_start, tokens_seen, stopped = dist.start_clock(), 0, 0
    ahead = data.Ahead(batches, lambda idx: microbatches(rows, idx, cfg.micro_batch_size, tok.pad_id, d.device))
    with dist.Progress(total_steps, step) as bar, dist.StopSignal() as stop:
        while step < total_steps and not stopped:
            t0 = time.perf_counter()
            mbs, data_state = ahead.take()
            lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
            loss = dist.train_step(model, d, mbs, sft_loss(count_label_tokens(mbs, d.dp_group)), first_trainable)
            if step + 1 < total_steps:
                ahead.prepare()  # the next step's batch, on the CPU while the GPU runs this one
            loss, norm, bad_steps = optim.optimizer_step(opt, loss, lr, cfg.grad_clip, d, bad_steps, step)
            step += 1
            slots = sum(mb["input_ids"].numel() for mb in mbs)
            tokens = int(sum((mb["input_ids"] != tok.pad_id).sum() for mb in mbs)) * d.D  # real tokens: one sync
            tokens_seen += tokens
            bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            if step % cfg.log_every == 0 or step == total_steps:
                log.log(step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens / (time.perf_counter() - t0),
                        padding=1 - tokens / d.D / slots, skipped=bad_steps)
            if eval_enc and (step % cfg.eval_every == 0 or step == total_steps):
                ev = evaluate()
                log.log(step, eval_loss=ev, eval_ppl=math.exp(min(ev, 50)))
                dist.print0(f"\nstep {step}: eval loss {ev:.4f} (perplexity {math.exp(min(ev, 50)):.2f})")
                if cfg.keep_best:
                    best = ckpt.save_if_best(cfg.out, best, step, ev, d, tok.path, {"": (model, lora_name)})
            stopped = step < total_steps and stop.requested(d)  # a signal in the last step: just finish
            if stopped or step % cfg.save_every == 0 or step == total_steps:
                ckpt.save_checkpoint(cfg.out, step, d, tok.path, {"": (model, lora_name)}, optimizers={"optim": opt},
                                     train_state=dict(step=step, bad_steps=bad_steps, data=data_state,
                                                      data_hashes=hashes, config=asdict(cfg), best=best,
                                                      toy_before=acc_before),
                                     keep=cfg.keep_checkpoints)
    if stopped:
        stop.exit(stopped, step, cfg.out, d)
    wall = time.perf_counter() - t_start

    # ---- the result: PEFT adapter (LoRA) or HF weights, loadable with glm.py + lora.py
    final = os.path.join(cfg.out, "final")
    ckpt.restore_best(cfg.out, best, step, d, {"": (model, lora_name)})
    ckpt.save(final, d, tok.path, {"": (model, lora_name)})
    dist.print0(f"wrote {final} ({'LoRA adapter' if mode == 'lora' else 'full HF weights'}); "
                f"{tokens_seen / max(wall, 1e-9):.0f} tokens/s over the run")
    acc_after = toy_accuracy(model, tok, eval_ex, cfg.max_len, d, "after") if toy else None
    ckpt.finish_run(cfg.out, d, stage, wall, toy_table(acc_before, acc_after) if toy else ())


if __name__ == "__main__":
    flags.run(main)
