"""Pipelined generation (gloo, several processes) equals single-process generation."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import sys, torch, glm, dist
d = dist.setup(int(sys.argv[1]))
path, out_path = sys.argv[2], sys.argv[3]
cfg = glm.GLMConfig.from_json(path + "/config.json")
plan = dist.plan_pipeline(cfg, d.P, 2, 16, 1, method="naive", param_bytes=4)
stage = glm.ChatGLM.from_pretrained(path, **plan.stages[d.pp_rank].model_kwargs()).eval()
ids = glm.left_pad([[20, 30, 40, 5, 8], [22, 5, 8], [50, 60, 70, 80, 5, 8], [33, 5, 8], [44, 45, 5, 8]], 3)
out, logprobs = dist.generate(stage, d, ids, 10, micro_batches=int(sys.argv[4]))
if d.pp_rank == d.P - 1:  # every stage returns the same; the last one writes it
    torch.save({"ids": out, "logprobs": logprobs}, out_path)
dist.teardown()
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    import glm
    cfg = glm.GLMConfig.toy()
    cfg.num_layers = 4
    path = tmp_path_factory.mktemp("m4") / "model"
    glm.ChatGLM(cfg).init_weights(3, std=0.3).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("P,micro", [(2, 2), (4, 5)])
def test_pipelined_greedy_equals_single_process(tmp_path, four_layer_model, P, micro):
    import torch
    import glm
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out_path = tmp_path / "out.pt"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={P}",
                    f"--master_port={free_port()}", str(script), str(P), four_layer_model, str(out_path),
                    str(micro)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    got = torch.load(out_path)
    full = glm.ChatGLM.from_pretrained(four_layer_model).eval()
    ids = glm.left_pad([[20, 30, 40, 5, 8], [22, 5, 8], [50, 60, 70, 80, 5, 8], [33, 5, 8], [44, 45, 5, 8]], 3)
    ref, ref_lp = full.generate(ids, max_new_tokens=10, return_logprobs=True)
    assert torch.equal(got["ids"], ref)
    torch.testing.assert_close(got["logprobs"], ref_lp, atol=1e-4, rtol=0)
