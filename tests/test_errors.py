"""A run never loses what is already on disk, and a user's mistake ends in one line and exit code 2.

Each case runs an entry point as the command line does (flags.run: one line on stderr, exit 2) and
checks that nothing under --out changed (a hash of every file before and after).
"""
import hashlib
import json
import os
import sys

import pytest

import ckpt
import data
import flags
import train_ppo
import train_rm
import train_sft
from conftest import RunKilled, head_lines, losses, make_base, newest_checkpoint, sft_argv, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def tree_hash(folder):
    """{relative path: sha256} of every file under folder ({} if there is none)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused(main, argv, out, capsys, *words):
    """main(argv) through flags.run ends with exit 2 and one line naming `words`; out is unchanged."""
    before = tree_hash(out)
    capsys.readouterr()  # what earlier runs printed
    with pytest.raises(SystemExit) as e:
        flags.run(main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) <= 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert tree_hash(out) == before
    return err


# -----------------------------------------------------------------------------
# what is already under --out


def test_a_typo_in_a_boolean_flag_is_an_error_not_false(tmp_path, base, data8, capsys):
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data8, out, max_steps=2, save_every=2))
    refused(train_sft.main, sft_argv(base, data8, out, "--resume", "ture", max_steps=4), out, capsys,
            "--resume", "ture")


def test_an_out_folder_holding_other_things_is_refused_unless_overwrite(tmp_path, base, data8, capsys):
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "my": "numbers"}\n')
    (out / "final" / "readme.txt").write_text("keep me")
    refused(train_sft.main, sft_argv(base, data8, out, max_steps=2), out, capsys, str(out), "--overwrite")
    train_sft.main(sft_argv(base, data8, out, "--overwrite", max_steps=2))  # asked for: written over
    assert sorted(losses(out)) == [1, 2]


def test_a_run_of_another_script_or_other_settings_is_refused(tmp_path, base, data8, capsys):
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data8, out, max_steps=2, save_every=2))
    rm_argv = ["--model", base, "--data", data.toy_file("rm_train"), "--out", str(out), "--max_steps", "1"]
    refused(train_rm.main, rm_argv, out, capsys, "train_sft", "train_rm")
    refused(train_sft.main, sft_argv(base, data8, out, "--resume", max_steps=4, lr=0.5), out, capsys,
            "--lr 0.01 there, 0.5 now")
    # a fresh run over a run that could be resumed: it says how to resume, or to start afresh
    refused(train_sft.main, sft_argv(base, data8, out, max_steps=4), out, capsys, "--resume", "step 2")
    train_sft.main(sft_argv(base, data8, out, "--resume", max_steps=4, save_every=2))  # more steps: allowed
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_out_that_is_a_file_is_refused(tmp_path, base, data8, capsys):
    out = tmp_path / "afile"
    out.write_text("not a folder")
    refused(train_sft.main, sft_argv(base, data8, out, max_steps=1), tmp_path, capsys, "is a file")


def test_toy_presets_never_override_an_explicit_flag():
    """--lr 1e-4 equals the 6B default; the toy preset (lr 1e-2) must not replace it."""
    cfg = flags.parse(train_sft.Config, ["--lr", "1e-4"], preset=lambda c: data.TOY_SFT)
    assert cfg.lr == 1e-4 and cfg.max_steps == data.TOY_SFT["max_steps"]
    cfg = flags.parse(train_ppo.Config, ["--mode", "lora"], preset=lambda c: data.TOY_PPO)
    assert cfg.mode == "lora" and cfg.max_new_tokens == data.TOY_PPO["max_new_tokens"]


# -----------------------------------------------------------------------------
# checkpoints: safe at every instant of a save


def test_only_the_newest_checkpoints_stay_and_the_pointer_names_the_newest(tmp_path, base, data8):
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data8, out, max_steps=6, save_every=1, keep_checkpoints=2))
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    assert kept == ["checkpoint-000005", "checkpoint-000006"]
    assert (out / ckpt.POINTER).read_text().strip() == "checkpoint-000006"


def test_a_kill_inside_the_rename_leaves_the_previous_checkpoint(tmp_path, base, data8, monkeypatch, capsys):
    """The run dies while checkpoint 4 is being renamed into place (after the folder was written in
    full): resume finds checkpoint 2, says nothing is lost but those steps, and reaches the same
    losses; the stale temporary folder is removed at the start."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_sft.main(sft_argv(base, data8, whole, max_steps=6, save_every=2))
    real = os.rename

    def rename(src, dst):
        if os.path.basename(dst) == "checkpoint-000004":
            raise RunKilled
        return real(src, dst)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(RunKilled):
        train_sft.main(sft_argv(base, data8, cut, max_steps=6, save_every=2))
    monkeypatch.setattr(ckpt.os, "rename", real)
    assert [n for n in os.listdir(cut) if n.startswith(".tmp-checkpoint")]  # the complete new one, unnamed
    assert newest_checkpoint(cut).name == "checkpoint-000002"
    capsys.readouterr()
    train_sft.main(sft_argv(base, data8, cut, "--resume", max_steps=6, save_every=2))
    assert f"resumed from {cut / 'checkpoint-000002'} at step 2" in capsys.readouterr().out
    assert not [n for n in os.listdir(cut) if n.startswith(".tmp-")]
    assert losses(cut) == losses(whole)


def test_a_kill_before_the_pointer_moves_resumes_from_the_newest_complete(tmp_path, base, data8, monkeypatch, capsys):
    """Checkpoint 4 is in place but the pointer still names checkpoint 2: resume takes checkpoint 4
    and says so; the metrics logged after the checkpoint's step are dropped, not repeated."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_sft.main(sft_argv(base, data8, whole, max_steps=6, save_every=2))
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == ckpt.POINTER and (cut / "checkpoint-000004").exists():
            raise RunKilled
        return real(src, dst)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(RunKilled):
        train_sft.main(sft_argv(base, data8, cut, max_steps=6, save_every=2))
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert (cut / ckpt.POINTER).read_text().strip() == "checkpoint-000002"
    capsys.readouterr()
    train_sft.main(sft_argv(base, data8, cut, "--resume", max_steps=6, save_every=2))
    printed = capsys.readouterr().out
    assert "names checkpoint-000002; the newest complete checkpoint is" in printed and "at step 4" in printed
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 3-4 logged once, not twice
    assert losses(cut) == losses(whole)


def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path, base, capsys):
    data_file = write_jsonl(tmp_path / "sft.jsonl", head_lines(data.toy_file("sft_train"), 8))
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data_file, out, max_steps=2, save_every=2))
    write_jsonl(data_file, head_lines(data.toy_file("sft_train"), 9)[1:])  # same path, other contents
    refused(train_sft.main, sft_argv(base, data_file, out, "--resume", max_steps=4), out, capsys,
            "--data", "--allow_data_change")
    train_sft.main(sft_argv(base, data_file, out, "--resume", "--allow_data_change", max_steps=4))
    assert "--allow_data_change: --data differs" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# flags: every number checked before any work


BAD_NUMBERS = {
    "train_sft": ["--lr -1", "--lr nan", "--max_steps -5", "--epochs 0", "--micro_batch_size 0", "--grad_accum 0",
                  "--log_every 0", "--save_every 0", "--eval_every 0", "--max_len 0", "--keep_checkpoints 0",
                  "--warmup_steps -1", "--holdout -0.1", "--weight_decay inf", "--pp 0", "--lora_rank -2"],
    "train_rm": ["--lr -0.5", "--micro_batch_size -1", "--max_len -3", "--epochs -1", "--grad_clip -1"],
    "train_ppo": ["--mini_batch_size 0", "--max_new_tokens 0", "--rollout_batch_size 0", "--actor_lr -0.5",
                  "--critic_lr nan", "--ppo_epochs 0", "--temperature 0", "--top_p 0", "--kl_coef -0.1",
                  "--save_every -1", "--max_steps 0", "--micro_batch_size 0"],
}
MAINS = {"train_sft": train_sft.main, "train_rm": train_rm.main, "train_ppo": train_ppo.main}


@pytest.mark.parametrize("script,flag", [(s, f) for s, fs in BAD_NUMBERS.items() for f in fs])
def test_numbers_out_of_range_are_refused_before_any_work(tmp_path, capsys, script, flag):
    out = tmp_path / "run"
    name, value = flag.split()
    refused(MAINS[script], [name, value, "--out", str(out)], tmp_path, capsys, f"argument {name}: {value}")
    assert not out.exists()


def test_ppo_needs_data_and_finite_reward_statistics(tmp_path, base, capsys):
    rm = tmp_path / "rm"
    rm.mkdir()
    out = tmp_path / "ppo"
    flags_ = ["--mode", "full", "--actor", base, "--rm_dir", str(rm), "--out", str(out)]
    refused(train_ppo.main, flags_, tmp_path, capsys, "--data is required")
    prompts = write_jsonl(tmp_path / "p.jsonl", head_lines(data.toy_file("prompts"), 4))
    refused(train_ppo.main, flags_ + ["--data", prompts], tmp_path, capsys, "reward_stats.json is missing", "--rm_dir")
    (rm / "reward_stats.json").write_text('{"mean": NaN, "std": 1.0}')
    refused(train_ppo.main, flags_ + ["--data", prompts], tmp_path, capsys, str(rm / "reward_stats.json"), "finite")
    assert not out.exists()


def test_a_diverged_run_stops_and_says_what_to_try(tmp_path, base, data8, monkeypatch, capsys):
    """A loss that stays non-finite stops the run after 10 such steps with the step and a hint,
    and writes no final/ (the last checkpoint stays the one to resume from)."""
    import dist
    real = dist.train_step
    monkeypatch.setattr(dist, "train_step", lambda *a, **kw: real(*a, **kw) * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        flags.run(train_sft.main, sft_argv(base, data8, out, max_steps=20, save_every=100))
    last = capsys.readouterr().err.splitlines()[-1]  # the line after the closed progress bar
    assert e.value.code == 2 and "Traceback" not in last
    assert last.startswith("error: step 9: the loss or gradient was not finite for 10 steps") and "--lr" in last
    assert not (out / "final").exists()


# -----------------------------------------------------------------------------
# bad model folders and data files, through the command line: one line naming the file


def damaged_model(tmp_path, damage):
    """A copy of a toy model folder with one thing wrong; returns (folder, what the error must name)."""
    import shutil
    from safetensors.torch import load_file, save_file
    model = make_base(tmp_path / "model")
    config, weights = os.path.join(model, "config.json"), None
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            weights = os.path.join(model, name)
    if damage == "no folder":
        shutil.rmtree(model)
        return model, model
    if damage in ("num_layers 2.7", "vocab 100", "config not json"):
        raw = json.loads(open(config).read())
        text = {"num_layers 2.7": json.dumps({**raw, "num_layers": 2.7}),
                "vocab 100": json.dumps({**raw, "vocab_size": 100, "pad_token_id": 3, "bos_token_id": 8,
                                         "eos_token_id": 9, "mask_token_id": 4, "gmask_token_id": 5}),
                "config not json": "{oops"}[damage]
        open(config, "w").write(text)
        return model, config
    if damage == "no tokenizer":
        os.remove(os.path.join(model, "ice_text.model"))
        return model, "ice_text.model"
    if damage == "truncated weights":
        blob = open(weights, "rb").read()
        open(weights, "wb").write(blob[: len(blob) // 2])
        return model, weights
    state = load_file(weights)  # "nan weights"
    state["lm_head.weight"][0, 0] = float("nan")
    save_file(state, weights)
    return model, "lm_head.weight"


@pytest.mark.parametrize("damage", ["no folder", "num_layers 2.7", "vocab 100", "config not json", "no tokenizer",
                                    "truncated weights", "nan weights"])
def test_a_damaged_model_folder_is_named(tmp_path, data8, capsys, damage):
    model, name = damaged_model(tmp_path, damage)
    out = tmp_path / "run"
    refused(train_sft.main, sft_argv(model, data8, out, max_steps=1), tmp_path / "none", capsys, str(name))
    assert not out.exists()


@pytest.mark.parametrize("lines,words", [
    (None, ["no such data file"]),
    ([], ["empty"]),
    (['{"prompt": "a", "response": "b"}', "{not json"], [":2"]),
    (['{"prompt": 3, "response": "b"}'], [":1", "prompt"]),
    (['{"prompt": "a"}'], [":1", "response"]),
], ids=["missing", "empty", "bad_json", "wrong_type", "missing_field"])
def test_a_bad_data_file_is_named_with_its_line(tmp_path, base, capsys, lines, words):
    path = tmp_path / "sft.jsonl"
    if lines is not None:
        path.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "run"
    refused(train_sft.main, sft_argv(base, str(path), out, max_steps=1), tmp_path / "none", capsys, str(path), *words)
    assert not out.exists()


def test_a_ranking_with_one_answer_is_named(tmp_path, base, capsys):
    path = write_jsonl(tmp_path / "rm.jsonl", ['{"prompt": "a", "answers": ["only one"]}'])
    out = tmp_path / "run"
    refused(train_rm.main, ["--model", base, "--data", path, "--out", str(out)], tmp_path / "none", capsys,
            f"{path}:1", "answers")
    assert not out.exists()


@pytest.mark.parametrize("damaged", ["optim-stage000.pt", "rng-rank000.pt"])
def test_a_damaged_checkpoint_file_is_named(tmp_path, base, data8, capsys, damaged):
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data8, out, max_steps=2, save_every=2))
    path = newest_checkpoint(out) / damaged
    path.write_bytes(path.read_bytes()[:100])
    refused(train_sft.main, sft_argv(base, data8, out, "--resume", max_steps=4), out, capsys, str(path),
            "truncated or damaged")


def test_out_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    refused(train_sft.main, ["--out", str(tmp_path / "afile" / "run")], tmp_path, capsys, str(tmp_path / "afile"),
            "is a file")
    assert not (tmp_path / "toy_base").exists() and not (tmp_path / "afile").is_dir()


# -----------------------------------------------------------------------------
# the tools: glm.py, lora.py, data.py


def run_module(name, argv, monkeypatch):
    """`python NAME.py ARGV` in this process: its __main__ block, exit code and all."""
    import runpy
    monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(name, run_name="__main__")
    return e.value.code


@pytest.mark.parametrize("name,argv,words", [
    ("infer", ["chat", "--model", "/no/such/model"], ["/no/such/model", "no such model folder"]),
    ("glm", ["convert", "/no/such/release", "OUT"], ["/no/such/release/config.json"]),
    ("lora", ["merge", "--model", "/no/such/model", "--adapter", "A", "--out", "O"], ["/no/such/model"]),
    ("lora", ["merge", "--model", "M"], ["--adapter", "--out"]),
    ("data", ["check", "/no/such.jsonl", "--kind", "sft"], ["/no/such.jsonl", "no such data file"]),
    ("data", ["check", "x.jsonl", "--kind", "bogus"], ["--kind", "bogus"]),
], ids=["chat_model", "convert_src", "merge_model", "merge_flags", "check_file", "check_kind"])
def test_the_tools_end_a_mistake_in_one_line(tmp_path, monkeypatch, capsys, name, argv, words):
    monkeypatch.chdir(tmp_path)
    assert run_module(name, argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_stalled_rank_is_named_after_timeout_min(tmp_path):
    """Rank 1 is stopped (SIGSTOP, as a hung host): its watcher, rank 0, ends its process within
    --timeout_min with one line naming rank 1, instead of hanging for the process group's half hour."""
    import signal
    import time
    import dist
    from conftest import free_port
    port, pids = free_port(), []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sys.stderr = open(tmp_path / f"rank-{rank}.err", "w", buffering=1)
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                dist.setup(1, timeout_min=0.02)  # 1.2 s
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGSTOP)
                time.sleep(30)  # rank 0 waits for rank 1, as in a collective
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    start = time.monotonic()
    _, status = os.waitpid(pids[0], 0)
    waited = time.monotonic() - start
    os.kill(pids[1], signal.SIGKILL)
    os.waitpid(pids[1], 0)
    msg = (tmp_path / "rank-0.err").read_text().strip()
    assert os.waitstatus_to_exitcode(status) == 2 and waited < 20, (status, waited, msg)
    assert msg.startswith("error: rank 0: rank 1 has not answered for ") and len(msg.splitlines()) == 1, msg
    assert "HINT: see its output; --timeout_min" in msg


@pytest.mark.parametrize("damage", ["index not json", "index outside", "bin damaged"])
def test_convert_names_a_damaged_release_file(tmp_path, monkeypatch, capsys, damage):
    import shutil
    from conftest import FIXTURE
    src = tmp_path / "release"
    src.mkdir()
    for name in ("config.json", "ice_text.model"):
        shutil.copy(os.path.join(FIXTURE, name), src / name)
    index, blob = src / "pytorch_model.bin.index.json", src / "pytorch_model.bin"
    if damage == "index not json":
        index.write_text("{oops")
    elif damage == "index outside":
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.bin"}}))
    else:
        blob.write_bytes(b"not a pickle at all")
    assert run_module("glm", ["convert", str(src), str(tmp_path / "out")], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert str(blob if damage == "bin damaged" else index) in err, err
    assert not (tmp_path / "out").exists()

