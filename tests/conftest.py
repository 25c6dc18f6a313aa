"""Fixtures and helpers the test files share.

Fixtures: fixture_dir, golden_model, tok (the golden fixture); one_thread (module scope);
toy_chain (session: the quickstart's three toy runs); killed_after_step; gloo_mains (ranks forked
from the test process).

Plain functions (import them: `from conftest import write_jsonl, sft_argv`):
    single_thread()                                   a context: one intra-op thread inside it
    make_base(path, num_layers=2, std=0.02, seed=0)   a random toy ChatGLM folder with the tokenizer
    write_jsonl(path, rows)                           rows: str lines as they are, or JSON objects
    head_lines(path, n)                               the first n lines of a file
    newest_checkpoint(out)                            OUT/checkpoint-STEP of the highest step
    as_argv(opts, *extra)                             {name: value} -> ["--name", "value", ...] + extra
    sft_argv / rm_argv / dpo_argv (base, data_file, out, *extra, **flags), ppo_argv(toy_dir, out, mode, *extra, **flags)
                                                      flags of a small, fast run; keywords override
    read_metrics(out)                                 metrics.jsonl rows, in order
    metrics_by_step(out)                              {step: every value logged at that step}
    losses(out, key="loss")                           {step: value} of the rows that log `key`
    printed_config(printed)                           the config dict a run printed on its `config:` line
    load_tensors(folder)                              every tensor of a folder's *.safetensors
    fork_ranks(target, log_dir, nproc=2)              target(rank) in ranks forked from the test process
    forked_mains(module, runs, log_dir, nproc=2)      what gloo_mains runs, without the fixture
    free_port()                                       a free TCP port for a process group
"""
import ast
import contextlib
import glob
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "case_small")
TOK_PATH = os.path.join(FIXTURE, "ice_text.model")  # the toy tokenizer (the same file as data/ice_text.model)

# one thread per pytest-xdist worker (the README runs one worker per core), else two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def fixture_dir():
    return FIXTURE


@pytest.fixture(scope="session")
def golden_model():
    import glm
    return glm.ChatGLM.from_pretrained(FIXTURE, dtype=torch.float32, device="cpu").eval()


@pytest.fixture(scope="session")
def tok():
    import glm
    return glm.Tokenizer(os.path.join(FIXTURE, "ice_text.model"))


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside the block: toy-sized ops gain nothing from threads, and on a busy
    2-core machine every op of a 2-thread pool waits for a descheduled thread (about 5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """single_thread() for a whole module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with single_thread():
        yield


# -----------------------------------------------------------------------------
# models, data files and flags


def make_base(path, num_layers=2, std=0.02, seed=0):
    """A randomly initialised toy ChatGLM (GLMConfig.toy() with num_layers blocks, N(0, std)
    matrices) saved as an HF folder with the toy tokenizer; returns the path as a str."""
    import glm
    cfg = glm.GLMConfig.toy()
    cfg.num_layers = num_layers
    glm.ChatGLM(cfg).init_weights(seed, std=std).save_pretrained(path, tokenizer=glm.Tokenizer(TOK_PATH))
    return str(path)


def write_jsonl(path, rows):
    """A jsonl file: str rows are written as they are (bad lines too), others as JSON; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    return str(path)


def head_lines(path, n):
    """The first n lines of a text file, without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def as_argv(opts, *extra):
    """{name: value} -> ["--name", "value", ...], then the extra arguments as they are."""
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))] + list(extra)


def sft_argv(base, data_file, out, *extra, **flags):
    """train_sft.py flags of a small run: 2 micro-batches of 2 a step, 6 steps, every loss logged,
    the data file as its own held-out set, no evaluation or checkpoint before the end."""
    opts = dict(model=base, data=data_file, eval_data=data_file, out=str(out), max_len=48, micro_batch_size=2,
                grad_accum=2, lr=1e-2, warmup_steps=4, max_steps=6, log_every=1, eval_every=1000,
                save_every=1000)
    return as_argv({**opts, **flags}, *extra)


def rm_argv(base, data_file, out, *extra, **flags):
    """train_rm.py flags of a small run: 2 micro-batches of 2 prompts a step, 4 steps, every loss
    logged, the data file as its own held-out set."""
    opts = dict(model=base, data=data_file, eval_data=data_file, out=str(out), max_len=48, micro_batch_size=2,
                grad_accum=2, lr=3e-3, warmup_steps=2, max_steps=4, log_every=1, eval_every=1000, save_every=1000)
    return as_argv({**opts, **flags}, *extra)


def dpo_argv(base, data_file, out, *extra, **flags):
    """train_dpo.py flags of a small run: 2 micro-batches of 2 prompts a step, 4 steps, every loss
    logged, the data file as its own held-out set."""
    opts = dict(model=base, data=data_file, eval_data=data_file, out=str(out), max_len=48, micro_batch_size=2,
                grad_accum=2, lr=3e-3, warmup_steps=2, max_steps=4, log_every=1, eval_every=1000, save_every=1000,
                beta=0.5)
    return as_argv({**opts, **flags}, *extra)


def ppo_argv(toy_dir, out, mode="full", *extra, **flags):
    """train_ppo.py flags of a small seeded run on a `bench.py make_model --toy --adapter` folder:
    8 rollouts of 3 tokens a step, 2 steps, 2 PPO epochs over mini-batches of 4, no checkpoint."""
    models = (dict(actor=toy_dir, rm_dir=toy_dir) if mode == "full" else
              dict(model=toy_dir, rm_dir=os.path.join(toy_dir, "rm_adapter")))
    opts = dict(mode=mode, **models, data=os.path.join(toy_dir, "prompts.jsonl"), out=str(out), max_prompt_len=40,
                rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2, max_new_tokens=3, max_steps=2,
                ppo_epochs=2, actor_lr=1e-3, critic_lr=1e-3, sample_every=0, save_every=0, save_final="false")
    return as_argv({**opts, **flags}, *extra)


# -----------------------------------------------------------------------------
# what a run wrote


def read_metrics(out):
    """The rows of OUT/metrics.jsonl in order (a resumed run appends to the same file)."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def metrics_by_step(out):
    """{step: every value logged at that step} from OUT/metrics.jsonl."""
    steps = {}
    for row in read_metrics(out):
        steps.setdefault(row["step"], {}).update(row)
    return steps


def losses(out, key="loss"):
    """{step: value} of the metrics rows that log `key`."""
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}


def printed_config(printed):
    """The resolved config a script printed (its `config: {...}` line), as a dict."""
    line = next(line for line in printed.splitlines() if line.startswith("config: "))
    return ast.literal_eval(line[len("config: "):])


def load_tensors(folder):
    """Every tensor of the *.safetensors files in a folder (an HF folder's shards, an adapter, heads),
    by key; a key in two files is an error."""
    state = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        part = load_file(path)
        assert not state.keys() & part.keys(), f"{path} repeats keys {sorted(state.keys() & part.keys())[:3]}"
        state.update(part)
    return state


# -----------------------------------------------------------------------------
# the toy quickstart, runs killed mid-way, and multi-process runs


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A random 2-block toy ChatGLM as an HF folder (modules may define their own)."""
    return make_base(tmp_path_factory.mktemp("base") / "toy")


@pytest.fixture(scope="session")
def data8(tmp_path_factory):
    """The first 8 lines of the toy SFT data."""
    import data
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft8.jsonl", head_lines(data.toy_file("sft_train"), 8))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """bench.py make_model --toy --adapter --prompt_len 10: a random toy model, its reward head, the reward
    adapter and the prompts (short: an RL run's cost grows with the tokens a step)."""
    import argparse
    import bench
    path = str(tmp_path_factory.mktemp("ppo") / "toy")
    torch.manual_seed(0)  # make_model draws the reward head and the reward adapter from the global RNG
    bench.make_model(argparse.Namespace(toy=True, dir=path, adapter=True, prompt_len=10), torch.device("cpu"),
                     torch.float32)
    return path


@pytest.fixture(scope="session")
def toy_chain(tmp_path_factory):
    """The README's toy chain in one runs/ folder, each script on its toy defaults but for a few steps:
    train_sft.py --out RUNS/toy_sft, then train_rm.py (which finds the toy SFT result), then
    train_ppo.py (which finds both, so it starts no subprocess). .runs is the folder; .toy_sft,
    .toy_rm, .toy_ppo each hold .result (what main returned) and .printed (its stdout)."""
    import train_ppo
    import train_rm
    import train_sft
    runs, chain = tmp_path_factory.mktemp("runs"), {}
    no_subprocess = mock.patch.object(subprocess, "run", side_effect=AssertionError("the toy chain ran a subprocess"))
    with single_thread(), no_subprocess:
        for name, main, flags in (("toy_sft", train_sft.main, dict(max_steps=3)),
                                  ("toy_rm", train_rm.main, dict(max_steps=2)),
                                  # one PPO step of 8 rollouts, not the preset's 76 x 2 epochs
                                  ("toy_ppo", train_ppo.main, dict(max_steps=1, rollout_batch_size=8,
                                                                   mini_batch_size=8, micro_batch_size=8))):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                result = main(as_argv(dict(out=runs / name, **flags)))
            chain[name] = SimpleNamespace(result=result, printed=printed.getvalue())
    return SimpleNamespace(runs=runs, **chain)


class RunKilled(Exception):
    """Raised inside a training loop to simulate a run killed mid-way."""


@pytest.fixture
def killed_after_step(monkeypatch):
    """`with killed_after_step(k): main(...)`: the run's (k+1)-th optimiser step raises, as if the
    process died right after step k (and its checkpoint); the block expects exactly that."""
    import optim

    @contextlib.contextmanager
    def killed(k):
        real, calls = optim.optimizer_step, [0]

        def step_or_die(*args, **kwargs):
            calls[0] += 1
            if calls[0] > k:
                raise RunKilled
            return real(*args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(optim, "optimizer_step", step_or_die)
            with pytest.raises(RunKilled):
                yield
    return killed


def free_port():
    """A free TCP port on this machine, so that concurrent launches never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(target, log_dir, nproc=2, timeout=300):
    """target(rank) in nproc processes forked from this one, with torchrun's environment variables
    (dist.setup or init_process_group("gloo") in target makes them one group) and one intra-op
    thread. Forked, a rank starts with this process's imports and warm caches: no interpreter
    start and no imports (torch, torch._dynamo), several seconds of CPU a rank under torchrun.
    A rank's output goes to LOG_DIR/rank-R.log; if a rank fails, the others (which would wait for
    it in a collective) are killed and the test fails with every rank's output."""
    import signal
    import time
    import traceback
    import torch.distributed as tdist
    import tqdm
    assert not tdist.is_initialized(), "the test process must hold no process group to fork ranks from"
    tqdm.tqdm.monitor_interval = 0  # no monitor thread that could hold tqdm's lock at the fork
    port = free_port()
    os.makedirs(log_dir, exist_ok=True)
    logs = [os.path.join(log_dir, f"rank-{r}.log") for r in range(nproc)]
    sys.stdout.flush()  # what this process printed so far is not printed again by every rank
    sys.stderr.flush()
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:  # a rank: it never returns into pytest
            code = 1
            try:
                sys.stdout = sys.stderr = open(logs[rank], "w", buffering=1, encoding="utf-8")
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                  LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork
                target(rank)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    codes, deadline = {}, time.monotonic() + timeout
    while len(codes) < nproc and not any(codes.values()) and time.monotonic() < deadline:
        for pid in pids:
            done, status = os.waitpid(pid, os.WNOHANG) if pid not in codes else (0, 0)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    for pid in pids:  # still running after a failure or past the limit
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    failed = [r for r, pid in enumerate(pids) if codes[pid] != 0]
    if failed:
        report = []
        for rank, (pid, log) in enumerate(zip(pids, logs)):
            text = open(log, encoding="utf-8", errors="replace").read() if os.path.isfile(log) else ""
            report.append(f"---- rank {rank}: exit code {codes[pid]}\n{text[-4000:]}")
        pytest.fail(f"ranks {failed} failed or were killed (limit {timeout} s):\n" + "\n".join(report))


def forked_mains(module, runs, log_dir, nproc=2, timeout=300):
    """module.main(flags) for each run, in order, in nproc forked ranks (fork_ranks) of one gloo
    group that the runs share."""
    import importlib
    import torch.distributed as tdist

    def ranks_runs(rank):
        import dist
        # several runs in one process group: dist.setup reuses it, and the runs' teardowns keep it
        init = tdist.init_process_group
        tdist.init_process_group = lambda *a, **kw: None if tdist.is_initialized() else init(*a, **kw)
        dist.teardown = dist.barrier
        main = importlib.import_module(module).main
        for flags in runs:
            main(flags)
        tdist.barrier()
        tdist.destroy_process_group()
    fork_ranks(ranks_runs, log_dir, nproc, timeout)


@pytest.fixture
def gloo_mains(tmp_path):
    """run(module, [flags, ...]): module.main(flags) for each run, in order, in 2 ranks forked from
    the test process (forked_mains): what a torchrun launch runs, without its seconds of start-up."""
    return lambda module, runs, nproc=2: forked_mains(module, runs, tmp_path / f"{module}-ranks", nproc)


def newest_checkpoint(out):
    """The newest complete checkpoint folder a run wrote under out (OUT/checkpoint-STEP)."""
    import ckpt
    found = ckpt.checkpoints(str(out))
    assert found, f"no checkpoint under {out}"
    return pathlib.Path(found[-1][1])
