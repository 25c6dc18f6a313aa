import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "case_small")

torch.set_num_threads(2)


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


_MAINS_WORKER = r'''
import importlib, json, sys
import torch.distributed as tdist
import dist
# several runs in one process group: dist.setup reuses it, and the runs' teardowns keep it
init = tdist.init_process_group
tdist.init_process_group = lambda *a, **kw: None if tdist.is_initialized() else init(*a, **kw)
dist.teardown = dist.barrier
main = importlib.import_module(sys.argv[1]).main
for flags in json.load(open(sys.argv[2])):
    main(flags)
tdist.barrier()
tdist.destroy_process_group()
'''


@pytest.fixture
def torchrun_mains(tmp_path):
    """run(module, [flags, ...]): module.main(flags) for each run, in order, under one torchrun
    launch of 2 CPU processes (gloo); fails the test with the launch's output if any run fails."""
    def run(module, runs, nproc=2):
        jobs, worker = tmp_path / f"{module}-jobs.json", tmp_path / f"{module}-worker.py"
        jobs.write_text(json.dumps(runs))
        worker.write_text(_MAINS_WORKER)
        with socket.socket() as s:  # a free port, so launches never collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                               f"--master_port={port}", str(worker), module, str(jobs)],
                              env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run
