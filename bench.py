"""Throughput and memory benchmarks at full ChatGLM-6B shapes with random weights
(random weights cost the same time and memory as the released ones).

    python bench.py generate [--batches 1,16,64 --prompt_len 64 --new_tokens 128]
    python bench.py forward  [--batch 4 --seq 512]
    python bench.py sft --train lora [--checkpoint]           # LoRA r=8 on query_key_value, 4 x 512
    python bench.py sft --train last_n --train_layers 4
    torchrun --nproc_per_node=4 bench.py pipeline --pp 4 --train full --micro_batches 16 --plans auto,naive
    torchrun --nproc_per_node=4 bench.py sft --pp 1 --train lora        # D = 4 data-parallel replicas
    torchrun --nproc_per_node=4 bench.py rm --pp 4 --train full         # ranked groups of 4 answers
    python bench.py make_model --dir /tmp/glm6b [--adapter]             # random 6B folder for train_ppo.py
    python bench.py dpo --dir /tmp/glm6b        # train_dpo.py there: cached + shared prompt vs live + separate
    python bench.py lengths --dir /tmp/glm6b    # train_sft.py on long-tailed lengths: padded, grouped, packed
    python bench.py quant --batches 1,64        # bf16 / int8 / int4 bases: LoRA SFT, decoding, logits' error
    python bench.py generate --toy          # the 2-layer toy model, runs anywhere

Each result is printed and appended as one JSON line to --out (default bench_results.jsonl)
together with the card, the command line and the date.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import data
import dist
import flags
import glm
import optim
import plan
import quant

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s per H100 (datasheet), the MFU denominator


def random_model(cfg, dtype, device, seed=0, **stage):
    """A model (or a pipeline stage: layer_ids, first, last) with random weights, built on the meta
    device and drawn in place."""
    with torch.device("meta"):
        model = glm.ChatGLM(cfg, **stage)
    return model.to_empty(device=device).to(dtype).init_weights(seed=seed)


def random_prompts(cfg, B, T, device, seed=0):
    """[B, T] ids ending in [gMASK] <sop>, the rest ordinary tokens (no special ids)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    high = cfg.mask_token_id if cfg.mask_token_id > 20 else cfg.vocab_size  # specials sit below 20 or above 130000
    body = torch.randint(20, high, (B, T - 2), generator=g)
    tail = torch.tensor([cfg.gmask_token_id, cfg.bos_token_id]).expand(B, 2)
    return torch.cat([body, tail], dim=1).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def bench_generate(args, device, dtype):
    """Decode ms/step and end-to-end tokens/s at each of --batches, with and without CUDA graphs; with
    --kernels fused,plain also how many greedy tokens of the two agree (random weights: flat logits,
    where a last-bit difference can flip a token and everything after it)."""
    model = random_model(glm.GLMConfig.toy() if args.toy else glm.GLMConfig(), dtype, device).eval()
    cfg, results, outs = model.config, [], {}
    variants = [(k, int(b)) for k in args.kernels.split(",") for b in args.batches.split(",")]
    for kernels, B in variants:
        glm.FUSED = kernels == "fused"
        ids = random_prompts(cfg, B, args.prompt_len, device)
        N = args.new_tokens
        for use_graph in ([False, True] if device.type == "cuda" else [False]):
            gen = lambda: model.generate(ids, max_new_tokens=N, stop_at_eop=False, cuda_graph=use_graph)
            timed(gen, device)  # warm-up (allocator, kernels)
            out, total = timed(gen, device)
            step_ms = decode_step_ms(model, ids, N, use_graph, device)
            results.append(dict(mode="generate", kernels=kernels, batch=B, prompt_len=args.prompt_len, new_tokens=N,
                                cuda_graph=use_graph, decode_ms_per_step=round(step_ms, 3),
                                decode_tok_per_s=round(B * 1000 / step_ms, 1),
                                end_to_end_s=round(total, 4), end_to_end_tok_per_s=round(B * N / total, 1),
                                weight_gb=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
                                                2)))
            outs[kernels, B, use_graph] = out
            if kernels == "plain" and ("fused", B, use_graph) in outs:
                same = (outs["fused", B, use_graph] == out).float()[:, ids.shape[1]:]  # [B, N]
                first = torch.where(same.min(0).values == 0)[0]
                results[-1].update(tokens_same_as_fused=round(same.mean().item(), 4),
                                   first_differing_step=int(first[0]) if len(first) else None)
            print(json.dumps(results[-1]), flush=True)
        del ids
    return results


@torch.no_grad()
def decode_step_ms(model, ids, N, use_graph, device):
    """Steady-state time of one decode step (after prefill and graph capture), in ms."""
    B, T = ids.shape
    cfg = model.config
    dec = glm.Decoder(model, B, T + N, use_graph)
    layout = glm.derive_layout(ids, cfg)
    logits = dec.prefill(ids, layout)
    tok = logits.argmax(-1)
    pos = lambda s: glm.new_token_positions(layout, s)
    for s in range(T, T + N - 1, dec.bucket if use_graph else N):  # capture every window first
        dec.step(tok, pos(s), s)
    sync(device)
    t0 = time.perf_counter()
    for s in range(T, T + N - 1):
        tok = dec.step(tok, pos(s), s).argmax(-1)
    sync(device)
    return (time.perf_counter() - t0) * 1000 / (N - 1)


def bench_forward(args, device, dtype):
    """Forward + backward of full fine-tuning (all weights get gradients), no optimiser step."""
    model = random_model(glm.GLMConfig.toy() if args.toy else glm.GLMConfig(), dtype, device).train()
    model.checkpoint_activations = frozenset(range(model.config.num_layers) if args.checkpoint else ())
    cfg = model.config
    ids = random_prompts(cfg, args.batch, args.seq, device)
    ids[:, args.seq // 2] = cfg.bos_token_id  # prefix of half the sequence, causal after it
    ids[:, args.seq // 2 - 1] = cfg.gmask_token_id

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    tokens = args.batch * (args.seq - 1)
    n_params = sum(p.numel() for p in model.parameters())
    attn = 12 * cfg.num_layers * cfg.hidden_size * (args.seq - 1)  # fwd+bwd scores and context per token
    flops = (6 * n_params + attn) * tokens
    results = []
    for kernels in args.kernels.split(","):
        glm.FUSED = kernels == "fused"
        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = [timed(step, device)[1] for _ in range(args.iters)]
        dt = sorted(times)[len(times) // 2]
        results.append(dict(mode="forward", kernels=kernels, batch=args.batch, seq=args.seq, checkpoint=args.checkpoint,
                            step_s=round(dt, 4), tok_per_s=round(tokens / dt, 1),
                            mfu=round(flops / dt / H100_BF16_PEAK, 4), peak_mem_gib=round(
                                torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None))
        print(json.dumps(results[-1]), flush=True)
    return results


def train_batches(cfg, args, M, device, seed):
    """M micro-batches of args.batch sequences of args.seq tokens: a prompt half, then an answer
    half that takes the loss (as in SFT)."""
    mbs = []
    for m in range(M):
        ids = random_prompts(cfg, args.batch, args.seq // 2, device, seed=seed + m)
        ans = random_prompts(cfg, args.batch, args.seq - args.seq // 2 + 2, device, seed=seed + 100 + m)[:, :-2]
        ids = torch.cat([ids, ans], dim=1)  # [b, s]
        labels = torch.full_like(ids, -100)
        labels[:, args.seq // 2:] = ids[:, args.seq // 2:]
        mbs.append({"input_ids": ids, "labels": labels})
    return mbs


def rm_batches(cfg, args, M, device, seed):
    """M micro-batches of args.batch prompts with 4 ranked answers each (all 4 in one forward)."""
    mbs, K = [], 4
    for m in range(M):
        ids = random_prompts(cfg, args.batch * K, args.seq, device, seed=seed + m)
        ids[:, -1] = cfg.eos_token_id  # every answer ends in <eop>, where its score is read
        better, worse = zip(*[(g * K + i, g * K + j) for g in range(args.batch) for i in range(K) for j in range(i + 1, K)])
        mbs.append({"input_ids": ids, "end": torch.full((args.batch * K,), args.seq - 1, device=device),
                    "better": torch.tensor(better, device=device), "worse": torch.tensor(worse, device=device)})
    return mbs


def model_flops_per_token(cfg, train, seq, train_layers=0):
    """Model FLOPs per trained token (no recomputation): forward 2N + attention; backward twice the
    forward for trained weights, once (activation gradients only) where weights are frozen."""
    h, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    block = 2 * (4 * h * h + 2 * h * cfg.inner_hidden_size) + 4 * seq * h  # matmuls + attention (causal ~half of 2*2*s*h)
    fwd = L * block + 2 * h * V
    if train == "full":
        return 3 * fwd
    if train == "lora":
        return 2 * fwd
    # last N blocks: their backward is twice their forward; the frozen head passes activation
    # gradients only (once its forward); the frozen prefix runs forward only
    head = fwd - L * block
    return fwd + 2 * train_layers * block + head


def training_setup(args, cfg, d, method, dtype, quantize=quant.FLOAT):
    """This rank's stage of the plan with random weights, what trains, the optimiser and the fixed
    micro-batches and loss of the step to time (an SFT step, or an RM step over ranked answers);
    quantize: the frozen base's scheme (quant.Scheme), for LoRA."""
    M = args.micro_batches
    budget = 0.95 * torch.cuda.get_device_properties(d.device).total_memory if d.device.type == "cuda" else None
    the_plan = plan.plan_pipeline(cfg, d.P, args.batch * (4 if args.mode == "rm" else 1), args.seq, M,
                                  train=args.train, lora_rank=8, train_layers=args.train_layers,
                                  param_bytes=2 if d.device.type == "cuda" else 4, checkpoint=budget is not None,
                                  mem_budget=budget, method=method, lm_head=args.mode != "rm", quantize=quantize)
    dist.print0(the_plan.format_table())
    stage = the_plan.stages[d.pp_rank]
    model = quant.quantize_as(random_model(cfg, dtype, d.device, d.pp_rank, **stage.model_kwargs()), quantize)
    model.checkpoint_activations = frozenset(stage.layers if args.checkpoint else stage.checkpoint_layers)
    optim.select_trainable(model, args.train, train_layers=args.train_layers)
    head = None
    if args.mode == "rm":
        if d.last:  # as train_rm.py: an RM never computes logits
            model.lm_head.requires_grad_(False)
            head = glm.reward_head(cfg.hidden_size, device=d.device)
        mbs = rm_batches(cfg, args, M, d.device, seed=17 * d.dp_rank)
        n_pairs = torch.tensor(float(sum(len(mb["better"]) for mb in mbs) * d.D), device=d.device)

        def loss_fn(model, h, mb):  # the pairwise ranking loss, scores read at each answer's <eop>
            r = glm.rewards_at(head, h, mb["end"])
            return -F.logsigmoid(r[mb["better"]] - r[mb["worse"]]).sum() / n_pairs
    else:
        mbs = train_batches(cfg, args, M, d.device, seed=17 * d.dp_rank)
        n_tok = dist.all_reduce(sum(data.count_labels(mb["labels"]) for mb in mbs).float(), "sum", d.dp_group)
        loss_fn = lambda model, h, mb: data.lm_loss(model.lm_head, h, mb["labels"]) / n_tok
    opt = optim.AdamW(optim.named_trainables(model, {"head": head} if head else None), 1e-5, 0.0, d, the_plan.hosts)
    first_trainable = dist.first_trainable_stage(model, d)

    def step():
        loss = dist.train_step(model, d, mbs, loss_fn, first_trainable)
        return optim.optimizer_step(opt, loss, 1e-5, 1.0, d, 0, 0)[0]
    return the_plan, model, step


def bench_train(args, device, dtype):
    """Training steps through dist.train_step (1F1B) + the optimiser, per rank: measured and
    predicted peak memory, busy share; overall tokens/s (or answers/s) and MFU."""
    d = dist.setup(args.pp)
    cfg = glm.GLMConfig.toy() if args.toy else glm.GLMConfig()
    if args.toy:
        cfg.num_layers = 4
    results = []
    for method, kernels in [(m, k) for m in args.plans.split(",") for k in args.kernels.split(",")]:
        glm.FUSED = kernels == "fused"  # fused: glm_kernels' Triton kernels; plain: torch ops only
        the_plan, model, step = training_setup(args, cfg, d, method, dtype)
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        d.idle.seconds(reset=True)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync(device)
        dt = (time.perf_counter() - t0) / args.iters
        rows = dist.report_memory_and_busy(the_plan.stages[d.pp_rank], d, dt * args.iters)
        params = sum(p.numel() for p in model.parameters()) if args.train != "lora" else None
        if params is not None:  # the MFU: 6 x all parameters (embedding included) x tokens
            params = int(dist.all_reduce(torch.tensor(float(params), device=d.device), "sum", d.pp_group).item())
        res = dict(kernels=kernels, **training_record(args, cfg, d, method, the_plan, dt, rows, params))
        dist.print0(json.dumps(res))
        results.append(res)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results if dist.is_main() else []


def gib(x):
    return None if x is None else round(x / 2**30, 2)  # None: not measured (CPU)


def training_record(args, cfg, d, method, the_plan, dt, rows, params):
    """One JSON record of a timed training configuration."""
    M = args.micro_batches
    seqs = args.batch * M * d.D * (4 if args.mode == "rm" else 1)
    tokens = seqs * args.seq
    mfu = model_flops_per_token(cfg, args.train, args.seq, args.train_layers) * tokens / dt / (d.world * H100_BF16_PEAK)
    res = dict(mode=args.mode, train=args.train, plan=method, P=d.P, D=d.D, micro_batch=args.batch,
               micro_batches=M, seq=args.seq, checkpoint=args.checkpoint, layer_counts=the_plan.layer_counts,
               optimizer_states_moved=the_plan.hosts,
               step_s=round(dt, 4), tok_per_s=round(tokens / dt, 1), mfu=round(mfu, 4),
               per_rank=[dict(rank=int(r[0]), stage=int(r[1]), peak_gib=gib(r[2]), predicted_gib=gib(r[3]),
                              busy=round(r[4], 3)) for r in rows])
    if params is not None:
        res["mfu_6n"] = round(6 * params * tokens / dt / (d.world * H100_BF16_PEAK), 4)
    if d.device.type == "cuda":  # do weight-gradient GEMMs add into the fp32 accumulators themselves?
        res["wgrad_gemm_into_fp32"] = optim.fp32_accumulating_gemm(d.device)
        peaks = [r[2] for r in rows]
        res["peak_max_over_min"] = round(max(peaks) / min(peaks), 3)
    if args.mode == "rm":
        res["answers_per_s_per_gpu"] = round(seqs / dt / d.world, 1)
    # the bubble is the idle share of the busiest (bottleneck) stage; faster stages idle more,
    # which is imbalance, reported as the mean idle share beside it
    res["bubble_predicted"] = round((d.P - 1) / (M + d.P - 1), 3)
    res["bubble_measured"] = round(1 - max(r[4] for r in rows), 3)
    res["idle_mean"] = round(1 - sum(r[4] for r in rows) / len(rows), 3)
    return res


def make_model(args, device, dtype):
    """A random 6B model folder (bf16) with a reward head and statistics, so train_ppo.py can run
    at full shapes: --actor DIR --rm_dir DIR (full), or --model DIR --rm_dir DIR/rm_adapter (LoRA).
    Special ids are the toy tokenizer's (bundled), so prompts tokenise; shapes are ChatGLM-6B's."""
    import shutil
    from safetensors.torch import save_file
    import lora
    cfg = glm.GLMConfig(bos_token_id=8, eos_token_id=9, mask_token_id=4, gmask_token_id=5, pad_token_id=3)
    if args.toy:
        cfg = glm.GLMConfig.toy()
    model = random_model(cfg, dtype, device)
    tok = glm.Tokenizer(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ice_text.model"))
    model.save_pretrained(args.dir, tokenizer=tok)
    head = {"weight": torch.randn(1, cfg.hidden_size) * cfg.hidden_size ** -0.5, "bias": torch.zeros(1)}
    save_file(head, os.path.join(args.dir, "reward_head.safetensors"))
    with open(os.path.join(args.dir, "reward_stats.json"), "w") as f:
        json.dump({"mean": 0.0, "std": 1.0}, f)
    if args.adapter:  # a reward adapter (random B, as after training) for the shared-base mode
        lora.inject_lora(model, r=8, alpha=16)
        for _, m in lora.lora_modules(model):
            torch.nn.init.normal_(m.lora_B["default"], std=1e-3)
        sub = os.path.join(args.dir, "rm_adapter")
        lora.save_adapter(model, sub)
        for name in ("reward_head.safetensors", "reward_stats.json"):
            shutil.copy(os.path.join(args.dir, name), os.path.join(sub, name))
    # prompts of about 256 tokens
    words = [tok.sp.id_to_piece(i).lstrip("\u2581") for i in range(300, 1100)]
    g = torch.Generator().manual_seed(0)
    with open(os.path.join(args.dir, "prompts.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(512):
            picks = torch.randint(len(words), (args.prompt_len,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(words[i] for i in picks if words[i].isalnum())}) + "\n")
    print(f"wrote {args.dir}")
    return []


# -----------------------------------------------------------------------------
# whole training scripts on a random 6B folder (make_model), timed from their metrics.jsonl


def script_steps(argv, out, skip=2):
    """Run `python SCRIPT ARGS` (a training script, log_every 1) and return its metrics records of
    the steps after the first `skip` (warm-up: allocator, first reference pass), and rank 0's peak
    GiB from the memory table the run prints last (None on a CPU)."""
    import subprocess
    run = subprocess.run([sys.executable, *argv, "--out", out, "--overwrite", "--log_every", "1",
                          "--save_every", "100000"], check=True, capture_output=True, text=True)
    print(run.stdout[-1500:], flush=True)
    table = run.stdout.split("measured peak GiB")[-1].split()  # "predicted GiB busy", then rank, stage, peak ...
    peak = float(table[5]) if table[5] != "n/a" else None
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    return [r for r in rows if "loss" in r and r["step"] > skip], peak


def median(rows, key):
    vals = sorted(r[key] for r in rows)
    return vals[len(vals) // 2]


def random_words(tok, n, rng):
    """About n tokens of text: ordinary pieces of the tokenizer, space-separated."""
    words = [tok.sp.id_to_piece(i).lstrip("\u2581") for i in range(300, 1100)]
    words = [w for w in words if w.isalnum()]
    return " ".join(rng.choice(words) for _ in range(n))


def bench_dpo(args, device, dtype):
    """LoRA DPO (train_dpo.py) on groups of one ~256-token prompt and 4 ~256-token answers: the
    default (reference log-probs cached, the prompt shared by its answers) beside the usual
    implementation (a live reference, one row per answer), answers/s per GPU."""
    import random
    tok = glm.Tokenizer(os.path.join(args.dir, "ice_text.model"))
    path, rng = os.path.join(args.dir, "ranked.jsonl"), random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(256):
            f.write(json.dumps({"prompt": random_words(tok, 200, rng),
                                "answers": [random_words(tok, 200, rng) for _ in range(4)]}) + "\n")
    common = ["train_dpo.py", "--model", args.dir, "--data", path, "--lora_rank", "8", "--lr", "1e-4",
              "--max_len", "512", "--micro_batch_size", "2", "--grad_accum", "4", "--max_steps", str(args.iters + 2),
              "--holdout", "8", "--eval_every", "100000"]
    results, cfg = [], glm.GLMConfig.from_json(os.path.join(args.dir, "config.json"))
    # model FLOPs of a token: the policy's forward and backward (LoRA: activation gradients only),
    # plus the reference's forward where it runs live; attention at the row's length
    for name, extra, seq, fwds in [("cached_shared", [], 5 * 256, 2),
                                   ("live_separate", ["--no_ref_cache", "--no_shared_prompt"], 2 * 256, 3)]:
        rows, peak = script_steps(common + extra, f"/tmp/bench_dpo_{name}")
        tok_s = median(rows, "tokens_per_s")
        results.append(dict(mode="dpo", train="lora", variant=name, groups_per_step=8, answers_per_group=4,
                            answers_per_s_per_gpu=round(median(rows, "answers_per_s"), 2), tok_per_s=round(tok_s),
                            mfu=round(model_flops_per_token(cfg, "lora", seq) / 2 * fwds * tok_s / H100_BF16_PEAK, 4),
                            peak_gib=peak))
        print(json.dumps(results[-1]), flush=True)
    results.append(dict(mode="dpo", speedup=round(results[0]["answers_per_s_per_gpu"]
                                                 / results[1]["answers_per_s_per_gpu"], 3)))
    print(json.dumps(results[-1]), flush=True)
    return results


def bench_lengths(args, device, dtype):
    """LoRA SFT (train_sft.py) on long-tailed example lengths (log-normal: median 200, 90th
    percentile 700, cap 1024): padded micro-batches, --group_by_length, --pack; real tokens/s."""
    path = os.path.join(args.dir, "long_tail.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for line in data.synth_lines(4096, seed=0):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    common = ["train_sft.py", "--model", args.dir, "--data", path, "--lora_rank", "8", "--lr", "1e-4",
              "--max_len", "1024", "--grad_accum", "1", "--max_steps", str(args.iters + 2), "--holdout", "8",
              "--eval_every", "100000"]
    results = []
    for name, extra in [("padded", ["--micro_batch_size", "8"]), ("group_by_length", ["--micro_batch_size", "8",
                        "--group_by_length"]), ("packed", ["--micro_batch_size", "3", "--pack"])]:
        rows, peak = script_steps(common + extra, f"/tmp/bench_len_{name}")
        results.append(dict(mode="lengths", train="lora", variant=name, extra=" ".join(extra),
                            real_tok_per_s=round(median(rows, "tokens_per_s"), 1),
                            padding=round(sum(r["padding"] for r in rows) / len(rows), 3), peak_gib=peak))
        print(json.dumps(results[-1]), flush=True)
    return results


# -----------------------------------------------------------------------------
# a frozen int8 / int4 base (quant.py) beside bf16, on one card


def quant_schemes(toy):
    """(name, quant.Scheme) compared; the toy's width of 64 takes int4 groups of 32."""
    g = 32 if toy else 128
    return [("bf16", quant.FLOAT), ("int8", quant.Scheme(8, 0)), (f"int4_g{g}", quant.Scheme(4, g)),
            ("int4_row", quant.Scheme(4, 0)), ("int8+head", quant.Scheme(8, 0, True)),
            (f"int4_g{g}+head", quant.Scheme(4, g, True))]


def quantized_random_model(cfg, dtype, device, qs):
    """random_model (the same weights every time), its block linears (and head) then quantized."""
    return quant.quantize_as(random_model(cfg, dtype, device), qs).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def fused_vs_plain(model, ids, N):
    """The CUDA kernels against quant.py's plain dequantize path: relative difference of the logits of
    one token (its linears through the GEMV) and of the prompt ids [1, T] (int8: the tensor-core kernel
    up to quant.FUSED_ROWS rows), and how many of N greedy tokens agree before the first difference."""
    runs = []
    for use in (True, False):
        quant.USE_KERNELS = use
        runs.append((model(ids[:, -1:])[0, -1], model(ids)[0], model.generate(ids, max_new_tokens=N,
                                                                            stop_at_eop=False)[0, ids.shape[1]:]))
    quant.USE_KERNELS = True
    (one, rows, gen), (one_p, rows_p, gen_p) = runs
    return round(rel_err(one, one_p), 5), round(rel_err(rows, rows_p), 5), int((gen == gen_p).cumprod(0).sum())


@torch.no_grad()
def block_linears_us(model, dtype, device, replays=20):
    """The four linears of every block at one row, as decoding at batch 1 runs them, replayed in one
    CUDA graph: microseconds a block. All blocks in turn, so the weights come from memory (the model
    exceeds L2 many times), as they do in a decode step."""
    cfg = model.config
    x = {n: torch.randn(1, n, dtype=dtype, device=device) for n in (cfg.hidden_size, cfg.inner_hidden_size)}
    linears = [lin for block in model.transformer.layers.values() for lin in (block.attention.query_key_value,
               block.attention.dense, block.mlp.dense_h_to_4h, block.mlp.dense_4h_to_h)]
    run = lambda: [glm.linear(lin, x[lin.in_features]) for lin in linears]  # as the blocks call them
    run()  # Triton compiles (and autotunes, where a kernel does) outside the capture
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    _, dt = timed(lambda: [graph.replay() for _ in range(replays)], device)
    return round(dt * 1e6 / replays / cfg.num_layers, 1)


def quant_sft(args, cfg, d, dtype, qs):
    """(tokens/s, peak bytes) of LoRA SFT steps on a base of scheme qs (training_setup's step)."""
    _, model, step = training_setup(args, cfg, d, "auto", dtype, quantize=qs)
    for _ in range(2):
        step()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    _, dt = timed(lambda: [step() for _ in range(args.iters)], d.device)
    peak = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else None
    return round(args.batch * args.seq * args.micro_batches * args.iters / dt, 1), peak


def bench_quant(args, device, dtype):
    """bf16 vs int8 vs int4 bases at 6B shapes: the logits' relative error against bf16 (and the fused
    kernels' against the plain path), decode ms/step at each of --batches (CUDA graphs), LoRA SFT r=8
    on query_key_value (--batch x --seq, activation checkpointing) tokens/s and peak memory, each
    scheme twice (sft_both_orders). One model at a time: each is built, measured and freed before
    the next."""
    cfg = glm.GLMConfig.toy() if args.toy else glm.GLMConfig()
    d, args.checkpoint = dist.setup(1), True
    ids = random_prompts(cfg, 1, args.prompt_len, device)
    ref, results = None, []
    for name, qs in quant_schemes(args.toy):
        model = quantized_random_model(cfg, dtype, device, qs)
        with torch.no_grad():
            logits = model(ids)[0]  # [T, V]
        ref = logits if ref is None else ref
        rec = dict(mode="quant", scheme=name, bits=qs.bits, group_size=qs.group_size, int8_head=qs.head,
                   logits_rel_err=round(rel_err(logits, ref), 4))
        if qs.bits and device.type == "cuda":
            keys = ("vs_plain_rel_1row", "vs_plain_rel_rows", "greedy_same_of_16")
            rec.update(zip(keys, fused_vs_plain(model, ids, 16)))
        if device.type == "cuda" and not qs.head:
            rec["block_linears_b1_us"] = block_linears_us(model, dtype, device)
        if name != "int4_row":  # int4 per row: its error only
            for B in [int(b) for b in args.batches.split(",")]:
                ms = decode_step_ms(model, random_prompts(cfg, B, args.prompt_len, device), args.new_tokens,
                                    device.type == "cuda", device)
                rec[f"decode_b{B}_ms"], rec[f"decode_b{B}_tok_per_s"] = round(ms, 3), round(B * 1000 / ms, 1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rec), flush=True)
        results.append(rec)
    sft_both_orders(args, cfg, d, dtype, results)
    print_quant_table(results, args)
    return results


def sft_both_orders(args, cfg, d, dtype, results):
    """LoRA SFT tokens/s of each scheme without a quantized head, measured twice: in order, then in the
    reverse order, since the card's speed drifted by ~10% within one call (bf16 first 14.0k, last 15.8k
    tokens/s, H200); the records get both runs, their mean and the larger peak."""
    schemes = dict(quant_schemes(args.toy))
    trained = [r for r in results if not r["int8_head"] and r["scheme"] != "int4_row"]
    for r in trained + trained[::-1]:
        tps, peak = quant_sft(args, cfg, d, dtype, schemes[r["scheme"]])
        r.setdefault("sft_runs", []).append(tps)
        if peak is not None:
            r["sft_peak_gib"] = max(r.get("sft_peak_gib", 0), gib(peak))
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
    for r in trained:
        r["sft_tok_per_s"] = round(sum(r["sft_runs"]) / 2, 1)
        print(json.dumps({"scheme": r["scheme"], "sft_runs": r["sft_runs"]}), flush=True)


def print_quant_table(results, args):
    """The records side by side, each speed also as a share of bf16's (added to the records)."""
    base = results[0]
    keys = ["sft_tok_per_s"] + [f"decode_b{b}_tok_per_s" for b in args.batches.split(",")]
    for r in results[1:]:
        for k in keys:
            if k in r:
                r[k.replace("tok_per_s", "x_bf16")] = round(r[k] / base[k], 3)
    cols = [("sft tok/s", "sft_tok_per_s"), ("x bf16", "sft_x_bf16"), ("peak GiB", "sft_peak_gib")]
    for B in args.batches.split(","):
        cols += [(f"b{B} ms", f"decode_b{B}_ms"), (f"b{B} tok/s", f"decode_b{B}_tok_per_s"),
                 ("x bf16", f"decode_b{B}_x_bf16")]
    cols += [("linears us", "block_linears_b1_us"), ("logit err", "logits_rel_err"), ("plain 1", "vs_plain_rel_1row"),
             ("plain T", "vs_plain_rel_rows"), ("greedy =", "greedy_same_of_16")]
    print("scheme".ljust(15) + "".join(title.rjust(11) for title, _ in cols))
    for r in results:
        print(r["scheme"].ljust(15) + "".join(str(r.get(key, "-")).rjust(11) for _, key in cols))


def launcher():
    """How this process was started, as the records' "command" begins: torchrun sets WORLD_SIZE."""
    n = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return f"torchrun --nproc_per_node={n} " if "WORLD_SIZE" in os.environ else "python "


def main():
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["generate", "forward", "sft", "pipeline", "rm", "make_model", "dpo", "lengths",
                                    "quant"])
    p.add_argument("--toy", action="store_true", help="the 2-layer toy model instead of 6B shapes")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    p.add_argument("--train", default="lora", choices=["lora", "full", "last_n"])
    p.add_argument("--train_layers", type=int, default=0)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro_batches", type=int, default=1, help="micro-batches per step and replica (M)")
    p.add_argument("--plans", default="auto", help="comma-separated: auto, naive")
    p.add_argument("--kernels", default="fused", help="generate, forward, sft, pipeline, rm: comma-separated fused "
                   "(glm_kernels' Triton kernels on CUDA), plain (torch ops only)")
    p.add_argument("--dir", default="/tmp/glm6b")
    p.add_argument("--adapter", action="store_true")
    p.add_argument("--out", default="bench_results.jsonl")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = dict(card=card, date=datetime.date.today().isoformat(), torch=torch.__version__,
                  command=launcher() + " ".join(sys.argv))
    if local == 0:
        print(json.dumps(header), flush=True)
    results = {"generate": bench_generate, "forward": bench_forward, "sft": bench_train, "pipeline": bench_train,
               "rm": bench_train, "make_model": make_model, "dpo": bench_dpo,
               "lengths": bench_lengths, "quant": bench_quant}[args.mode](args, device, dtype)
    if not results:
        return
    with open(args.out, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({**header, **r}) + "\n")


if __name__ == "__main__":
    flags.run(main)
