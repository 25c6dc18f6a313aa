"""Checkpoints and results: everything a run writes under --out, and reading it back to resume.

Weights or LoRA adapters (every stage writes its share), heads, optimiser states, RNG, the loop's
state and the metrics log; a checkpoint reads back with any number of pipeline stages.

    OUT/args.json              script, settings, command line    OUT/final/         the result
    OUT/checkpoint-STEP/       the last --keep_checkpoints ones  OUT/latest_checkpoint  names the newest
    OUT/metrics.jsonl          one JSON object per logged step   OUT/tb/            TensorBoard, if installed
    OUT/report.html            the curves (report.py), rewritten at each checkpoint and at the end
"""
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dist
import flags
import glm
import lora
import report

STATE_FILE = "train_state.json"        # the loop's state; written last, so it marks a complete checkpoint
POINTER = "latest_checkpoint"          # a text file naming the newest checkpoint folder
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
RUN_FILE = "args.json"                 # which script wrote this folder, with which settings and command line
# settings a run may change when it continues (or restarts) in the same folder: the split over GPUs
# and micro-batches (the data position checks the global batch itself), lengths, logs
VOLATILE = {"out", "resume", "overwrite", "max_steps", "epochs", "log_every", "eval_every", "save_every",
            "sample_every", "save_final", "keep_checkpoints", "pp", "plan", "gpu_mem_gib", "checkpoint",
            "micro_batch_size", "grad_accum", "allow_data_change", "timeout_min", "threads", "keep_best"}


def save(out_dir, d, tokenizer_path, models, heads=None, optimizers=None, train_state=None, extra_json=None):
    """Write a result or checkpoint folder atomically, every rank its share:
    models {subfolder: (this stage's model, LoRA adapter name or None)} ("" = the folder itself)
    as HF weights or a PEFT adapter; heads {prefix: module} (the last stage's); optimizers
    {file prefix: optim.AdamW}; with train_state (a checkpoint) the loop's state and every rank's
    RNG; extra_json {file name: object} from rank 0."""
    def write(tmp):
        for sub, (model, lora_name) in models.items():
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
            write_stage_weights(model, os.path.join(tmp, sub), d, lora_name)
        save_heads(heads, tmp, d)
        if d.dp_rank == 0:
            for prefix, opt in (optimizers or {}).items():
                torch.save(opt.state_by_name(), os.path.join(tmp, f"{prefix}-stage{d.pp_rank:03d}.pt"))
        if train_state is not None:
            torch.save(rng_state(d), os.path.join(tmp, f"rng-rank{d.rank:03d}.pt"))
        dist.barrier()
        if not dist.is_main():
            return
        for sub, (model, lora_name) in models.items():
            finish_weights(model, os.path.join(tmp, sub), tokenizer_path, lora_name)
        for name, obj in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), obj)
        if train_state is not None:
            write_json(os.path.join(tmp, STATE_FILE), {**train_state, "world": d.world, "pp": d.P})  # written last
    atomic_dir_all(out_dir, write, d)


def save_checkpoint(out, step, d, tokenizer_path, models, heads=None, optimizers=None, train_state=None, keep=2):
    """OUT/checkpoint-STEP (see save), then the pointer OUT/latest_checkpoint names it, then all but
    the newest `keep` checkpoints go. Every file and rename is on disk before the next step, so a
    kill at any instant leaves the previous checkpoint complete."""
    path = os.path.join(out, f"checkpoint-{step:06d}")
    save(path, d, tokenizer_path, models, heads, optimizers, train_state)
    if dist.is_main():
        tmp = os.path.join(out, f".tmp-{POINTER}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(os.path.basename(path) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out, POINTER))
        _fsync_dir(out)
        for _, old in checkpoints(out)[:-keep] if keep > 0 else ():
            shutil.rmtree(old)
        write_report(out)  # the curves so far, for a look while the run goes on
    dist.barrier()


def save_if_best(out, best, step, eval_loss, d, tokenizer_path, models, heads=None):
    """--keep_best: OUT/best holds the weights of the lowest held-out loss so far. best is that
    record, {"step", "eval_loss"} (None: none yet); returns the record after this evaluation."""
    if best and best["eval_loss"] <= eval_loss:
        return best
    save(os.path.join(out, "best"), d, tokenizer_path, models, heads)
    return {"step": step, "eval_loss": eval_loss}


def restore_best(out, best, step, d, models, heads=None):
    """Before the result is written: load OUT/best's weights (and heads) back if they are not the
    last step's. True if it did."""
    if not best or best["step"] == step:
        return False
    for sub, (model, lora_name) in models.items():
        load_weights(model, os.path.join(out, "best", sub), d, lora_name)
    for prefix, module in (heads or {}).items():
        load_head(module, os.path.join(out, "best"), prefix)
    dist.print0(f"--keep_best: the result is step {best['step']}'s (held-out loss {best['eval_loss']:.4f}), "
                f"not the last step's")
    return True


def write_report(out, tables=()):
    """OUT/report.html (rank 0). A page that cannot be drawn is said, and never stops the run."""
    try:
        return report.write(out, tables=tables)
    except Exception as e:
        print(f"warning: {os.path.join(out, 'report.html')} not written ({type(e).__name__}: {e})",
              file=sys.stderr, flush=True)


def finish_run(out, d, stage, wall, tables=()):
    """The end of a run: OUT/report.html with the run's tables, each rank's measured memory and busy
    time beside the plan's, the process group left."""
    if dist.is_main():
        dist.print0(f"report: {write_report(out, tables)}")
    dist.report_memory_and_busy(stage, d, wall)
    dist.teardown()


def rng_state(d):
    """This rank's random generators: the CPU's and, on GPUs, its device's."""
    rng = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    return rng


# -----------------------------------------------------------------------------
# the run's folder, and resuming


def check_out(out, script, config, resume, overwrite):
    """Before any work: refuse an --out that holds something this run would replace without being
    asked: a folder that is not a run of `script`, a run with other settings, or (for a fresh
    run) one that could be resumed. --overwrite allows all of these."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file. HINT: pass a folder for the run's outputs")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the nearest folder that exists must take new files
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is {'a file' if not os.path.isdir(parent) else 'not writable'}. "
                         "HINT: pass a folder you can write to")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries or overwrite:
        return
    run = os.path.join(out, RUN_FILE)
    if not os.path.isfile(run):
        raise ValueError(f"--out {out} is not empty ({', '.join(entries[:3])}{', ...' * (len(entries) > 3)}) and "
                         f"holds no run of {script}. HINT: choose a new folder, or pass --overwrite to write into it")
    try:
        with open(run, encoding="utf-8") as f:
            earlier = json.load(f)
    except ValueError:
        earlier = None
    if not isinstance(earlier, dict) or not {"script", "config"} <= set(earlier):
        raise ValueError(f"{run}: not a run record this project wrote. HINT: move the folder away, or pass --overwrite")
    if earlier["script"] != script:
        raise ValueError(f"--out {out} holds a run of {earlier['script']}, not of {script}. HINT: choose "
                         "another --out, or pass --overwrite")
    was = earlier["config"]
    differ = [k for k in sorted(set(was) | set(config)) if k not in VOLATILE and was.get(k) != config.get(k)]
    if differ:
        raise ValueError(f"--out {out} holds a {script} run with other settings (" + "; ".join(
            f"--{k} {was.get(k)!r} there, {config.get(k)!r} now" for k in differ[:4]) + "). HINT: use the same "
            "flags, choose another --out, or pass --overwrite")
    found = checkpoints(out)
    if not resume and found:
        raise ValueError(f"--out {out} holds a {script} run with checkpoints up to step {found[-1][0]}. "
                         "HINT: pass --resume to continue it, or --overwrite to start afresh there")


def start_run(out, script, config, resume_step):
    """OUT once every check has passed: args.json records the run; a fresh run removes what an earlier
    one left (checkpoints, pointer, metrics), a resumed one keeps the metrics up to its checkpoint's
    step; temporary folders of saves a kill interrupted go. Returns the metrics log."""
    if dist.is_main():
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            stale = name.startswith((".tmp-checkpoint", f".tmp-{POINTER}", ".tmp-best"))
            earlier = resume_step is None and (CHECKPOINT.fullmatch(name) or name in ("checkpoint", POINTER, "best"))
            path = os.path.join(out, name)
            if stale or earlier:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        write_json(os.path.join(out, RUN_FILE), {"script": script, "config": config, "argv": flags.argv_parsed,
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    dist.barrier()
    return MetricsLog(out, resume_step)


def checkpoints(out):
    """[(step, folder)] of the complete checkpoints under OUT, oldest first: OUT/checkpoint-STEP (and
    the single OUT/checkpoint of earlier versions). A folder appears only complete: it is written
    under a temporary name and renamed into place."""
    found = []
    for name in os.listdir(out) if os.path.isdir(out) else ():
        path = os.path.join(out, name)
        if (CHECKPOINT.fullmatch(name) or name == "checkpoint") and os.path.isfile(os.path.join(path, STATE_FILE)):
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                found.append((int(json.load(f)["step"]), path))
    return sorted(found)


def checkpoint_dir(out, resume):
    """The checkpoint --resume continues from: the newest complete one (said when the pointer file
    names another); None for a fresh run (said when --resume found nothing)."""
    if not resume:
        return None
    found = checkpoints(out)
    if not found:
        dist.print0(f"--resume: no checkpoint in {out}, starting afresh")
        return None
    newest = found[-1][1]
    pointer = os.path.join(out, POINTER)
    named = open(pointer, encoding="utf-8").read().strip() if os.path.isfile(pointer) else None
    if named != os.path.basename(newest):
        dist.print0(f"--resume: {pointer} names {named or 'nothing'}; the newest complete checkpoint is {newest}")
    return newest


def file_hashes(files):
    """{flag: sha256 of its file} of the data a run trains on; a checkpoint records them."""
    out = {}
    for flag, path in files.items():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[flag] = h.hexdigest()
    return out


def resume(ckpt_dir, d, optimizers, batches, data_hashes=None, allow_data_change=False):
    """Restore the optimisers {file prefix: AdamW}, the data positions {state key: data.Batches}
    and this rank's RNG from a checkpoint; return the loop's state (step, ...). Data files whose
    contents changed since the checkpoint (data_hashes: file_hashes now) are refused unless allowed."""
    state = load_train_state(ckpt_dir, d)
    was = state.get("data_hashes", {})
    for flag in [f for f in data_hashes or {} if f in was and was[f] != data_hashes[f]]:
        if not allow_data_change:
            raise ValueError(f"--{flag}: the file's contents differ from those {ckpt_dir} was trained on (sha256 "
                             f"{was[flag][:12]}... then, {data_hashes[flag][:12]}... now). HINT: resume with the same "
                             "data, or pass --allow_data_change to continue on the new one")
        dist.print0(f"--allow_data_change: --{flag} differs from the data {ckpt_dir} was trained on")
    for prefix, opt in optimizers.items():
        opt.load(ckpt_dir, prefix)
    for key, b in batches.items():
        if b is not None:
            b.load_state_dict(state[key])
    dist.print0(f"resumed from {ckpt_dir} at step {state['step']}")
    return state


def load_train_state(ckpt_dir, d):
    """The loop's state; this rank's RNG is restored when the checkpoint had the same ranks."""
    path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir} has no {STATE_FILE}: it is not a complete checkpoint. "
                                "HINT: remove it, or resume from a folder a finished save wrote")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    rng_path = os.path.join(ckpt_dir, f"rng-rank{d.rank:03d}.pt")
    if state.get("world") == d.world and os.path.isfile(rng_path):
        rng = read_pt(rng_path)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return state


def read_pt(path):
    """A torch.save file of tensors (optimiser state, RNG); a damaged one is an error that names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: RuntimeError, EOFError, UnpicklingError ...
        raise ValueError(f"{path}: not a readable checkpoint file ({type(e).__name__}). HINT: it is truncated or "
                         "damaged; move its checkpoint folder away, and --resume takes the one before it") from None


def load_weights(model, path, d, lora_name=None):
    """A stage's trained weights (its adapter, or its own tensors) from a checkpoint's folder."""
    if lora_name is not None:
        lora.load_adapter(model, path, name=lora_name)
    else:
        model.load_state_dict(glm.read_safetensors(path, glm.expected_shapes(model), d.device))


# -----------------------------------------------------------------------------
# the pieces of a folder


def atomic_dir_all(out_dir, write, d):
    """Every rank runs write(tmp) into one temporary folder; rank 0 renames it into place once
    all have finished, so a crash mid-save leaves the previous checkpoint untouched."""
    out_dir, tmp = os.path.abspath(out_dir), None
    if dist.is_main():
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        tmp = glm.make_temp_dir(out_dir)
    tmp = dist.broadcast_object(tmp, d)
    write(tmp)
    dist.barrier()
    if dist.is_main():
        publish(tmp, out_dir)
    dist.barrier()


def publish(tmp, out_dir):
    """Rename the finished folder tmp to out_dir, with its files and the rename on disk (fsync)."""
    glm.share_modes(tmp)
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)
    if os.path.exists(out_dir):  # written again (a result): the old one aside, the new one in, the old one gone
        os.rename(out_dir, tmp + ".old")
        os.rename(tmp, out_dir)
        shutil.rmtree(tmp + ".old")
    else:
        os.rename(tmp, out_dir)
    _fsync_dir(os.path.dirname(out_dir))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(obj):
    """obj with NaN and infinities as null: strict JSON readers refuse them (peak memory on a CPU,
    an accuracy over no answers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


def write_stage_weights(model, tmp, d, lora_name=None):
    """This stage's share of an HF model folder (full weights) or of a PEFT adapter (lora_name).
    Only data-parallel replica 0 writes; rank 0 adds the index/config after the barrier."""
    if d.dp_rank != 0:
        return
    if lora_name is None:
        state = {k: v.detach().cpu().contiguous() for k, v in glm.base_state_dict(model).items()}
        save_file(state, os.path.join(tmp, f"model-stage{d.pp_rank:03d}-of-{d.P:03d}.safetensors"),
                  metadata={"format": "pt"})
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in lora.adapter_state_dict(model, lora_name).items()}
        save_file(state, os.path.join(tmp, f"adapter-stage{d.pp_rank:03d}.safetensors"),
                  metadata=lora.adapter_metadata(model))


def finish_weights(model, tmp, tokenizer_path, lora_name=None):
    """Rank 0, after every stage wrote its part: index + config.json (full), or one PEFT
    adapter_model.safetensors + adapter_config.json (LoRA); the tokenizer beside them."""
    if lora_name is None:  # one shard a stage, renamed as HF names shards: model-00001-of-00004.safetensors
        weight_map, parts = {}, sorted(glob.glob(os.path.join(tmp, "model-stage*.safetensors")))
        for i, path in enumerate(parts):
            name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            os.rename(path, os.path.join(tmp, name))
            with safe_open(os.path.join(tmp, name), framework="pt") as f:
                weight_map.update({k: name for k in f.keys()})
        write_json(os.path.join(tmp, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        write_json(os.path.join(tmp, "config.json"), model.config.to_json(dtype))
    else:
        state, fingerprint = {}, {}  # every stage's tensors, and the base fingerprint of what it held
        for path in sorted(glob.glob(os.path.join(tmp, "adapter-stage*.safetensors"))):
            with safe_open(path, framework="pt") as f:
                fingerprint.update(json.loads(f.metadata()["base_model_fingerprint"]))
            state.update(load_file(path))
            os.remove(path)
        save_file(state, os.path.join(tmp, lora.ADAPTER_FILE),
                  metadata={"format": "pt", "base_model_fingerprint": json.dumps(fingerprint)})
        write_json(os.path.join(tmp, lora.CONFIG_FILE), lora.adapter_config(model, lora_name))
    if tokenizer_path and os.path.isfile(tokenizer_path):
        glm.copy_tokenizer(tokenizer_path, tmp)


def save_heads(heads, tmp, d):
    """Extra modules (a reward or value head, on the last stage) as {prefix}.safetensors."""
    if d.dp_rank == 0:
        for prefix, module in (heads or {}).items():
            save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()},
                      os.path.join(tmp, f"{prefix}.safetensors"))


def load_head(module, ckpt_dir, prefix):
    """Strictly load a head saved by save_heads; the error names the file and what to do."""
    path = os.path.join(ckpt_dir, f"{prefix}.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing. HINT: pass the output folder of the run that trained "
                                f"the {prefix} (train_rm.py writes reward_head.safetensors)")
    state = load_file(path, device=str(next(module.parameters()).device))
    try:
        module.load_state_dict({k: v.to(next(module.parameters()).dtype) for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}. HINT: the head was trained for another model size") from None


# -----------------------------------------------------------------------------
# the metrics log


def read_metrics(out):
    """The rows of OUT/metrics.jsonl, in order; a last line a kill cut short is skipped."""
    path, rows = os.path.join(out, "metrics.jsonl"), []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


class MetricsLog:
    """metrics.jsonl (and TensorBoard events when the package is installed), on rank 0 only. A fresh
    run starts it afresh; a resumed one drops the rows logged after its checkpoint's step (a killed
    run logged them, and the resumed run logs those steps again)."""

    def __init__(self, out_dir, resume_step=None):
        self.path, self.tb = os.path.join(out_dir, "metrics.jsonl"), None
        if not dist.is_main():
            return
        os.makedirs(out_dir, exist_ok=True)
        rows = [r for r in read_metrics(out_dir) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(self.path + ".tmp", self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step, **values):
        if not dist.is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe({"step": step, **values}), allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
