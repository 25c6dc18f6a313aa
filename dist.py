"""Distribution: processes (P pipeline stages x D data-parallel replicas), the partition
planner, point-to-point transfers, the 1F1B schedule, and the checkpoint/log plumbing that the
three training scripts share.

    python train_sft.py ...                                  # P = D = 1: the same code, one process
    torchrun --nproc_per_node=8 train_sft.py --pp 8 ...      # 8 stages
    torchrun --nproc_per_node=8 train_sft.py --pp 4 ...      # 4 stages x 2 replicas
"""
import collections
import contextlib
import datetime
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

import glm
# ---- partition planner ----------------------------------------------------------------------
#
# The model is a list of pieces [embedding, block 0 .. block L-1, final LN + lm_head]; a plan
# cuts it into P contiguous stages, each holding at least one block (so the embedding always
# rides with stage 0 and the head with stage P-1). Everything here is arithmetic on a cost
# model, no process groups and no tensors, so it runs (and is tested) anywhere.
#
# Memory of stage s, in bytes:
#   params  = held parameters * param_bytes (frozen ones too)
#   grads   = trainable parameters * grad_bytes   (fp32 accumulators by default: M micro-batches
#             are summed into them, and bf16 sums lose the small late terms)
#   optim   = trainable parameters * optim_bytes  (AdamW: two fp32 moments = 8, plus an fp32
#             master copy = 12 when the parameters themselves are bf16), counted on the stage
#             that keeps them, which need not be the parameters' own (see _level)
#   act     = in_flight * activations kept per micro-batch, where 1F1B keeps
#             in_flight = min(P - s, M) micro-batches alive on stage s (its warm-up depth);
#             a recomputed (checkpointed) block keeps only its input, and while one is being
#             recomputed in backward its full activations exist once more (a transient)
#   logits  = the last stage's loss buffers, for one micro-batch only: the last stage runs a
#             micro-batch's backward right after its forward
# Time of stage s per optimiser step = M * (forward + backward + recompute FLOPs) / throughput.
#
# Objective, in order (each step is an exact dynamic programme over the cuts):
#   1. the smallest achievable peak memory, M* = min over plans of max_s mem_s;
#   2. among plans with every mem_s <= bound, the smallest slowest-stage time T* (a 1F1B step
#      is M + P - 1 slots of the slowest stage), where
#          bound = M* * (1 + mem_slack)                                  with no budget,
#          bound = min(budget, max(M* * (1 + mem_slack), mem_target * budget))  with one;
#   3. among those with max time <= T*, the smallest peak memory again (a Pareto tie-break);
#   4. among those, the most even stages: least sum over s of (time_s/T*)^2 + (mem_s/peak)^2,
#      so ties never leave a stage nearly idle (identical blocks split into counts that differ
#      by at most one) and a spare block goes where it costs the least memory.
# Memory comes first because it decides whether a run fits and how large a micro-batch can be;
# mem_slack (5 %) lets a plan give up a little memory balance for speed. But memory is only
# worth time while it is scarce: below mem_target (85 %) of the budget every peak counts as
# good, and time decides. (Without that rule a LoRA run using 6 of 80 GiB would be planned
# slower than equal layer counts, to even out memory nobody needs; 15 % stays free for what the
# model leaves out: allocator fragmentation, NCCL buffers, transient workspaces.)
# With bf16 weights the 12 bytes of master and moments can live on another stage (AdamW below),
# which decouples memory from the cut: passes 2-4 then only require what cannot move to meet
# the bound, so time alone decides the cut, and _level moves the states of half-blocks, the
# embedding or the head from the fullest stage to the emptiest until no move helps. (If that
# plan does not fit, the cut is made for memory as above and levelled after.) This is what
# evens out the first stage, whose 9 GiB embedding has no compute to balance against and which
# keeps the most micro-batches in flight.
# Activation checkpointing (where allowed) is not a free choice of the search: pass 1 prices
# every stage fully recomputed (the least memory reachable); passes 2-3 let each stage recompute
# the fewest blocks that bring it under the bound, since more would trade time for memory
# nobody needs. With no budget nothing is recomputed. A naive plan recomputes the fewest blocks
# that fit the budget.

GiB = 1 << 30


class PlanError(ValueError):
    """A pipeline plan that cannot exist or will not fit; the message says what to change.
    `peak` is the smallest predicted peak bytes found (inf when no plan exists)."""

    def __init__(self, msg, peak=math.inf):
        super().__init__(msg)
        self.peak = peak


@dataclass(frozen=True)
class PieceCost:
    """One contiguous piece of the model: what it holds and costs per micro-batch."""
    name: str
    layer: int | None          # global block index; None for the embedding / head (not a block)
    params: int                # parameters held
    trainable: int = 0         # of which trainable (they get gradients and optimiser state)
    fwd_flops: float = 0.0     # per micro-batch
    bwd_flops: float = 0.0     # per micro-batch (0 for a piece outside the autograd graph)
    act_bytes: float = 0.0     # kept for backward, per micro-batch in flight
    ckpt_bytes: float = 0.0    # kept instead when the block is recomputed (its input)
    once_bytes: float = 0.0    # held once per stage, e.g. one micro-batch's logits and their gradient
    parts: tuple = ()          # ((part, trainable), ...): units whose optimiser state may move on its
                               # own, named "piece/part"; () = the whole piece is one unit

    def units(self):
        """{unit name: trainable parameters} of this piece's optimiser state."""
        if not self.parts:
            return {self.name: self.trainable} if self.trainable else {}
        return {f"{self.name}/{part}": t for part, t in self.parts if t}


@dataclass(frozen=True)
class CostModel:
    """Per-parameter byte rates, the schedule and the hardware the plan is priced for."""
    micro_batches: int = 1          # M per optimiser step
    param_bytes: int = 2            # bf16
    grad_bytes: int = 4             # fp32 gradient accumulators
    optim_bytes: int = 12           # AdamW: fp32 master + 2 fp32 moments (8 without a master copy)
    mem_budget: float | None = None  # bytes one GPU may allocate; None = unlimited
    checkpoint: bool = False        # may blocks be recomputed to fit the budget?
    flops_per_s: float = 400e12     # sustained bf16 rate assumed per GPU (H100: ~50 % of 790 peak)
    trained_copies: int = 1         # models of this shape that train (PPO full mode: actor, critic)
    frozen_copies: int = 0          # and frozen ones beside them (PPO full mode: reference, reward)
    level_optim: bool = False       # may a piece's master and moments live on another stage?


@dataclass
class Stage:
    index: int
    layers: range                   # global block ids held
    first: bool                     # holds the embedding (stage 0)
    last: bool                      # holds final LN + lm_head (stage P-1)
    pieces: tuple                   # piece names, in order
    checkpoint_layers: tuple        # global ids of the blocks recomputed in backward
    in_flight: int                  # micro-batches whose activations 1F1B keeps here
    mem: dict                       # bytes: params, grads, optim, act, logits (optim: kept here)
    mem_total: float                # predicted peak bytes
    flops: float                    # per optimiser step, recomputation included
    time: float                     # predicted busy seconds per optimiser step

    @property
    def checkpoint_blocks(self):
        return len(self.checkpoint_layers)

    def model_kwargs(self):
        """Arguments that build this stage: glm.ChatGLM(cfg, **stage.model_kwargs())."""
        return dict(layer_ids=self.layers, first=self.first, last=self.last)


@dataclass
class Plan:
    stages: list
    method: str                     # "auto" or "naive"
    model: CostModel
    title: str = ""
    hosts: dict = field(default_factory=dict)  # {unit: stage keeping its optimiser state} if not its own

    P = property(lambda self: len(self.stages))
    layer_counts = property(lambda self: [len(st.layers) for st in self.stages])
    max_mem = property(lambda self: max(st.mem_total for st in self.stages))
    min_mem = property(lambda self: min(st.mem_total for st in self.stages))
    max_time = property(lambda self: max(st.time for st in self.stages))
    mean_time = property(lambda self: sum(st.time for st in self.stages) / len(self.stages))
    mem_imbalance = property(lambda self: self.max_mem / self.min_mem)
    time_imbalance = property(lambda self: self.max_time / self.mean_time)

    @property
    def fits(self):
        return self.model.mem_budget is None or self.max_mem <= self.model.mem_budget

    @property
    def step_time(self):
        """1F1B step: M + P - 1 slots of the slowest stage's per-micro-batch time (the bubble)."""
        M = self.model.micro_batches
        return self.max_time / M * (M + self.P - 1)

    def format_table(self):
        m = self.model
        budget = "none" if m.mem_budget is None else f"{m.mem_budget / GiB:.1f} GiB"
        lines = [f"{self.method} plan: {self.P} stages, M={m.micro_batches} micro-batches, "
                 f"budget {budget}, {m.flops_per_s / 1e12:.0f} TFLOP/s assumed"
                 + (f" ({self.title})" if self.title else ""),
                 f"{'stage':>5} {'layers':>11} {'holds':>10} {'ckpt':>5} {'params':>7} {'grads':>7} "
                 f"{'optim':>7} {'act':>7} {'logits':>7} {'total':>7} {'time ms':>9} {'share':>6}"]
        total_time = sum(st.time for st in self.stages)
        for st in self.stages:
            span = f"{st.layers.start}-{st.layers.stop - 1} ({len(st.layers)})"
            holds = "+".join(n for n, on in (("embed", st.first), ("head", st.last)) if on)
            g = {k: f"{v / GiB:7.2f}" for k, v in st.mem.items()}
            lines.append(f"{st.index:>5} {span:>11} {holds:>10} {st.checkpoint_blocks:>5} {g['params']} "
                         f"{g['grads']} {g['optim']} {g['act']} {g['logits']} {st.mem_total / GiB:7.2f} "
                         f"{st.time * 1e3:9.1f} {st.time / total_time:6.1%}")
        lines.append(f"memory GiB: sum {sum(st.mem_total for st in self.stages) / GiB:.2f}, "
                     f"max {self.max_mem / GiB:.2f}, min {self.min_mem / GiB:.2f}, "
                     f"max/min {self.mem_imbalance:.3f}{'' if self.fits else '  DOES NOT FIT'}")
        for unit, host in self.hosts.items():
            home = next(st.index for st in self.stages if unit.split("/")[0] in st.pieces)
            lines.append(f"optimiser state of {unit} (stage {home}) kept on stage {host}")
        lines.append(f"time: max/mean {self.time_imbalance:.3f}; predicted step "
                     f"{self.step_time * 1e3:.1f} ms (slowest stage x (M + P - 1) / M: the 1F1B bubble)")
        return "\n".join(lines)


class _Spans:
    """Sums over piece ranges [i, j) and each range's recompute options, cached by (i, j)."""

    def __init__(self, pieces, model):
        self.pieces, self.model = pieces, model
        self.blocks = [0]  # prefix count of blocks
        for p in pieces:
            self.blocks.append(self.blocks[-1] + (p.layer is not None))
        self.cache = {}

    def nblocks(self, i, j):
        return self.blocks[j] - self.blocks[i]

    def movable(self, i, j):
        """Bytes of optimiser state (master + moments) pieces [i, j) could keep on other stages."""
        m = self.model
        if not m.level_optim:
            return 0.0
        return sum(p.trainable for p in self.pieces[i:j]) * m.optim_bytes * m.trained_copies

    def span(self, i, j):
        if (i, j) not in self.cache:
            ps, m = self.pieces[i:j], self.model
            static = sum(p.params * m.param_bytes * (m.trained_copies + m.frozen_copies)
                         + p.trainable * (m.grad_bytes + m.optim_bytes) * m.trained_copies
                         + p.once_bytes for p in ps)
            # recompute the blocks that free the most bytes first (ties: earliest block)
            cands = sorted((p for p in ps if p.layer is not None and p.act_bytes > p.ckpt_bytes),
                           key=lambda p: p.ckpt_bytes - p.act_bytes)
            saved, extra = [0.0], [0.0]  # prefix sums over cands: bytes freed, flops added
            for p in cands:
                saved.append(saved[-1] + p.act_bytes - p.ckpt_bytes)
                extra.append(extra[-1] + p.fwd_flops)
            flops = sum(p.fwd_flops + p.bwd_flops for p in ps)
            self.cache[i, j] = (static, sum(p.act_bytes for p in ps), cands, saved, extra, flops)
        return self.cache[i, j]

    def cost(self, s, P, i, j, limit=None):
        """(peak bytes, seconds per step, blocks recomputed) of stage s holding pieces [i, j),
        recomputing the fewest blocks that bring it to `limit` bytes (all if none suffice;
        none when limit is None or checkpointing is off)."""
        static, act, cands, saved, extra, flops = self.span(i, j)
        m = self.model
        k = min(P - s, m.micro_batches)
        transient = cands[0].act_bytes - cands[0].ckpt_bytes if cands else 0.0

        def mem(c):
            return static + k * (act - saved[c]) + (transient if c else 0.0)

        c = 0
        if m.checkpoint and limit is not None and mem(0) > limit:
            # memory does not grow with c (k >= 1 micro-batches repay the one transient)
            c = next((c for c in range(1, len(cands) + 1) if mem(c) <= limit), len(cands))
        return mem(c), m.micro_batches * (flops + extra[c]) / m.flops_per_s, c


def _search(spans, P, value, combine=max):
    """Cuts minimising combine over stages of value(s, i, j) (max: the slowest / fullest stage;
    add: a sum) over P contiguous stages of >= 1 block each; returns (best, [piece index where
    each stage ends]). Exact: best[s][j] = min over i of combine(best[s-1][i], value(s, i, j))."""
    n, L = len(spans.pieces), spans.blocks[-1]
    best = [[math.inf] * (n + 1) for _ in range(P)]
    arg = [[None] * (n + 1) for _ in range(P)]
    for s in range(P):
        for j in range(1, n + 1):
            if s == P - 1 and j != n:
                continue
            # stages 0..s need s+1 blocks before j; the rest need P-1-s blocks after it
            if spans.blocks[j] < s + 1 or L - spans.blocks[j] < P - 1 - s:
                continue
            for i in range(0, j) if s else (0,):
                if spans.nblocks(i, j) < 1 or (s and best[s - 1][i] == math.inf):
                    continue
                v = value(s, i, j)
                v = combine(best[s - 1][i], v) if s else v
                if v < best[s][j]:
                    best[s][j], arg[s][j] = v, i
    if best[P - 1][n] == math.inf:
        return math.inf, None
    ends, j = [], n
    for s in range(P - 1, -1, -1):
        ends.append(j)
        j = arg[s][j]
    return best[P - 1][n], ends[::-1]


def _check_P(pieces, P):
    L = sum(p.layer is not None for p in pieces)
    if P < 1:
        raise PlanError(f"{P} pipeline stages: need at least 1. HINT: pass --pp 1 or more.")
    if P > L:
        raise PlanError(f"cannot cut {L} blocks into {P} pipeline stages: every stage needs at "
                        f"least one block. HINT: use --pp {L} or fewer.")


def _build(pieces, P, model, ends, limit, method, title=""):
    spans, stages, i = _Spans(pieces, model), [], 0
    for s, j in enumerate(ends):
        mem_total, time, c = spans.cost(s, P, i, j, limit)
        ps, m = pieces[i:j], model
        blocks = [p.layer for p in ps if p.layer is not None]
        trainable = sum(p.trainable for p in ps)
        copies = m.trained_copies + m.frozen_copies
        mem = dict(params=sum(p.params for p in ps) * m.param_bytes * copies,
                   grads=trainable * m.grad_bytes * m.trained_copies,
                   optim=trainable * m.optim_bytes * m.trained_copies, act=0.0, logits=sum(p.once_bytes for p in ps))
        mem["act"] = mem_total - sum(mem.values())
        stages.append(Stage(index=s, layers=range(blocks[0], blocks[-1] + 1), first=s == 0,
                            last=s == P - 1, pieces=tuple(p.name for p in ps),
                            checkpoint_layers=tuple(sorted(p.layer for p in spans.span(i, j)[2][:c])),
                            in_flight=min(P - s, m.micro_batches), mem=mem, mem_total=mem_total,
                            flops=time * m.flops_per_s, time=time))
        i = j
    return Plan(stages, method, model, title)


def partition(pieces, P, model, mem_slack=0.05, mem_target=0.85, title=""):
    """The balanced plan over generic pieces (objective at the top of this section). A plan that
    cannot fit the budget is still returned, with plan.fits False, at its smallest peak."""
    _check_P(pieces, P)
    spans = _Spans(pieces, model)
    budget = model.mem_budget
    recompute = model.checkpoint and budget is not None  # with no budget there is nothing to fit
    # pass 1: the least peak memory any plan reaches, recomputing every block if allowed
    least = -math.inf if recompute else None
    best_mem, ends = _search(spans, P, lambda s, i, j: spans.cost(s, P, i, j, least)[0])
    if budget is not None and best_mem > budget:  # nothing fits: the least-memory plan, levelled
        return _level(_build(pieces, P, model, ends, least, "auto", title), pieces)
    bound = best_mem * (1 + mem_slack)
    if budget is not None:
        bound = min(budget, max(bound, mem_target * budget))
    bound *= 1 + 1e-12  # the pass-1 plan itself must pass
    limit = bound if recompute else None  # each stage recomputes the fewest blocks to meet it
    if model.level_optim:
        # optimiser states can leave a stage, so only what stays must meet the bound: time decides
        # the cut and _level evens out memory after it; if that does not fit, cut for memory
        plan = _level(_build(pieces, P, model, _fastest(spans, P, bound, None, movable=True), None, "auto",
                             title), pieces)
        if plan.fits:
            return plan
    return _level(_build(pieces, P, model, _fastest(spans, P, bound, limit), limit, "auto", title), pieces)


def _fastest(spans, P, bound, limit, movable=False):
    """Passes 2-4 of the objective: the cut whose slowest stage is fastest with every stage's
    memory within bound (less its movable optimiser state if `movable`), then the least memory at
    that speed, then the most even stages."""
    def cost(s, i, j):
        mem, time, _ = spans.cost(s, P, i, j, limit)
        return mem - (spans.movable(i, j) if movable else 0.0), time

    def time_within(s, i, j):  # pass 2: the fastest slowest stage within the memory bound
        mem, time = cost(s, i, j)
        return time if mem <= bound else math.inf

    best_time, _ = _search(spans, P, time_within)
    tbound = best_time * (1 + 1e-9)

    def mem_within(s, i, j):  # pass 3: the least memory at that speed
        mem, time = cost(s, i, j)
        return mem if mem <= bound and time <= tbound else math.inf

    peak, _ = _search(spans, P, mem_within)
    mbound = peak * (1 + 1e-9)

    def even_within(s, i, j):  # pass 4: the most even stages among those (least sum of squares)
        mem, time = cost(s, i, j)
        if mem > mbound or time > tbound:
            return math.inf
        return (time / (best_time or 1.0)) ** 2 + (mem / (peak or 1.0)) ** 2

    return _search(spans, P, even_within, combine=lambda a, b: a + b)[1]


def _level(plan, pieces):
    """Even out memory after the cut: move the optimiser state (fp32 master + moments) of whole
    units (a block's attention or MLP half, the embedding, the head) from the fullest stage to
    the emptiest, each move the unit nearest half their gap, while one of 1/32 to 1 times the gap
    exists (so every move lowers the sum of squared stage memories and the loop ends). Records
    plan.hosts and the stages' new optim/total bytes."""
    if not plan.model.level_optim:
        return plan
    m = plan.model
    stage_of = {name: st.index for st in plan.stages for name in st.pieces}
    size, home = {}, {}
    for p in pieces:
        for unit, t in p.units().items():
            size[unit], home[unit] = t * m.optim_bytes * m.trained_copies, stage_of[p.name]
    where, load = dict(home), [st.mem_total for st in plan.stages]
    for _ in range(4 * len(size)):
        f = max(range(plan.P), key=load.__getitem__)
        e = min(range(plan.P), key=load.__getitem__)
        gap = load[f] - load[e]
        # a unit under 1/32 of the gap barely helps and costs a transfer every step (LoRA's
        # adapters: activations make that gap, and megabytes of state cannot close it)
        movable = [n for n, s in where.items() if s == f and gap / 32 <= size[n] < gap]
        if not movable:
            break
        n = min(movable, key=lambda n: abs(gap / 2 - size[n]))
        where[n], load[f], load[e] = e, load[f] - size[n], load[e] + size[n]
    plan.hosts = {n: s for n, s in where.items() if s != home[n]}
    for st in plan.stages:
        st.mem["optim"] += load[st.index] - st.mem_total
        st.mem_total = load[st.index]
    return plan


def equal_partition(pieces, P, model, title=""):
    """The naive plan: equal block counts (the first L % P stages take one more), the embedding
    with the first stage and the head with the last, priced by the same model."""
    _check_P(pieces, P)
    L = sum(p.layer is not None for p in pieces)
    counts = [L // P + (s < L % P) for s in range(P)]
    return _build(pieces, P, model, _ends_from_counts(pieces, counts), model.mem_budget, "naive", title)


def _ends_from_counts(pieces, counts):
    """Piece index where each stage ends, given each stage's block count; leading non-blocks go
    with the first stage, trailing ones with the last."""
    ends, seen, want = [], 0, 0
    for cnt in counts[:-1]:
        want += cnt
        j = ends[-1] if ends else 0
        while seen < want:
            seen += pieces[j].layer is not None
            j += 1
        ends.append(j)
    return ends + [len(pieces)]


def plan_from_counts(pieces, counts, model, method="given", title=""):
    """Price a plan with the given block count per stage (for comparisons and tests)."""
    _check_P(pieces, len(counts))
    if min(counts) < 1 or sum(counts) != sum(p.layer is not None for p in pieces):
        raise PlanError(f"block counts {counts} must be >= 1 each and sum to the number of blocks")
    return _build(pieces, len(counts), model, _ends_from_counts(pieces, counts), model.mem_budget,
                  method, title)


# LoRA targets and their (in, out) features, by the module names glm.py uses
def _lora_shapes(cfg):
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    return {"query_key_value": (h, 3 * h), "dense": (h, h),
            "dense_h_to_4h": (h, f), "dense_4h_to_h": (f, h)}


def glm_pieces(cfg, micro_batch_size, seq_len, train="full", lora_rank=8,
               lora_targets=("query_key_value",), train_layers=0, train_head=False,
               param_bytes=2, loss_chunk=None, lm_head=True):
    """ChatGLM's pieces [embedding, blocks, final LN + lm_head] priced for one micro-batch.

    train: "full" (everything), "lora" (adapters of rank lora_rank on lora_targets in every
    block, base frozen) or "last_n" (the last train_layers blocks; the final LN and lm_head too
    if train_head). lm_head=False: the run never computes logits (a reward model reads hidden
    states), so lm_head is held frozen and costs no FLOPs, gradients or logit buffers. FLOP and
    activation formulas are in the comments below."""
    h, f, V, L = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size, cfg.num_layers
    T = micro_batch_size * seq_len  # tokens per micro-batch
    if train not in ("full", "lora", "last_n"):
        raise ValueError(f"train={train!r}: expected 'full', 'lora' or 'last_n'")
    if train == "last_n" and not (0 <= train_layers <= L and (train_layers or train_head)):
        raise ValueError(f"--train_layers {train_layers}: expected 1..{L} (or 0 with the head trained)")
    shapes = _lora_shapes(cfg)
    for t in lora_targets if train == "lora" else ():
        if t not in shapes:
            raise ValueError(f"LoRA target {t!r} is not a block linear; choose from {sorted(shapes)}")
    lora = sum(lora_rank * (shapes[t][0] + shapes[t][1]) for t in lora_targets) if train == "lora" else 0
    lora_attn = sum(lora_rank * (shapes[t][0] + shapes[t][1]) for t in lora_targets
                    if t in ("query_key_value", "dense")) if train == "lora" else 0

    # block: QKV 3h*h+3h, dense h*h+h, h->4h f*h+f, 4h->h h*f+h, two LayerNorms 4h
    block = 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h + 4 * h
    attn = 3 * h * h + 3 * h + h * h + h + 2 * h  # QKV, dense, input LayerNorm
    scale = param_bytes / 2  # activations are stored in the parameter dtype
    # activations a block keeps, in bytes per token per hidden unit at bf16 (Korthikanti et al.
    # 2022, attention without the s^2 score term as in flash / memory-efficient kernels):
    # attention 11 (QKV input 2, q k 4, v 2, dense input 2, dropout mask 1), MLP 3 + 4f/h
    # (h->4h input 2, GELU input 2f/h, 4h->h input 2f/h, dropout mask 1), LayerNorm inputs 4:
    # (18 + 4f/h) T h = 34 T h at f = 4h. ChatGLM fine-tunes without dropout, so the two mask
    # bytes are headroom. A recomputed block keeps only its input: 2 T h.
    act, ckpt = (18 + 4 * f / h) * T * h * scale, 2 * T * h * scale
    # the loss keeps one micro-batch's logits in fp32 plus their gradient (8 bytes a logit);
    # a chunked loss keeps only loss_chunk tokens' worth at a time
    logits = min(T, loss_chunk or T) * V * 8

    emb_train = V * h if train == "full" else 0
    graph = emb_train > 0  # does something at or before this piece train (so autograd records it)?
    pieces = [PieceCost("embedding", None, V * h, emb_train)]  # a lookup: ~0 FLOPs, keeps ids only
    for i in range(L):
        trains = {"full": block, "lora": lora, "last_n": block if i >= L - train_layers else 0}[train]
        graph = graph or trains > 0
        n = block + lora
        # forward: 2 FLOPs per weight per token + attention scores and context 4*s*h per token;
        # backward: input gradients cost the forward again (attention's twice), weight gradients
        # 2 per trainable weight per token. Full training 3x forward, frozen base + LoRA ~2x.
        fwd = 2 * n * T + 4 * seq_len * h * T
        bwd = (2 * n * T + 8 * seq_len * h * T + 2 * trains * T) if graph else 0.0
        # the block's optimiser state in two units: input LN + attention, post LN + MLP
        att = {"full": attn, "lora": lora_attn, "last_n": attn if trains else 0}[train]
        pieces.append(PieceCost(f"layer {i}", i, n, trains, fwd, bwd, act if graph else 0.0,
                                ckpt if graph else 0.0, parts=(("attention", att), ("mlp", trains - att))))
    lm = V * h if lm_head else 0  # lm_head weights that compute (and train with the head)
    head_train = (2 * h + lm) if train == "full" or (train == "last_n" and train_head) else 0
    graph = graph or head_train > 0
    # head: final LN (2h) and lm_head (V*h); keeps the LN input and output (4 T h bytes)
    pieces.append(PieceCost("head", None, 2 * h + V * h, head_train, 2 * lm * T,
                            (2 * lm * T + 2 * head_train * T) if graph else 0.0,
                            2 * T * h * param_bytes if graph else 0.0, 0.0, logits if graph and lm else 0.0))
    return pieces


def plan_pipeline(cfg, P, micro_batch_size, seq_len, micro_batches, train="full", lora_rank=8,
                  lora_targets=("query_key_value",), train_layers=0, train_head=False,
                  param_bytes=2, grad_bytes=4, optim_bytes=None, checkpoint=False, mem_budget=None,
                  flops_per_s=400e12, loss_chunk=None, method="auto", mem_slack=0.05,
                  mem_target=0.85, hints=True, copies=(1, 0), level_optim=True, lm_head=True):
    """Plan ChatGLM over P pipeline stages; raises PlanError (saying what to change) if it will
    not fit mem_budget bytes per GPU. method "naive" gives equal layer counts instead.
    level_optim: let the balanced plan keep pieces' optimiser states on other stages (only for
    bf16 weights with fp32 masters, where the master is a separate tensor that can move)."""
    for name, v in (("micro_batch_size", micro_batch_size), ("seq_len", seq_len),
                    ("micro_batches", micro_batches)):
        if v < 1:
            raise PlanError(f"{name}={v}: must be at least 1")
    if method not in ("auto", "naive"):
        raise PlanError(f"--plan {method!r}: expected 'auto' or 'naive'")
    if optim_bytes is None:  # AdamW's two fp32 moments, plus an fp32 master copy of bf16/fp16 weights
        optim_bytes = 8 + (4 if param_bytes < 4 else 0)
    args = dict(train=train, lora_rank=lora_rank, lora_targets=lora_targets, train_layers=train_layers,
                train_head=train_head, param_bytes=param_bytes, loss_chunk=loss_chunk, lm_head=lm_head)
    pieces = glm_pieces(cfg, micro_batch_size, seq_len, **args)
    model = CostModel(micro_batches, param_bytes, grad_bytes, optim_bytes, mem_budget, checkpoint,
                      flops_per_s, *copies, level_optim=level_optim and param_bytes < 4)
    title = (f"{train}" + (f" r={lora_rank}" if train == "lora" else "")
             + (f" last {train_layers}" if train == "last_n" else "")
             + f", b={micro_batch_size}, s={seq_len}")
    plan = (partition(pieces, P, model, mem_slack, mem_target, title) if method == "auto"
            else equal_partition(pieces, P, model, title))
    if plan.fits:
        return plan

    # ---- it does not fit: say by how much, and which single change would make it fit
    worst = max(plan.stages, key=lambda st: st.mem_total)
    msg = (f"the {method} plan does not fit: its peak is {plan.max_mem / GiB:.1f} GiB on stage "
           f"{worst.index} (of 0..{P - 1}) against a budget of {mem_budget / GiB:.1f} GiB per GPU")
    if not hints:
        raise PlanError(msg, plan.max_mem)
    kw = dict(cfg=cfg, P=P, micro_batch_size=micro_batch_size, seq_len=seq_len,
              micro_batches=micro_batches, grad_bytes=grad_bytes, optim_bytes=optim_bytes,
              checkpoint=checkpoint, mem_budget=mem_budget, flops_per_s=flops_per_s,
              method=method, mem_slack=mem_slack, mem_target=mem_target, hints=False, copies=copies,
              level_optim=level_optim, **args)

    def attempt(**change):
        """(fits, peak bytes) of the same request with one thing changed."""
        try:
            return True, plan_pipeline(**{**kw, **change}).max_mem
        except PlanError as e:
            return False, e.peak

    def tip(what, ok, p):
        return f"{what}: " + ("fits" if ok else "still too big") + f" (peak {p / GiB:.1f} GiB)"

    tips, L = [], cfg.num_layers
    if method == "naive":
        tips.append(tip("the balanced plan (--plan auto)", *attempt(method="auto")))
    if not checkpoint:
        tips.append(tip("activation checkpointing (--checkpoint)", *attempt(checkpoint=True)))
    for P2 in range(P + 1, L + 1):  # the fewest stages that fit
        ok, p = attempt(P=P2)
        if ok or P2 == L:
            tips.append(tip(f"more pipeline stages (--pp {P2})", ok, p))
            break
    b2 = micro_batch_size // 2
    while b2 >= 1:  # the largest micro-batch that fits
        ok, p = attempt(micro_batch_size=b2)
        if ok or b2 == 1:
            tips.append(tip(f"a smaller micro-batch (--micro_batch_size {b2})", ok, p))
            break
        b2 //= 2
    if train != "lora":
        tips.append(tip(f"LoRA on a frozen base (--lora_rank {lora_rank})", *attempt(train="lora")))
    if train == "full":
        for n in range(L - 1, 0, -1):  # the most trained blocks that fit
            ok, p = attempt(train="last_n", train_layers=n)
            if ok or n == 1:
                tips.append(tip(f"training only the last blocks (--train_layers {n})", ok, p))
                break
    raise PlanError(msg + ". HINT: change one of: " + "; ".join(tips) + ".", plan.max_mem)


def naive_plan(cfg, P, micro_batch_size, seq_len, micro_batches, **kw):
    """Equal layer counts per stage, priced and reported like the balanced plan (--plan naive)."""
    return plan_pipeline(cfg, P, micro_batch_size, seq_len, micro_batches, method="naive", **kw)

# ---- end of partition planner ----------------------------------------------------------------


# -----------------------------------------------------------------------------
# processes: P pipeline stages x D data-parallel replicas

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

    @property
    def first(self):
        return self.pp_rank == 0

    @property
    def last(self):
        return self.pp_rank == self.P - 1

    def stage_rank(self, s):
        """Global rank of stage s of this replica."""
        return self.dp_rank * self.P + s


_DIST = Dist()


def setup(pp=1):
    """Read torchrun's environment (or run as one process), pick NCCL on GPUs and gloo on CPUs,
    set the device and build the pipeline and data-parallel groups."""
    global _DIST
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if pp < 1 or world % pp:
        raise ValueError(f"--pp {pp} does not divide the world size {world}; choose P so that "
                         f"WORLD_SIZE = P x D" + (f" (e.g. --pp {world} or --pp 1)" if world > 1 else " (one process: --pp 1)"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    d = Dist(rank=rank, world=world, local_rank=local_rank, P=pp, D=world // pp,
             pp_rank=rank % pp, dp_rank=rank // pp, device=device)
    if world > 1:
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
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
    _DIST = d
    return d


def get():
    return _DIST


def is_main():
    return _DIST.rank == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def teardown():
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def all_reduce(t, op="sum", group=None):
    """In-place all-reduce over `group` (a no-op in one process); returns t. The wait for the
    other ranks counts as idle time (at a step's end the stages that finished first wait here)."""
    if tdist.is_initialized() and tdist.get_world_size(group) > 1:
        with _waiting(get()):
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX, group=group)
    return t


def broadcast_from_last_stage(t, d):
    """Share a value computed on the last stage (the loss) with every stage of the replica."""
    if d.P > 1:
        with _waiting(d):
            tdist.broadcast(t, src=d.stage_rank(d.P - 1), group=d.pp_group)
    return t


# -----------------------------------------------------------------------------
# point-to-point between neighbouring stages

def _exchange(d, sends=(), recvs=()):
    """Post sends [(tensor, stage)] and receives [(buffer, stage)] within this replica together
    and wait for all of them: posted at once, two stages that both send and receive can never
    deadlock. The wait counts as idle time."""
    ops = ([tdist.P2POp(tdist.isend, t.contiguous(), d.stage_rank(s)) for t, s in sends]
           + [tdist.P2POp(tdist.irecv, b, d.stage_rank(s)) for b, s in recvs])
    if not ops:
        return
    with _waiting(d):
        for req in tdist.batch_isend_irecv(ops):
            req.wait()


def _p2p(d, send=None, send_to=None, recv_shape=None, recv_from=None, dtype=None):
    """One send and/or one receive between neighbours, posted together (see _exchange);
    returns the received buffer."""
    buf = None if recv_shape is None else torch.empty(recv_shape, dtype=dtype, device=d.device)
    _exchange(d, [] if send is None else [(send, send_to)], [] if buf is None else [(buf, recv_from)])
    return buf


# The pipeline's idle time: for every transfer or collective, the span from "this stage's
# queued work is done" to "the other ranks' data is here". On GPUs these are CUDA events on the
# compute stream, read only when reported, so measuring never stalls the host; on CPUs they are
# wall-clock times.
WAITS = collections.deque()
WAITED = [0.0]  # seconds already folded out of WAITS


@contextlib.contextmanager
def _waiting(d):
    """Count what runs inside as waiting on other ranks."""
    start = _mark(d)
    yield
    WAITS.append((start, _mark(d)))
    if len(WAITS) > 256:  # fold what has finished, so a long run keeps few events alive
        _fold(block=False)


def _mark(d):
    if d.device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _fold(block):
    while WAITS:
        start, end = WAITS[0]
        if not isinstance(start, float):
            if not block and not end.query():
                return
            end.synchronize()
        WAITS.popleft()
        WAITED[0] += (end - start) if isinstance(start, float) else start.elapsed_time(end) / 1000


def wait_seconds(reset=False):
    """Seconds this rank spent waiting on its neighbours since the last reset."""
    _fold(block=True)
    total = WAITED[0]
    if reset:
        WAITED[0] = 0.0
    return total


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
    """Forward and backward over `microbatches` with 1F1B; gradients accumulate in .grad of
    float32 weights and in .main_grad of bf16 ones (see AdamW).

    model: this stage (glm.ChatGLM built with layer_ids/first/last).
    loss_fn(model, hidden [b, T, C], mb) -> one micro-batch's loss, scaled so that the sum over
    micro-batches and replicas is the step's loss; it runs on the last stage only.
    first_trainable: the first stage holding trainable parameters. Stages before it (a frozen
    prefix with --train_layers) run forward only: no graph, no gradients sent back to them.
    Activations and their gradients cross stages in the stages' compute dtype (bf16 on GPUs).
    Returns the summed loss as a tensor on every stage of the replica."""
    M, P, s = len(microbatches), d.P, d.pp_rank
    hidden_dtype = stage_dtype(model)
    C = model.config.hidden_size
    shape = lambda i: (*microbatches[i]["input_ids"].shape, C)  # [b, T, C] crosses each boundary
    sends_grad = s > first_trainable  # the stage before us trains: give it d loss / d input
    gets_grad = not d.last and s >= first_trainable  # we (or a stage before) train
    warmup = min(P - s - 1, M)
    inputs, outputs = [], []
    total = torch.zeros((), device=d.device)

    def recv_forward(i):
        return None if d.first else _p2p(d, recv_shape=shape(i), recv_from=s - 1, dtype=hidden_dtype)

    def forward(i, x):
        mb = microbatches[i]
        if x is None:
            x = mb["input_ids"]
        elif sends_grad:
            x.requires_grad_()
        rope, attend = model.inputs(mb["input_ids"])
        h = model.transformer(x, rope, attend, checkpoint=model.checkpoint_activations)
        if not d.last:
            return x, h
        loss = loss_fn(model, h, mb)
        total.add_(loss.detach())
        return x, loss

    def backward(x, y, grad):
        if y.requires_grad:
            torch.autograd.backward(y, grad_tensors=None if grad is None else grad.to(y.dtype))
        return x.grad if sends_grad else None

    for i in range(warmup):
        x, y = forward(i, recv_forward(i))
        _p2p(d, send=y.detach().to(hidden_dtype), send_to=s + 1)
        inputs.append(x)
        outputs.append(y)
    x = recv_forward(warmup) if warmup < M else None
    for j in range(warmup, M):
        # forward of micro-batch j, then backward of the oldest one in flight (micro-batch b)
        x, y = forward(j, x)
        inputs.append(x)
        outputs.append(y)
        b = j + 1 - len(inputs)
        grad = _p2p(d, send=None if d.last else y.detach().to(hidden_dtype), send_to=s + 1,
                    recv_shape=shape(b) if gets_grad else None, recv_from=s + 1, dtype=hidden_dtype)
        gx = backward(inputs.pop(0), outputs.pop(0), grad)
        more = j + 1 < M and not d.first
        x = _p2p(d, send=gx, send_to=s - 1, recv_shape=shape(j + 1) if more else None,
                 recv_from=s - 1, dtype=hidden_dtype)
    while inputs:  # drain: the backwards of the warm-up micro-batches
        b = M - len(inputs)
        grad = _p2p(d, recv_shape=shape(b), recv_from=s + 1, dtype=hidden_dtype) if gets_grad else None
        gx = backward(inputs.pop(0), outputs.pop(0), grad)
        _p2p(d, send=gx, send_to=s - 1)
    return broadcast_from_last_stage(total, d)


def forward_collect(model, d, microbatches, out_fn, out_shape):
    """Forward-only through the pipeline, collecting out_fn(model, hidden, mb) -> float32 tensor
    of out_shape(mb) per micro-batch from the last stage; every stage gets the list."""
    s, outs = d.pp_rank, []
    C = model.config.hidden_size
    with torch.no_grad():
        for mb in microbatches:
            ids = mb["input_ids"]
            x = ids if d.first else _p2p(d, recv_shape=(*ids.shape, C), recv_from=s - 1, dtype=stage_dtype(model))
            rope, attend = model.inputs(ids)
            h = model.transformer(x, rope, attend)
            if d.last:
                y = out_fn(model, h, mb).float()
            else:
                _p2p(d, send=h, send_to=s + 1)
                y = torch.empty(out_shape(mb), device=d.device)
            outs.append(broadcast_from_last_stage(y, d))
    return outs


def stage_dtype(model):
    """The dtype this stage computes in (its first block's LayerNorm): bf16 on GPUs, fp32 on CPUs."""
    return next(iter(model.transformer.layers.values())).input_layernorm.weight.dtype


def forward_only(model, d, microbatches, loss_fn):
    """Evaluation through the pipeline: every micro-batch flows forward; the summed loss_fn over
    them is returned on every stage. No graph is built."""
    total = torch.zeros((), device=d.device)
    hidden_dtype = stage_dtype(model)
    s = d.pp_rank
    with torch.no_grad():
        for mb in microbatches:
            x = mb["input_ids"] if d.first else _p2p(d, recv_shape=(*mb["input_ids"].shape, model.config.hidden_size),
                                                     recv_from=s - 1, dtype=hidden_dtype)
            rope, attend = model.inputs(mb["input_ids"])
            h = model.transformer(x, rope, attend)
            if d.last:
                total += loss_fn(model, h, mb).float()
            else:
                _p2p(d, send=h.to(hidden_dtype), send_to=s + 1)
    return broadcast_from_last_stage(total, d)


# -----------------------------------------------------------------------------
# what every training script shares: the stage, gradients, the schedule, checkpoints, logs


def first_trainable_stage(model, d):
    """Lowest stage index of this replica that holds a trainable parameter (P if none does)."""
    mine = d.pp_rank if any(p.requires_grad for p in model.parameters()) else d.P
    t = torch.tensor(float(-mine), device=d.device)
    return int(-all_reduce(t, "max", d.pp_group).item())


def lr_at(step, lr, warmup_steps, total_steps, min_ratio=0.1):
    """Linear warm-up, then cosine decay to min_ratio * lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# -----------------------------------------------------------------------------
# checkpoints written by many ranks, read back with any number of stages


def atomic_dir_all(out_dir, write, d):
    """Every rank runs write(tmp) into one temporary folder; rank 0 renames it into place once
    all have finished, so a crash mid-save leaves the previous checkpoint untouched."""
    out_dir = os.path.abspath(out_dir)
    box = [None]
    if is_main():
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        box[0] = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=os.path.dirname(out_dir))
    if d.world > 1:
        tdist.broadcast_object_list(box, src=0)
    tmp = box[0]
    write(tmp)
    barrier()
    if is_main():
        glm.atomic_dir(out_dir, lambda t: _move_contents(tmp, t))
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()


def _move_contents(src, dst):
    for name in os.listdir(src):
        os.rename(os.path.join(src, name), os.path.join(dst, name))


def barrier():
    if tdist.is_initialized():
        tdist.barrier()


def write_stage_weights(model, tmp, d, lora_name=None):
    """This stage's share of an HF model folder (full weights) or of a PEFT adapter (lora_name).
    Only data-parallel replica 0 writes; rank 0 adds the index/config after the barrier."""
    if d.dp_rank != 0:
        return
    from safetensors.torch import save_file
    if lora_name is None:
        state = {k: v.detach().cpu().contiguous() for k, v in glm.base_state_dict(model).items()}
        save_file(state, os.path.join(tmp, f"model-stage{d.pp_rank:03d}-of-{d.P:03d}.safetensors"),
                  metadata={"format": "pt"})
    else:
        import lora
        state = {k: v.detach().cpu().contiguous() for k, v in lora.adapter_state_dict(model, lora_name).items()}
        save_file(state, os.path.join(tmp, f"adapter-stage{d.pp_rank:03d}.safetensors"))


def finish_weights(model, tmp, tokenizer_path, lora_name=None):
    """Rank 0, after every stage wrote its part: index + config.json (full), or one PEFT
    adapter_model.safetensors + adapter_config.json (LoRA); the tokenizer beside them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    if lora_name is None:
        weight_map = {}
        for path in sorted(glob.glob(os.path.join(tmp, "model-stage*.safetensors"))):
            with safe_open(path, framework="pt") as f:
                weight_map.update({k: os.path.basename(path) for k in f.keys()})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_json(), f, indent=2)
    else:
        import lora
        parts = sorted(glob.glob(os.path.join(tmp, "adapter-stage*.safetensors")))
        state = {}
        for path in parts:
            state.update(load_file(path))
            os.remove(path)
        save_file(state, os.path.join(tmp, lora.ADAPTER_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, lora.CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(lora.adapter_config(model, lora_name), f, indent=2)
    if tokenizer_path and os.path.isfile(tokenizer_path):
        shutil.copy(tokenizer_path, os.path.join(tmp, "ice_text.model"))


def save_heads(heads, tmp, d):
    """Extra modules (a reward or value head, on the last stage) as {prefix}.safetensors."""
    from safetensors.torch import save_file
    if d.dp_rank == 0:
        for prefix, module in (heads or {}).items():
            save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()},
                      os.path.join(tmp, f"{prefix}.safetensors"))


def load_head(module, ckpt_dir, prefix):
    """Strictly load a head saved by save_heads; the error names the file and what to do."""
    from safetensors.torch import load_file
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
# flags and logs


def parse_config(cls, argv=None):
    """A flat config dataclass -> --name value flags that keep each default's type; unknown
    flags are errors. Booleans take true/false (or no value for true)."""
    import argparse
    import dataclasses
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=f.default,
                           type=lambda v: v.lower() in ("1", "true", "yes"))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=f.default)
    return cls(**vars(p.parse_args(argv)))


def override_defaults(cfg, values):
    """Set each field of `values` that the command line left at its default (the toy runs' presets)."""
    import dataclasses
    defaults = type(cfg)()
    unknown = set(values) - {f.name for f in dataclasses.fields(cfg)}
    assert not unknown, f"presets name fields the config lacks: {sorted(unknown)}"
    for f in dataclasses.fields(cfg):
        if f.name in values and getattr(cfg, f.name) == getattr(defaults, f.name):
            setattr(cfg, f.name, values[f.name])
    return cfg


class MetricsLog:
    """metrics.jsonl (and TensorBoard events when the package is installed), on rank 0 only."""

    def __init__(self, out_dir, resume=False):
        self.path, self.tb = os.path.join(out_dir, "metrics.jsonl"), None
        if not is_main():
            return
        os.makedirs(out_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):  # a fresh run starts a fresh log
            os.remove(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step, **values):
        if not is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)


def start_clock():
    """Start of the span report_memory_and_busy covers: forget earlier waits, return the time."""
    wait_seconds(reset=True)
    return time.perf_counter()


def report_memory_and_busy(plan_stage, d, wall_s):
    """Each rank's measured peak memory and busy share beside the planner's prediction (rank 0 prints)."""
    peak = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else float("nan")
    row = torch.tensor([d.rank, d.pp_rank, peak, plan_stage.mem_total if plan_stage else float("nan"),
                        1 - wait_seconds() / max(wall_s, 1e-9)], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(d.world)] if d.world > 1 else [row]
    if d.world > 1:
        tdist.all_gather_object(rows, row)
    print0("rank stage  measured peak GiB  predicted GiB  busy")
    for r in rows:
        print0(f"{int(r[0]):4d} {int(r[1]):5d}  {r[2] / GiB:17.2f}  {r[3] / GiB:13.2f}  {r[4]:5.1%}")
    return [r.tolist() for r in rows]


# -----------------------------------------------------------------------------
# building this rank's stage


def plan_for_run(gcfg, d, cfg, mode, copies=(1, 0), lm_head=True):
    """The planner's split for this run (printed on rank 0) and this rank's stage of it.
    On GPUs the budget is the card's memory (or --gpu_mem_gib); recomputation is allowed where
    a stage would not fit otherwise, and forced everywhere by --checkpoint. copies: (trained,
    frozen) models of this shape held side by side (PPO's full mode holds (2, 2)); lm_head:
    does the run compute logits (not a reward model)?"""
    cuda = d.device.type == "cuda"
    budget = cfg.gpu_mem_gib * GiB or (0.95 * torch.cuda.get_device_properties(d.device).total_memory
                                       if cuda else None)
    plan = plan_pipeline(gcfg, d.P, cfg.micro_batch_size, cfg.max_len, cfg.grad_accum, train=mode,
                         lora_rank=cfg.lora_rank or 8, lora_targets=tuple(cfg.lora_targets.split(",")),
                         train_layers=cfg.train_layers, param_bytes=2 if cuda else 4,
                         checkpoint=budget is not None, mem_budget=budget, method=cfg.plan, copies=copies,
                         lm_head=lm_head)
    print0(plan.format_table())
    return plan, plan.stages[d.pp_rank]


def build_stage(model_dir, stage, d, checkpoint_all=False):
    """This rank's slice of the model, read straight from the safetensors files (bf16 on GPUs);
    blocks the plan recomputes are marked for activation checkpointing."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    model = glm.ChatGLM.from_pretrained(model_dir, dtype=dtype, device=d.device, **stage.model_kwargs())
    model.checkpoint_activations = True if checkpoint_all else set(stage.checkpoint_layers)
    return model


def write_result(tmp, model, d, lora_name=None, heads=None, extra_json=None):
    """Every rank's share of a result folder: its stage's weights (or adapter part), the heads
    it holds, and (rank 0) small JSON files ({filename: object})."""
    write_stage_weights(model, tmp, d, lora_name)
    save_heads(heads, tmp, d)
    if is_main():
        for name, obj in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)


def save_weights(out_dir, model, d, tokenizer_path, lora_name=None, heads=None, extra_json=None):
    """The trained result as an HF model folder (or a PEFT adapter), every stage adding its part,
    plus extra heads ({prefix: module}) and small JSON files from rank 0."""
    def write(tmp):
        write_result(tmp, model, d, lora_name, heads, extra_json)
        barrier()
        if is_main():
            finish_weights(model, tmp, tokenizer_path, lora_name)
    atomic_dir_all(out_dir, write, d)


def save_train_checkpoint(out_dir, model, opt, d, tokenizer_path, lora_name, train_state, heads=None,
                          extra_json=None):
    """Weights (or adapter), heads, optimiser state by parameter name, each rank's RNG and the
    loop's state: everything a resumed run needs, readable with another number of stages."""
    def write(tmp):
        write_result(tmp, model, d, lora_name, heads, extra_json)
        if d.dp_rank == 0:
            torch.save(opt.state_by_name(),
                       os.path.join(tmp, f"optim-stage{d.pp_rank:03d}.pt"))
        rng = {"cpu": torch.get_rng_state()}
        if d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(d.device)
        torch.save(rng, os.path.join(tmp, f"rng-rank{d.rank:03d}.pt"))
        barrier()
        if is_main():
            finish_weights(model, tmp, tokenizer_path, lora_name)
            with open(os.path.join(tmp, "train_state.json"), "w", encoding="utf-8") as f:
                json.dump({**train_state, "world": d.world, "pp": d.P}, f, indent=2)
    atomic_dir_all(out_dir, write, d)


def load_train_state(ckpt_dir, d):
    """The loop's state; this rank's RNG is restored when the checkpoint had the same ranks."""
    path = os.path.join(ckpt_dir, "train_state.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir} has no train_state.json: it is not a complete checkpoint. "
                                "HINT: remove it, or resume from a folder a finished save wrote")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    rng_path = os.path.join(ckpt_dir, f"rng-rank{d.rank:03d}.pt")
    if state.get("world") == d.world and os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return state


# -----------------------------------------------------------------------------
# what trains, and the optimiser step


def train_mode(lora_rank, train_layers, num_layers):
    """"lora" (frozen base + adapters), "last_n" (only the last blocks) or "full"."""
    if lora_rank > 0 and train_layers > 0:
        raise ValueError("--lora_rank and --train_layers are exclusive: pick one way to train")
    if train_layers > num_layers:
        raise ValueError(f"--train_layers {train_layers} is larger than the model's {num_layers} blocks; "
                         f"use 1..{num_layers}, or 0 to train everything")
    if train_layers < 0 or lora_rank < 0:
        raise ValueError("--train_layers and --lora_rank must be >= 0")
    return "lora" if lora_rank > 0 else "last_n" if train_layers > 0 else "full"


def select_trainable(model, mode, cfg, adapter_dir=None, adapter="default"):
    """Mark what trains (LoRA adapters, the last cfg.train_layers blocks, or everything) and
    return those parameters (their fp32 masters are the optimiser's: see AdamW). adapter_dir:
    resume the adapter from there."""
    import lora
    if mode == "lora":
        lora.inject_lora(model, targets=tuple(cfg.lora_targets.split(",")), r=cfg.lora_rank,
                         alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, name=adapter, dtype=torch.float32,
                         seed=getattr(cfg, "seed", 0))
        if adapter_dir is not None:
            lora.load_adapter(model, adapter_dir, name=adapter)
    else:
        first_trained = model.config.num_layers - cfg.train_layers if mode == "last_n" else 0
        for name, p in model.named_parameters():
            m = glm.LAYER_KEY.fullmatch(name)
            p.requires_grad_(mode == "full" or (m is not None and int(m.group(1)) >= first_trained))
    return [p for p in model.parameters() if p.requires_grad]


def named_trainables(model, heads=None):
    """{name: parameter} of what trains on this stage: the model's trained tensors plus those of
    extra head modules ({prefix: module}); the names under which optimiser state is saved."""
    named = dict(model.named_parameters())
    for prefix, module in (heads or {}).items():
        named.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
    return {n: p for n, p in named.items() if p.requires_grad}


def unit_of(name):
    """The planner's unit of optimiser state a parameter belongs to ("embedding", "head",
    "layer i/attention" with the input LayerNorm, "layer i/mlp" with the post-attention one);
    None for tensors outside the model (reward and value heads)."""
    m = glm.LAYER_KEY.fullmatch(name)
    if m:
        mlp = m.group(2).startswith(("mlp.", "post_attention_layernorm."))
        return f"layer {m.group(1)}/{'mlp' if mlp else 'attention'}"
    if name.startswith("transformer.word_embeddings."):
        return "embedding"
    if name.startswith(("transformer.final_layernorm.", "lm_head.")):
        return "head"
    return None


# -----------------------------------------------------------------------------
# the optimiser: fp32 masters of bf16 weights, kept on this stage or on another
#
# On GPUs a stage computes in bf16, trained weights included. (Under autocast every micro-batch
# would cast each fp32 weight to bf16 again and keep that copy for its backward: one copy per
# micro-batch in flight, most of them on stage 0.) Precision lives in fp32 tensors beside each
# trained bf16 weight w:
#   w.main_grad  the gradient accumulator (bf16 sums of M terms would lose the late ones): the
#                weight-gradient GEMM of a glm.Linear adds into it directly; for other tensors
#                a hook adds each micro-batch's bf16 gradient and frees it at once
#   master       the weight AdamW updates; w is refreshed from it, rounded to bf16, after a step
#   m, v         AdamW's moments
# A float32 weight (CPU runs, LoRA adapters, heads) is its own master and sums in .grad.
#
# Master and moments are 12 of the 18 bytes a trained weight costs, and only the optimiser step
# touches them. So they can live on another stage of the replica (`hosts`, chosen by the
# planner): at the step the owner sends the summed fp32 gradient to the host, which runs AdamW
# and sends the new weight back, 6 bytes per weight over P2P once per step. That evens out the
# memory the layer split cannot: stage 0 holds the 9 GiB embedding, which costs no compute to
# balance it against, on top of the most micro-batches in flight.


def _accumulate_fp32(p):
    """Post-accumulate hook of a bf16 trained weight: fold its fresh gradient into main_grad."""
    if p.grad is None:  # a glm.Linear weight, whose GEMM already added into main_grad
        return
    if p.main_grad is None:
        p.main_grad = p.grad.float()
    else:
        p.main_grad.add_(p.grad)
    p.grad = None


class AdamW:
    """AdamW (betas 0.9, 0.95; decay on matrices only) over this stage's trained tensors
    {name: parameter}, through fp32 masters. hosts {unit: stage} keeps the masters and moments
    of those units (see unit_of) on another stage of the replica (every stage passes the same
    dict)."""

    def __init__(self, named, lr, weight_decay, d=None, hosts=None):
        self.d = d = d or get()
        self.owned = dict(named)
        hosts = hosts or {}
        self.away = {n: hosts[unit_of(n)] for n in sorted(self.owned)
                     if hosts.get(unit_of(n), d.pp_rank) != d.pp_rank}  # {name: host stage}
        for p in self.owned.values():
            if p.dtype != torch.float32:
                p.main_grad = None
                p.register_post_accumulate_grad_hook(_accumulate_fp32)  # embedding, LayerNorms, biases
                p.fuse_main_grad = p.dim() == 2  # glm.Linear weights: the GEMM adds into main_grad
        self.masters = {n: p if p.dtype == torch.float32 else p.detach().float()
                        for n, p in self.owned.items() if n not in self.away}
        self.guests = {}  # {name: (owner stage, owner dtype)} of the masters kept here for others
        if hosts and d.P > 1:
            self._adopt_guests()
        matrices = [t for t in self.masters.values() if t.dim() >= 2]
        vectors = [t for t in self.masters.values() if t.dim() < 2]
        groups = [g for g in ({"params": matrices, "weight_decay": weight_decay},
                              {"params": vectors, "weight_decay": 0.0}) if g["params"]]
        # fused: one kernel over all tensors, and no temporaries the size of the stage's weights
        self.fused = d.device.type == "cuda" and bool(self.masters)
        self.opt = torch.optim.AdamW(groups or [{"params": []}], lr=lr, betas=(0.9, 0.95),
                                     fused=self.fused or None)

    def _adopt_guests(self):
        """Every stage learns which tensors it hosts (name, shape, dtype, owner); owners send
        their starting values."""
        mine = {n: (h, tuple(self.owned[n].shape), str(self.owned[n].dtype)) for n, h in self.away.items()}
        everyone = [None] * self.d.P
        tdist.all_gather_object(everyone, mine, group=self.d.pp_group)
        recvs = []
        for owner, table in enumerate(everyone):
            for n, (h, shape, dtype) in sorted(table.items()):
                if h == self.d.pp_rank:
                    self.guests[n] = (owner, getattr(torch, dtype.split(".")[-1]))
                    self.masters[n] = torch.empty(shape, device=self.d.device)
                    recvs.append((self.masters[n], owner))
        _exchange(self.d, [(self.owned[n].detach().float(), h) for n, h in self.away.items()], recvs)

    def grads(self):
        """This stage's summed fp32 gradients, one per trained tensor (zeros where none arrived)."""
        out = []
        for p in self.owned.values():
            if p.dtype == torch.float32:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                out.append(p.grad)
            else:
                if p.main_grad is None:
                    p.main_grad = torch.zeros_like(p, dtype=torch.float32)
                out.append(p.main_grad)
        return out

    def step(self, lr):
        grads = dict(zip(self.owned, self.grads()))
        # gradients of tensors kept elsewhere go to their hosts; our guests' gradients come here
        inbox = {n: torch.empty_like(self.masters[n]) for n in self.guests}
        _exchange(self.d, [(grads[n], h) for n, h in self.away.items()],
                  [(inbox[n], owner) for n, (owner, _) in self.guests.items()])
        for n, t in self.masters.items():
            t.grad = inbox[n] if n in inbox else grads[n]
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        # the new weights: back to their owners, and into this stage's own bf16 copies
        _exchange(self.d, [(self.masters[n].to(dtype), owner) for n, (owner, dtype) in self.guests.items()],
                  [(self.owned[n].detach(), h) for n, h in self.away.items()])
        self._refresh_working()

    def _refresh_working(self):
        with torch.no_grad():
            for n, t in self.masters.items():
                p = self.owned.get(n)
                if p is not None and p is not t:
                    p.copy_(t)

    def zero_grad(self):
        for p in self.owned.values():
            p.grad = None
            if p.dtype != torch.float32:
                p.main_grad = None
        for t in self.masters.values():
            t.grad = None

    def state_by_name(self):
        """AdamW state of every master kept here (own or hosted), keyed by parameter name, so any
        other pipeline split finds its share; with the master itself where the saved weight is
        only its bf16 rounding."""
        out = {}
        for n, t in self.masters.items():
            st = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.opt.state.get(t, {}).items()}
            if self.owned.get(n) is not t:
                st["master"] = t.detach().cpu()
            out[n] = st
        return out

    def load(self, ckpt_dir, prefix="optim"):
        """Fill the state from every {prefix}-stage*.pt file of a checkpoint (written with any P)."""
        merged = {}
        for path in sorted(glob.glob(os.path.join(ckpt_dir, f"{prefix}-stage*.pt"))):
            merged.update(torch.load(path, map_location="cpu", weights_only=True))
        for n, t in self.masters.items():
            if n not in merged:
                raise KeyError(f"{ckpt_dir}: no optimiser state for '{n}'. HINT: resume with the same "
                               "training mode (--lora_rank / --train_layers) the checkpoint was written with")
            st = dict(merged[n])
            master = st.pop("master", None)
            if master is not None:
                with torch.no_grad():
                    t.copy_(master)
            # the step counter lives on the device for the fused kernel, on the CPU otherwise
            self.opt.state[t] = {k: (v.to(t.device) if torch.is_tensor(v) and (k != "step" or self.fused) else v)
                                 for k, v in st.items()}
        self._refresh_working()


def sync_grads(grads, d, bucket=1 << 26):
    """Sum fp32 gradients over the data-parallel replicas in place (losses are already scaled by
    the global token count), in all-reduces of up to `bucket` elements."""
    if d.D == 1:
        return
    group, size = [], 0

    def flush():
        if len(group) == 1:
            all_reduce(group[0], "sum", d.dp_group)
        else:
            flat = all_reduce(torch.cat([g.reshape(-1) for g in group]), "sum", d.dp_group)
            for g, part in zip(group, flat.split([g.numel() for g in group])):
                g.copy_(part.view_as(g))
        group.clear()

    for g in grads:
        if group and size + g.numel() > bucket:
            flush()
            size = 0
        group.append(g)
        size += g.numel()
    if group:
        flush()


def clip_grad_norm(grads, max_norm, d):
    """Global gradient norm over all stages (each holds different tensors); clip to max_norm."""
    sq = torch.zeros((), device=d.device)
    for g in grads:
        sq += torch.linalg.vector_norm(g).square()
    norm = all_reduce(sq, "sum", d.pp_group).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)
    return norm


def optimizer_step(opt, loss, lr, grad_clip, d, bad_steps, step, max_bad=10):
    """After train_step: global loss, replica-summed and clipped gradients, then the update,
    skipped (and counted) when the loss or gradient is not finite. Returns (loss, grad norm,
    consecutive bad steps); stops the run after max_bad bad steps in a row."""
    loss = all_reduce(loss.detach().clone(), "sum", d.dp_group).item()
    grads = opt.grads()
    sync_grads(grads, d)
    norm = float(clip_grad_norm(grads, grad_clip, d))
    if math.isfinite(loss) and math.isfinite(norm):
        opt.step(lr)
        bad_steps = 0
    else:
        bad_steps += 1
        print0(f"step {step}: non-finite loss/gradient ({loss}, {norm}); update skipped ({bad_steps} in a row)")
        if bad_steps >= max_bad:
            raise RuntimeError(f"{max_bad} non-finite steps in a row: lower --lr or check the data")
    opt.zero_grad()
    return loss, norm, bad_steps


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
             top_k=0, generator=None, micro_batches=None, cuda_graph=None):
    """KV-cached sampling through the pipeline; every stage of the replica gets the result:
    ids [B, T + N'] (pad after <eop>) and the sampled tokens' log-probabilities [B, N']."""
    if d.P == 1:
        return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                              return_logprobs=True, cuda_graph=cuda_graph)
    cfg, (B, T), N = model.config, input_ids.shape, max_new_tokens
    if T + N > cfg.max_sequence_length:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens {N} exceeds max_sequence_length "
                         f"{cfg.max_sequence_length}; shorten either")
    use_graph = d.device.type == "cuda" if cuda_graph is None else cuda_graph
    n = min(B, max(micro_batches or d.P, d.P))
    chunks = list(input_ids.tensor_split(n))
    layouts = [glm.derive_layout(c, cfg) for c in chunks]
    decoders = [glm.Decoder(model, c.shape[0], T + N, use_graph) for c in chunks]
    compute_dtype = next(iter(model.transformer.layers.values())).input_layernorm.weight.dtype
    out = torch.full((B, N), cfg.pad_token_id, dtype=torch.long, device=d.device)
    logprobs = torch.zeros(B, N, device=d.device)
    rows = [range(int(a), int(a) + c.shape[0]) for a, c in
            zip(torch.tensor([0] + [c.shape[0] for c in chunks]).cumsum(0), chunks)]
    done = torch.zeros(B, dtype=torch.bool, device=d.device)
    pending, s, C = [], d.pp_rank, cfg.hidden_size

    def recv(shape, dtype, src):
        buf = torch.empty(shape, dtype=dtype, device=d.device)
        tdist.irecv(buf, src=d.stage_rank(src)).wait()
        return buf

    def send(t, dst):
        t = t.contiguous()
        pending.append((tdist.isend(t, dst=d.stage_rank(dst)), t))

    with torch.no_grad():
        for k in range(N):  # k = 0: the prompt; k > 0: the token sampled at step k - 1
            for m, c in enumerate(chunks):
                b = c.shape[0]
                if d.first:
                    x = c if k == 0 else recv((b,), torch.long, d.P - 1)
                else:
                    x = recv((b, T if k == 0 else 1, C), torch.float32, s - 1).to(compute_dtype)
                if k == 0:
                    y = decoders[m].prefill(x, layouts[m])
                else:
                    slot = T + k - 1
                    lay = layouts[m]
                    pos_ids = torch.stack([lay.mask_pos, slot - lay.ctx + 1], dim=1)[:, :, None]  # [b, 2, 1]
                    y = decoders[m].step(x, pos_ids, slot)
                if not d.last:
                    send(y.float(), s + 1)
                    continue
                r = rows[m]
                tok, lp = glm.sample_next(y.float(), do_sample, temperature, top_p, top_k, generator)
                tok = tok.masked_fill(done[r.start:r.stop], cfg.pad_token_id)
                out[r.start:r.stop, k] = tok
                logprobs[r.start:r.stop, k] = lp.masked_fill(done[r.start:r.stop], 0.0)
                done[r.start:r.stop] |= tok == cfg.eos_token_id
                if k < N - 1:
                    send(tok, 0)
    for req, _ in pending:
        req.wait()
    broadcast_from_last_stage(out, d)
    broadcast_from_last_stage(logprobs, d)
    out, logprobs = glm.trim_finished(out, logprobs, cfg.eos_token_id)
    return torch.cat([input_ids, out], dim=1), logprobs
