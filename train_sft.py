"""Supervised fine-tuning of ChatGLM-6B: LoRA, the last N blocks, or the whole model.

    python train_sft.py                                   # toy model on the bundled toy task (CPU, minutes)
    python train_sft.py --model DIR --data FILE --out DIR --lora_rank 8
    python train_sft.py --model DIR --data FILE --out DIR --train_layers 4
    torchrun --nproc_per_node=8 train_sft.py --model DIR --data FILE --out DIR --pp 8
    torchrun --nproc_per_node=8 train_sft.py --model DIR --data FILE --out DIR --pp 4   # 4 stages x 2 replicas
    ... --resume                                          # continue from OUT/checkpoint

One optimiser step = grad_accum micro-batches of micro_batch_size examples on each of the D
data-parallel replicas; the loss is the mean over every response token of that global batch.
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import dist
import glm


@dataclass
class Config:
    # ---- model
    model: str = ""                 # HF folder (config.json, model*.safetensors, ice_text.model); "" = toy
    out: str = "runs/sft"
    # ---- data
    data: str = ""                  # SFT jsonl; "" = the bundled toy task
    eval_data: str = ""             # held-out jsonl; "" = hold out `holdout` of --data
    holdout: float = 0.05
    max_len: int = 512
    # ---- what trains: LoRA (lora_rank > 0), the last N blocks (train_layers > 0), else everything
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "query_key_value"   # comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    train_layers: int = 0
    # ---- optimiser
    max_steps: int = 0              # 0 = run `epochs` epochs
    epochs: float = 1.0
    micro_batch_size: int = 4
    grad_accum: int = 8             # micro-batches per step and replica (the M of 1F1B)
    lr: float = 1e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # ---- memory and the pipeline
    checkpoint: bool = False        # activation checkpointing in every block (the planner may add some)
    pp: int = 1                     # pipeline stages; data-parallel replicas = world size / pp
    plan: str = "auto"              # "auto" (balanced memory and time) or "naive" (equal layer counts)
    gpu_mem_gib: float = 0.0        # memory budget per GPU for the planner; 0 = the card's
    # ---- logs and checkpoints
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 200
    resume: bool = False


# the toy run: a small model from scratch on the bundled arithmetic task, a few CPU minutes
TOY = dict(max_len=64, micro_batch_size=32, grad_accum=1, lr=1e-2, warmup_steps=30, max_steps=2000,
           weight_decay=0.1, eval_every=200, save_every=400, out="runs/toy_sft")
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def apply_toy_defaults(cfg):
    """With no --model, fields still at their 6B default take the toy run's values."""
    if cfg.model:
        return cfg
    dist.override_defaults(cfg, TOY)
    cfg.model = ensure_toy_model(os.path.join(os.path.dirname(cfg.out) or ".", "toy_base"))
    if not cfg.data:
        cfg.data = os.path.join(TOY_DIR, "toy_sft_train.jsonl")
        cfg.eval_data = cfg.eval_data or os.path.join(TOY_DIR, "toy_sft_eval.jsonl")
    return cfg


def ensure_toy_model(path, seed=0):
    """A randomly initialised toy ChatGLM (2 blocks, width 64) with the bundled tokenizer."""
    if dist.is_main() and not os.path.isdir(path):
        model = glm.ChatGLM(glm.GLMConfig.toy()).init_weights(seed)
        model.save_pretrained(path, tokenizer=glm.Tokenizer(os.path.join(TOY_DIR, "ice_text.model")))
    dist.barrier()
    return path


def sft_loss(n_tokens):
    """Summed next-token cross-entropy of one micro-batch over its response tokens, divided by the
    global batch's response-token count, so the step's loss is their mean."""
    def loss_fn(model, h, mb):
        targets = mb["labels"][:, 1:]  # [b, T-1]: logits at t predict the token at t+1
        keep = targets != data.IGNORE
        logits = model.lm_head(h[:, :-1][keep])  # [N, V]: the head only where a label exists
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_tokens
    return loss_fn


def microbatches(examples, idx, cfg, pad_id, device):
    """The step's examples -> grad_accum micro-batches {input_ids, labels} on the device."""
    out = []
    for m in range(0, len(idx), cfg.micro_batch_size):
        ids, labels = data.collate([examples[i] for i in idx[m:m + cfg.micro_batch_size]], pad_id)
        out.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return out


def count_label_tokens(mbs, group=None):
    """Response tokens (the loss's denominator) in these micro-batches, summed over `group` if given."""
    n = sum(((mb["labels"][:, 1:] != data.IGNORE).sum() for mb in mbs), torch.zeros(())).float()
    return (dist.all_reduce(n, "sum", group) if group is not None else n).clamp(min=1)


def toy_accuracy(model, tok, examples, max_len, d):
    """Exact-match accuracy of greedy answers on the toy task (through the pipeline if P > 1)."""
    model.eval()
    ok = 0
    for i in range(0, len(examples), 128):
        chunk = examples[i:i + 128]
        ids = glm.left_pad([data.encode_prompt(tok, e, max_len) for e in chunk], tok.pad_id).to(d.device)
        out, _ = dist.generate(model, d, ids, max_new_tokens=6)
        for e, row in zip(chunk, out[:, ids.shape[1]:]):
            ok += data.toy_answer_correct(e["prompt"], tok.decode(row, skip_special_tokens=True))
    model.train()
    return ok / len(examples)


def main(argv=None):
    cfg = dist.parse_config(Config, argv)
    toy = not cfg.model
    d = dist.setup(cfg.pp)
    cfg = apply_toy_defaults(cfg)
    torch.manual_seed(cfg.seed + d.rank)
    dist.print0(f"config: {asdict(cfg)}")

    # ---- tokenizer and data (checked in full before any model is built)
    tok = glm.Tokenizer.from_dir(cfg.model)
    train_ex = data.load_sft(cfg.data)
    if cfg.eval_data:
        eval_ex = data.load_sft(cfg.eval_data)
    else:
        train_ex, eval_ex = data.split_holdout(train_ex, cfg.holdout, cfg.seed)
    stats = data.TruncationStats()
    train_enc = [data.encode_sft(tok, e, cfg.max_len, stats) for e in train_ex]
    eval_enc = [data.encode_sft(tok, e, cfg.max_len, stats) for e in eval_ex]
    dist.print0(f"data: {len(train_enc)} train / {len(eval_enc)} held-out examples; {stats}")
    if not eval_enc:
        dist.print0("no held-out examples (raise --holdout or pass --eval_data): evaluation is off")
    batches = data.Batches(len(train_enc), cfg.micro_batch_size * cfg.grad_accum, cfg.seed,
                           rank=d.dp_rank, world=d.D)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(batches))

    # ---- the plan and this rank's stage
    gcfg = glm.GLMConfig.from_json(os.path.join(cfg.model, "config.json"))
    mode = dist.train_mode(cfg.lora_rank, cfg.train_layers, gcfg.num_layers)
    plan, stage = dist.plan_for_run(gcfg, d, cfg, mode)
    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    resuming = cfg.resume and os.path.isdir(ckpt_dir)
    if cfg.resume and not resuming:
        dist.print0(f"--resume: no checkpoint in {ckpt_dir}, starting afresh")
    model = dist.build_stage(ckpt_dir if resuming and mode != "lora" else cfg.model, stage, d,
                             checkpoint_all=cfg.checkpoint)
    dist.select_trainable(model, mode, cfg, adapter_dir=ckpt_dir if resuming else None)
    first_trainable = dist.first_trainable_stage(model, d)
    opt = dist.AdamW(dist.named_trainables(model), cfg.lr, cfg.weight_decay, d, plan.hosts)
    step, bad_steps = 0, 0
    if resuming:
        state = dist.load_train_state(ckpt_dir, d)
        opt.load(ckpt_dir)
        batches.load_state_dict(state["data"])
        step, bad_steps = state["step"], state["bad_steps"]
        dist.print0(f"resumed from {ckpt_dir} at step {step}")

    def save(path):
        dist.save_train_checkpoint(path, model, opt, d, tok.path, lora_name="default" if mode == "lora" else None,
                                   train_state=dict(step=step, bad_steps=bad_steps, data=batches.state_dict(),
                                                    config=asdict(cfg)))

    def evaluate():  # every replica scores the whole held-out set: no cross-replica sums needed
        mbs = microbatches(eval_enc, list(range(len(eval_enc))), cfg, tok.pad_id, d.device)
        return float(dist.forward_only(model, d, mbs, sft_loss(count_label_tokens(mbs))))

    # ---- loop
    log = dist.MetricsLog(cfg.out, resume=resuming)
    if toy and not resuming:
        dist.print0(f"toy held-out accuracy before training: {toy_accuracy(model, tok, eval_ex, cfg.max_len, d):.1%}")
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True)
    t_start, tokens_seen = dist.start_clock(), 0
    while step < total_steps:
        for idx in batches:
            t0 = time.perf_counter()
            mbs = microbatches(train_enc, idx, cfg, tok.pad_id, d.device)
            n_tok = count_label_tokens(mbs, d.dp_group)
            lr = dist.lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
            loss = dist.train_step(model, d, mbs, sft_loss(n_tok), first_trainable)
            loss, norm, bad_steps = dist.optimizer_step(opt, loss, lr, cfg.grad_clip, d, bad_steps, step)
            step += 1
            tokens = sum(mb["input_ids"].numel() for mb in mbs) * d.D
            tokens_seen += tokens
            tok_s = tokens / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if step % cfg.log_every == 0 or step == total_steps:
                log.log(step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tok_s, skipped=bad_steps)
            if eval_enc and (step % cfg.eval_every == 0 or step == total_steps):
                ev = evaluate()
                log.log(step, eval_loss=ev, eval_ppl=math.exp(min(ev, 50)))
                dist.print0(f"\nstep {step}: eval loss {ev:.4f} (perplexity {math.exp(min(ev, 50)):.2f})")
            if step % cfg.save_every == 0 or step == total_steps:
                save(ckpt_dir)
            if step >= total_steps:
                break
    bar.close()
    wall = time.perf_counter() - t_start

    # ---- the result: PEFT adapter (LoRA) or HF weights, loadable with glm.py + lora.py
    final = os.path.join(cfg.out, "final")
    dist.save_weights(final, model, d, tok.path, lora_name="default" if mode == "lora" else None)
    dist.print0(f"wrote {final} ({'LoRA adapter' if mode == 'lora' else 'full HF weights'}); "
                f"{tokens_seen / max(wall, 1e-9):.0f} tokens/s over the run")
    if toy:
        dist.print0(f"toy held-out accuracy after training: {toy_accuracy(model, tok, eval_ex, cfg.max_len, d):.1%}")
    dist.report_memory_and_busy(stage, d, wall)
    dist.teardown()


if __name__ == "__main__":
    main()
