"""Cut ChatGLM into P pipeline stages that fit each GPU's memory and keep the slowest stage fast.

    python plan.py --pp 8 --train full                # the plan for 8 stages of ChatGLM-6B
    python plan.py --pp 4 --train lora --gpu_mem_gib 24 --micro_batches 16
    python plan.py --pp 4 --plan naive                # equal layer counts, priced the same way

It prices each piece of the model (embedding, blocks, head) in bytes and FLOPs, searches every
cut exactly, and prints each stage's predicted memory and time. Pure arithmetic, no process
groups and no tensors, so it runs (and is tested) on any machine; docs/numbers.md works the
formulas through for ChatGLM-6B.
"""
import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from itertools import accumulate

import torch

import glm

# The model is a list of pieces [embedding, block 0 .. block L-1, final LN + lm_head]; a plan cuts
# it into P contiguous stages of at least one block each. A stage's memory is its parameters, the
# gradients and optimiser state of what trains (the state may live on another stage: _level), the
# activations of the min(P - s, M) micro-batches 1F1B keeps in flight on stage s, and the last
# stage's logits; its time is M x its FLOPs / throughput. The objective, each pass an exact dynamic
# programme over the cuts (docs/planner.md gives the reasons): the least peak memory first; then,
# with every stage within 5 % of it (or under 85 % of the budget), the fastest slowest stage; then
# the least memory at that speed; then the most even stages. Blocks recompute their activations
# only where a stage would not fit otherwise.

GiB = 1 << 30


class PlanError(ValueError):
    """A pipeline plan that cannot exist or will not fit; the message says what to change.
    `peak` is the smallest predicted peak bytes found (inf when no plan exists); `rollout_fits` the
    most prompts an RL step could generate at once where the rollout alone does not fit (else 0)."""

    def __init__(self, msg, peak=math.inf, rollout_fits=0):
        super().__init__(msg)
        self.peak, self.rollout_fits = peak, rollout_fits


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
        m, rollout = self.model, "rollout" in self.stages[0].mem
        budget = "none" if m.mem_budget is None else f"{m.mem_budget / GiB:.1f} GiB"
        lines = [f"{self.method} plan: {self.P} stages, M={m.micro_batches} micro-batches, "
                 f"budget {budget}, {m.flops_per_s / 1e12:.0f} TFLOP/s assumed"
                 + (f" ({self.title})" if self.title else ""),
                 f"{'stage':>5} {'layers':>11} {'holds':>10} {'ckpt':>5} {'params':>7} {'grads':>7} "
                 f"{'optim':>7} {'act':>7} {'logits':>7} " + (f"{'rollout':>7} " if rollout else "")
                 + f"{'total':>7} {'time ms':>9} {'share':>6}"]
        total_time = sum(st.time for st in self.stages)
        for st in self.stages:
            span = f"{st.layers.start}-{st.layers.stop - 1} ({len(st.layers)})"
            holds = "+".join(n for n, on in (("embed", st.first), ("head", st.last)) if on)
            g = {k: f"{v / GiB:7.2f}" for k, v in st.mem.items()}
            lines.append(f"{st.index:>5} {span:>11} {holds:>10} {st.checkpoint_blocks:>5} {g['params']} "
                         f"{g['grads']} {g['optim']} {g['act']} {g['logits']} "
                         + (f"{g['rollout']} " if rollout else "")
                         + f"{st.mem_total / GiB:7.2f} {st.time * 1e3:9.1f} {st.time / total_time:6.1%}")
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
        for j in (n,) if s == P - 1 else range(1, n + 1):  # the last stage ends the model
            # stages 0..s need s+1 blocks before j; the rest need P-1-s blocks after it
            if spans.blocks[j] < s + 1 or L - spans.blocks[j] < P - 1 - s:
                continue
            for i in range(0, j) if s else (0,):
                if spans.blocks[j] == spans.blocks[i] or (s and best[s - 1][i] == math.inf):
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
    spans, stages, m = _Spans(pieces, model), [], model
    for s, (i, j) in enumerate(zip([0] + ends, ends)):
        mem_total, time, c = spans.cost(s, P, i, j, limit)
        ps = pieces[i:j]
        blocks = [p.layer for p in ps if p.layer is not None]
        trainable = sum(p.trainable for p in ps)
        mem = dict(params=sum(p.params for p in ps) * m.param_bytes * (m.trained_copies + m.frozen_copies),
                   grads=trainable * m.grad_bytes * m.trained_copies,
                   optim=trainable * m.optim_bytes * m.trained_copies, act=0.0,
                   logits=sum(p.once_bytes for p in ps))
        mem["act"] = mem_total - sum(mem.values())
        stages.append(Stage(index=s, layers=range(blocks[0], blocks[-1] + 1), first=s == 0,
                            last=s == P - 1, pieces=tuple(p.name for p in ps),
                            checkpoint_layers=tuple(sorted(p.layer for p in spans.span(i, j)[2][:c])),
                            in_flight=min(P - s, m.micro_batches), mem=mem, mem_total=mem_total,
                            flops=time * m.flops_per_s, time=time))
    return Plan(stages, method, model, title)


def partition(pieces, P, model, mem_slack=0.05, mem_target=0.85, title=""):
    """The balanced plan over generic pieces (objective at the top of this section). A plan that
    cannot fit the budget is still returned, with plan.fits False, at its smallest peak."""
    _check_P(pieces, P)
    spans, budget = _Spans(pieces, model), model.mem_budget

    def build(ends, limit):
        return _level(_build(pieces, P, model, ends, limit, "auto", title), pieces)

    recompute = model.checkpoint and budget is not None  # with no budget there is nothing to fit
    # pass 1: the least peak memory any plan reaches, recomputing every block if allowed
    least = -math.inf if recompute else None
    best_mem, ends = _search(spans, P, lambda s, i, j: spans.cost(s, P, i, j, least)[0])
    if budget is not None and best_mem > budget:  # nothing fits: the least-memory plan, levelled
        return build(ends, least)
    bound = best_mem * (1 + mem_slack)
    if budget is not None:
        bound = min(budget, max(bound, mem_target * budget))
    bound *= 1 + 1e-12  # the pass-1 plan itself must pass
    limit = bound if recompute else None  # each stage recomputes the fewest blocks to meet it
    if model.level_optim:
        # optimiser states can leave a stage, so only what stays must meet the bound: time decides
        # the cut and _level evens out memory after it; if that does not fit, cut for memory
        plan = build(_fastest(spans, P, bound, None, movable=True), None)
        if plan.fits:
            return plan
    return build(_fastest(spans, P, bound, limit), limit)


def _fastest(spans, P, bound, limit, movable=False):
    """Passes 2-4 of the objective: the cut whose slowest stage is fastest with every stage's
    memory within bound (less its movable optimiser state if `movable`), then the least memory at
    that speed, then the most even stages."""
    def within(objective, mbound, tbound=math.inf):  # objective(mem, time) of a stage inside both bounds
        def value(s, i, j):
            mem, time, _ = spans.cost(s, P, i, j, limit)
            mem -= spans.movable(i, j) if movable else 0.0
            return objective(mem, time) if mem <= mbound and time <= tbound else math.inf
        return value

    # pass 2: the fastest slowest stage within the memory bound; pass 3: the least memory at that speed
    best_time, _ = _search(spans, P, within(lambda mem, time: time, bound))
    tbound = best_time * (1 + 1e-9)
    peak, _ = _search(spans, P, within(lambda mem, time: mem, bound, tbound))

    def even(mem, time):  # pass 4: the most even stages among those (least sum of squares)
        return (time / (best_time or 1.0)) ** 2 + (mem / (peak or 1.0)) ** 2

    return _search(spans, P, within(even, peak * (1 + 1e-9), tbound), combine=lambda a, b: a + b)[1]


def _level(plan, pieces):
    """Even out memory after the cut: move the optimiser state of whole units (a block's attention or
    MLP half, the embedding, the head) from the fullest stage to the emptiest, each move the unit
    nearest half their gap, while one of 1/32 to 1 times the gap exists (so every move lowers the sum
    of squared stage memories and the loop ends). Records plan.hosts and the new optim/total bytes."""
    m = plan.model
    if not m.level_optim:
        return plan
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
    return plan_from_counts(pieces, [L // P + (s < L % P) for s in range(P)], model, "naive", title)


def _ends_from_counts(pieces, counts):
    """Piece index where each stage ends, given each stage's block count: right after its last block,
    so leading non-blocks go with the first stage, trailing ones with the last."""
    after_block = [j + 1 for j, p in enumerate(pieces) if p.layer is not None]
    return [after_block[n - 1] for n in accumulate(counts[:-1])] + [len(pieces)]


def plan_from_counts(pieces, counts, model, method="given", title=""):
    """Price a plan with the given block count per stage (for comparisons and tests)."""
    _check_P(pieces, len(counts))
    if min(counts) < 1 or sum(counts) != sum(p.layer is not None for p in pieces):
        raise PlanError(f"block counts {counts} must be >= 1 each and sum to the number of blocks")
    return _build(pieces, len(counts), model, _ends_from_counts(pieces, counts), model.mem_budget,
                  method, title)


def _lora_params(cfg, rank, targets):
    """(adapter parameters a block adds, of which in its attention half): r * (in + out) a target."""
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    shapes = {"query_key_value": (h, 3 * h), "dense": (h, h),  # (in, out) by the names glm.py uses
              "dense_h_to_4h": (h, f), "dense_4h_to_h": (f, h)}
    for t in targets:
        if t not in shapes:
            raise ValueError(f"LoRA target {t!r} is not a block linear; choose from {sorted(shapes)}")
    n = {t: rank * (shapes[t][0] + shapes[t][1]) for t in targets}
    return sum(n.values()), sum(v for t, v in n.items() if t in ("query_key_value", "dense"))


def quantized_bytes(cfg, bits, group_size=0):
    """Bytes of one block's four linears stored as int8 / int4 codes plus float16 scales (one per
    row, or one per group_size inputs of a row): what quant.QuantLinear holds."""
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    return sum(o * i * bits / 8 + 2 * o * (i // group_size if group_size else 1)
               for i, o in ((h, 3 * h), (h, h), (h, f), (f, h)))  # (in, out) of QKV, dense, h->4h, 4h->h


def glm_pieces(cfg, micro_batch_size, seq_len, train="full", lora_rank=8,
               lora_targets=("query_key_value",), train_layers=0, train_head=False,
               param_bytes=2, loss_chunk=None, lm_head=True, quantize=(0, 0)):
    """ChatGLM's pieces [embedding, blocks, final LN + lm_head] priced for one micro-batch. train:
    "full", "lora" (adapters in every block, base frozen) or "last_n" (the last train_layers blocks;
    the final LN and lm_head too if train_head). lm_head=False: no logits are computed (a reward model
    reads hidden states), so lm_head is held frozen and costs no FLOPs, gradients or logit buffers.
    quantize (bits, group size[, head]): the blocks' linears are frozen int8 / int4 (LoRA only), and
    lm_head int8 (one float16 scale per row) if head. docs/numbers.md works the formulas through for ChatGLM-6B."""
    h, f, V, L = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size, cfg.num_layers
    T = micro_batch_size * seq_len  # tokens per micro-batch
    if train not in ("full", "lora", "last_n"):
        raise ValueError(f"train={train!r}: expected 'full', 'lora' or 'last_n'")
    if train == "last_n" and not (0 <= train_layers <= L and (train_layers or train_head)):
        raise ValueError(f"--train_layers {train_layers}: expected 1..{L} (or 0 with the head trained)")
    lora, lora_attn = _lora_params(cfg, lora_rank, lora_targets) if train == "lora" else (0, 0)

    # parameters ("Parameters"): QKV 3h*h+3h, dense h*h+h, h->4h f*h+f, 4h->h h*f+h, two LayerNorms 4h
    block = 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h + 4 * h
    attn = 3 * h * h + 3 * h + h * h + h + 2 * h  # QKV, dense, input LayerNorm
    scale = param_bytes / 2  # activations are stored in the parameter dtype
    # activations a block keeps ("Activation memory"), in bytes per token per hidden unit at bf16
    # (Korthikanti et al. 2022, attention without the s^2 score term as in flash kernels):
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
        # a quantized block holds its linears' codes and scales: priced as the parameters of the
        # same bytes, so the planner's params x param_bytes is right (FLOPs still count n)
        linears = 4 * h * h + 2 * h * f  # their weights (biases stay float)
        held = n - linears + quantized_bytes(cfg, *quantize[:2]) / param_bytes if quantize[0] else n
        # FLOPs ("Compute"): forward 2 per weight per token + attention scores and context 4*s*h
        # per token; backward: input gradients cost the forward again (attention's twice), weight
        # gradients 2 per trainable weight per token. Full training 3x forward, frozen base + LoRA ~2x.
        fwd = 2 * n * T + 4 * seq_len * h * T
        bwd = (2 * n * T + 8 * seq_len * h * T + 2 * trains * T) if graph else 0.0
        # the block's optimiser state in two units: input LN + attention, post LN + MLP
        att = {"full": attn, "lora": lora_attn, "last_n": attn if trains else 0}[train]
        pieces.append(PieceCost(f"layer {i}", i, held, trains, fwd, bwd, act if graph else 0.0,
                                ckpt if graph else 0.0, parts=(("attention", att), ("mlp", trains - att))))
    trains_head = train == "full" or (train == "last_n" and train_head)
    int8_head = len(quantize) > 2 and quantize[0] and quantize[2]
    pieces.append(head_piece(cfg, T, lm_head, trains_head, graph, logits, int8_head, param_bytes))
    return pieces


def head_piece(cfg, T, lm_head, trains, graph, logits, int8_head, param_bytes):
    """The head's PieceCost: final LN (2h) and lm_head (V*h), keeping the LN's input and output (4 T h
    bytes). lm_head=False: its weights compute nothing. An int8 head holds a byte a weight and a
    float16 scale a row, and dequantizes its whole weight for a call's logits (glm.head_logprobs,
    prefill): held once, beside the logits."""
    h, V = cfg.hidden_size, cfg.vocab_size
    lm = V * h if lm_head else 0  # lm_head weights that compute (and train with the head)
    head_train = (2 * h + lm) if trains else 0
    graph = graph or head_train > 0
    held = 2 * h + ((V * h + 2 * V) / param_bytes if int8_head else V * h)
    once = (logits if graph else 0.0) + (V * h * param_bytes if int8_head else 0.0) if lm else 0.0
    return PieceCost("head", None, held, head_train, 2 * lm * T, (2 * lm * T + 2 * head_train * T) if graph else 0.0,
                     2 * T * h * param_bytes if graph else 0.0, 0.0, once)


# ---- the request: ChatGLM of one shape, trained one way, on one kind of GPU -------------------

@dataclass(frozen=True)
class Request:
    """What plan_pipeline is asked; a variant of it is dataclasses.replace(req, P=...)."""
    cfg: object                      # glm.GLMConfig
    P: int                           # pipeline stages
    micro_batch_size: int            # sequences per micro-batch (b)
    seq_len: int                     # tokens per sequence (s)
    micro_batches: int               # per optimiser step (M)
    # what trains (see glm_pieces)
    train: str = "full"              # "full", "lora" or "last_n"
    lora_rank: int = 8
    lora_targets: tuple = ("query_key_value",)
    train_layers: int = 0            # "last_n": how many of the last blocks
    train_head: bool = False         # "last_n": the final LN and lm_head too
    lm_head: bool = True             # False: no logits are computed (a reward model)
    quantize: tuple = (0, 0)         # (bits, group size[, head]): int8 / int4 frozen block linears (+ int8 head)
    # bytes a parameter
    param_bytes: int = 2             # bf16 weights (4: fp32, as on CPUs)
    grad_bytes: int = 4              # fp32 gradient accumulators
    optim_bytes: int | None = None   # None: AdamW's two fp32 moments (8), plus an fp32 master (4)
                                     # when the weights themselves are narrower than fp32
    # the hardware and the schedule
    mem_budget: float | None = None  # bytes one GPU may allocate; None = unlimited
    checkpoint: bool = False         # may blocks recompute their activations to fit?
    flops_per_s: float = 400e12      # sustained rate per GPU (docs/numbers.md, "Time")
    loss_chunk: int | None = None    # tokens whose logits the loss holds at once (None: all)
    copies: tuple = (1, 0)           # (trained, frozen) models of this shape side by side
    # the search
    method: str = "auto"             # "auto" (the balanced plan) or "naive" (equal layer counts)
    mem_slack: float = 0.05          # see the objective at the top of this file
    mem_target: float = 0.85
    level_optim: bool = True         # may optimiser states live on other stages (bf16 weights only:
                                     # there the fp32 master is a separate tensor that can move)

    def cost_model(self):
        narrow = self.param_bytes < 4  # weights below fp32: AdamW keeps an fp32 master copy
        optim_bytes = 8 + 4 * narrow if self.optim_bytes is None else self.optim_bytes
        return CostModel(self.micro_batches, self.param_bytes, self.grad_bytes, optim_bytes,
                         self.mem_budget, self.checkpoint, self.flops_per_s, *self.copies,
                         level_optim=self.level_optim and narrow)

    def pieces(self):
        return glm_pieces(self.cfg, self.micro_batch_size, self.seq_len, train=self.train,
                          lora_rank=self.lora_rank, lora_targets=self.lora_targets,
                          train_layers=self.train_layers, train_head=self.train_head,
                          param_bytes=self.param_bytes, loss_chunk=self.loss_chunk, lm_head=self.lm_head,
                          quantize=tuple(self.quantize))

    def title(self):
        return (f"{self.train}" + (f" r={self.lora_rank}" if self.train == "lora" else "")
                + (f" last {self.train_layers}" if self.train == "last_n" else "")
                + f", b={self.micro_batch_size}, s={self.seq_len}")


def plan_request(req):
    """The plan for req, whether or not it fits its budget (plan.fits says); raises PlanError only
    when no plan can exist (a size below 1, an unknown method, more stages than blocks)."""
    for name in ("micro_batch_size", "seq_len", "micro_batches"):
        if getattr(req, name) < 1:
            raise PlanError(f"{name}={getattr(req, name)}: must be at least 1")
    if req.method not in ("auto", "naive"):
        raise PlanError(f"--plan {req.method!r}: expected 'auto' or 'naive'")
    pieces, model = req.pieces(), req.cost_model()
    if req.method == "auto":
        return partition(pieces, req.P, model, req.mem_slack, req.mem_target, req.title())
    return equal_partition(pieces, req.P, model, req.title())


def explain_misfit(req, plan):
    """Why `plan` (req's, over budget) does not fit, and which single change of the request would
    make it fit: each change is checked by planning the changed request."""
    worst = max(plan.stages, key=lambda st: st.mem_total)
    msg = (f"the {req.method} plan does not fit: its peak is {plan.max_mem / GiB:.1f} GiB on stage "
           f"{worst.index} (of 0..{req.P - 1}) against a budget of {req.mem_budget / GiB:.1f} GiB per GPU")
    L, b = req.cfg.num_layers, req.micro_batch_size
    groups = []  # each a sequence of (tip, {field: value}): the first change that fits is reported
    if req.method == "naive":
        groups.append([("the balanced plan (--plan auto)", dict(method="auto"))])
    if not req.checkpoint:
        groups.append([("activation checkpointing (--checkpoint)", dict(checkpoint=True))])
    # the fewest stages that fit; the largest micro-batch that fits, trying b/2, b/4, .. 1
    groups.append((f"more pipeline stages (--pp {P2})", dict(P=P2)) for P2 in range(req.P + 1, L + 1))
    groups.append((f"a smaller micro-batch (--micro_batch_size {b2})", dict(micro_batch_size=b2))
                  for b2 in (b >> k for k in range(1, b.bit_length())))
    if req.train != "lora":
        groups.append([(f"LoRA on a frozen base (--lora_rank {req.lora_rank})", dict(train="lora"))])
    if req.train == "full":  # the most trained blocks that fit
        groups.append((f"training only the last blocks (--train_layers {n})",
                       dict(train="last_n", train_layers=n)) for n in range(L - 1, 0, -1))
    tips = [tip for tip in (_tip(req, changes) for changes in groups) if tip]
    if not tips:  # P = L, recomputing, b = 1, LoRA already: only the shape or the card is left
        return msg + ". HINT: shorten --seq_len or use GPUs with more memory."
    return msg + ". HINT: change one of: " + "; ".join(tips) + "."


def _tip(req, changes):
    """'what: fits (peak ...)' for the first (what, {field: value}) change of req that fits, or for
    the last one tried if none does; None if there is none to try."""
    tip = None
    for what, change in changes:
        try:
            p = plan_request(replace(req, **change))
            ok, peak = p.fits, p.max_mem
        except PlanError as e:
            ok, peak = False, e.peak
        tip = f"{what}: " + ("fits" if ok else "still too big") + f" (peak {peak / GiB:.1f} GiB)"
        if ok:
            break
    return tip


def plan_pipeline(cfg, P, micro_batch_size, seq_len, micro_batches, **options):
    """Plan ChatGLM over P pipeline stages (options: Request's fields, e.g. train="lora",
    mem_budget=76 * GiB, method="naive"); raises PlanError, saying which single change would fit,
    if it will not fit mem_budget bytes per GPU."""
    req = Request(cfg, P, micro_batch_size, seq_len, micro_batches, **options)
    plan = plan_request(req)
    if not plan.fits:
        raise PlanError(explain_misfit(req, plan), plan.max_mem)
    return plan


def plan_for_run(cfg, P, device, micro_batch_size, seq_len, micro_batches, train, lora_rank=8,
                 lora_targets=("query_key_value",), train_layers=0, gpu_mem_gib=0.0, method="auto",
                 copies=(1, 0), lm_head=True, rollout=None, loss_chunk=None, quantize=(0, 0)):
    """The plan a training run uses on `device`. On GPUs the budget is 95 % of the card's memory
    (or gpu_mem_gib) and weights are bf16; blocks may recompute their activations where a stage
    would not fit otherwise. copies: (trained, frozen) models of this shape held side by side
    (PPO's full mode holds (2, 2)); lm_head: does the run compute logits (not a reward model)?
    rollout: (prompts generated at once, answers per prompt, prompt tokens, new tokens) of an RL step;
    loss_chunk: the tokens a micro-batch's loss takes logits of, if not all (RL: the answers');
    quantize: (bits, group size[, head]) of a frozen int8 / int4 base (quant.scheme)."""
    cuda = torch.device(device).type == "cuda"
    budget = gpu_mem_gib * GiB or (0.95 * torch.cuda.get_device_properties(device).total_memory
                                   if cuda else None)
    plan = plan_pipeline(cfg, P, micro_batch_size, seq_len, micro_batches, train=train,
                         lora_rank=lora_rank or 8, lora_targets=tuple(lora_targets),
                         train_layers=train_layers, param_bytes=2 if cuda else 4,
                         checkpoint=budget is not None, mem_budget=budget, method=method,
                         copies=copies, lm_head=lm_head, loss_chunk=loss_chunk, quantize=tuple(quantize))
    return add_rollout(plan, cfg, *rollout, param_bytes=2 if cuda else 4) if rollout else plan


def rollout_bytes(cfg, stage, P, prompts, group, prompt_len, new_tokens, param_bytes):
    """What a stage holds beyond its weights and optimiser state while it generates (dist.generate):
    the KV cache of every answer's prompt and new tokens in its blocks; the largest prefill's
    activations (prompts / P of them at once, each computed once; with groups, their own cache before
    it is copied to the group's rows); on the last stage the float32 logits of every row, which
    sampling copies about twice."""
    L, C, rows = len(stage.layers), cfg.hidden_size, prompts * group
    kv = rows * (prompt_len + new_tokens) * L * 2 * C * param_bytes
    chunk = math.ceil(prompts / P) * prompt_len  # prefill tokens at once
    prefill = chunk * (2 * cfg.inner_hidden_size + 6 * C) * param_bytes + (group > 1) * chunk * L * 2 * C * param_bytes
    logits = rows * cfg.vocab_size * 4 * 3 if stage.last else 0
    return kv + prefill + logits


def add_rollout(plan, cfg, prompts, group, prompt_len, new_tokens, param_bytes):
    """The plan of an RL step: each stage's peak is the larger of training (its weights, gradients,
    optimiser state and activations) and generating (the same without activations, plus
    rollout_bytes). A rollout that does not fit the budget is refused, with the largest that does."""
    def peaks(n):
        return [(st.mem["params"] + st.mem["grads"] + st.mem["optim"],
                 rollout_bytes(cfg, st, plan.P, n, group, prompt_len, new_tokens, param_bytes)) for st in plan.stages]
    for st, (static, gen) in zip(plan.stages, peaks(prompts)):
        st.mem["rollout"] = gen
        st.mem_total = max(st.mem_total, static + gen)
    budget = plan.model.mem_budget
    if budget is None or plan.max_mem <= budget:
        return plan
    fits = [n for n in range(prompts - 1, 0, -1) if max(s + g for s, g in peaks(n)) <= budget]
    worst = max(plan.stages, key=lambda st: st.mem_total)
    raise PlanError(f"the rollout does not fit: generating {prompts} x {group} answers of {prompt_len} + "
                    f"{new_tokens} tokens needs {worst.mem_total / GiB:.1f} GiB on stage {worst.index} "
                    f"({worst.mem['rollout'] / GiB:.1f} GiB of it KV cache and activations), over the "
                    f"{budget / GiB:.1f} GiB budget. HINT: "
                    + (f"--gen_batch_size {fits[0]} fits (prompts generated at once); " if fits else "")
                    + "or lower --max_new_tokens / --group_size, or add stages (--pp)", peak=plan.max_mem,
                    rollout_fits=fits[0] if fits else 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4, help="pipeline stages (default %(default)s)")
    p.add_argument("--train", choices=("full", "lora", "last_n"), default="full",
                   help="what trains: everything, LoRA adapters on a frozen base, or the last "
                        "--train_layers blocks (default %(default)s)")
    p.add_argument("--train_layers", type=int, default=0, help="with --train last_n: how many blocks")
    p.add_argument("--lora_rank", type=int, default=8, help="with --train lora (default %(default)s)")
    p.add_argument("--lora_targets", default="query_key_value",
                   help="with --train lora: comma-separated block linears (default %(default)s)")
    p.add_argument("--micro_batch_size", type=int, default=4,
                   help="sequences per micro-batch (default %(default)s)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument("--micro_batches", type=int, default=16,
                   help="micro-batches per optimiser step (default %(default)s)")
    p.add_argument("--gpu_mem_gib", type=float, default=76.0,
                   help="memory budget per GPU in GiB, 0 for none (default %(default)s)")
    p.add_argument("--checkpoint", action="store_true",
                   help="let blocks recompute their activations where a stage would not fit")
    p.add_argument("--plan", choices=("auto", "naive"), default="auto",
                   help="auto: balanced stages; naive: equal layer counts (default %(default)s)")
    p.add_argument("--fp32", action="store_true", help="float32 weights (as on CPUs) instead of bf16")
    a = p.parse_args(argv)
    try:
        pl = plan_pipeline(glm.GLMConfig(), a.pp, a.micro_batch_size, a.seq_len, a.micro_batches,
                           train=a.train, lora_rank=a.lora_rank,
                           lora_targets=tuple(a.lora_targets.split(",")), train_layers=a.train_layers,
                           param_bytes=4 if a.fp32 else 2, checkpoint=a.checkpoint,
                           mem_budget=a.gpu_mem_gib * GiB or None, method=a.plan)
    except ValueError as e:  # PlanError, or a --train_layers / --lora_targets glm_pieces refuses
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(pl.format_table())


if __name__ == "__main__":
    main()
