"""Pipeline stages x data-parallel replicas (gloo, CPU) against one process: the same losses, the same
gradients, checkpoints that read back under another number of stages.

The multi-process tests are named test_torchrun_* (select them with `pytest -k torchrun`). Each
torchrun launch costs seconds, so two launches (4 processes, then 2) each run a list of jobs in one
process group, and the tests check their results. This file is also the worker script the
launches run:  python -m torch.distributed.run --nproc_per_node=N tests/test_pipeline.py JOBS.json
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import data  # noqa: E402
import dist  # noqa: E402
import glm  # noqa: E402
import lora  # noqa: E402
import train_sft  # noqa: E402

TOK_PATH = os.path.join(HERE, "fixtures", "case_small", "ice_text.model")
TOY_TRAIN = os.path.join(ROOT, "data", "toy_sft_train.jsonl")
LAYERS = 4
MICRO_BATCHES = 4  # global micro-batches of one gradient step: M per replica x D replicas
# what trains in the gradient jobs (select_trainable reads the LoRA fields or train_layers by mode)
LORA = train_sft.Config(lora_rank=4, lora_alpha=8.0, lora_targets="query_key_value,dense_4h_to_h", train_layers=2)
LAUNCH_TIMEOUT = 300


# -----------------------------------------------------------------------------
# shared by the workers and the single-process references


def make_base(path, seed=0):
    cfg = glm.GLMConfig.toy()
    cfg.num_layers = LAYERS
    glm.ChatGLM(cfg).init_weights(seed, std=0.1).save_pretrained(path, tokenizer=glm.Tokenizer(TOK_PATH))
    return str(path)


def global_microbatches(n=MICRO_BATCHES, size=2, max_len=48):
    """The step's fixed micro-batches of `size` toy examples each, of different lengths (some with history)."""
    tok = glm.Tokenizer(TOK_PATH)
    exs = data.load_sft(TOY_TRAIN)[:n * size]
    enc = [data.encode_sft(tok, e, max_len) for e in exs]
    out = []
    for i in range(0, len(enc), size):
        ids, labels = data.collate(enc[i:i + size], tok.pad_id)
        out.append({"input_ids": ids, "labels": labels})
    return out


def set_lora_values(model):
    """Nonzero A and B, drawn per layer from its global name, so every split holds the same adapter."""
    with torch.no_grad():
        for path, m in lora.lora_modules(model):
            g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
            for params in (m.lora_A, m.lora_B):
                p = params["default"]
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def data_file(path, n=12):
    """n toy examples: 3 steps an epoch at 2 micro-batches of 2."""
    with open(TOY_TRAIN, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as g:
        g.writelines(next(f) for _ in range(n))
    return str(path)


def sft_argv(base, train, out, *extra, **flags):
    opts = dict(model=base, data=train, eval_data=train, out=str(out), max_len=48, micro_batch_size=2,
                grad_accum=2, lr=1e-2, warmup_steps=4, max_steps=6, log_every=1, eval_every=1000,
                save_every=1000)
    opts.update(flags)
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))] + list(extra)


def losses(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


# -----------------------------------------------------------------------------
# the worker: one process of a torchrun launch


_REAL_SETUP = dist.setup


def _setup(pp):
    """dist.setup, but a later job of the same launch adds groups to the one process group instead of
    creating a second (gloo cannot reliably re-initialise in one process)."""
    if not tdist.is_initialized():
        return _REAL_SETUP(pp)
    init = tdist.init_process_group
    tdist.init_process_group = lambda *a, **kw: None
    try:
        return _REAL_SETUP(pp)
    finally:
        tdist.init_process_group = init


def grads_job(job, out):
    """One 1F1B step over this replica's share of the global micro-batches; saves loss and gradients."""
    d = _setup(job["pp"])
    mbs_all = global_microbatches(job.get("micro_batches", MICRO_BATCHES))
    M = len(mbs_all) // d.D
    mine = mbs_all[d.dp_rank * M:(d.dp_rank + 1) * M]  # replicas take disjoint slices
    gcfg = glm.GLMConfig.from_json(os.path.join(job["model"], "config.json"))
    pieces = dist.glm_pieces(gcfg, 2, 48)
    plan = dist.plan_from_counts(pieces, job.get("counts") or [LAYERS // d.P] * d.P, dist.CostModel(M))
    model = dist.build_stage(job["model"], plan.stages[d.pp_rank], d, checkpoint_all=job.get("checkpoint", False))
    params = dist.select_trainable(model, job["mode"], LORA)
    if job["mode"] == "lora":
        set_lora_values(model)
    n_tok = train_sft.count_label_tokens(mine, d.dp_group)
    first = dist.first_trainable_stage(model, d)
    loss = dist.train_step(model, d, mine, train_sft.sft_loss(n_tok), first)
    loss = dist.all_reduce(loss.detach().clone(), "sum", d.dp_group)
    dist.sync_grads([p.grad for p in params], d)
    torch.save({"rank": d.rank, "pp_rank": d.pp_rank, "dp_rank": d.dp_rank, "loss": loss.item(),
                "n_tokens": n_tok.item(), "first_trainable": first,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)},
               os.path.join(out, f"{job['name']}-rank{d.rank}.pt"))


HOSTED_LR, HOSTED_WD, HOSTED_CLIP, HOSTED_STEPS = 1e-3, 0.1, 0.5, 2


def hosted_job(job, out):
    """HOSTED_STEPS AdamW steps of full training, some pieces' masters and moments kept on other
    stages (job["hosts"]); saves each rank's weights and the optimiser state it keeps."""
    d = _setup(job["pp"])
    mbs = global_microbatches()
    gcfg = glm.GLMConfig.from_json(os.path.join(job["model"], "config.json"))
    plan = dist.plan_from_counts(dist.glm_pieces(gcfg, 2, 48), [LAYERS // d.P] * d.P, dist.CostModel(len(mbs)))
    model = dist.build_stage(job["model"], plan.stages[d.pp_rank], d)
    dist.select_trainable(model, "full", LORA)
    opt = dist.AdamW(dist.named_trainables(model), HOSTED_LR, HOSTED_WD, d, job["hosts"])
    n_tok = train_sft.count_label_tokens(mbs)
    for step in range(HOSTED_STEPS):
        loss = dist.train_step(model, d, mbs, train_sft.sft_loss(n_tok))
        dist.optimizer_step(opt, loss, HOSTED_LR, HOSTED_CLIP, d, 0, step)
    torch.save({"pp_rank": d.pp_rank, "guests": sorted(opt.guests), "away": sorted(opt.away),
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "state": opt.state_by_name()}, os.path.join(out, f"{job['name']}-rank{d.rank}.pt"))


def train_job(job, out):
    """train_sft.main under this launch's processes, sharing its process group with the other jobs."""
    saved = dist.setup, dist.teardown
    dist.setup, dist.teardown = _setup, dist.barrier
    try:
        train_sft.main(job["argv"])
    finally:
        dist.setup, dist.teardown = saved


def worker(jobs_path):
    torch.set_num_threads(1)
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    out = os.path.dirname(jobs_path)
    rank, results = int(os.environ["RANK"]), {}
    for job in jobs:
        try:
            {"grads": grads_job, "train": train_job, "hosted": hosted_job}[job["kind"]](job, out)
            results[job["name"]] = "ok"
        except Exception as e:  # recorded for the test; the jobs after it still run
            results[job["name"]] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(os.path.join(out, f"results-rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def launch(nproc, jobs, out):
    """Run the jobs under torchrun with nproc processes; returns each rank's {job name: "ok" or the error}."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "jobs.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jobs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    # --standalone: the launcher binds a free port itself, so concurrent launches never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), path]
    # a session of its own, so that a hung launch is ended with its workers (not only the launcher)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung for {LAUNCH_TIMEOUT} s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    results = []
    for r in range(nproc):
        with open(os.path.join(out, f"results-rank{r}.json"), encoding="utf-8") as f:
            results.append(json.load(f))
    return results


# -----------------------------------------------------------------------------
# the single-process references, written without dist.py


def reference_grads(base, mode, micro_batches=MICRO_BATCHES):
    """(loss, {name: grad}): the whole model, a plain loop of full forwards and summed cross-entropy over
    every micro-batch divided by the global label count, then backward."""
    model = glm.ChatGLM.from_pretrained(base)
    if mode == "lora":
        lora.inject_lora(model, targets=LORA.lora_targets.split(","), r=LORA.lora_rank, alpha=LORA.lora_alpha)
        set_lora_values(model)
    else:
        for name, p in model.named_parameters():
            m = glm.LAYER_KEY.fullmatch(name)
            p.requires_grad_(mode == "full" or (m is not None and int(m.group(1)) >= LAYERS - LORA.train_layers))
    mbs = global_microbatches(micro_batches)
    n = sum(int((mb["labels"][:, 1:] != data.IGNORE).sum()) for mb in mbs)
    total = 0.0
    for mb in mbs:
        logits = model(mb["input_ids"])  # [B, T, V]
        V = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), mb["labels"][:, 1:].reshape(-1),
                               ignore_index=data.IGNORE, reduction="sum") / n
        loss.backward()
        total += loss.item()
    return total, n, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def reference_adamw(base):
    """The whole model after HOSTED_STEPS steps of torch's own AdamW (decay on matrices only) on
    the plain loop's gradients, clipped by torch's clip_grad_norm_: {name: weight}, {name: state}."""
    model = glm.ChatGLM.from_pretrained(base)
    mbs = global_microbatches()
    n = sum(int((mb["labels"][:, 1:] != data.IGNORE).sum()) for mb in mbs)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": HOSTED_WD},
                             {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=HOSTED_LR, betas=(0.9, 0.95))
    for _ in range(HOSTED_STEPS):
        opt.zero_grad()
        for mb in mbs:
            logits = model(mb["input_ids"])
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), mb["labels"][:, 1:].reshape(-1),
                            ignore_index=data.IGNORE, reduction="sum").div(n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HOSTED_CLIP)
        opt.step()
    return ({k: p.detach() for k, p in named.items()}, {k: opt.state[p] for k, p in named.items()})


def check_hosted(out, name, nproc, base, hosts):
    """Weights and optimiser states equal torch's AdamW on one process; every hosted state sits on
    its host and nowhere else."""
    ranks = [torch.load(os.path.join(out, f"{name}-rank{r}.pt"), weights_only=True) for r in range(nproc)]
    want_w, want_state = reference_adamw(base)
    got_w, got_state = {}, {}
    for r in ranks:
        got_w.update(r["weights"])
        assert not got_state.keys() & r["state"].keys(), "one state kept on two stages"
        got_state.update(r["state"])
        for n in r["state"]:
            assert hosts.get(dist.unit_of(n), r["pp_rank"]) == r["pp_rank"] or n in r["guests"]
        for n in r["guests"]:
            assert hosts[dist.unit_of(n)] == r["pp_rank"] and n in r["state"]
    assert sorted(n for r in ranks for n in r["guests"]) == sorted(n for r in ranks for n in r["away"])
    assert {dist.unit_of(n) for r in ranks for n in r["guests"]} == set(hosts)
    assert got_w.keys() == want_w.keys() == got_state.keys()
    for k in want_w:
        torch.testing.assert_close(got_w[k], want_w[k], atol=2e-6, rtol=1e-5, msg=k)
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got_state[k][m], want_state[k][m], atol=1e-7, rtol=1e-4, msg=f"{k} {m}")


def merged_grads(out, name, nproc):
    """Every rank's saved step, and {param name: grad} over the pipeline (replica 0's stages)."""
    ranks = [torch.load(os.path.join(out, f"{name}-rank{r}.pt"), weights_only=True) for r in range(nproc)]
    grads = {}
    for r in ranks:
        if r["dp_rank"] == 0:
            assert not grads.keys() & r["grads"].keys(), "two stages hold the same parameter"
            grads.update(r["grads"])
    return ranks, grads


def check_against_reference(base, out, name, nproc, mode="full", micro_batches=MICRO_BATCHES):
    loss, n, want = reference_grads(base, mode, micro_batches)
    ranks, got = merged_grads(out, name, nproc)
    assert got.keys() == want.keys()  # every trainable tensor got a gradient, nothing frozen did
    for r in ranks:
        assert r["n_tokens"] == n  # the global label count, summed over replicas
        assert abs(r["loss"] - loss) < 1e-5, (r["rank"], r["loss"], loss)  # every stage and replica knows the loss
        assert all(k in r["trainable"] for k in r["grads"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    for r in ranks:  # after sync_grads every replica holds the same summed gradients
        for key, g in r["grads"].items():
            torch.testing.assert_close(g, got[key], atol=1e-7, rtol=1e-6, msg=f"rank {r['rank']}: {key}")
    return ranks


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized ops gain nothing from threads, and on a busy 2-core machine every op of a 2-thread pool
    waits for a descheduled thread (about 5x slower here); restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# the launches (module fixtures: each runs once, the tests read its results)


# optimiser states kept away from their stage: P = 4 holds one block a stage, P = 2 two
HOSTS_P4 = {"embedding": 3, "head": 0, "layer 1/attention": 2, "layer 1/mlp": 3, "layer 2/mlp": 0}
HOSTS_P2 = {"embedding": 1, "layer 3/mlp": 0, "head": 0}


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base = make_base(root / "base")
    train = data_file(root / "train12.jsonl")
    return SimpleNamespace(root=root, base=base, train=train)


@pytest.fixture(scope="module")
def four(setup_dir):
    """4 processes: gradients with P = 4 and P = 2 x D = 2; a --pp 4 training run of 3 steps; --pp 2 x 2
    replicas training runs (full and LoRA)."""
    s, out = setup_dir, str(setup_dir.root / "four")
    g = dict(kind="grads", model=s.base)
    jobs = [
        dict(g, name="p4", pp=4, mode="full"),
        dict(g, name="p4_m1", pp=4, mode="full", micro_batches=1),  # fewer micro-batches than stages
        dict(g, name="p4_last2", pp=4, mode="last_n"),
        dict(g, name="p4_lora", pp=4, mode="lora"),
        dict(g, name="p2d2", pp=2, mode="full"),
        dict(kind="hosted", name="hosted_p4", pp=4, model=s.base, hosts=HOSTS_P4),
        # warmup 4 > 3 steps: the first three learning rates do not depend on max_steps, so this run
        # is the first half of a 6-step run and may be resumed as one
        dict(kind="train", name="sft_p4", argv=sft_argv(s.base, s.train, s.root / "sft_p4", "--pp", "4", max_steps=3)),
        # 2 replicas of 2 micro-batches: the global batch of one process with grad_accum 4
        dict(kind="train", name="sft_p2d2",
             argv=sft_argv(s.base, s.train, s.root / "sft_p2d2", "--pp", "2", max_steps=4)),
        dict(kind="train", name="sft_p2d2_lora",
             argv=sft_argv(s.base, s.train, s.root / "sft_p2d2_lora", "--pp", "2", "--lora_rank", "4", max_steps=4)),
    ]
    return SimpleNamespace(out=out, results=launch(4, jobs, out))


@pytest.fixture(scope="module")
def two(setup_dir, four):
    """2 processes: gradients with P = 2 (uneven split, recomputation); --pp 2 training runs (full, LoRA,
    last 2 blocks); the --pp 4 checkpoint resumed with --pp 2; --pp 3 on 2 processes."""
    s, out = setup_dir, str(setup_dir.root / "two")
    shutil.copytree(s.root / "sft_p4", s.root / "sft_p4_to_p2")
    shutil.copytree(s.root / "sft_p4", s.root / "sft_p4_to_p1")  # resumed in the test process
    g = dict(kind="grads", model=s.base)
    jobs = [
        dict(g, name="p2", pp=2, mode="full", counts=[1, 3], checkpoint=True),
        dict(kind="hosted", name="hosted_p2", pp=2, model=s.base, hosts=HOSTS_P2),
        dict(kind="train", name="sft_p2", argv=sft_argv(s.base, s.train, s.root / "sft_p2", "--pp", "2")),
        dict(kind="train", name="sft_p2_lora",
             argv=sft_argv(s.base, s.train, s.root / "sft_p2_lora", "--pp", "2", "--lora_rank", "4", max_steps=4)),
        dict(kind="train", name="sft_p2_last2",
             argv=sft_argv(s.base, s.train, s.root / "sft_p2_last2", "--pp", "2", "--train_layers", "2", max_steps=4)),
        dict(kind="train", name="sft_p4_to_p2",
             argv=sft_argv(s.base, s.train, s.root / "sft_p4_to_p2", "--pp", "2", "--resume")),
        dict(kind="train", name="pp3", argv=sft_argv(s.base, s.train, s.root / "pp3", "--pp", "3")),
    ]
    return SimpleNamespace(out=out, results=launch(2, jobs, out))


@pytest.fixture(scope="module")
def single(setup_dir):
    """The same training runs in this process (P = D = 1)."""
    s, runs = setup_dir, {}
    for name, extra, steps in (("sft_p1", [], 6), ("sft_p1_3", [], 3), ("sft_p1_lora", ["--lora_rank", "4"], 4),
                               ("sft_p1_last2", ["--train_layers", "2"], 4),
                               ("sft_p1_ga4", ["--grad_accum", "4"], 4),
                               ("sft_p1_ga4_lora", ["--grad_accum", "4", "--lora_rank", "4"], 4)):
        train_sft.main(sft_argv(s.base, s.train, s.root / name, *extra, max_steps=steps))
        runs[name] = s.root / name
    return runs


def ok(launch_result, name):
    for rank, results in enumerate(launch_result.results):
        assert results[name] == "ok", f"job {name} failed on rank {rank}:\n{results[name]}"


def assert_same_curve(got, want, steps, atol=1e-5):
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= atol * max(1.0, abs(want[step])), (step, got[step], want[step])


# -----------------------------------------------------------------------------
# gradients of one step


def test_train_step_in_one_process_matches_the_plain_loop(setup_dir):
    d = dist.setup(1)
    model = glm.ChatGLM.from_pretrained(setup_dir.base)
    params = dist.select_trainable(model, "full", LORA)
    mbs = global_microbatches()
    n_tok = train_sft.count_label_tokens(mbs)
    loss = dist.train_step(model, d, mbs, train_sft.sft_loss(n_tok))
    want_loss, n, want = reference_grads(setup_dir.base, "full")
    assert int(n_tok) == n and abs(loss.item() - want_loss) < 1e-5
    got = {name: p.grad for name, p in model.named_parameters()}
    assert len(params) == len(got) == len(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)


def test_torchrun_p4_optimizer_states_kept_on_other_stages_match_torch_adamw(setup_dir, four):
    ok(four, "hosted_p4")
    check_hosted(four.out, "hosted_p4", 4, setup_dir.base, HOSTS_P4)


def test_torchrun_p2_optimizer_states_kept_on_other_stages_match_torch_adamw(setup_dir, two):
    ok(two, "hosted_p2")
    check_hosted(two.out, "hosted_p2", 2, setup_dir.base, HOSTS_P2)


def test_torchrun_p2_gradients_match_one_process(setup_dir, two):
    ok(two, "p2")
    ranks = check_against_reference(setup_dir.base, two.out, "p2", 2)
    assert sorted(k.split(".")[2] for k in ranks[0]["grads"] if ".layers." in k) == ["0"] * 12  # counts [1, 3]


def test_torchrun_p4_gradients_match_one_process(setup_dir, four):
    ok(four, "p4")
    check_against_reference(setup_dir.base, four.out, "p4", 4)


def test_torchrun_p4_with_one_micro_batch_matches_one_process(setup_dir, four):
    ok(four, "p4_m1")
    check_against_reference(setup_dir.base, four.out, "p4_m1", 4, micro_batches=1)


def test_torchrun_p2_d2_gradients_match_one_process(setup_dir, four):
    ok(four, "p2d2")
    ranks = check_against_reference(setup_dir.base, four.out, "p2d2", 4)
    assert sorted((r["pp_rank"], r["dp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_torchrun_p4_last2_frozen_stages_get_no_gradients(setup_dir, four):
    ok(four, "p4_last2")
    ranks = check_against_reference(setup_dir.base, four.out, "p4_last2", 4, mode="last_n")
    for r in ranks:  # blocks 0 and 1 (stages 0 and 1) are frozen: they only run forward
        assert r["first_trainable"] == 2
        assert bool(r["grads"]) == (r["pp_rank"] >= 2)


def test_torchrun_p4_lora_gradients_match_one_process(setup_dir, four):
    ok(four, "p4_lora")
    ranks = check_against_reference(setup_dir.base, four.out, "p4_lora", 4, mode="lora")
    assert all(".lora_" in k for r in ranks for k in r["grads"])


# -----------------------------------------------------------------------------
# train_sft.py under torchrun


def test_torchrun_sft_p2_gives_the_single_process_losses(two, single):
    ok(two, "sft_p2")
    root = os.path.dirname(single["sft_p1"])
    assert_same_curve(losses(os.path.join(root, "sft_p2")), losses(single["sft_p1"]), range(1, 7))


def test_torchrun_sft_p2_d2_gives_the_single_process_losses(four, single):
    ok(four, "sft_p2d2")
    root = os.path.dirname(single["sft_p1"])
    assert_same_curve(losses(os.path.join(root, "sft_p2d2")), losses(single["sft_p1_ga4"]), range(1, 5))


def test_torchrun_sft_p2_eval_loss_is_the_single_process_one(two, single):
    ok(two, "sft_p2")
    root = os.path.dirname(single["sft_p1"])
    assert_same_curve(losses(os.path.join(root, "sft_p2"), "eval_loss"), losses(single["sft_p1"], "eval_loss"), [6])


def test_torchrun_sft_p2_lora_gives_the_single_process_losses(two, single):
    ok(two, "sft_p2_lora")
    root = os.path.dirname(single["sft_p1"])
    assert_same_curve(losses(os.path.join(root, "sft_p2_lora")), losses(single["sft_p1_lora"]), range(1, 5))


def test_torchrun_sft_p2_d2_lora_gives_the_single_process_losses(four, single):
    ok(four, "sft_p2d2_lora")
    root = os.path.dirname(single["sft_p1"])
    assert_same_curve(losses(os.path.join(root, "sft_p2d2_lora")), losses(single["sft_p1_ga4_lora"]), range(1, 5))


def test_torchrun_sft_p2_last2_gives_the_single_process_losses(two, single):
    ok(two, "sft_p2_last2")
    root = os.path.dirname(single["sft_p1"])
    assert_same_curve(losses(os.path.join(root, "sft_p2_last2")), losses(single["sft_p1_last2"]), range(1, 5))


def stage_logits(model_dir, counts, ids):
    """Logits of a model read stage by stage (each stage reads only its own tensors), chained by hand."""
    h, start = ids, 0
    for s, n in enumerate(counts):
        stage = glm.ChatGLM.from_pretrained(model_dir, layer_ids=range(start, start + n), first=s == 0,
                                            last=s == len(counts) - 1).eval()
        rope, attend = stage.inputs(ids)
        with torch.no_grad():
            h = stage.transformer(h, rope, attend)
        start += n
    with torch.no_grad():
        return stage.lm_head(h)


def test_torchrun_p4_checkpoint_reads_back_with_p2_and_p1(setup_dir, four, single):
    ok(four, "sft_p4")
    root = setup_dir.root
    assert_same_curve(losses(root / "sft_p4"), losses(single["sft_p1"]), range(1, 4))
    final, ckpt = root / "sft_p4" / "final", root / "sft_p4" / "checkpoint"
    assert len([f for f in os.listdir(final) if f.endswith(".safetensors")]) == 4  # one file per stage
    ids = global_microbatches()[2]["input_ids"]
    with torch.no_grad():
        whole = glm.ChatGLM.from_pretrained(final).eval()(ids)
        ref = glm.ChatGLM.from_pretrained(single["sft_p1_3"] / "final").eval()(ids)
    for counts in ([2, 2], [1, 3], [1, 1, 1, 1]):
        torch.testing.assert_close(stage_logits(final, counts, ids), whole, atol=0, rtol=0)
    torch.testing.assert_close(stage_logits(ckpt, [2, 2], ids), whole, atol=0, rtol=0)  # the training checkpoint
    # and the weights are what one process trains in the same three steps
    torch.testing.assert_close(whole, ref, atol=1e-5, rtol=1e-5)


def test_torchrun_p4_checkpoint_resumes_with_p2_and_p1(setup_dir, two, single):
    """The 3-step --pp 4 run continued to 6 steps under --pp 2 and in one process: the resumed steps
    follow the uninterrupted single-process run."""
    ok(two, "sft_p4_to_p2")
    root = setup_dir.root
    train_sft.main(sft_argv(setup_dir.base, setup_dir.train, root / "sft_p4_to_p1", "--resume"))
    want = losses(single["sft_p1"])
    for name in ("sft_p4_to_p2", "sft_p4_to_p1"):
        assert_same_curve(losses(root / name), want, range(1, 7))


def test_torchrun_pp_that_does_not_divide_the_world_is_a_clear_error(two):
    for rank, results in enumerate(two.results):
        msg = results["pp3"]
        assert msg.startswith("ValueError: --pp 3 does not divide the world size 2"), msg
        assert "--pp 2" in msg.splitlines()[0]  # it says what to pass instead
    assert not os.path.exists(os.path.join(os.path.dirname(two.out), "pp3", "metrics.jsonl"))


if __name__ == "__main__":
    worker(sys.argv[1])


def test_bf16_weights_train_through_fp32_masters(setup_dir, tmp_path):
    """A bf16 stage: micro-batch gradients sum in fp32 (main_grad), AdamW updates fp32 masters and
    the bf16 weights are their rounding; saved state carries the master, so a resume is exact."""
    d = dist.setup(1)
    mbs = global_microbatches()
    n_tok = train_sft.count_label_tokens(mbs)
    lr, wd = 1e-3, 0.1

    def bf16_model():
        model = glm.ChatGLM.from_pretrained(setup_dir.base, dtype=torch.bfloat16)
        dist.select_trainable(model, "full", LORA)
        return model

    # reference gradients: each micro-batch's bf16 gradient on its own, summed in float64 (the
    # matrices' GEMMs add into fp32 without rounding to bf16: they may differ by that rounding)
    ref, want, size = bf16_model(), {}, {}
    for mb in mbs:
        ref.zero_grad()
        dist.train_step(ref, d, [mb], train_sft.sft_loss(n_tok))
        for k, p in ref.named_parameters():
            want[k] = want.get(k, 0) + p.grad.double()
            size[k] = size.get(k, 0) + p.grad.double().abs()
    model = bf16_model()
    opt = dist.AdamW(dist.named_trainables(model), lr, wd, d)
    loss = dist.train_step(model, d, mbs, train_sft.sft_loss(n_tok))
    named = dict(model.named_parameters())
    for k, p in named.items():
        assert p.grad is None and p.main_grad.dtype == torch.float32
        fused = p.dim() == 2 and k != "transformer.word_embeddings.weight"  # a glm.Linear weight
        tol = (2 ** -8 if fused else 1e-6) * size[k] + 1e-7
        assert ((p.main_grad.double() - want[k]).abs() <= tol).all(), k
    # reference update: torch's AdamW on float32 copies of the starting weights with those gradients
    start = {k: p.detach().float().clone().requires_grad_() for k, p in named.items()}
    ref_opt = torch.optim.AdamW([{"params": [t for t in start.values() if t.dim() >= 2], "weight_decay": wd},
                                 {"params": [t for t in start.values() if t.dim() < 2], "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95))
    for k, t in start.items():
        t.grad = named[k].main_grad.clone()
    ref_opt.step()
    dist.optimizer_step(opt, loss, lr, 0.0, d, 0, 0)
    for k, p in named.items():
        torch.testing.assert_close(opt.masters[k], start[k].detach(), atol=1e-7, rtol=1e-6, msg=k)
        assert torch.equal(p.detach(), opt.masters[k].to(torch.bfloat16)), k
    assert (opt.masters["lm_head.weight"] != named["lm_head.weight"].float()).any()  # the master has more bits
    # the saved state brings the fp32 master back into a model built from the bf16 weights
    torch.save(opt.state_by_name(), tmp_path / "optim-stage000.pt")
    again = bf16_model()
    with torch.no_grad():
        for k, p in again.named_parameters():
            p.copy_(named[k])
    opt2 = dist.AdamW(dist.named_trainables(again), lr, wd, d)
    opt2.load(str(tmp_path))
    for k in named:
        assert torch.equal(opt2.masters[k], opt.masters[k]), k
        moments = opt2.opt.state[opt2.masters[k]]["exp_avg_sq"], opt.opt.state[opt.masters[k]]["exp_avg_sq"]
        assert torch.equal(*moments), k


def test_linear_adds_its_weight_gradient_into_main_grad():
    """glm.Linear with a fused fp32 accumulator: same output and input/bias gradients as F.linear,
    and main_grad grows by exactly g^T x (checked in float64) on every backward."""
    torch.manual_seed(0)
    lin = glm.Linear(24, 40).bfloat16()
    lin.weight.main_grad, lin.weight.fuse_main_grad = None, True
    start = None
    for step in range(2):
        x = torch.randn(3, 5, 24, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(3, 5, 40, dtype=torch.bfloat16)
        y = lin(x)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
        y.backward(g)
        want = g.reshape(-1, 40).double().t() @ x.detach().reshape(-1, 24).double()
        if start is not None:
            want += start
        torch.testing.assert_close(lin.weight.main_grad.double(), want, atol=1e-5, rtol=1e-5)
        start = lin.weight.main_grad.double().clone()
        assert lin.weight.grad is None
        torch.testing.assert_close(x.grad, (g @ lin.weight.detach()), atol=0, rtol=0)
        torch.testing.assert_close(lin.bias.grad, g.reshape(-1, 40).sum(0), atol=1e-2, rtol=1e-2)
        lin.bias.grad = None
