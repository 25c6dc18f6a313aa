"""The pipeline across processes: groups, stage-to-stage transfers, 1F1B, pipelined forward and generation.

P pipeline stages x D data-parallel replicas, over torch.distributed (NCCL on GPUs, gloo on CPUs).

    python train_sft.py ...                                  # P = D = 1: the same code, one process
    torchrun --nproc_per_node=8 train_sft.py --pp 8 ...      # 8 stages
    torchrun --nproc_per_node=8 train_sft.py --pp 4 ...      # 4 stages x 2 replicas

    d = dist.setup(pp)            # this process's place: d.pp_rank, d.dp_rank, d.device, groups
    dist.print0(...)              # rank 0 prints; dist.is_main() asks
    with dist.Progress(total) as bar, dist.StopSignal() as stop:   # a training loop's step counter, and
        ...                                                          # Ctrl-C / SIGTERM agreed across ranks
    dist.teardown()

Every rank also runs a Heartbeat: a rank that stops answering is named, and the run ends.
"""
import collections
import contextlib
import datetime
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from tqdm import tqdm

import flags
import glm
import quant

GiB = 1 << 30


def setup(pp=1, timeout_min=10.0, threads=0):
    """Read torchrun's environment (or run as one process), pick NCCL on GPUs and gloo on CPUs,
    set the device and build the pipeline and data-parallel groups. A collective that waits longer
    than timeout_min for a rank (a stalled or dead process) ends the run instead of hanging it.
    threads > 0 sets torch's CPU threads: a small model gains little from a second one and loses
    much when another process holds a core (the toy SFT on 2 cores beside one busy process: 1.7x
    slower with 2 threads than with 1)."""
    global _DIST
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if pp < 1 or world % pp:
        raise ValueError(f"--pp {pp} does not divide the world size {world}; choose P so that "
                         "WORLD_SIZE = P x D" + (f" (e.g. --pp {world} or --pp 1)" if world > 1 else
                                                 " (one process: --pp 1)"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    d = Dist(rank=rank, world=world, local_rank=local_rank, P=pp, D=world // pp,
             pp_rank=rank % pp, dp_rank=rank // pp, device=device, timeout_min=timeout_min)
    if world > 1:
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min),
                                 **({"device_id": device} if cuda else {}))
        # every rank must create every group, in the same order
        for r in range(d.D):
            g = tdist.new_group(list(range(r * pp, (r + 1) * pp)))
            if r == d.dp_rank:
                d.pp_group = g
        for s in range(pp):
            g = tdist.new_group(list(range(s, world, pp)))
            if s == d.pp_rank:
                d.dp_group = g
        d.heartbeat = Heartbeat(d)
    _DIST = d
    return d


def get():
    """Where this process sits (set by setup; one process on the CPU before it)."""
    return _DIST


def is_main():
    return _DIST.rank == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if tdist.is_initialized():
        tdist.barrier()


def teardown():
    if tdist.is_initialized():
        get().heartbeat.stop()
        tdist.barrier()
        tdist.destroy_process_group()


class Progress:
    """The step counter, on rank 0: tqdm's bar in a terminal; piped to a file, one plain line every
    `every_s` seconds and at the last step instead of a carriage return per update."""

    def __init__(self, total, initial=0, every_s=30.0):
        self.tty, self.on = sys.stderr.isatty(), is_main()
        self.bar = tqdm(total=total, initial=initial, disable=not (self.on and self.tty), dynamic_ncols=True)
        self.n, self.initial, self.total, self.every_s = initial, initial, total, every_s
        self.t0 = self.shown = time.monotonic()

    def update(self, **values):
        """One step done; values (formatted strings) are shown beside the count."""
        self.n += 1
        self.bar.update(1)
        self.bar.set_postfix(values, refresh=False)
        now = time.monotonic()
        if self.on and not self.tty and (now - self.shown >= self.every_s or self.n == self.total):
            left = (self.total - self.n) * (now - self.t0) / max(self.n - self.initial, 1)
            print(f"step {self.n}/{self.total} ({now - self.t0:.0f} s, ~{left:.0f} s left) "
                  + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr, flush=True)
            self.shown = now

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


class StopSignal:
    """Ctrl-C (SIGINT) or a cluster's preemption (SIGTERM) asks the run to stop at the next step
    boundary, where the loop writes a checkpoint and exits with the command that resumes it; a
    second Ctrl-C stops at once. Ranks may see the signal at different steps (or not at all), so
    `requested` agrees across every rank with an all-reduce."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _note(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if is_main():
            print(f"\n{signal.Signals(signum).name}: stopping after this step, once its checkpoint is written "
                  "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def requested(self, d):
        """The signal any rank received (0: none), the same on every rank."""
        if d.world == 1:
            return self.signum
        return int(all_reduce(torch.tensor([float(self.signum)], device=d.device), "max").item())

    @staticmethod
    def exit(signum, step, out, d):
        """After the checkpoint of `step`: say how to resume, leave the process group, exit 128 + signum."""
        argv, prev = [], ""
        for a in [sys.argv[0], *flags.argv_parsed]:  # without --resume, --resume=X or --resume X
            value = prev == "--resume" and a.lower() in ("1", "true", "yes", "0", "false", "no")
            if not (a == "--resume" or a.startswith("--resume=") or value):
                argv.append(a)
            prev = a
        launch = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', d.world)}" if d.world > 1 else "python"
        print0(f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is in {out}. Resume: "
               f"{launch} {' '.join(map(shlex.quote, argv))} --resume")
        teardown()
        raise SystemExit(128 + signum)


class Heartbeat:
    """A stalled rank (stopped, hung, swapping) must end the run with its name, not hang the others
    until the collectives time out without one. Each rank bumps a counter in the rendezvous store
    from a daemon thread and watches the next rank's counter (a ring: one watcher per rank, one
    message); a counter that has not moved for 0.9 x --timeout_min, before the collectives' own
    timeout, ends the watcher's process with a line naming the rank, and torchrun stops the rest.
    The thread runs whatever the main thread does (a long kernel, a slow step), so only a process
    that stopped answering goes stale."""

    def __init__(self, d):
        self.d, self.limit = d, 0.9 * d.timeout_min * 60
        self.watched = (d.rank + 1) % d.world
        self.store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=datetime.timedelta(seconds=self.limit), wait_for_workers=False)
        self.stopped = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="heartbeat").start()

    def _run(self):
        every, key, count = min(5.0, self.limit / 20), f"heartbeat/{self.watched}", None
        beat, changed = 0, time.monotonic()
        try:
            while not self.stopped.wait(every):
                beat += 1
                self.store.set(f"heartbeat/{self.d.rank}", str(beat))
                seen = self.store.get(key) if self.store.check([key]) else None
                if seen != count or seen == b"done":
                    count, changed = seen, time.monotonic()
                elif time.monotonic() - changed > self.limit:
                    self._end(f"rank {self.watched} has not answered for {time.monotonic() - changed:.0f} s: "
                              "it stopped, hung or died. HINT: see its output; --timeout_min sets the wait")
        except Exception as e:  # the store itself went silent: its host (torchrun's agent, or rank 0) stalled
            if not self.stopped.is_set():
                self._end(f"the rendezvous store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} stopped "
                          f"answering ({str(e).splitlines()[0][:100]}). HINT: see rank 0's and torchrun's output")

    def _end(self, message):
        print(f"error: rank {self.d.rank}: {message}", file=sys.stderr, flush=True)
        os._exit(2)

    def stop(self):
        """This rank is done: its watcher must not take the silence that follows for a stall."""
        self.stopped.set()
        self.store.set(f"heartbeat/{self.d.rank}", "done")


class IdleClock:
    """Time this rank spends waiting on others: for every transfer or collective, the span from
    "this stage's queued work is done" to "the other ranks' data is here". On GPUs the marks are
    CUDA events on the compute stream, read only when reported, so measuring never stalls the
    host; on CPUs they are wall-clock times."""

    def __init__(self):
        self.spans = collections.deque()  # (start, end) marks not yet read
        self.total = 0.0                  # seconds already read out of spans

    @contextlib.contextmanager
    def waiting(self, device):
        """Count what runs inside as waiting on other ranks."""
        start = self._mark(device)
        yield
        self.spans.append((start, self._mark(device)))
        if len(self.spans) > 256:  # fold what has finished, so a long run keeps few events alive
            self._fold(block=False)

    @staticmethod
    def _mark(device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _fold(self, block):
        while self.spans:
            start, end = self.spans[0]
            if not isinstance(start, float):
                if not block and not end.query():
                    return
                end.synchronize()
            self.spans.popleft()
            self.total += (end - start) if isinstance(start, float) else start.elapsed_time(end) / 1000

    def seconds(self, reset=False):
        """Seconds spent waiting since the last reset."""
        self._fold(block=True)
        total = self.total
        if reset:
            self.total = 0.0
        return total


@dataclass
class Dist:
    """Where this process sits. Ranks are laid out replica-major: rank = dp_rank * P + pp_rank,
    so the P stages of one replica are neighbours (same node, NVLink) and only the small
    gradient all-reduce crosses replicas."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    P: int = 1
    D: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    device: torch.device = torch.device("cpu")
    pp_group: object = None
    dp_group: object = None
    idle: IdleClock = field(default_factory=IdleClock)
    timeout_min: float = 10.0         # how long a rank waits for another before the run ends
    heartbeat: object = None          # watches the next rank (several processes only)

    first = property(lambda self: self.pp_rank == 0)        # holds the embedding
    last = property(lambda self: self.pp_rank == self.P - 1)  # holds the final LN and lm_head

    def stage_rank(self, s):
        """Global rank of stage s of this replica."""
        return self.dp_rank * self.P + s


_DIST = Dist()  # the process-group handle: set once by setup()


# -----------------------------------------------------------------------------
# collectives and point-to-point transfers; every wait counts as idle time


def all_reduce(t, op="sum", group=None):
    """In-place all-reduce over `group` (None: every rank; a no-op in one process); returns t. The
    wait for the other ranks counts as idle time (at a step's end the stages that finished first
    wait here)."""
    if tdist.is_initialized() and tdist.get_world_size(group) > 1:
        d = get()
        with d.idle.waiting(d.device):
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX, group=group)
    return t


def broadcast_object(obj, d):
    """Rank 0's picklable obj, on every rank."""
    box = [obj]
    if d.world > 1:
        tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_stage_objects(obj, d):
    """Every stage's picklable obj of this replica, in stage order."""
    out = [None] * d.P
    tdist.all_gather_object(out, obj, group=d.pp_group)
    return out


def broadcast_from_last_stage(t, d):
    """Share a value computed on the last stage (the loss) with every stage of the replica."""
    if d.P > 1:
        with d.idle.waiting(d.device):
            tdist.broadcast(t, src=d.stage_rank(d.P - 1), group=d.pp_group)
    return t


def exchange(d, sends=(), recvs=()):
    """Post sends [(tensor, stage)] and receives [(buffer, stage)] within this replica together
    and wait for all of them: posted at once, two stages that both send and receive can never
    deadlock. The wait counts as idle time."""
    ops = ([tdist.P2POp(tdist.isend, t.contiguous(), d.stage_rank(s)) for t, s in sends]
           + [tdist.P2POp(tdist.irecv, b, d.stage_rank(s)) for b, s in recvs])
    if not ops:
        return
    with d.idle.waiting(d.device):
        for req in tdist.batch_isend_irecv(ops):
            req.wait()


def p2p(d, send=None, send_to=None, recv_shape=None, recv_from=None, dtype=None):
    """One send and/or one receive between neighbours, posted together (see exchange);
    returns the received buffer."""
    buf = None if recv_shape is None else torch.empty(recv_shape, dtype=dtype, device=d.device)
    exchange(d, [] if send is None else [(send, send_to)], [] if buf is None else [(buf, recv_from)])
    return buf


# -----------------------------------------------------------------------------
# 1F1B: one forward, one backward
#
# P = 4 stages, M = 6 micro-batches; Fi / Bi = forward / backward of micro-batch i:
#
#   stage 0 | F0 F1 F2 F3          B0 F4    B1 F5    B2       B3       B4    B5
#   stage 1 |    F0 F1 F2       B0 F3    B1 F4    B2 F5    B3       B4    B5
#   stage 2 |       F0 F1    B0 F2    B1 F3    B2 F4    B3 F5    B4    B5
#   stage 3 |          F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5
#
# Stage s first runs P - s - 1 warm-up forwards, then alternates one forward with one backward,
# then drains the remaining backwards. So stage s holds at most P - s micro-batches of
# activations at once (the last stage one) instead of all M, and each stage idles only during
# the fill and drain: the bubble is (P - 1) / (M + P - 1) of the step.

def train_step(model, d, microbatches, loss_fn, first_trainable=0):
    """Forward and backward over `microbatches` with 1F1B; gradients accumulate in .grad of float32
    weights and in .main_grad of bf16 ones (see optim.AdamW). loss_fn(model, hidden [b, T, C], mb)
    runs on the last stage: one micro-batch's loss, scaled so that the sum over micro-batches and
    replicas is the step's loss. Stages before first_trainable (a frozen prefix under
    --train_layers) run forward only: no graph, no gradients sent back to them. Activations and
    their gradients cross stages in the compute dtype (bf16 on GPUs). Returns the summed loss on
    every stage of the replica."""
    M, P, s = len(microbatches), d.P, d.pp_rank
    dtype, C = stage_dtype(model), model.config.hidden_size
    shape = lambda i: (*microbatches[i]["input_ids"].shape, C)  # [b, T, C] crosses each boundary
    sends_grad = s > first_trainable  # the stage before us trains: give it d loss / d input
    gets_grad = not d.last and s >= first_trainable  # we (or a stage before) train
    warmup = min(P - s - 1, M)
    flight = []  # (input, output) of the micro-batches whose backward is still to come, oldest first
    total = torch.zeros((), device=d.device)

    def recv_forward(i):
        return None if d.first else p2p(d, recv_shape=shape(i), recv_from=s - 1, dtype=dtype)

    def forward(i, x):
        mb = microbatches[i]
        if x is None:
            x = mb["input_ids"]
        elif sends_grad:
            x.requires_grad_()
        rope, attend = model.batch_inputs(mb)
        y = model.transformer(x, rope, attend, checkpoint=model.checkpoint_activations)
        if d.last:
            y = loss_fn(model, y, mb)
            total.add_(y.detach())
        flight.append((x, y))
        return y

    def backward(grad):
        x, y = flight.pop(0)
        if y.requires_grad:
            torch.autograd.backward(y, grad_tensors=None if grad is None else grad.to(y.dtype))
        return x.grad if sends_grad else None

    for i in range(warmup):
        p2p(d, send=forward(i, recv_forward(i)).detach().to(dtype), send_to=s + 1)
    x = recv_forward(warmup) if warmup < M else None
    for j in range(warmup, M):
        # forward of micro-batch j, then backward of the oldest one in flight (micro-batch b)
        y = forward(j, x)
        b = j + 1 - len(flight)
        grad = p2p(d, send=None if d.last else y.detach().to(dtype), send_to=s + 1,
                   recv_shape=shape(b) if gets_grad else None, recv_from=s + 1, dtype=dtype)
        more = j + 1 < M and not d.first
        x = p2p(d, send=backward(grad), send_to=s - 1, recv_shape=shape(j + 1) if more else None,
                recv_from=s - 1, dtype=dtype)
    while flight:  # drain: the backwards of the warm-up micro-batches
        b = M - len(flight)
        grad = p2p(d, recv_shape=shape(b), recv_from=s + 1, dtype=dtype) if gets_grad else None
        p2p(d, send=backward(grad), send_to=s - 1)
    return broadcast_from_last_stage(total, d)


def forward(model, d, microbatches, out_fn, out_shape):
    """Forward-only through the pipeline, no graph: out_fn(model, hidden [b, T, C], mb) -> a float32
    tensor of out_shape(mb) per micro-batch, computed on the last stage; every stage of the
    replica gets the list (a loss: out_shape = lambda mb: ())."""
    s, outs = d.pp_rank, []
    C, dtype = model.config.hidden_size, stage_dtype(model)
    with torch.no_grad():
        for mb in microbatches:
            ids = mb["input_ids"]
            x = ids if d.first else p2p(d, recv_shape=(*ids.shape, C), recv_from=s - 1, dtype=dtype)
            rope, attend = model.batch_inputs(mb)
            h = model.transformer(x, rope, attend)
            if d.last:
                y = out_fn(model, h, mb).float()
            else:
                p2p(d, send=h.to(dtype), send_to=s + 1)
                y = torch.empty(out_shape(mb), device=d.device)
            outs.append(broadcast_from_last_stage(y, d))
    return outs


# -----------------------------------------------------------------------------
# this rank's stage


def build_stage(model_dir, stage, d, checkpoint_all=False, quantize=quant.FLOAT):
    """This rank's slice of the model, read straight from the safetensors files (bf16 on GPUs);
    blocks the plan recomputes are marked for activation checkpointing. quantize (bits, group size):
    the block linears int8 / int4, quantized block by block as they are read (a quantized
    checkpoint loads as it is)."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    model = quant.from_pretrained(model_dir, dtype, d.device, *quantize, **stage.model_kwargs())
    model.checkpoint_activations = frozenset(stage.layers if checkpoint_all else stage.checkpoint_layers)
    return model


def stage_dtype(model):
    """The dtype this stage computes in (its first block's LayerNorm): bf16 on GPUs, fp32 on CPUs."""
    return next(iter(model.transformer.layers.values())).input_layernorm.weight.dtype


def first_trainable_stage(model, d):
    """Lowest stage index of this replica that holds a trainable parameter (P if none does)."""
    mine = d.pp_rank if any(p.requires_grad for p in model.parameters()) else d.P
    t = torch.tensor(float(-mine), device=d.device)
    return int(-all_reduce(t, "max", d.pp_group).item())


# -----------------------------------------------------------------------------
# pipelined generation
#
# The batch is cut into n >= P micro-batches that circulate: stage 0 embeds micro-batch m's
# newest tokens, each stage runs its blocks over its own KV cache of m, the last stage samples
# and sends the tokens back to stage 0. While m travels, stage 0 already works on m+1, ...;
# with n >= P every stage has work at every moment after the first lap (P = 3, n = 3):
#
#   stage 0 | m0 m1 m2 m0 m1 m2 m0 ...      (step k of m0, m1, m2, then step k+1 ...)
#   stage 1 |    m0 m1 m2 m0 m1 m2 ...
#   stage 2 |       m0 m1 m2 m0 m1 m2 ...   (samples, sends m's tokens to stage 0)
#
# Sends never block (isend; buffers live until the end), only receives wait, so the ring cannot
# deadlock. Every micro-batch runs all max_new_tokens steps (rows past <eop> emit padding).


def generate(model, d, input_ids, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
             top_k=0, generator=None, micro_batches=None, cuda_graph=None, group_size=1):
    """KV-cached sampling through the pipeline; every stage of the replica gets the result:
    ids [B*n, T + N'] (pad after <eop>) and the sampled tokens' log-probabilities [B*n, N'], with
    n = group_size completions of each prompt (rows i*n .. i*n + n-1), each prompt computed once
    and sent between stages once."""
    sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
    if d.P == 1:
        return model.generate(input_ids, max_new_tokens=max_new_tokens, return_logprobs=True,
                              cuda_graph=cuda_graph, group_size=group_size, **sampling)
    model.check_ids(input_ids, max_new_tokens)
    cfg, (B, T), N, n = model.config, input_ids.shape, max_new_tokens, group_size
    use_graph = d.device.type == "cuda" if cuda_graph is None else cuda_graph
    chunks = input_ids.tensor_split(min(B, max(micro_batches or d.P, d.P)))
    starts = [0] + torch.tensor([c.shape[0] * n for c in chunks]).cumsum(0).tolist()
    rows = [slice(a, b) for a, b in zip(starts, starts[1:])]  # a chunk's completions
    layouts = [glm.derive_layout(c, cfg) for c in chunks]
    decoders = [glm.Decoder(model, c.shape[0] * n, T + N, use_graph) for c in chunks]
    out = torch.full((B * n, N), cfg.pad_token_id, dtype=torch.long, device=d.device)
    logprobs = torch.zeros(B * n, N, device=d.device)
    done = torch.zeros(B * n, dtype=torch.bool, device=d.device)
    ring = _Ring(d, stage_dtype(model), cfg.hidden_size)
    with torch.no_grad():
        for k in range(N):  # k = 0: the prompt; k > 0: the token sampled at step k - 1
            for m, c in enumerate(chunks):
                x = ring.receive(c, k, T, n)
                if k == 0:
                    y = decoders[m].prefill(x, layouts[m], n)
                    layouts[m] = glm.repeat_rows(layouts[m], n)
                else:
                    y = decoders[m].step(x, glm.new_token_positions(layouts[m], T + k - 1), T + k - 1)
                if not d.last:
                    ring.send(y, d.pp_rank + 1)
                    continue
                r = rows[m]
                tok = glm.next_token(y, done[r], cfg, out[r, k], logprobs[r, k], **sampling)
                if k < N - 1:
                    ring.send(tok, 0)
    ring.finish()
    broadcast_from_last_stage(out, d)
    broadcast_from_last_stage(logprobs, d)
    out, logprobs = glm.trim_finished(out, logprobs, cfg.eos_token_id)
    return torch.cat([input_ids.repeat_interleave(n, 0), out], dim=1), logprobs


def greedy_answers(model, d, tok, prompts, max_new_tokens, batch_size=128):
    """Decoded greedy answers (special tokens skipped) to encoded prompts (id lists), through the
    pipeline, batch_size prompts at a time; every stage gets them."""
    was_training, texts = model.training, []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        ids = glm.left_pad(prompts[i:i + batch_size], tok.pad_id).to(d.device)
        out, _ = generate(model, d, ids, max_new_tokens)
        texts += [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    model.train(was_training)
    return texts


class _Ring:
    """The transfers of pipelined generation: hidden states [b, t, C] in the stages' compute
    dtype from stage to stage, sampled tokens [b] from the last stage back to the first."""

    def __init__(self, d, dtype, C):
        self.d, self.dtype, self.C, self.pending = d, dtype, C, []

    def receive(self, chunk, k, T, n=1):
        """Stage 0: the prompt chunk [b, T] at k = 0, then its newest tokens [b*n]; later stages:
        the previous stage's hidden states, [b, T, C] of the prompts, then [b*n, 1, C]."""
        d, b = self.d, chunk.shape[0] * (n if k else 1)
        if d.first and k == 0:
            return chunk
        if d.first:
            buf, src = torch.empty(b, dtype=torch.long, device=d.device), d.P - 1
        else:
            buf, src = torch.empty(b, T if k == 0 else 1, self.C, dtype=self.dtype, device=d.device), d.pp_rank - 1
        with d.idle.waiting(d.device):
            tdist.recv(buf, src=d.stage_rank(src))
        return buf

    def send(self, t, stage):
        t = t.contiguous()  # kept alive until finish(): isend reads it asynchronously
        self.pending.append((tdist.isend(t, dst=self.d.stage_rank(stage)), t))

    def finish(self):
        for req, _ in self.pending:
            req.wait()


# -----------------------------------------------------------------------------
# what the planner predicted, against what each rank measured


def start_clock():
    """Start of the span report_memory_and_busy covers: forget earlier waits, return the time."""
    get().idle.seconds(reset=True)
    return time.perf_counter()


def report_memory_and_busy(plan_stage, d, wall_s):
    """Each rank's measured peak memory and busy share beside the planner's prediction (rank 0 prints)."""
    peak = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else float("nan")  # n/a on CPUs
    row = torch.tensor([d.rank, d.pp_rank, peak, plan_stage.mem_total if plan_stage else float("nan"),
                        1 - d.idle.seconds() / max(wall_s, 1e-9)], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(d.world)] if d.world > 1 else [row]
    if d.world > 1:
        tdist.all_gather_object(rows, row)
    gib = lambda x: f"{x / GiB:.2f}" if math.isfinite(x) else "n/a"
    print0("rank stage  measured peak GiB  predicted GiB  busy")
    for r in rows:
        print0(f"{int(r[0]):4d} {int(r[1]):5d}  {gib(r[2]):>17}  {gib(r[3]):>13}  {r[4]:5.1%}")
    return [[x if math.isfinite(x) else None for x in r.tolist()] for r in rows]  # None: not measured
