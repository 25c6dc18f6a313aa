"""Temporary GPU check of quant.py (not part of the project): logits error, decode ms/step, LoRA SFT peak."""
import copy, json, time
from types import SimpleNamespace
import torch
import bench, data, dist, glm, optim, quant

dev, cfg = torch.device("cuda"), glm.GLMConfig()
d = dist.setup(1)
ids = bench.random_prompts(cfg, 1, 64, dev)
m = bench.random_model(cfg, torch.bfloat16, dev)
with torch.no_grad():
    ref = m(ids).float()
prompts = {B: bench.random_prompts(cfg, B, 64, dev, seed=B) for B in (1, 64)}
rows = [dict(scheme="bf16", **{f"ms_b{B}": round(bench.decode_step_ms(m, p, 128, True, dev), 3) for B, p in prompts.items()})]
print(json.dumps(rows[-1]), flush=True)
for bits, g in ((8, 0), (4, 0), (4, 128)):
    q = quant.quantize_model(copy.deepcopy(m), bits, g)
    with torch.no_grad():
        y = q(ids).float()
        same = torch.equal(q.generate(ids, 16, cuda_graph=True), q.generate(ids, 16, cuda_graph=False))
    r = dict(scheme=f"int{bits} g{g}", rel_err=round(((y - ref).norm() / ref.norm()).item(), 5), graph_eq_eager=same,
             **{f"ms_b{B}": round(bench.decode_step_ms(q, p, 128, True, dev), 3) for B, p in prompts.items()})
    print(json.dumps(r), flush=True)
    del q
    torch.cuda.empty_cache()
del m, ref
torch.cuda.empty_cache()
mbs = bench.train_batches(cfg, SimpleNamespace(batch=4, seq=512), 1, dev, 0)
n_tok = data.count_labels(mbs[0]["labels"]).float()
for bits, g in ((0, 0), (8, 0), (4, 128)):
    m = quant.quantize_model(bench.random_model(cfg, torch.bfloat16, dev), bits, g)
    torch.cuda.empty_cache()
    m.checkpoint_activations = frozenset(range(cfg.num_layers))
    optim.select_trainable(m, "lora", lora_rank=8)
    opt = optim.AdamW(optim.named_trainables(m), 1e-4, 0.0, d, {})
    loss_fn = lambda model, h, mb: data.lm_loss(model.lm_head, h, mb["labels"]) / n_tok
    step = lambda: optim.optimizer_step(opt, dist.train_step(m, d, mbs, loss_fn, 0), 1e-4, 1.0, d, 0, 0)
    step(), step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 3
    print(json.dumps(dict(sft_lora_ckpt=f"int{bits} g{g}" if bits else "bf16", tok_s=round(4 * 512 / dt),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))), flush=True)
    del m, opt, step
    torch.cuda.empty_cache()
