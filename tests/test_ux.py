"""What a user sees around a run: the grouped --help, --config files, OUT/args.json, Ctrl-C and
SIGTERM (a checkpoint and the command that resumes it), the progress lines when piped, strict JSON,
the warnings before a run, and --keep_best."""
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from unittest import mock

import pytest
import torch

import ckpt
import data
import dist
import flags
import optim
import train_ppo
import train_rm
import train_sft
from conftest import fork_ranks, head_lines, load_tensors, losses, rm_argv, sft_argv, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
N, K = 4, 2  # the runs' steps, and the step after which a signal arrives


@pytest.fixture(scope="module")
def whole(tmp_path_factory, one_thread, base, data8):
    """An uninterrupted 4-step SFT run launched as `python train_sft.py ARGV` would be (sys.argv set):
    .out, .argv, and what it printed (.stdout, .stderr: not a terminal)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    argv = sft_argv(base, data8, out, max_steps=N)
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["train_sft.py", *argv]), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        train_sft.main(argv)
    return dataclasses.make_dataclass("Run", ["out", "argv", "stdout", "stderr"])(
        out, argv, stdout.getvalue(), stderr.getvalue())


def strict_json(text):
    """json.loads that refuses NaN and Infinity (as a strict reader such as JavaScript's does)."""
    def refuse(name):
        raise ValueError(f"{name} in strict JSON")
    return json.loads(text, parse_constant=refuse)


# -----------------------------------------------------------------------------
# --help


def help_of(main, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def help_sections(text):
    """{section title: {flag: its help text without whitespace}} of argparse's --help output, in order."""
    title, flag = "options", None
    sections = {title: {}}
    body = text.split("\noptions:\n", 1)[1].split("\nwith no --model", 1)[0]
    for line in body.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            title, flag = line[:-1], None
            sections[title] = {}
        elif line.startswith("  --"):
            flag = line.split()[0]
            sections[title][flag] = "".join(line.split()[1:])
        elif line.strip() and flag:
            sections[title][flag] += "".join(line.split())
    return sections


def source_groups(cls):
    """[(group, [(field, comment, default)])] read from the class's source by this test."""
    groups, defaults = [], {f.name: f.default for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines():
        header = re.match(r"\s*# ---- (.*)", line)
        field = re.match(r"\s*(\w+)\s*:", line)
        if header:
            groups.append((header.group(1).strip(), []))
        elif field and field.group(1) in defaults:
            groups[-1][1].append((field.group(1), line.split("#", 1)[1].strip(), defaults[field.group(1)]))
    return groups


def shown(default):
    return str(default).lower() if isinstance(default, bool) else '""' if default == "" else str(default)


def test_help_groups_every_flag_with_its_comment_and_default(capsys):
    text = help_of(train_sft.main, capsys)
    sections = help_sections(text)
    for group, fields in source_groups(train_sft.Config):
        assert [f"--{name}" for name, _, _ in fields] == list(sections[group]), group
        for name, comment, default in fields:
            block = sections[group][f"--{name}"]
            assert "".join(comment.split()) in block, (name, block)
            assert f"(default:{shown(default)})" in block, (name, block)
    assert "peaklearningrate" in sections["optimiser"]["--lr"]
    assert "(default:0.0001)" in sections["optimiser"]["--lr"]
    assert sections["memory and the pipeline"]["--checkpoint"].endswith("(default:false)")
    lora_rank = sections["what trains: LoRA (lora_rank > 0), the last N blocks (train_layers > 0), else everything"]
    assert lora_rank["--lora_rank"].endswith("(default:0)")  # an int 0, not "false"
    # the epilog lists the toy preset, each flag beside its value on one line
    for k, v in data.TOY_SFT.items():
        assert f"--{k} {shown(v)}" in text, k


@dataclasses.dataclass
class Demo:
    # ---- the first group
    steps: int = 0          # how many steps (0: none)
    share: float = 0.5      # 50% of the data
    on: bool = True         # a switch
    # ---- the second group
    name: str = ""          # who


def test_help_of_a_config_with_percent_zero_and_empty_defaults(capsys):
    sections = help_sections(help_of(lambda argv: flags.parse(Demo, argv), capsys))
    assert list(sections) == ["options", "the first group", "the second group"]
    first = sections["the first group"]
    assert first["--steps"] == "INThowmanysteps(0:none)(default:0)"
    assert first["--share"] == "FLOAT50%ofthedata(default:0.5)"
    assert first["--on"] == "[BOOL]aswitch(default:true)"
    assert sections["the second group"]["--name"] == 'STRwho(default:"")'


@pytest.mark.parametrize("cls", [train_sft.Config, train_rm.Config, train_ppo.Config])
def test_every_flag_has_a_comment(cls):
    docs = flags.field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    assert [name for name, (group, comment) in docs.items() if not comment.strip() or not group] == []


# -----------------------------------------------------------------------------
# --config FILE.toml


def toy_sft_parse(argv):
    return flags.parse(train_sft.Config, argv, preset=lambda c: {} if c.model else data.TOY_SFT)


def test_a_config_file_sets_flags_below_the_command_line_and_above_the_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.5\n[optimiser]\nmax_steps = 3\nepochs = 2\n[model]\nout = "runs/mine"\n')
    cfg = toy_sft_parse(["--config", str(path)])
    assert (cfg.lr, cfg.max_steps, cfg.out) == (0.5, 3, "runs/mine")  # the toy preset says 0.01, 1000, runs/toy_sft
    assert cfg.epochs == 2.0 and type(cfg.epochs) is float
    assert cfg.micro_batch_size == data.TOY_SFT["micro_batch_size"]  # what the file leaves, the preset fills
    cfg = toy_sft_parse(["--lr", "0.25", "--config", str(path), "--max_steps", "7"])
    assert (cfg.lr, cfg.max_steps, cfg.out) == (0.25, 7, "runs/mine")


@pytest.mark.parametrize("text, words", [
    ("lrr = 0.1\n", ["'lrr'", "unknown key"]),
    ('max_steps = "3"\n', ["max_steps", "not an int"]),
    ("max_steps = true\n", ["max_steps", "not an int"]),
    ("max_steps = 2.5\n", ["max_steps", "not an int"]),
    ("[optimiser]\nlr = 0.1\n[other]\nlr = 0.2\n", ["lr", "twice"]),
    ("lr = \n", ["not valid TOML"]),
    (None, ["No such file"]),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, words):
    path, out = tmp_path / "run.toml", tmp_path / "run"
    if text is not None:
        path.write_text(text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        # --micro_batch_size 0 ends a parse that let the file through at once (not in a whole toy run)
        flags.run(train_sft.main, ["--config", str(path), "--out", str(out), "--micro_batch_size", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --config "), err
    for w in [str(path)] + words:
        assert w in err, (w, err)
    assert not out.exists()


# -----------------------------------------------------------------------------
# OUT/args.json, strict JSON, the memory table on CPUs


def test_args_json_records_the_run_and_a_changed_setting_is_refused(whole, capsys):
    with open(whole.out / "args.json", encoding="utf-8") as f:
        args = strict_json(f.read())
    assert args["script"] == "train_sft" and args["argv"] == whole.argv
    assert set(args["config"]) == {f.name for f in dataclasses.fields(train_sft.Config)}
    assert (args["config"]["lr"], args["config"]["max_steps"], args["config"]["out"]) == (1e-2, N, str(whole.out))
    started = time.mktime(time.strptime(args["started"], "%Y-%m-%d %H:%M:%S %z"))
    assert abs(started - time.time()) < 600
    before = (whole.out / "args.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        flags.run(train_sft.main, whole.argv + ["--lr", "0.02", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lr 0.01 there, 0.02 now" in err, err
    assert (whole.out / "args.json").read_bytes() == before


def test_written_json_has_no_nan(whole, tmp_path, capsys):
    for line in (whole.out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    log = ckpt.MetricsLog(str(tmp_path))
    log.log(3, x=float("nan"), y=[1.0, float("inf")], z={"w": -float("inf")}, ok=1.5)
    assert [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 3, "x": None, "y": [1.0, None], "z": {"w": None}, "ok": 1.5}]
    ckpt.write_json(tmp_path / "stats.json", {"mean": float("nan"), "count": 0})
    assert strict_json((tmp_path / "stats.json").read_text()) == {"mean": None, "count": 0}

    d = dist.setup()
    capsys.readouterr()
    rows = dist.report_memory_and_busy(None, d, 1.0)  # on a CPU: nothing measured, nothing predicted
    assert rows[0][:4] == [0, 0, None, None] and 0 <= rows[0][4] <= 1
    strict_json(json.dumps(rows))
    assert capsys.readouterr().out.splitlines()[1].split()[2:4] == ["n/a", "n/a"]


# -----------------------------------------------------------------------------
# progress lines when stderr is not a terminal


def test_piped_progress_is_plain_lines_throttled(whole):
    assert "\r" not in whole.stderr
    assert re.findall(r"^step \d+/\d+", whole.stderr, re.M) == [f"step {N}/{N}"]  # every 30 s, and the last step
    assert re.search(rf"^step {N}/{N} \(\d+ s, ~0 s left\) loss=\d", whole.stderr, re.M)


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM


@contextlib.contextmanager
def signal_after(k, signum):
    """The process sends itself `signum` right after its k-th optimiser step."""
    real, calls = optim.optimizer_step, [0]

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == k:  # with no handler the signal would end (or interrupt) the test process
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)
            os.kill(os.getpid(), signum)
        return out
    with mock.patch.object(optim, "optimizer_step", step):
        yield calls


def stopped_line(printed, signame, k):
    lines = [line for line in printed.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {signame} after step {k}; "), printed
    return lines[0]


def checkpoint_steps(out):
    return [step for step, _ in ckpt.checkpoints(str(out))]


def test_ctrl_c_checkpoints_prints_the_resume_command_and_resumes_the_same_curve(
        whole, tmp_path, base, data8, capsys, monkeypatch):
    out = tmp_path / "cut"
    argv = sft_argv(base, data8, out, "--resume", "false", max_steps=N)  # a flag and value the command drops
    monkeypatch.setattr(sys, "argv", ["train_sft.py", *argv])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    with signal_after(K, signal.SIGINT), pytest.raises(SystemExit) as e:
        train_sft.main(argv)
    printed = capsys.readouterr()
    assert e.value.code == 128 + signal.SIGINT
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert checkpoint_steps(out) == [K] and not (out / "final").exists()
    assert sorted(losses(out)) == list(range(1, K + 1))
    line = stopped_line(printed.out, "SIGINT", K)
    assert "SIGINT: stopping after this step" in printed.err
    command = shlex.split(line.split(" Resume: ", 1)[1])
    assert command[:2] == ["python", "train_sft.py"] and command[-1] == "--resume"
    assert command[2:-1] == [a for a in argv if a not in ("--resume", "false")]

    # the printed command, its progress a line a step
    monkeypatch.setattr(dist, "Progress", functools.partial(dist.Progress, every_s=0))
    train_sft.main(command[2:])
    err = capsys.readouterr().err
    assert re.findall(r"^step \d+/\d+", err, re.M) == [f"step {s}/{N}" for s in range(K + 1, N + 1)]
    assert losses(out) == losses(whole.out)
    assert (out / "final").is_dir()


def test_sigterm_stops_an_rm_run_with_143_and_it_resumes(tmp_path, base, capsys):
    ranked = write_jsonl(tmp_path / "rm.jsonl", head_lines(data.toy_file("rm_train"), 8))
    ref, out = tmp_path / "whole", tmp_path / "cut"
    train_rm.main(rm_argv(base, ranked, ref, max_steps=N))
    with signal_after(K, signal.SIGTERM), pytest.raises(SystemExit) as e:
        train_rm.main(rm_argv(base, ranked, out, max_steps=N))
    assert e.value.code == 128 + signal.SIGTERM
    stopped_line(capsys.readouterr().out, "SIGTERM", K)
    assert checkpoint_steps(out) == [K] and not (out / "final").exists()
    train_rm.main(rm_argv(base, ranked, out, "--resume", max_steps=N))
    assert sorted(losses(out)) == list(range(1, N + 1)) and losses(out) == losses(ref)
    stats = strict_json((out / "final" / "reward_stats.json").read_text())
    assert stats["step"] == N and math.isfinite(stats["mean"])


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, base, data8, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def save(*args, **kwargs):  # the second Ctrl-C, while the stop's checkpoint is being written
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    try:
        with signal_after(1, signal.SIGINT), pytest.raises(SystemExit) as e:
            flags.run(train_sft.main, sft_argv(base, data8, out, max_steps=N))
    except KeyboardInterrupt:
        pytest.fail("flags.run let a KeyboardInterrupt through")
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert signal.getsignal(signal.SIGINT) == handler
    assert checkpoint_steps(out) == []


def test_stop_signal_resume_command_drops_every_form_of_resume(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_sft.py"])
    monkeypatch.setattr(flags, "argv_parsed", ["--resume", "true", "--lr", "1e-3", "--resume=1", "--out", "my dir",
                                               "--resume"])  # as flags.parse read them
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dist.StopSignal.exit(signal.SIGTERM, 7, "my dir", dist.Dist())
    assert e.value.code == 143
    assert capsys.readouterr().out.strip() == ("stopped by SIGTERM after step 7; its checkpoint is in my dir. Resume: "
                                               "python train_sft.py --lr 1e-3 --out 'my dir' --resume")


def test_ctrl_c_on_one_rank_stops_both_pipeline_stages_at_the_same_step(tmp_path, base, data8):
    out, logs = tmp_path / "run", tmp_path / "ranks"

    def rank_main(rank):
        calls, code = [0], 0
        real = optim.optimizer_step

        def step(*args, **kwargs):
            result = real(*args, **kwargs)
            calls[0] += 1
            if rank == 1 and calls[0] == K:
                os.kill(os.getpid(), signal.SIGINT)
            return result
        optim.optimizer_step = step
        try:
            train_sft.main(sft_argv(base, data8, out, "--pp", "2", max_steps=N))
        except SystemExit as e:
            code = e.code
        with open(logs / f"result-{rank}.json", "w") as f:
            json.dump({"code": code, "steps": calls[0]}, f)
    fork_ranks(rank_main, logs, nproc=2, timeout=120)
    for rank in range(2):
        with open(logs / f"result-{rank}.json") as f:
            assert json.load(f) == {"code": 130, "steps": K}, rank
    assert checkpoint_steps(out) == [K] and not (out / "final").exists()
    with open(out / f"checkpoint-{K:06d}" / ckpt.STATE_FILE, encoding="utf-8") as f:
        assert json.load(f)["step"] == K
    stopped_line((logs / "rank-0.log").read_text(), "SIGINT", K)
    assert "Resume: torchrun --nproc_per_node=2 " in (logs / "rank-0.log").read_text()


# -----------------------------------------------------------------------------
# warnings before a run


def test_warnings_name_the_numbers_and_sane_settings_warn_nothing(capsys):
    capsys.readouterr()
    assert optim.warn_settings(100, 20, 1e-4, "lora", 50) == [] and capsys.readouterr().out == ""
    assert optim.warn_settings(20, 20, 1e-4, "lora", 50) == []  # its last step reaches --lr
    (w,) = optim.warn_settings(10, 40, 2e-4, "lora", 50)
    assert "10 steps" in w and "40-step warmup" in w and f"peaks at {2e-4 * 10 / 40:.2g}" in w, w
    assert capsys.readouterr().out == f"warning: {w}\n"
    (w,) = optim.warn_settings(100, 20, 1e-4, "lora", 5)
    assert "only 5 held-out examples" in w
    assert optim.warn_settings(100, 20, 1e-4, "lora", 0) == optim.warn_settings(100, 20, 1e-4, "lora", 8) == []
    (w,) = optim.warn_settings(100, 20, 1e-2, "full", 50)
    assert "--lr 0.01" in w and "full" in w
    assert optim.warn_settings(100, 20, 1e-2, "full", 50, pretrained=False) == []
    assert optim.warn_settings(100, 20, 1e-3, "lora", 50) == []


def test_a_run_inside_its_warmup_says_so(tmp_path, base, data8, capsys):
    capsys.readouterr()
    train_sft.main(sft_argv(base, data8, tmp_path / "run", max_steps=1, warmup_steps=20, lr=1e-2))
    printed = capsys.readouterr().out
    assert "warning: the run's 1 steps end inside the 20-step warmup, so the learning rate peaks at 0.0005" in printed


# -----------------------------------------------------------------------------
# --keep_best


def test_keep_best_writes_the_lowest_held_out_loss_steps_weights(tmp_path, base, data8, capsys):
    out, last = tmp_path / "run", 5
    argv = sft_argv(base, data8, out, "--keep_best", max_steps=last, lr=0.05, warmup_steps=1, eval_every=1,
                    save_every=1, keep_checkpoints=last)
    capsys.readouterr()
    train_sft.main(argv)
    curve = losses(out, "eval_loss")
    best = min(curve, key=curve.get)
    assert sorted(curve) == list(range(1, last + 1)) and best < last, curve  # the held-out loss rose at the end
    assert f"--keep_best: the result is step {best}'s" in capsys.readouterr().out
    final = load_tensors(out / "final")
    at_best, at_last = load_tensors(out / f"checkpoint-{best:06d}"), load_tensors(out / f"checkpoint-{last:06d}")
    assert final and final.keys() == at_best.keys() == at_last.keys()
    for key in final:
        torch.testing.assert_close(final[key], at_best[key], atol=0, rtol=0, msg=key)
    assert any(not torch.equal(final[key], at_last[key]) for key in final)
    assert (out / "best").is_dir()

    train_sft.main(sft_argv(base, data8, out, "--overwrite", max_steps=1))  # a fresh run: no earlier best
    assert not (out / "best").exists()


def test_resume_keeps_the_metrics_up_to_its_step_even_after_a_cut_last_line(tmp_path):
    """A kill mid-write leaves half a line at the end of metrics.jsonl: --resume keeps the rows up to
    its checkpoint's step and drops the rest, the half line too, instead of failing on it."""
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    ckpt.MetricsLog(str(tmp_path), resume_step=2)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:2]


def test_a_report_that_cannot_be_drawn_never_stops_the_run(tmp_path, base, data8, monkeypatch, capsys):
    """report.html is a convenience: if drawing it fails, the run says so and goes on to its result."""
    import report

    def broken(*args, **kwargs):
        raise RuntimeError("no page today")
    monkeypatch.setattr(report, "write", broken)
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data8, out, max_steps=2, save_every=1))
    assert (out / "final" / "config.json").is_file() and not (out / "report.html").exists()
    assert f"warning: {out / 'report.html'} not written (RuntimeError: no page today)" in capsys.readouterr().err
