"""One rank of tests/test_pipeline.py's multi-process jobs: it runs a list of jobs in one gloo
process group (every job builds its own stages and groups) and writes each job's results beside
the list, for the test process to check. The test forks the ranks (conftest.fork_ranks); to
reproduce a failure by hand, run the same list under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=4 tests/pipeline_worker.py JOBS.json

Also what both sides build from (the step's micro-batches, the prompts, the LoRA values), so the
ranks and the single-process references read the same.
"""
import json
import os
import shutil
import sys
import traceback
import zlib

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import dist  # noqa: E402
import glm  # noqa: E402
import lora  # noqa: E402
import optim  # noqa: E402
import plan  # noqa: E402
import train_dpo  # noqa: E402
import train_sft  # noqa: E402

TOK_PATH = os.path.join(data.TOY_DIR, "ice_text.model")
TOY_TRAIN = data.toy_file("sft_train")
LAYERS = 4  # blocks of the test models: 4 stages of one, or 2 of two
MICRO_BATCHES = 4  # global micro-batches of one gradient step: M per replica x D replicas
MAX_LEN = 48
# what trains in the gradient jobs, by mode (select_trainable reads the LoRA fields or train_layers)
TRAINS = dict(lora_rank=4, lora_alpha=8.0, lora_targets=("query_key_value", "dense_4h_to_h"), train_layers=2)
HOSTED_LR, HOSTED_WD, HOSTED_CLIP, HOSTED_STEPS = 1e-3, 0.1, 0.5, 2
PROMPTS, NEW_TOKENS = 5, 10  # generation: the first PROMPTS toy prompts, NEW_TOKENS greedy tokens


# -----------------------------------------------------------------------------
# what the ranks and the single-process references share


def global_microbatches(n=MICRO_BATCHES, size=2):
    """The step's fixed micro-batches of `size` toy examples each, of different lengths (some with history)."""
    tok = glm.Tokenizer(TOK_PATH)
    enc = [data.encode_sft(tok, e, MAX_LEN) for e in data.load_sft(TOY_TRAIN)[:n * size]]
    out = []
    for i in range(0, len(enc), size):
        ids, labels = data.collate(enc[i:i + size], tok.pad_id)
        out.append({"input_ids": ids, "labels": labels})
    return out


def prompts(replica=0, replicas=1):
    """A replica's share of the encoded toy prompts (id lists of different lengths)."""
    tok = glm.Tokenizer(TOK_PATH)
    return [data.encode_prompt(tok, e, MAX_LEN) for e in data.load_sft(TOY_TRAIN)[:PROMPTS]][replica::replicas]


def set_lora_values(model):
    """Nonzero A and B, drawn per layer from its global name, so every split holds the same adapter."""
    with torch.no_grad():
        for path, m in lora.lora_modules(model):
            g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
            for params in (m.lora_A, m.lora_B):
                p = params["default"]
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# -----------------------------------------------------------------------------
# the jobs


_REAL_SETUP = dist.setup


def _setup(pp, timeout_min=10.0, threads=0):
    """dist.setup, but a later job of the same launch adds groups to the one process group instead of
    creating a second (gloo cannot reliably re-initialise in one process)."""
    if not tdist.is_initialized():
        return _REAL_SETUP(pp, timeout_min, threads)
    init = tdist.init_process_group
    tdist.init_process_group = lambda *a, **kw: None
    try:
        return _REAL_SETUP(pp, timeout_min, threads)
    finally:
        tdist.init_process_group = init


def _stage(job, d, micro_batches, dtype=None):
    """This rank's stage of the base model, job["counts"] blocks a stage (default equal)."""
    gcfg = glm.GLMConfig.from_json(os.path.join(job["model"], "config.json"))
    the_plan = plan.plan_from_counts(plan.glm_pieces(gcfg, 2, MAX_LEN), job.get("counts") or [LAYERS // d.P] * d.P,
                                     plan.CostModel(micro_batches))
    stage = the_plan.stages[d.pp_rank]
    if dtype is not None:  # a stage in another dtype than build_stage's (bf16 on a CPU)
        return glm.ChatGLM.from_pretrained(job["model"], dtype=dtype, **stage.model_kwargs())
    return dist.build_stage(job["model"], stage, d, checkpoint_all=job.get("checkpoint", False),
                            quantize=tuple(job.get("quantize", (0, 0))))  # (bits, group size): an int4 base


def _my_share(mbs, d):
    """This replica's disjoint slice of the global micro-batches."""
    M = len(mbs) // d.D
    return mbs[d.dp_rank * M:(d.dp_rank + 1) * M]


def _save(job, out, d, result):
    torch.save(result, os.path.join(out, f"{job['name']}-rank{d.rank}.pt"))


def grads_job(job, out):
    """One 1F1B step over this replica's share of the global micro-batches; saves loss and gradients."""
    d = _setup(job["pp"])
    mine = _my_share(global_microbatches(job.get("micro_batches", MICRO_BATCHES)), d)
    model = _stage(job, d, len(mine))
    params = optim.select_trainable(model, job["mode"], **TRAINS)
    if job["mode"] == "lora":
        set_lora_values(model)
    n_tok = train_sft.count_label_tokens(mine, d.dp_group)
    first = dist.first_trainable_stage(model, d)
    loss = dist.train_step(model, d, mine, train_sft.sft_loss(n_tok), first)
    loss = dist.all_reduce(loss.detach().clone(), "sum", d.dp_group)
    optim.sync_grads([p.grad for p in params], d)
    _save(job, out, d, {"rank": d.rank, "pp_rank": d.pp_rank, "dp_rank": d.dp_rank, "loss": loss.item(),
                        "n_tokens": n_tok.item(), "first_trainable": first,
                        "recomputed": sorted(model.checkpoint_activations),
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)})


def hosted_job(job, out):
    """HOSTED_STEPS AdamW steps of full training over the global micro-batches, some pieces' masters
    and moments kept on other stages (job["hosts"]); saves each rank's weights and the optimiser
    state it keeps."""
    d = _setup(job["pp"])
    mine = _my_share(global_microbatches(), d)
    model = _stage(job, d, len(mine))
    optim.select_trainable(model, "full")
    opt = optim.AdamW(optim.named_trainables(model), HOSTED_LR, HOSTED_WD, d, job["hosts"])
    n_tok = train_sft.count_label_tokens(mine, d.dp_group)
    for step in range(HOSTED_STEPS):
        loss = dist.train_step(model, d, mine, train_sft.sft_loss(n_tok))
        optim.optimizer_step(opt, loss, HOSTED_LR, HOSTED_CLIP, d, 0, step)
    _save(job, out, d, {"pp_rank": d.pp_rank, "dp_rank": d.dp_rank, "guests": sorted(opt.guests),
                        "away": sorted(opt.away), "state": opt.state_by_name(),
                        "weights": {n: p.detach().clone() for n, p in model.named_parameters()}})


def generate_job(job, out):
    """Greedy generation through the pipeline, each replica on its share of the prompts: the ids and
    log-probabilities of dist.generate, and the texts of dist.greedy_answers (two prompts a batch)."""
    d = _setup(job["pp"])
    dtype = getattr(torch, job["dtype"]) if "dtype" in job else None
    model = _stage(job, d, 1, dtype).eval()
    tok = glm.Tokenizer(TOK_PATH)
    mine = prompts(d.dp_rank, d.D)
    ids, logprobs = dist.generate(model, d, glm.left_pad(mine, tok.pad_id), NEW_TOKENS,
                                  micro_batches=job["micro_batches"])
    texts = dist.greedy_answers(model, d, tok, mine, NEW_TOKENS, batch_size=2)
    group = dist.generate(model, d, glm.left_pad(mine, tok.pad_id), NEW_TOKENS, micro_batches=job["micro_batches"],
                          group_size=3)  # 3 greedy completions of each prompt, the prompt sent once
    _save(job, out, d, {"dp_rank": d.dp_rank, "ids": ids, "logprobs": logprobs, "texts": texts, "group": group})


def train_job(job, out):
    """train_sft.main (or job["script"]'s: "dpo") under this launch's processes, sharing its process
    group with the other jobs."""
    saved = dist.setup, dist.teardown
    dist.setup, dist.teardown = _setup, dist.barrier
    try:
        {"sft": train_sft, "dpo": train_dpo}[job.get("script", "sft")].main(job["argv"])
    finally:
        dist.setup, dist.teardown = saved


def copy_job(job, out):
    """Rank 0 copies a finished run's folder (for a run that resumes from it), the others wait."""
    try:
        if int(os.environ["RANK"]) == 0:
            shutil.copytree(job["src"], job["dst"])
    finally:  # a failed copy must not leave the other ranks waiting
        dist.barrier()


JOBS = {"grads": grads_job, "hosted": hosted_job, "generate": generate_job, "train": train_job, "copy": copy_job}


def main(jobs_path):
    """Run the jobs in order; after each, rewrite this rank's {job name: "ok" or the error}. A job
    that fails without job["fails"] ends the launch: the other ranks may wait on this one for good,
    and the launcher (fork_ranks, torchrun) stops them when a rank exits with an error."""
    torch.set_num_threads(1)
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    out = os.path.dirname(jobs_path)
    path, results = os.path.join(out, f"results-rank{os.environ['RANK']}.json"), {}
    for job in jobs:
        try:
            JOBS[job["kind"]](job, out)
            results[job["name"]] = "ok"
        except Exception as e:
            results[job["name"]] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f)
        if results[job["name"]] != "ok" and not job.get("fails"):
            print(results[job["name"]], file=sys.stderr, flush=True)
            os._exit(1)
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
