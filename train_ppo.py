"""RLHF for ChatGLM-6B: PPO and PPO-ptx (actor, reference, critic and reward split by one pipeline
plan), and the critic-free GRPO, RLOO and REINFORCE++ (--algo), rewarded by a reward model, by
functions of the answer's text (--reward_fn, rewards.py), or both.

    python train_ppo.py                    # toy: toy SFT policy + toy RM on toy prompts (CPU, minutes)
    python train_ppo.py --algo grpo --reward_fn toy_exact    # toy GRPO, the toy task's answer check as reward

    # shared-base LoRA: one frozen base on each GPU serves all four roles
    torchrun --nproc_per_node=8 train_ppo.py --pp 8 --mode lora --model BASE \\
        --sft_adapter SFT_ADAPTER --rm_dir RM_ADAPTER_DIR --data prompts.jsonl --out runs/ppo

    # full: separate actor and critic weights; frozen reference and reward copies
    torchrun --nproc_per_node=8 train_ppo.py --pp 8 --mode full --actor SFT_DIR --rm_dir RM_DIR \\
        --data prompts.jsonl --ptx_data sft.jsonl --ptx_coef 0.5 --out runs/ppo

Roles. actor = the policy being trained (from SFT); reference = the frozen SFT policy; critic =
a value head on the reward model's backbone (trained); reward = the frozen reward model, its
score read at the final <eop>. In --mode lora they are adapters on one frozen base: "policy"
and "critic" train, "reference" (a frozen copy of the SFT adapter, or no adapter when the base
is the SFT model) and "reward" (the RM's adapter) do not.

One step: sample rollout_batch_size prompts per replica; generate through the pipeline; one
scoring pass for old log-probs, reference log-probs, values and the reward; per-token rewards
-beta * (log pi - log pi_ref) plus the normalised, clipped score on the last token; GAE;
whitened advantages; ppo_epochs over mini-batches of the clipped policy loss (+ entropy bonus,
+ ptx_coef * LM loss on SFT data) and the clipped value loss. GRPO / RLOO / REINFORCE++ sample
group_size answers to each prompt (one prefill each), need no critic, and take their advantages
from the group (or from whitened returns); see advantages().
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import ckpt
import data
import dist
import flags
import glm
import lora
import optim
import plan
import quant
import rewards


@dataclass
class Config:
    # ---- models
    mode: str = "lora"              # "lora" (one shared frozen base) or "full" (separate actor/critic weights)
    model: str = ""                 # lora: the frozen base (HF folder)
    quantize: int = 0               # lora: 8 / 4 = the shared base's block linears in int8 / int4; 0 = off
    quant_group_size: int = -1      # inputs per int scale: 0 = one per row; -1 = int8 per row, int4 128
    quantize_head: bool = False     # with --quantize: lm_head in int8 too (one scale per row)
    sft_adapter: str = ""           # lora: the SFT adapter (policy init + reference); "" = the base is the SFT model
    actor: str = ""                 # full: the SFT model (policy init + reference)
    rm_dir: str = ""                # train_rm.py output: weights or adapter, reward_head.safetensors, reward_stats.json
    out: str = "runs/ppo"           # the run's folder: checkpoints, metrics, final/
    # ---- data
    data: str = ""                  # prompts jsonl or tokenised folder (data.py tokenize --kind prompts)
    ptx_data: str = ""              # SFT jsonl or tokenised folder for the PPO-ptx term
    max_prompt_len: int = 256       # prompt tokens kept (from the end)
    # ---- LoRA (lora mode; a given adapter's own r/alpha/targets win)
    lora_rank: int = 8              # LoRA rank r (0: no LoRA)
    lora_alpha: float = 16.0        # LoRA scale is alpha / r
    lora_targets: str = "query_key_value"  # comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    # ---- algorithm: PPO (actor and critic), or critic-free GRPO, RLOO, REINFORCE++
    algo: str = "ppo"               # ppo, grpo, rloo or reinforce_pp
    group_size: int = 0             # completions per prompt; 0 = 8 for grpo and rloo, 1 for ppo and reinforce_pp
    no_std_norm: bool = False       # grpo: advantage r - mean of the group, not divided by its std (Dr. GRPO)
    kl_in: str = ""                 # "reward" (per token, as PPO) or "loss" (k3, as GRPO); "" = the algorithm's
    loss_agg: str = "token_mean"    # token_mean (every response token weighs the same) or seq_mean (every answer)
    skip_uniform_groups: bool = False  # groups whose rewards are all equal leave the loss
    reward_fn: str = ""             # rewards from text, MODULE:FUNCTION[=WEIGHT],... (rewards.py); added to --rm_dir's
    # ---- rollouts
    rollout_batch_size: int = 64    # prompts per step and data-parallel replica (each gives group_size answers)
    gen_batch_size: int = 0         # prompts generated at once (0: all); bounds the KV cache (64 x 512 tokens: 14 GiB)
    max_new_tokens: int = 256       # response tokens per rollout
    temperature: float = 1.0        # rollout sampling temperature
    top_p: float = 1.0              # nucleus sampling (1: off)
    top_k: int = 0                  # top-k sampling (0: off)
    # ---- PPO
    max_steps: int = 100            # steps (one rollout batch each)
    ppo_epochs: int = 1             # passes over each rollout batch
    mini_batch_size: int = 16       # sequences per optimiser step and replica
    micro_batch_size: int = 4       # sequences per forward
    actor_lr: float = 1e-5          # policy learning rate
    critic_lr: float = 1e-5         # value model learning rate (ppo)
    weight_decay: float = 0.0       # AdamW's decoupled weight decay
    grad_clip: float = 1.0          # clip the global gradient norm to this (0: off)
    gamma: float = 1.0              # discount of GAE (and of REINFORCE++'s returns)
    lam: float = 0.95               # lambda of GAE
    clip_ratio: float = 0.2         # PPO's policy ratio clip epsilon
    value_clip: float = 0.2         # clip of the value update around the old values (ppo)
    entropy_coef: float = 0.0       # entropy bonus in the policy loss
    kl_coef: float = 0.05           # beta; adapted towards target_kl when target_kl > 0
    target_kl: float = 0.0          # adaptive beta's KL target (0: fixed kl_coef)
    kl_horizon: int = 10000         # adaptive beta's horizon in sequences
    reward_clip: float = 5.0        # the normalised score is clipped to [-reward_clip, reward_clip]
    no_eop_penalty: float = 0.0     # added to the score of a response that never emitted <eop>
    ptx_coef: float = 0.0           # weight of the PPO-ptx SFT loss (0: off)
    ptx_batch_size: int = 4         # SFT sequences per actor update and replica
    ptx_pack: bool = False          # PPO-ptx rows of max_prompt_len + max_new_tokens tokens, several examples each
    seed: int = 0                   # data order, initialisation and sampling
    # ---- memory and the pipeline
    checkpoint: bool = False        # activation checkpointing in every block (the planner may add some)
    pp: int = 1                     # pipeline stages; data-parallel replicas = world size / pp
    plan: str = "auto"              # "auto" (balanced memory and time) or "naive" (equal layer counts)
    gpu_mem_gib: float = 0.0        # memory budget per GPU for the planner; 0 = the card's
    # ---- logs and checkpoints
    log_every: int = 1              # write metrics.jsonl every N steps
    sample_every: int = 10          # print a sample every N steps (0: never)
    save_every: int = 20            # checkpoint every N steps and at the end (0: never)
    save_final: bool = True         # write the trained policy to OUT/final
    resume: bool = False           # continue from the newest complete checkpoint in --out
    overwrite: bool = False        # write into an --out that holds something else
    keep_checkpoints: int = 2      # the newest N checkpoints stay on disk
    allow_data_change: bool = False  # --resume on data files whose contents changed
    timeout_min: float = 10.0       # a rank silent this long (stalled, dead) ends the run
    threads: int = 0                # CPU threads per process (0: torch's default; the toy run: 1)


# flags that must be > 0, and >= 0 (every number must be finite)
POSITIVE = ("timeout_min", "max_prompt_len", "rollout_batch_size", "max_new_tokens", "max_steps", "ppo_epochs",
            "mini_batch_size", "micro_batch_size", "kl_horizon", "ptx_batch_size", "log_every", "keep_checkpoints",
            "pp", "temperature", "top_p", "lora_rank", "lora_alpha")
NON_NEGATIVE = ("group_size", "gen_batch_size", "threads", "actor_lr",
                "critic_lr", "weight_decay", "grad_clip", "gamma", "lam", "clip_ratio", "value_clip",
                "entropy_coef", "kl_coef", "target_kl", "reward_clip", "ptx_coef", "top_k", "sample_every",
                "save_every", "gpu_mem_gib")


def one_process_env():
    """This process's environment without torchrun's variables: a script started from a rank must run as
    one process of its own, not join (and wait for) this run's process group."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items()
            if k not in launch and not k.startswith(("TORCHELASTIC_", "TORCH_NCCL"))}


def toy_models_and_data(cfg, d):
    """The toy run (no models given): the toy SFT policy and toy RM next to --out, trained first by
    their own scripts if missing (the quickstart chain; under torchrun rank 0 runs them, one process
    each, while the other ranks wait for their results), and the toy prompts."""
    runs, rm = data.toy_runs(cfg.out), cfg.algo == "ppo" or not cfg.reward_fn  # a reward model, unless not used
    cfg.actor, cfg.rm_dir = os.path.join(runs, "toy_sft", "final"), os.path.join(runs, "toy_rm", "final") if rm else ""
    for script, result in (("train_sft.py", cfg.actor), ("train_rm.py", cfg.rm_dir))[:1 + rm]:
        if not dist.is_main():
            while not os.path.isdir(result):  # polled, not a barrier: a busy machine may take longer than its timeout
                time.sleep(0.5)
            continue
        if os.path.isdir(result):
            continue
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
               "--out", os.path.dirname(result)]
        print(f"$ {' '.join(cmd)}", flush=True)
        code = subprocess.run(cmd, env=one_process_env()).returncode
        if code:
            raise SystemExit(f"error: the toy run's `{' '.join(cmd)}` failed (exit code {code}); see its output above")
    dist.barrier()
    cfg.data = cfg.data or data.toy_file("sft_eval")  # the held-out questions: the RL sees only the reward
    return cfg


ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp")
GROUPED = ("grpo", "rloo")  # their baseline is the other answers to the same prompt


def algorithm_defaults(cfg):
    """Fill the settings left to the algorithm: group_size (8 for grpo and rloo, else 1) and where the
    KL goes (in the loss for grpo, as its paper puts it; in the reward for the others)."""
    if cfg.algo not in ALGOS:
        raise ValueError(f"--algo {cfg.algo!r}: expected one of {', '.join(ALGOS)}")
    cfg.group_size = cfg.group_size or (8 if cfg.algo in GROUPED else 1)
    cfg.kl_in = cfg.kl_in or ("loss" if cfg.algo == "grpo" else "reward")
    return cfg


def check_models(cfg):
    """The folders each mode needs and the algorithm's settings, checked before anything is read."""
    if cfg.mode not in ("lora", "full"):
        raise ValueError(f"--mode {cfg.mode!r}: expected 'lora' or 'full'")
    if cfg.mode == "lora" and not cfg.model:
        raise ValueError("--mode lora needs --model BASE (the frozen base all roles share)")
    if cfg.mode == "full" and not cfg.actor:
        raise ValueError("--mode full needs --actor SFT_DIR (an HF weight folder)")
    if not cfg.rm_dir and (cfg.algo == "ppo" or not cfg.reward_fn):
        raise ValueError("--rm_dir is required: the output folder of train_rm.py" + (
            " (PPO's critic starts from it)" if cfg.reward_fn else "; or, for --algo grpo/rloo/reinforce_pp, "
                                                                 "--reward_fn to score answers by their text"))
    if not cfg.data:
        raise ValueError("--data is required: a jsonl of prompts ({\"prompt\": ..., \"history\": [...]})")
    if cfg.kl_in not in ("reward", "loss") or cfg.loss_agg not in ("token_mean", "seq_mean"):
        raise ValueError(f"--kl_in {cfg.kl_in!r} / --loss_agg {cfg.loss_agg!r}: expected reward or loss / "
                         "token_mean or seq_mean")
    if cfg.algo in GROUPED and cfg.group_size < 2:
        raise ValueError(f"--algo {cfg.algo} compares the answers to one prompt: --group_size must be >= 2")


def read_reward_stats(rm_dir):
    """The RM's held-out reward mean and std (train_rm.py writes them); PPO normalises scores by them."""
    path = os.path.join(rm_dir, "reward_stats.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing. HINT: --rm_dir is the final/ folder of a train_rm.py run")
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    if not all(isinstance(stats.get(k), (int, float)) and math.isfinite(stats[k]) for k in ("mean", "std")):
        raise ValueError(f"{path}: 'mean' and 'std' must be finite numbers, got {stats.get('mean')!r}, "
                         f"{stats.get('std')!r}. HINT: train the reward model again (its held-out rewards diverged)")
    return stats


# -----------------------------------------------------------------------------
# the four roles on this rank's stage


class Roles:
    """Which weights each role runs on this stage. In lora mode every role is an adapter (or none)
    of one model; in full mode each role has its own model. Heads live on the last stage. PPO has
    all four roles; the critic-free algorithms have no critic, and a reward only with --rm_dir."""

    def __init__(self, cfg, d, stage):
        self.d, self.mode = d, cfg.mode
        self.present = ["actor", "reference"] + ["critic"] * (cfg.algo == "ppo") + ["reward"] * bool(cfg.rm_dir)
        (self._build_lora if cfg.mode == "lora" else self._build_full)(cfg, d, stage)
        C = self.models["actor"].config.hidden_size
        self.value_head = self.reward_head = None
        if d.last and "reward" in self.present:
            self.reward_head = nn.Linear(C, 1).to(d.device)
            ckpt.load_head(self.reward_head, cfg.rm_dir, "reward_head")
            self.reward_head.requires_grad_(False)
        if d.last and "critic" in self.present:  # the critic starts from the reward model, head included
            self.value_head = nn.Linear(C, 1).to(d.device)
            self.value_head.load_state_dict(self.reward_head.state_dict())
            self.value_head.requires_grad_(True)

    def _build_lora(self, cfg, d, stage):
        model = dist.build_stage(cfg.model, stage, d, cfg.checkpoint,
                                 quant.scheme(cfg.model, cfg.quantize, cfg.quant_group_size,
                                              head=cfg.quantize_head))  # one base, all roles
        targets = tuple(cfg.lora_targets.split(","))
        sft = cfg.sft_adapter
        # trainable adapters in float32; frozen ones may stay in the base's dtype
        if sft:  # the policy starts as the SFT adapter; a frozen copy of it is the reference
            self._adapter(model, sft, "policy", torch.float32)
            self._adapter(model, sft, "reference", None)
        else:  # the base is the SFT model: a fresh adapter (B = 0) starts as exactly the reference
            lora.inject_lora(model, targets=targets, r=cfg.lora_rank, alpha=cfg.lora_alpha, name="policy",
                             dtype=torch.float32, seed=cfg.seed)
        if "critic" in self.present:
            self._adapter(model, cfg.rm_dir, "critic", torch.float32)
        if "reward" in self.present:
            self._adapter(model, cfg.rm_dir, "reward", None)
        lora.mark_only_lora_trainable(model, ("policy", "critic") if "critic" in self.present else ("policy",))
        self.models = {r: model for r in self.present}
        self.adapters = {"actor": "policy", "reference": "reference" if sft else None,
                         "critic": "critic", "reward": "reward"}

    @staticmethod
    def _adapter(model, adapter_dir, name, dtype):
        """Inject adapter `name` with the folder's own r/alpha/targets, then load it."""
        acfg = lora.read_adapter_config(adapter_dir)
        lora.inject_lora(model, targets=tuple(acfg["target_modules"]), r=acfg["r"], alpha=acfg["lora_alpha"],
                         name=name, dtype=dtype)
        lora.load_adapter(model, adapter_dir, name=name)

    def _build_full(self, cfg, d, stage):
        build = lambda path: dist.build_stage(path, stage, d, cfg.checkpoint)
        source = {"actor": cfg.actor, "reference": cfg.actor, "critic": cfg.rm_dir, "reward": cfg.rm_dir}
        self.models = {role: build(source[role]) for role in self.present}
        for role, m in self.models.items():
            m.requires_grad_(role in ("actor", "critic"))
            optim.fuse_weight_grads(m)
            if role == "critic" and m.lm_head is not None:
                m.lm_head.requires_grad_(False)  # the value comes from value_head; lm_head gets no gradient
        self.adapters = {r: None for r in self.models}

    def use(self, role):
        """The stage model with `role`'s weights active."""
        model = self.models[role]
        if self.mode == "lora":
            lora.set_adapter(model, self.adapters[role])
        return model

    def trainables(self, role):
        """{name: parameter} that the role's optimiser updates: its model's (or adapter's) trained
        tensors plus, for the critic, the value head; the names key the saved optimiser state."""
        heads = {"value_head": self.value_head} if role == "critic" and self.value_head else None
        named = optim.named_trainables(self.models[role], heads)
        if self.mode == "lora":  # one model holds both trained adapters: keep this role's own
            named = {n: p for n, p in named.items() if ".lora_" not in n or n.endswith("." + self.adapters[role])}
        return named

    def checkpointed(self):
        """{subfolder: (model, adapter name)} of the trained roles, as ckpt.save writes them."""
        lora_mode = self.mode == "lora"
        return {sub: (self.models[role], sub if lora_mode else None)
                for sub, role in (("policy", "actor"), ("critic", "critic")) if role in self.present}


# -----------------------------------------------------------------------------
# rollouts and advantages


def response_mask(ids, T, eos_id):
    """[B, L-1] mask over actions (index i = token i+1): response tokens up to and including <eop>."""
    B, L = ids.shape
    j = torch.arange(1, L, device=ids.device)  # the token each action index produces
    resp = ids[:, T:]  # [B, N]
    N = resp.shape[1]
    first_eop = torch.where(resp == eos_id, torch.arange(N, device=ids.device), N).min(dim=1).values  # [B]
    end = T + torch.minimum(first_eop, torch.full_like(first_eop, N - 1))  # last response token's index
    return (j[None] >= T) & (j[None] <= end[:, None]), end, first_eop < N


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over the masked action axis of [B, A] tensors.
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last action = 0); A_t = delta_t + gamma lam A_{t+1}."""
    B, A = rewards.shape
    adv = torch.zeros_like(rewards)
    nxt_v, nxt_a = torch.zeros(B, device=rewards.device), torch.zeros(B, device=rewards.device)
    for t in reversed(range(A)):
        m = mask[:, t].float()
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        a = delta + gamma * lam * nxt_a
        adv[:, t] = a * m
        # masked (prompt or padding) steps pass the future through untouched
        nxt_v = torch.where(mask[:, t], values[:, t], nxt_v)
        nxt_a = torch.where(mask[:, t], a, nxt_a)
    return adv, (adv + values) * mask


def masked_whiten(x, mask, group=None, eps=1e-8):
    """(x - mean) / std over the masked entries of every replica in `group`."""
    m = mask.float()
    s = dist.all_reduce(torch.stack([(x * m).sum(), m.sum()]), "sum", group)
    mean = s[0] / s[1].clamp(min=1)
    var = dist.all_reduce(((x - mean) ** 2 * m).sum(), "sum", group) / s[1].clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def kl_rewards(logp, ref_logp, score, mask, end, beta):
    """Per-action rewards [B, A]: -beta (log pi - log pi_ref) on response actions, plus the score
    on the action that produced the last response token."""
    r = -beta * (logp - ref_logp) * mask
    last = (end - 1).clamp(min=0)  # action index of token `end`
    return r.scatter_add(1, last[:, None], score[:, None])


def group_advantages(reward, n, algo, std_norm=True):
    """Per-answer advantages [B] from per-answer rewards [B], in groups of n consecutive rows (the n
    answers to one prompt). GRPO: (r - mean) / std within the group (std_norm; without it, Dr. GRPO's
    r - mean); RLOO: r minus the mean of the other n - 1 answers, which is n / (n - 1) (r - mean)."""
    g = reward.view(-1, n)  # [B/n, n]
    centred = g - g.mean(1, keepdim=True)
    if algo == "rloo":
        return (centred * n / (n - 1)).view(-1)
    return (centred / (g.std(1, keepdim=True) + 1e-6) if std_norm else centred).view(-1)


def advantages(cfg, r, score, beta, d):
    """Per-action advantages [B, A] of a rollout (r: mask, end, log-probs, PPO's values) for cfg.algo.
    The KL to the reference enters here as a per-token reward when --kl_in reward, else the loss
    holds it. PPO: GAE over the critic's values, whitened; REINFORCE++: the returns of the per-token
    rewards (its group's mean score subtracted first when group_size > 1), whitened over every
    replica's batch; GRPO / RLOO: one advantage per answer, from its group, on each of its tokens."""
    mask, beta = r["mask"], beta if cfg.kl_in == "reward" else 0.0
    if cfg.algo in GROUPED:
        seq = score - beta * ((r["logp"] - r["ref_logp"]) * mask).sum(1)  # [B]
        return group_advantages(seq, cfg.group_size, cfg.algo, not cfg.no_std_norm)[:, None] * mask
    if cfg.algo == "reinforce_pp" and cfg.group_size > 1:
        score = score - score.view(-1, cfg.group_size).mean(1).repeat_interleave(cfg.group_size)
    rewards = kl_rewards(r["logp"], r["ref_logp"], score, mask, r["end"], beta)
    values = r["values"] if cfg.algo == "ppo" else torch.zeros_like(rewards)
    adv, r["returns"] = gae(rewards, values, mask, cfg.gamma, cfg.lam if cfg.algo == "ppo" else 1.0)
    return masked_whiten(adv, mask, d.dp_group)


class KLController:
    """Fixed beta, or the adaptive rule: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        if self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err * n / self.horizon


# -----------------------------------------------------------------------------
# the per-micro-batch quantities (last stage)


def policy_loss(cfg, beta, stats):
    """Clipped surrogate over response actions, each weighted by mb["w"] (see loss_weights); plus an
    entropy bonus, and with --kl_in loss beta times the k3 estimate of KL(pi || pi_ref) per token,
    exp(d) - d - 1 with d = log pi_ref - log pi: never negative, and unbiased under pi's samples."""
    def fn(model, h, mb):
        mask = mb["mask"]  # the head only where there is an action to score: [n] of each below
        logp, entropy = glm.head_logprobs(model.lm_head, h[:, :-1][mask], mb["input_ids"][:, 1:][mask],
                                          cfg.temperature, entropy="grad" if cfg.entropy_coef else True)
        old, adv, w = mb["logp"][mask], mb["adv"][mask], mb["w"][mask]
        ratio = torch.exp(logp - old)
        loss = -(w * torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio) * adv)).sum()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * (w * entropy).sum()
        if cfg.kl_in == "loss":
            dl = mb["ref_logp"][mask] - logp
            loss = loss + beta * (w * (torch.exp(dl) - dl - 1)).sum()
        with torch.no_grad():
            stats.add_(torch.stack([((ratio - 1).abs() > cfg.clip_ratio).float().sum(),
                                    (0.5 * (logp - old) ** 2).sum(), entropy.sum(), mask.sum().float()]))
        return loss
    return fn


def loss_weights(mask, keep, agg, group):
    """Per-action weights [b, A] of one mini-batch that sum to 1 over every replica's share of it:
    each kept response token alike (token_mean), or each kept answer alike, its tokens sharing its
    weight (seq_mean). keep [b] drops answers from the loss (the groups --skip_uniform_groups skips)."""
    m = mask.float() * keep[:, None]
    if agg == "token_mean":
        return m / dist.all_reduce(m.sum(), "sum", group).clamp(min=1)
    answers = dist.all_reduce((m.sum(1) > 0).float().sum(), "sum", group).clamp(min=1)
    return m / m.sum(1, keepdim=True).clamp(min=1) / answers


def value_loss(cfg, head, n_tok, stats):
    """Clipped value loss 0.5 max((V - R)^2, (V_clip - R)^2) over response actions, summed / n_tok."""
    def fn(model, h, mb):
        mask = mb["mask"]
        v = head(h[:, :-1][mask].float()).float()[:, 0]  # [n]: the head is float32
        old, ret = mb["values"][mask], mb["returns"][mask]
        v_clip = old + (v - old).clamp(-cfg.value_clip, cfg.value_clip)
        loss = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2).sum()
        with torch.no_grad():
            stats.add_(torch.stack([loss.detach(), mask.sum().float()]))
        return loss / n_tok
    return fn


def ptx_loss(coef, n_tok):
    """ptx_coef times the SFT language-model loss (mean over its response tokens)."""
    return lambda model, h, mb: coef * data.lm_loss(model.lm_head, h, mb["labels"]) / n_tok


# -----------------------------------------------------------------------------
# one PPO step: rollout, scores, advantages, then the updates


def split(batch, idx, size):
    """Micro-batches {key: tensor[rows]} of `size` rows from a dict of [B, ...] tensors."""
    return [{k: v[idx[i:i + size]] for k, v in batch.items()} for i in range(0, len(idx), size)]


def row_batches(ids, T, mask, end, size):
    """Scoring micro-batches of `size` rows, one sequence a row. Each holds what scoring reads:
    "pred_row", "pred_col" (the hidden state that predicts each action's token, row-major over
    mask), "target" (that token), "eop_row", "eop_col" (each answer's last token)."""
    out = []
    for i in range(0, ids.shape[0], size):
        rows, cols = mask[i:i + size].nonzero(as_tuple=True)  # action col predicts token col + 1
        out.append({"input_ids": ids[i:i + size], "pred_row": rows, "pred_col": cols,
                    "target": ids[i:i + size][rows, cols + 1], "eop_row": torch.arange(len(end[i:i + size]),
                    device=ids.device), "eop_col": end[i:i + size]})
    return out


def group_batches(ids, T, mask, n, size, gcfg):
    """The same micro-batches for groups of n completions (consecutive rows of one prompt): each
    group is one row, its prompt once, then its n answers (data.group_rows), so the prompt is
    computed once per group, not n times; size // n groups (at least one) per micro-batch. Actions
    come out in the same row-major order as row_batches'."""
    n_act = mask.sum(1).tolist()
    groups = []
    for r in range(0, ids.shape[0], n):
        prompt = ids[r, :T].tolist()
        lead = next((i for i, t in enumerate(prompt) if t != gcfg.pad_token_id), T)  # left padding
        groups.append((prompt[lead:], [ids[r + k, T:T + n_act[r + k]].tolist() for k in range(n)]))
    per = max(1, size // n)
    return [{k: v.to(ids.device) for k, v in data.group_rows(groups[i:i + per], gcfg.pad_token_id, gcfg)[0].items()}
            for i in range(0, len(groups), per)]


def rm_scores(roles, d, mbs):
    """The reward model's score of every answer [B], read at its last token."""
    return torch.cat(dist.forward(roles.use("reward"), d, mbs, lambda m, h, mb: roles.reward_head(
        h[mb["eop_row"], mb["eop_col"]].float())[:, 0], lambda mb: (len(mb["eop_row"]),)))


def score_rollout(roles, d, ids, T, cfg):
    """One pass per role present over the finished sequences: old and reference log-probs and the
    critic's values at every action (0 elsewhere), the reward model's score (with --rm_dir). The
    completions of a group (--group_size) share one row, their prompt computed once."""
    gcfg = roles.models["actor"].config
    mask, end, has_eop = response_mask(ids, T, gcfg.eos_token_id)
    n = getattr(cfg, "group_size", 1)
    mbs = (group_batches(ids, T, mask, n, cfg.micro_batch_size, gcfg) if n > 1 else
           row_batches(ids, T, mask, end, cfg.micro_batch_size))
    at = lambda h, mb: h[mb["pred_row"], mb["pred_col"]]  # [N, C]: the hidden state before each action

    def per_action(role, fn):  # [N] per micro-batch -> [B, L-1], 0 off the actions
        out = torch.zeros(mask.shape, device=ids.device)
        out[mask] = torch.cat(dist.forward(roles.use(role), d, mbs, fn, lambda mb: (len(mb["target"]),)))
        return out
    logp_fn = lambda m, h, mb: glm.head_logprobs(m.lm_head, at(h, mb), mb["target"], cfg.temperature)[0]
    r = dict(mask=mask, end=end, has_eop=has_eop, logp=per_action("actor", logp_fn),
             ref_logp=per_action("reference", logp_fn))
    if "critic" in roles.present:
        r["values"] = per_action("critic", lambda m, h, mb: roles.value_head(at(h, mb).float())[:, 0])
    if "reward" in roles.present:
        r["score"] = rm_scores(roles, d, mbs)
    return r


@dataclass
class Judge:
    """What an answer's task reward comes from besides the reward role's score: that model's held-out
    mean and std (to normalise it), and the --reward_fn functions of the text."""
    tok: glm.Tokenizer
    rm_stats: dict
    fns: list

    def rewards(self, r, ids, T, texts, cfg):
        """Each answer's task reward [B], raw (logged) and as it trains: the reward model's score,
        normalised and clipped, plus the functions' rewards."""
        raw = cfg.no_eop_penalty * (~r["has_eop"]).float()
        norm = raw
        if "score" in r:
            raw = raw + r["score"]
            norm = ((raw - self.rm_stats["mean"]) / max(self.rm_stats["std"], 1e-6)).clamp(-cfg.reward_clip,
                                                                                         cfg.reward_clip)
        if self.fns:  # every stage calls them, so that a failing function is reported by every rank
            answers = [sample_text(self.tok, row[T:]) for row in ids]  # ids outside the tokenizer never pass a check
            f = torch.tensor(rewards.score(self.fns, texts, answers), device=ids.device)
            raw, norm = raw + f, norm + f
        return raw, norm


def generate_rollout(actor, d, prompt_ids, cfg, gen):
    """group_size sampled answers to each prompt [B, T], --gen_batch_size prompts at a time (all when
    0): ids [B * group_size, T + N'], the chunks' answers right-padded to the longest."""
    parts = [dist.generate(actor, d, chunk, cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                           top_p=cfg.top_p, top_k=cfg.top_k, generator=gen, group_size=cfg.group_size)[0]
             for chunk in prompt_ids.split(cfg.gen_batch_size or prompt_ids.shape[0])]
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=actor.config.pad_token_id) for p in parts])


def rollout(roles, d, prompt_ids, texts, cfg, judge, beta, gen):
    """Sample group_size answers to each prompt (texts: the prompts as text), score them with every
    role present and the judge, and turn the scores into advantages (and PPO's returns); the
    training batch, and the scores with their timings."""
    T, t0, n = prompt_ids.shape[1], time.perf_counter(), cfg.group_size
    ids = generate_rollout(roles.use("actor"), d, prompt_ids, cfg, gen)
    t1 = time.perf_counter()
    r = score_rollout(roles, d, ids, T, cfg)
    r["raw_score"], score = judge.rewards(r, ids, T, [t for t in texts for _ in range(n)], cfg)
    groups = score.view(-1, n)
    r["uniform"] = (groups.max(1).values - groups.min(1).values) < 1e-6  # [B/n]: every answer scored alike
    r["group_std"] = groups.std(1) if n > 1 else torch.zeros(groups.shape[0], device=score.device)
    keep = ~r["uniform"].repeat_interleave(n) if cfg.skip_uniform_groups and n > 1 else torch.ones_like(score)
    adv = advantages(cfg, r, score, beta, d)
    r["t_generate"], r["t_score"] = t1 - t0, time.perf_counter() - t1
    batch = {"input_ids": ids, "mask": r["mask"], "logp": r["logp"], "adv": adv, "keep": keep.float()}
    batch.update({k: r[k] for k in ("ref_logp",) if cfg.kl_in == "loss"})
    batch.update({k: r[k] for k in ("returns", "values") if "values" in r})
    return batch, r


def ppo_update(roles, opts, bad, batch, d, cfg, step, next_ptx, beta):
    """ppo_epochs over shuffled mini-batches: one actor step (clipped policy loss, + ptx) and, for
    PPO, one critic step (clipped value loss) each. Returns the summed policy and value statistics."""
    pstats, vstats = torch.zeros(4, device=d.device), torch.zeros(2, device=d.device)
    order_gen = torch.Generator().manual_seed(cfg.seed + 31 * step)
    B = batch["input_ids"].shape[0]
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=order_gen).to(d.device)
        for m in range(0, B, cfg.mini_batch_size):
            rows = perm[m:m + cfg.mini_batch_size]
            mini = {**{k: v[rows] for k, v in batch.items()},
                    "w": loss_weights(batch["mask"][rows], batch["keep"][rows], cfg.loss_agg, d.dp_group)}
            mbs = split(mini, torch.arange(len(rows), device=d.device), cfg.micro_batch_size)
            actor = roles.use("actor")
            loss = dist.train_step(actor, d, mbs, policy_loss(cfg, beta, pstats))
            if next_ptx is not None:
                pmbs = [{k: v.to(d.device) for k, v in next_ptx().items()}]  # packed rows carry their own layout
                p_tok = dist.all_reduce(data.count_labels(pmbs[0]["labels"]).float(), "sum", d.dp_group).clamp(min=1)
                loss = loss + dist.train_step(actor, d, pmbs, ptx_loss(cfg.ptx_coef, p_tok))
            _, _, bad["actor"] = optim.optimizer_step(opts["actor"], loss, cfg.actor_lr, cfg.grad_clip, d,
                                                      bad["actor"], step)
            if "critic" in opts:
                n_tok = dist.all_reduce(batch["mask"][rows].sum().float(), "sum", d.dp_group).clamp(min=1)
                vloss = dist.train_step(roles.use("critic"), d, mbs, value_loss(cfg, roles.value_head, n_tok, vstats))
                _, _, bad["critic"] = optim.optimizer_step(opts["critic"], vloss, cfg.critic_lr, cfg.grad_clip, d,
                                                           bad["critic"], step)
    return pstats, vstats


# -----------------------------------------------------------------------------
# reports: step metrics, log lines, the toy run's before/after table


def metrics(r, pstats, vstats, d):
    """Reward, KL, entropy, clip fraction, approximate KL, length, the groups' reward spread and
    uniform share, PPO's value loss and explained variance, over every replica, from a rollout's
    scores r and the update's summed statistics."""
    raw_score, m = r["raw_score"], r["mask"].float()
    kl_seq = ((r["logp"] - r["ref_logp"]) * m).sum(1)  # [B]
    n = m.sum()
    var = lambda x: (x ** 2 * m).sum() / n - ((x * m).sum() / n) ** 2
    critic = "values" in r
    resid = (r["returns"] - r["values"]) * m if critic else m
    local = torch.stack([raw_score.sum(), (raw_score ** 2).sum(), kl_seq.sum(), m.sum(1).sum(),
                         torch.tensor(float(raw_score.shape[0]), device=m.device),
                         var(resid) * n if critic else n * 0, var(r["returns"]) * n if critic else n * 0, n,
                         r["group_std"].sum(), r["uniform"].float().sum(), torch.tensor(float(len(r["uniform"])),
                                                                                       device=m.device)])
    g = dist.all_reduce(local, "sum", d.dp_group)
    B = g[4]
    pstats = dist.all_reduce(dist.broadcast_from_last_stage(pstats, d), "sum", d.dp_group)
    mean = g[0] / B
    out = dict(reward_mean=float(mean), reward_std=float((g[1] / B - mean ** 2).clamp(min=0).sqrt()),
               kl=float(g[2] / B), response_len=float(g[3] / B),
               clip_frac=float(pstats[0] / pstats[3].clamp(min=1)), approx_kl=float(pstats[1] / pstats[3].clamp(min=1)),
               entropy=float(pstats[2] / pstats[3].clamp(min=1)),
               group_reward_std=float(g[8] / g[10]), uniform_groups=float(g[9] / g[10]))
    if critic:
        vstats = dist.all_reduce(dist.broadcast_from_last_stage(vstats, d), "sum", d.dp_group)
        out.update(explained_var=float(1 - g[5] / g[6].clamp(min=1e-8)),
                   value_loss=float(vstats[0] / vstats[1].clamp(min=1)))
    return out


def toy_report(roles, tok, d, cfg):
    """On the toy task's held-out questions: exact-match accuracy of the policy's greedy answers,
    the reward model's mean score of those answers, and the answers."""
    eval_ex = data.load_sft(data.toy_file("sft_eval"))
    model = roles.use("actor")
    ids = glm.left_pad([data.encode_prompt(tok, e, cfg.max_prompt_len) for e in eval_ex], tok.pad_id).to(d.device)
    model.eval()
    out, _ = dist.generate(model, d, ids, cfg.max_new_tokens)
    model.train()
    answers = [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    score = None
    if "reward" in roles.present:  # only the reward model's pass; every stage gets its output (dist.forward)
        mask, end, _ = response_mask(out, ids.shape[1], roles.models["actor"].config.eos_token_id)
        score = float(rm_scores(roles, d, row_batches(out, ids.shape[1], mask, end, cfg.micro_batch_size)).mean())
    return data.toy_accuracy(eval_ex, answers), score, [[e["prompt"], a] for e, a in zip(eval_ex, answers)]


def toy_tables(before, after, rows, cfg):
    """The toy run's before/after table on the held-out questions, its first and last logged steps
    (from metrics.jsonl, so a resumed run's table covers the whole run), and the answers that changed:
    [(caption, header, rows)], as report.write takes them."""
    judged_by = " + ".join(["the toy reward model"] * bool(cfg.rm_dir) + [cfg.reward_fn] * bool(cfg.reward_fn))
    rows = [r for r in rows if r.get("reward_mean") is not None]
    mean = lambda rows, k: f"{sum(r[k] for r in rows) / len(rows):.3f}" if rows else "n/a"
    summary = [["accuracy of the greedy answers", f"{before[0]:.1%}", f"{after[0]:.1%}"],
               ["RM score of the greedy answers", *(f"{x[1]:.3f}" for x in (before, after) if x[1] is not None)],
               ["rollout reward mean (first / last 5 steps)", mean(rows[:5], "reward_mean"),
                mean(rows[-5:], "reward_mean")],
               ["KL to the reference (first / last 5 steps)", mean(rows[:5], "kl"), mean(rows[-5:], "kl")]]
    mark = lambda p, x: "right" if data.toy_answer_correct(p, x) else "wrong"
    changed = [[p, f"{a!r} ({mark(p, a)})", f"{b!r} ({mark(p, b)})"]
               for (p, a), (_, b) in zip(before[2], after[2]) if a != b]
    return [(f"on the held-out questions (the RL prompts; the reward: {judged_by})", ["", "before RL", "after RL"],
             [row for row in summary if len(row) == 3]),
            (f"greedy answers that changed: {len(changed)} of {len(before[2])}", ["question", "before", "after"],
             changed)]


def print_tables(tables):
    for caption, header, rows in tables:
        print(f"\n{caption}")
        widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
        for row in [header, *rows]:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def print_sample(step, m, tok, ids, T):
    dist.print0(f"\nstep {step}: reward {m['reward_mean']:.3f} kl {m['kl']:.4f} | sample: "
                f"{sample_text(tok, ids[:T])!r} -> {sample_text(tok, ids[T:])!r}")


def throughput(ids, pad_id, d, t0):
    """Answers and (prompt + generated) tokens a second, over every replica, the tokens also per GPU:
    the throughput RL frameworks report."""
    seconds = time.perf_counter() - t0
    n = dist.all_reduce(torch.tensor([float(ids.shape[0]), float((ids != pad_id).sum())], device=ids.device),
                        "sum", d.dp_group)
    return dict(answers_per_s=float(n[0]) / seconds, tokens_per_s_per_gpu=float(n[1]) / seconds / d.world)


def sample_text(tok, ids):
    """A log line's text of ids [N]. The model's vocabulary may be larger than the tokenizer's
    (ChatGLM-6B pads its embedding), and a sampling policy can emit those ids: they are counted,
    not decoded, so a log line never stops a run."""
    known = (ids >= 0) & (ids < tok.vocab_size)
    text = tok.decode(ids[known], skip_special_tokens=True)
    return text if known.all() else f"{text} [+{int((~known).sum())} ids outside the tokenizer]"


def rl_plan(cfg, gcfg, d):
    """The plan of an RL step: the actor's training (full mode holds the actor, and PPO's critic,
    training beside frozen reference, and reward, copies), and the rollout's generation; and how
    many prompts it generates at once: --gen_batch_size, else all of them, or where their KV cache
    does not fit, the most that fit (said)."""
    def plan_with(prompts):
        return plan.plan_for_run(gcfg, d.P, d.device, cfg.micro_batch_size, cfg.max_prompt_len + cfg.max_new_tokens,
                                 max(1, cfg.mini_batch_size // cfg.micro_batch_size), cfg.mode,
                                 cfg.lora_rank if cfg.mode == "lora" else 0, cfg.lora_targets.split(","),
                                 gpu_mem_gib=cfg.gpu_mem_gib, method=cfg.plan,
                                 copies=(1, 0) if cfg.mode == "lora" else (1 + (cfg.algo == "ppo"),
                                                                           1 + bool(cfg.rm_dir)),
                                 rollout=(prompts, cfg.group_size, cfg.max_prompt_len, cfg.max_new_tokens),
                                 loss_chunk=cfg.micro_batch_size * cfg.max_new_tokens,  # logits of the answers only
                                 quantize=quant.scheme(cfg.model or cfg.actor, cfg.quantize, cfg.quant_group_size,
                                                       cfg.mode, cfg.quantize_head))
    prompts = min(cfg.gen_batch_size or cfg.rollout_batch_size, cfg.rollout_batch_size)
    try:
        return plan_with(prompts), prompts
    except plan.PlanError as e:
        if cfg.gen_batch_size or not e.rollout_fits:
            raise
        dist.print0(f"the KV cache of all {prompts} prompts' answers does not fit: generating {e.rollout_fits} "
                    "prompts at a time (--gen_batch_size sets it)")
        return plan_with(e.rollout_fits), e.rollout_fits


def main(argv=None):
    cfg = flags.parse(Config, argv, preset=lambda c: {} if c.model or c.actor or c.rm_dir else
                      data.TOY_PPO if c.algo == "ppo" else data.TOY_RL, positive=POSITIVE, non_negative=NON_NEGATIVE)
    d = dist.setup(cfg.pp, cfg.timeout_min, cfg.threads)
    toy, cfg = not (cfg.model or cfg.actor or cfg.rm_dir), algorithm_defaults(cfg)
    cfg = toy_models_and_data(cfg, d) if toy else cfg
    check_models(cfg)
    ckpt.check_out(cfg.out, "train_ppo", asdict(cfg), cfg.resume, cfg.overwrite)  # before any work
    torch.manual_seed(cfg.seed + d.rank)
    dist.print0(f"config: {asdict(cfg)}")

    # ---- tokenizer and data
    base_dir = cfg.model if cfg.mode == "lora" else cfg.actor
    tok = glm.Tokenizer.from_dir(base_dir)
    stats = data.TruncationStats()
    # a jsonl is read and encoded here, a tokenised folder mapped and read lazily; texts: the question a
    # --reward_fn judges (its line's "prompt")
    prompts, texts = data.prompt_dataset(tok, cfg.data, cfg.max_prompt_len, stats)
    dist.print0(f"prompts: {len(prompts)}; {stats}")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ValueError("--ptx_coef > 0 needs --ptx_data (an SFT jsonl)")
    ptx = data.sft_dataset(tok, cfg.ptx_data, cfg.max_prompt_len + cfg.max_new_tokens) if cfg.ptx_coef > 0 else []
    if ptx and cfg.ptx_pack:
        ptx = data.Packed(ptx, cfg.max_prompt_len + cfg.max_new_tokens, cfg.seed + 1, tok)
    batches = data.Batches(len(prompts), cfg.rollout_batch_size, cfg.seed, rank=d.dp_rank, world=d.D)
    ptx_batches = data.Batches(len(ptx), cfg.ptx_batch_size, cfg.seed + 1, rank=d.dp_rank, world=d.D) if ptx else None
    next_ptx = (lambda: data.collate_sft([ptx[i] for i in ptx_batches.next()], tok.pad_id)) if ptx else None
    judge = Judge(tok, read_reward_stats(cfg.rm_dir) if cfg.rm_dir else None,
                  rewards.load(cfg.reward_fn) if cfg.reward_fn else [])

    # ---- the plan, the roles on this stage, their optimisers, resume
    the_plan, gen_batch = rl_plan(cfg, glm.GLMConfig.from_json(os.path.join(base_dir, "config.json")), d)
    dist.print0(the_plan.format_table())
    roles = Roles(cfg, d, the_plan.stages[d.pp_rank])
    opts = {role: optim.AdamW(roles.trainables(role), lr, cfg.weight_decay, d, the_plan.hosts)
            for role, lr in (("actor", cfg.actor_lr), ("critic", cfg.critic_lr)) if role in roles.present}
    saved_opts = {f"optim-{role}": opt for role, opt in opts.items()}
    resume_dir = ckpt.checkpoint_dir(cfg.out, cfg.resume)
    for sub, (model, name) in roles.checkpointed().items() if resume_dir else ():
        ckpt.load_weights(model, os.path.join(resume_dir, sub), d, name)
    if resume_dir and roles.value_head is not None:
        ckpt.load_head(roles.value_head, resume_dir, "value_head")
    hashes = ckpt.file_hashes({k: data.data_file(v) for k, v in (("data", cfg.data), ("ptx_data", cfg.ptx_data)) if v})
    state = ckpt.resume(resume_dir, d, saved_opts, {"data": batches, "ptx_data": ptx_batches}, hashes,
                        cfg.allow_data_change) if resume_dir else {}
    step, bad = state.get("step", 0), state.get("bad", {"actor": 0, "critic": 0})
    kl_ctl = KLController(state.get("beta", cfg.kl_coef), cfg.target_kl, cfg.kl_horizon)

    # ---- loop
    log = ckpt.start_run(cfg.out, "train_ppo", asdict(cfg), state["step"] if resume_dir else None)
    cfg = replace(cfg, gen_batch_size=gen_batch)  # the plan's; args.json keeps the flag as given (a resume fits alike)
    gen = torch.Generator(device=d.device)
    # the toy table's "before" column is the SFT policy's: measured once, then carried by the checkpoints
    before = (state.get("toy_before") or toy_report(roles, tok, d, cfg)) if toy else None
    t_run, stopped = dist.start_clock(), 0
    with dist.Progress(cfg.max_steps, step) as bar, dist.StopSignal() as stop:
        while step < cfg.max_steps and not stopped:
            t0 = time.perf_counter()
            gen.manual_seed(cfg.seed * 1_000_003 + step * 1009 + d.dp_rank)  # per step: a resumed run samples the same
            picked = batches.next()
            prompt_ids = glm.left_pad([prompts[i] for i in picked], tok.pad_id).to(d.device)
            batch, r = rollout(roles, d, prompt_ids, [texts[i] for i in picked], cfg, judge, kl_ctl.beta, gen)
            t1 = time.perf_counter()
            pstats, vstats = ppo_update(roles, opts, bad, batch, d, cfg, step, next_ptx, kl_ctl.beta)
            step += 1
            m = metrics(r, pstats, vstats, d)
            kl_ctl.update(m["kl"], cfg.rollout_batch_size * d.D)
            m.update(beta=kl_ctl.beta, t_generate=r["t_generate"], t_score=r["t_score"],
                     t_train=time.perf_counter() - t1, **throughput(batch["input_ids"], tok.pad_id, d, t0))
            bar.update(reward=f"{m['reward_mean']:.3f}", kl=f"{m['kl']:.3f}", len=f"{m['response_len']:.1f}")
            if step % cfg.log_every == 0:
                log.log(step, **m)
            if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == 1):
                print_sample(step, m, tok, batch["input_ids"][0], prompt_ids.shape[1])
            stopped = step < cfg.max_steps and stop.requested(d)  # a signal in the last step: just finish
            if stopped or cfg.save_every > 0 and (step % cfg.save_every == 0 or step == cfg.max_steps):
                ckpt.save_checkpoint(cfg.out, step, d, tok.path, roles.checkpointed(),
                                     {"value_head": roles.value_head} if roles.value_head else None, saved_opts,
                                     dict(step=step, bad=bad, beta=kl_ctl.beta, data=batches.state_dict(),
                                          data_hashes=hashes,
                                          ptx_data=ptx_batches.state_dict() if ptx_batches else None,
                                          config=asdict(cfg), rm_stats=judge.rm_stats, toy_before=before),
                                     keep=cfg.keep_checkpoints)
    if stopped:
        stop.exit(stopped, step, cfg.out, d)
    wall = time.perf_counter() - t_run
    if cfg.save_final:
        final = os.path.join(cfg.out, "final")
        ckpt.save(final, d, tok.path, {"": roles.checkpointed()["policy"]})
        dist.print0(f"wrote {final} (the trained policy)")
    # every stage takes part in the report: it runs through the pipeline
    tables = toy_tables(before, toy_report(roles, tok, d, cfg), ckpt.read_metrics(cfg.out), cfg) if toy else ()
    if dist.is_main():
        print_tables(tables)
    ckpt.finish_run(cfg.out, d, the_plan.stages[d.pp_rank], wall, tables)


if __name__ == "__main__":
    flags.run(main)
