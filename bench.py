"""Throughput and memory benchmarks at full ChatGLM-6B shapes with random weights
(random weights cost the same time and memory as the released ones).

    python bench.py generate [--batches 1,16,64 --prompt_len 64 --new_tokens 128]
    python bench.py forward  [--batch 4 --seq 512]
    python bench.py generate --toy          # the 2-layer toy model, runs anywhere

Each result is printed and appended as one JSON line to --out (default bench_results.jsonl)
together with the card, the command line and the date.
"""
import argparse
import datetime
import json
import sys
import time

import torch
import torch.nn.functional as F

import glm

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s per H100 (datasheet), the MFU denominator


def build_model(toy, dtype, device):
    cfg = glm.GLMConfig.toy() if toy else glm.GLMConfig()
    with torch.device("meta"):
        model = glm.ChatGLM(cfg)
    return model.to_empty(device=device).to(dtype).init_weights(seed=0)


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
    model = build_model(args.toy, dtype, device).eval()
    cfg, results = model.config, []
    for B in [int(b) for b in args.batches.split(",")]:
        ids = random_prompts(cfg, B, args.prompt_len, device)
        N = args.new_tokens
        for use_graph in ([False, True] if device.type == "cuda" else [False]):
            gen = lambda: model.generate(ids, max_new_tokens=N, stop_at_eop=False, cuda_graph=use_graph)
            timed(gen, device)  # warm-up (allocator, kernels)
            out, total = timed(gen, device)
            step_ms = decode_step_ms(model, ids, N, use_graph, device)
            results.append(dict(mode="generate", batch=B, prompt_len=args.prompt_len, new_tokens=N,
                                cuda_graph=use_graph, decode_ms_per_step=round(step_ms, 3),
                                decode_tok_per_s=round(B * 1000 / step_ms, 1),
                                end_to_end_s=round(total, 4), end_to_end_tok_per_s=round(B * N / total, 1),
                                weight_gb=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2)))
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
    pos = lambda s: torch.stack([layout.mask_pos, s - layout.ctx + 1], dim=1)[:, :, None]
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
    model = build_model(args.toy, dtype, device).train()
    model.checkpoint_activations = args.checkpoint
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

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step, device)[1] for _ in range(args.iters)]
    dt = sorted(times)[len(times) // 2]
    tokens = args.batch * (args.seq - 1)
    n_params = sum(p.numel() for p in model.parameters())
    attn = 12 * cfg.num_layers * cfg.hidden_size * (args.seq - 1)  # fwd+bwd scores and context per token
    flops = (6 * n_params + attn) * tokens
    res = dict(mode="forward", batch=args.batch, seq=args.seq, checkpoint=args.checkpoint,
               step_s=round(dt, 4), tok_per_s=round(tokens / dt, 1), mfu=round(flops / dt / H100_BF16_PEAK, 4),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None)
    print(json.dumps(res), flush=True)
    return [res]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["generate", "forward"])
    p.add_argument("--toy", action="store_true", help="the 2-layer toy model instead of 6B shapes")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    p.add_argument("--out", default="bench_results.jsonl")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = dict(card=card, date=datetime.date.today().isoformat(), torch=torch.__version__,
                  command="python " + " ".join(sys.argv))
    print(json.dumps(header), flush=True)
    results = {"generate": bench_generate, "forward": bench_forward}[args.mode](args, device, dtype)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({**header, **r}) + "\n")


if __name__ == "__main__":
    main()
