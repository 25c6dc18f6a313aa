"""train_ppo.py: GAE, the clipped losses and the KL reward against float64 formulas written here; that PPO
raises a toy reward (and a flipped advantage sign does not); a 2-stage pipeline against one process;
resuming; the errors a user can cause.

The end-to-end runs use the random 2-layer model folder `bench.py make_model --toy --adapter` writes: full
weights with reward_head.safetensors and reward_stats.json (actor and reward model in --mode full), an
rm_adapter/ subfolder (the reward adapter of --mode lora) and 512 random prompts. The multi-process
runs are ranks forked from the test process (conftest.gloo_mains).
"""
import contextlib
import io
import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import ckpt
import data
import dist
import glm
import lora
import plan
import train_ppo

from conftest import (ROOT, head_lines, load_tensors, make_base, metrics_by_step, newest_checkpoint, ppo_argv,
                      printed_config, write_jsonl)

TOY_SFT = data.toy_file("sft_train")
# what a rerun of the same seeded steps must reproduce (timings and throughput are not)
METRICS = ("reward_mean", "reward_std", "kl", "response_len", "explained_var", "clip_frac", "approx_kl",
           "entropy", "value_loss", "beta")
pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# helpers


# -----------------------------------------------------------------------------
# GAE and whitening


def naive_gae(rewards, values, mask, gamma, lam):
    """Per row, in float64, backwards over the masked (response) steps only:
    delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next, with V and A after the last step 0."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(steps):
            r, v = float(rewards[b, t]), float(values[b, t])
            next_a = r + gamma * next_v - v + gamma * lam * next_a
            next_v = v
            adv[b, t], ret[b, t] = next_a, next_a + v
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_equals_a_naive_backward_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    A = 12
    # rows: (first response action, number of response actions); prompts and responses of different lengths,
    # a response that runs to the last column, and one of a single token
    spans = [(3, 4), (5, 7), (0, 2), (8, 1), (2, 10)]
    mask = torch.zeros(len(spans), A, dtype=torch.bool)
    for b, (start, n) in enumerate(spans):
        mask[b, start:start + n] = True
    rewards = torch.randn(len(spans), A, generator=g)
    values = torch.randn(len(spans), A, generator=g)
    # whatever stands on prompt and padding steps must not leak into the response's advantages
    rewards[~mask] = 1e3
    values[~mask] = -1e3
    adv, returns = train_ppo.gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), want_adv, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(returns.double(), want_ret, atol=1e-5, rtol=1e-6)
    assert (adv[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_masked_whiten_has_zero_mean_and_unit_std_on_the_mask():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=g) * 3 + 2
    mask = torch.rand(4, 9, generator=g) > 0.4
    x[~mask] = 1e4  # ignored
    w = train_ppo.masked_whiten(x, mask)
    vals = x[mask].double()
    want = (vals - vals.mean()) / vals.std(unbiased=False)
    torch.testing.assert_close(w[mask].double(), want, atol=1e-5, rtol=1e-5)
    assert (w[~mask] == 0).all()


# -----------------------------------------------------------------------------
# the losses against float64 formulas


class StandIn(nn.Module):
    """The part of a stage model the losses use: an lm_head."""

    def __init__(self, C, V, seed):
        super().__init__()
        self.lm_head = nn.Linear(C, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(V, C, generator=torch.Generator().manual_seed(seed)))


def loss_batch(B=3, L=8, C=6, V=11, seed=0):
    """Random hidden states [B, L, C], ids, and an action mask [B, L-1] with a prompt and padding per row."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, C, generator=g)
    ids = torch.randint(V, (B, L), generator=g)
    mask = torch.zeros(B, L - 1, dtype=torch.bool)
    for b, (start, stop) in enumerate([(2, 6), (4, 7), (1, 3)]):
        mask[b, start:stop] = True
    return h, ids, mask, g


@pytest.mark.parametrize("entropy_coef,kl_in", [(0.0, "reward"), (0.05, "reward"), (0.05, "loss")])
def test_policy_loss_is_the_clipped_surrogate(entropy_coef, kl_in, temperature=0.7, beta=0.3):
    """The policy is the sampling one: softmax(logits / temperature). Each action's terms count with
    its weight w (loss_weights); with --kl_in loss, beta times k3 = exp(d) - d - 1, d = log pi_ref - log pi."""
    model = StandIn(6, 11, seed=1)
    h, ids, mask, g = loss_batch()
    with torch.no_grad():
        logp_now = torch.log_softmax(model.lm_head(h[:, :-1]).double() / temperature, -1).gather(
            -1, ids[:, 1:, None])[..., 0]
    # old log-probs a little off, so that ratios fall below, inside and above [1 - eps, 1 + eps]
    old = (logp_now + 0.4 * torch.randn(logp_now.shape, generator=g, dtype=torch.float64)).float()
    ref = (logp_now + 0.3 * torch.randn(logp_now.shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(mask.shape, generator=g)
    w = torch.rand(mask.shape, generator=g) * mask / 7  # any weights: token_mean's are 1 / (the global count)
    mb = {"input_ids": ids, "mask": mask, "logp": old, "adv": adv, "w": w, "ref_logp": ref}
    cfg = SimpleNamespace(clip_ratio=0.2, entropy_coef=entropy_coef, temperature=temperature, kl_in=kl_in)
    stats = torch.zeros(4)
    h = h.requires_grad_()
    got = train_ppo.policy_loss(cfg, beta, stats)(model, h, mb)
    got.backward()

    # the same in float64, one response action at a time
    h64 = h.detach().double().requires_grad_()
    W = model.lm_head.weight.detach().double()
    total, n_clip, n_low, n_high, kl2, ent_sum = 0.0, 0, 0, 0, 0.0, 0.0
    for b, t in mask.nonzero().tolist():
        logp_all = torch.log_softmax(W @ h64[b, t] / temperature, -1)  # action t scores token t + 1
        ratio = torch.exp(logp_all[ids[b, t + 1]] - old[b, t].double())
        a, wt = adv[b, t].double(), w[b, t].double()
        total = total - wt * torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
        entropy = -(logp_all.exp() * logp_all).sum()
        total = total - entropy_coef * wt * entropy
        if kl_in == "loss":
            dl = ref[b, t].double() - logp_all[ids[b, t + 1]]
            total = total + beta * wt * (torch.exp(dl) - dl - 1)
        n_clip += int(abs(ratio.item() - 1) > 0.2)
        n_low, n_high = n_low + int(ratio.item() < 0.8), n_high + int(ratio.item() > 1.2)
        kl2 += 0.5 * (logp_all[ids[b, t + 1]].item() - old[b, t].item()) ** 2
        ent_sum += entropy.item()
    want = total
    want.backward()
    assert n_low > 0 and n_high > 0 and n_clip < int(mask.sum())  # every branch of the min is exercised
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    assert (h.grad[:, -1] == 0).all()  # the last position scores no action
    torch.testing.assert_close(stats.double(), torch.tensor([n_clip, kl2, ent_sum, int(mask.sum())],
                                                            dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_value_loss_is_the_clipped_squared_error():
    C = 6
    head = nn.Linear(C, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, C, generator=torch.Generator().manual_seed(2)))
        head.bias.fill_(0.3)
    h, _, mask, g = loss_batch(C=C, seed=3)
    with torch.no_grad():
        v_now = head(h[:, :-1])[..., 0]
    # old values within and beyond value_clip of the new ones; returns on either side
    old = v_now + 0.5 * torch.randn(v_now.shape, generator=g)
    returns = v_now + torch.randn(v_now.shape, generator=g)
    mb = {"input_ids": torch.zeros(h.shape[:2], dtype=torch.long), "mask": mask, "values": old, "returns": returns}
    cfg = SimpleNamespace(value_clip=0.2)
    n_tok = torch.tensor(float(mask.sum() + 2))
    stats = torch.zeros(2)
    h = h.requires_grad_()
    got = train_ppo.value_loss(cfg, head, n_tok, stats)(None, h, mb)
    got.backward()

    h64 = h.detach().double().requires_grad_()
    w, bias = head.weight.detach().double()[0], head.bias.detach().double()[0]
    total, clipped = 0.0, 0
    for b, t in mask.nonzero().tolist():
        v = h64[b, t] @ w + bias  # the value of the state before action t
        o, r = old[b, t].double(), returns[b, t].double()
        v_clip = o + torch.clamp(v - o, -0.2, 0.2)
        total = total + 0.5 * torch.maximum((v - r) ** 2, (v_clip - r) ** 2)
        clipped += int((v_clip - r) ** 2 > (v - r) ** 2)
    want = total / n_tok.double()
    want.backward()
    assert 0 < clipped < int(mask.sum())
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.double(), torch.stack([total.detach(), torch.tensor(float(mask.sum()),
                                                            dtype=torch.float64)]), atol=1e-5, rtol=1e-5)


def test_ptx_loss_is_coef_times_the_lm_loss():
    model = StandIn(6, 11, seed=4)
    h, ids, _, _ = loss_batch(seed=5)
    labels = ids.clone()
    labels[:, :4] = data.IGNORE  # the prompt takes no loss
    labels[1, 4:6] = data.IGNORE
    coef, n_tok = 0.7, torch.tensor(17.0)
    got = train_ppo.ptx_loss(coef, n_tok)(model, h, {"input_ids": ids, "labels": labels})
    W = model.lm_head.weight.double()
    nll, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):  # position t predicts token t + 1
            if labels[b, t + 1] != data.IGNORE:
                nll -= torch.log_softmax(W @ h[b, t].double(), -1)[labels[b, t + 1]].item()
                count += 1
    assert count == 10
    torch.testing.assert_close(got.double(), torch.tensor(coef * nll / 17.0, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# which tokens are the response, and where the rewards land

PAD, GMASK, SOP, EOP = 3, 5, 8, 9  # the toy tokenizer's ids


def hand_built():
    """Left-padded prompts of 5, 3, 4 and 2 tokens (T = 7 with [gMASK] <sop>), then N = 4 response tokens:
    <eop> second, <eop> last, <eop> first (then padding), and no <eop> at all. The first prompt holds
    an <eop> id of its own, which is not the response's end."""
    prompts = [[20, EOP, 22, 23, 24], [30, 31, 32], [40, 41, 42, 43], [50, 51]]
    responses = [[60, EOP, PAD, PAD], [61, 62, 63, EOP], [EOP, PAD, PAD, PAD], [64, 65, 66, 67]]
    ids = glm.left_pad([p + [GMASK, SOP] for p in prompts], PAD)
    return torch.cat([ids, torch.tensor(responses)], dim=1), ids.shape[1], responses


def test_response_mask_on_hand_built_rollouts():
    ids, T, responses = hand_built()
    assert T == 7 and ids.shape == (4, 11)
    mask, end, has_eop = train_ppo.response_mask(ids, T, EOP)
    want = torch.zeros(4, 10, dtype=torch.bool)
    want_end = []
    for b, resp in enumerate(responses):
        n = resp.index(EOP) + 1 if EOP in resp else len(resp)  # response tokens, <eop> included
        for k in range(n):
            want[b, T + k - 1] = True  # token T + k is produced by action T + k - 1
        want_end.append(T + n - 1)
    assert torch.equal(mask, want)
    assert end.tolist() == want_end == [8, 10, 7, 10]
    assert has_eop.tolist() == [True, True, True, False]
    assert mask.sum(1).tolist() == [2, 4, 1, 4]  # the row without <eop> keeps all N tokens


def test_kl_rewards_sign_and_placement():
    ids, T, _ = hand_built()
    mask, end, _ = train_ppo.response_mask(ids, T, EOP)
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(mask.shape, generator=g) * 3  # nonzero everywhere, prompt and padding included
    ref_logp = -torch.rand(mask.shape, generator=g) * 3
    score = torch.tensor([2.0, -1.5, 0.75, 3.0])
    beta = 0.1
    r = train_ppo.kl_rewards(logp, ref_logp, score, mask, end, beta)
    assert (r[~mask] == 0).all()  # prompt and padding: exactly nothing
    last = torch.zeros_like(mask)
    last[torch.arange(4), end - 1] = True  # the action that produced the last response token
    assert last.tolist() == (mask & ~F.pad(mask, (0, 1))[:, 1:]).tolist()  # ... is the mask's last True
    kl_only = mask & ~last
    assert kl_only.any()
    # where the policy puts more probability on its token than the reference, the reward is a penalty
    assert (r[kl_only & (logp > ref_logp)] < 0).all() and (r[kl_only & (logp < ref_logp)] > 0).all()
    torch.testing.assert_close(r[kl_only], -beta * (logp - ref_logp)[kl_only])
    torch.testing.assert_close(r[last], score - beta * (logp - ref_logp)[last])
    # each row's return (gamma = 1) is its score minus beta times its summed KL
    torch.testing.assert_close(r.sum(1), score - beta * ((logp - ref_logp) * mask).sum(1))


def test_score_rollout_reads_each_role_at_the_right_position(toy_dir):
    """Old log-probs and values at every action (0 elsewhere), the reward at the last response token: each equal to the
    model run on that row alone, cut right after the position read (so later padding cannot matter)."""
    model = glm.ChatGLM.from_pretrained(toy_dir).eval()
    g = torch.Generator().manual_seed(7)
    heads = [nn.Linear(64, 1) for _ in range(2)]
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.randn(1, 64, generator=g))
    roles = SimpleNamespace(models={"actor": model}, use=lambda role: model, value_head=heads[0],
                            reward_head=heads[1], present=("actor", "reference", "critic", "reward"))
    ids, T, _ = hand_built()
    r = train_ppo.score_rollout(roles, dist.Dist(), ids, T, SimpleNamespace(micro_batch_size=3, temperature=1.0))
    assert r["end"].tolist() == [8, 10, 7, 10]
    with torch.no_grad():
        for b in range(ids.shape[0]):
            e = int(r["end"][b])
            h = model(ids[b:b + 1, :e + 1], return_hidden=True)[0]  # [e + 1, C]
            torch.testing.assert_close(r["score"][b], heads[1](h[-1])[0], atol=1e-5, rtol=1e-5)
            logp = torch.log_softmax(model.lm_head(h[:-1]).double(), -1)
            assert r["mask"][b].sum() > 0
            for i in range(e):  # action i scores token i + 1; the head runs only at actions
                act = bool(r["mask"][b, i])
                want = logp[i, ids[b, i + 1]] if act else torch.zeros((), dtype=torch.float64)
                torch.testing.assert_close(r["logp"][b, i].double(), want, atol=1e-5, rtol=0)
                torch.testing.assert_close(r["values"][b, i], heads[0](h[i])[0] * act, atol=1e-5, rtol=1e-5)
        # the row whose <eop> is followed by padding: the last column would have given another score
        last_col = heads[1](model(ids[:1], return_hidden=True)[0, -1])[0]
        assert (last_col - r["score"][0]).abs() > 1e-3


# -----------------------------------------------------------------------------
# the four roles: each scores with its own weights


def write_adapter(path, targets, r, alpha, seed, num_layers=2, C=64, inner=256):
    """A PEFT LoRA folder written here (not by lora.py): random A and B for `targets` in every block.
    Returns {module path: (A, B)} and the scaling alpha / r."""
    shapes = {"query_key_value": (3 * C, C), "dense": (C, C), "dense_h_to_4h": (inner, C), "dense_4h_to_h": (C, inner)}
    where = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
    g = torch.Generator().manual_seed(seed)
    factors, state = {}, {}
    for i in range(num_layers):
        for t in targets:
            (out_f, in_f), path_ = shapes[t], f"transformer.layers.{i}.{where[t]}.{t}"
            A, B = torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3
            factors[path_] = (A, B)
            state[f"base_model.model.{path_}.lora_A.weight"], state[f"base_model.model.{path_}.lora_B.weight"] = A, B
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                       bias="none", task_type="CAUSAL_LM"), f)
    return factors, alpha / r


def write_head(folder, seed):
    """reward_head.safetensors with a random head, as train_rm.py writes it; returns the nn.Linear."""
    head = nn.Linear(64, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, 64, generator=g))
        head.bias.fill_(0.5)
    save_file({k: v.detach().clone() for k, v in head.state_dict().items()},
              os.path.join(folder, "reward_head.safetensors"))
    return head


def merged_model(base, factors, scale):
    """The base with W + scale * B A formed here in float64: a plain model, no LoRA layers."""
    model = glm.ChatGLM.from_pretrained(base).eval()
    with torch.no_grad():
        for path_, (A, B) in factors.items():
            W = model.get_submodule(path_).weight
            W.copy_(W.double() + scale * B.double() @ A.double())
    return model


def one_stage(mode):
    return plan.plan_for_run(glm.GLMConfig.toy(), 1, "cpu", 2, 16, 1, mode).stages[0]


def lora_roles(tmp_path, with_sft):
    """LoRA-mode roles on one base: the RM's adapter and, with_sft, an SFT adapter (else the base is
    the SFT model and the policy a fresh adapter), all written here. Returns the roles, the RM's
    head, and move(): new factors for the trained adapters (as training gives), then {role: a plain
    model holding only that role's weights}."""
    base, rm, sft = make_base(tmp_path / "base", std=0.1), str(tmp_path / "rm"), str(tmp_path / "sft")
    rm_adapter = write_adapter(rm, ("query_key_value", "dense"), r=2, alpha=4.0, seed=3)
    reward_head = write_head(rm, 11)
    sft_adapter = write_adapter(sft, ("query_key_value", "dense_4h_to_h"), r=4, alpha=2.0, seed=4) if with_sft else None
    cfg = train_ppo.Config(mode="lora", model=base, sft_adapter=sft if with_sft else "", rm_dir=rm, lora_rank=3,
                           lora_alpha=6.0, lora_targets="query_key_value,dense_h_to_4h")
    roles = train_ppo.Roles(cfg, dist.Dist(), one_stage("lora"))

    def move():
        g, trained = torch.Generator().manual_seed(7), {"policy": {}, "critic": {}}
        with torch.no_grad():
            for path_, m in lora.lora_modules(roles.models["actor"]):
                for name in trained.keys() & m.lora_A.keys():
                    A, B = (torch.randn(t.shape, generator=g) * 0.3 for t in (m.lora_A[name], m.lora_B[name]))
                    m.lora_A[name].copy_(A), m.lora_B[name].copy_(B)
                    trained[name][path_] = (A, B)
        # the policy has the SFT adapter's shape, or the flags' for a fresh one; the critic the RM's
        want_targets = ("attention.query_key_value", "mlp.dense_4h_to_h" if with_sft else "mlp.dense_h_to_4h")
        assert set(trained["policy"]) == {f"transformer.layers.{i}.{t}" for i in (0, 1) for t in want_targets}
        assert set(trained["critic"]) == set(rm_adapter[0])
        return {"actor": merged_model(base, trained["policy"], sft_adapter[1] if with_sft else 6.0 / 3),
                "reference": merged_model(base, *sft_adapter) if with_sft else glm.ChatGLM.from_pretrained(base),
                "critic": merged_model(base, trained["critic"], rm_adapter[1]),
                "reward": merged_model(base, *rm_adapter)}
    return roles, reward_head, move


def full_roles(tmp_path):
    """Full-mode roles: separate random SFT and RM models, written here; as lora_roles, move() gives
    the actor and the critic a random step and returns the plain models."""
    sft, rm = make_base(tmp_path / "sft", std=0.1, seed=1), make_base(tmp_path / "rm", std=0.1, seed=2)
    reward_head = write_head(rm, 11)
    roles = train_ppo.Roles(train_ppo.Config(mode="full", actor=sft, rm_dir=rm), dist.Dist(), one_stage("full"))

    def move():
        want = {role: glm.ChatGLM.from_pretrained(folder).eval()
                for role, folder in (("actor", sft), ("reference", sft), ("critic", rm), ("reward", rm))}
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for role in ("actor", "critic"):
                for (n, p), (n2, q) in zip(roles.models[role].named_parameters(), want[role].named_parameters()):
                    assert n == n2
                    step = torch.randn(p.shape, generator=g) * 0.05
                    p.add_(step), q.add_(step)
        return want
    return roles, reward_head, move


ROLES = {"lora": lambda tmp: lora_roles(tmp, with_sft=True), "lora_fresh_policy": lambda tmp: lora_roles(tmp, False),
         "full": full_roles}


@pytest.mark.parametrize("mode", ROLES)
def test_each_role_trains_only_its_own_tensors(tmp_path, mode):
    roles, reward_head, _ = ROLES[mode](tmp_path)
    heads = {"value_head.weight", "value_head.bias"}
    if mode == "full":
        assert set(roles.trainables("actor")) == {n for n, _ in roles.models["actor"].named_parameters()}
        assert set(roles.trainables("critic")) == \
            {n for n, _ in roles.models["critic"].named_parameters() if n != "lm_head.weight"} | heads
        assert not any(p.requires_grad for role in ("reference", "reward") for p in roles.models[role].parameters())
    else:  # one model: the policy's and the critic's adapter factors train, nothing else
        trained = {n for n, p in roles.models["actor"].named_parameters() if p.requires_grad}
        assert {n.rsplit(".", 1)[-1] for n in trained} == {"policy", "critic"}
        assert set(roles.trainables("actor")) == {n for n in trained if n.endswith(".policy")}
        assert set(roles.trainables("critic")) == {n for n in trained if n.endswith(".critic")} | heads
    # both heads start as the RM's; only the value head trains
    for head in (roles.reward_head, roles.value_head):
        assert torch.equal(head.weight, reward_head.weight) and torch.equal(head.bias, reward_head.bias)
    assert not roles.reward_head.weight.requires_grad and roles.value_head.weight.requires_grad


def test_grouped_scoring_computes_each_prompt_once_with_the_same_results(toy_dir):
    """--group_size n: the n completions of a prompt scored as one shared-prompt row give the
    log-probs, values and reward-model scores of scoring each completion as its own row (which
    the test above checks against the model run row by row)."""
    model = glm.ChatGLM.from_pretrained(toy_dir).eval()
    heads = [nn.Linear(64, 1) for _ in range(2)]
    roles = SimpleNamespace(models={"actor": model}, use=lambda role: model, value_head=heads[0],
                            reward_head=heads[1], present=("actor", "reference", "critic", "reward"))
    ids, T, _ = hand_built()
    ids = torch.cat([ids[:, :T].repeat_interleave(2, 0), ids[[0, 1, 2, 3, 3, 2, 1, 0], T:]], 1)  # 4 groups of 2
    alone = train_ppo.score_rollout(roles, dist.Dist(), ids, T, SimpleNamespace(micro_batch_size=3, temperature=0.9))
    shared = train_ppo.score_rollout(roles, dist.Dist(), ids, T,
                                     SimpleNamespace(micro_batch_size=4, temperature=0.9, group_size=2))
    for k in ("logp", "ref_logp", "values", "score", "mask", "end"):
        torch.testing.assert_close(shared[k], alone[k], atol=1e-5, rtol=1e-5, msg=k)
    assert (alone["logp"] != 0).sum() == alone["mask"].sum()


@pytest.mark.parametrize("mode", ROLES)
def test_each_role_scores_with_its_own_weights(tmp_path, mode):
    """All four roles hold different weights (the trained actor and critic have moved away from their
    frozen reference and reward copies): old log-probs come from the actor, reference log-probs from
    the reference, values from the critic and the value head, the score from the reward model and
    its head, each equal to a plain model holding only that role's weights."""
    roles, reward_head, move = ROLES[mode](tmp_path)
    value_head = nn.Linear(64, 1)
    with torch.no_grad():
        value_head.weight.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(12)))
        value_head.bias.fill_(-0.25)
        roles.value_head.load_state_dict(value_head.state_dict())
    want = move()
    ids, T, _ = hand_built()
    r = train_ppo.score_rollout(roles, dist.Dist(), ids, T, SimpleNamespace(micro_batch_size=3, temperature=0.8))
    with torch.no_grad():
        h = {role: m(ids, return_hidden=True) for role, m in want.items()}  # [B, L, C]
        logp = {role: torch.log_softmax(want[role].lm_head(h[role][:, :-1]).double() / 0.8, -1).gather(
            -1, ids[:, 1:, None])[..., 0] * r["mask"] for role in ("actor", "reference")}  # [B, L-1], 0 off actions
        values = value_head(h["critic"][:, :-1])[..., 0] * r["mask"]
        at_end = lambda role: h[role][torch.arange(ids.shape[0]), r["end"]]  # [B, C]
        score = reward_head(at_end("reward"))[:, 0]
        torch.testing.assert_close(r["logp"].double(), logp["actor"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["ref_logp"].double(), logp["reference"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["values"], values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["score"], score, atol=1e-5, rtol=1e-5)
        # each check tells the roles apart: another role's weights or head give other numbers
        assert (logp["actor"] - logp["reference"]).abs().max() > 1e-2
        assert (value_head(h["reward"][:, :-1])[..., 0] - values).abs().max() > 1e-2
        assert (reward_head(at_end("critic"))[:, 0] - score).abs().max() > 1e-2
        assert (value_head(at_end("reward"))[:, 0] - score).abs().max() > 1e-2
        # switching in another order (LoRA roles share one model): each role still runs its own weights
        for role in ("reward", "critic", "reference", "actor"):
            torch.testing.assert_close(roles.use(role)(ids, return_hidden=True), h[role], atol=1e-5, rtol=1e-5,
                                       msg=role)


# -----------------------------------------------------------------------------
# PPO raises the reward


def reward_curve(toy, out, steps=8):
    """Eight seeded full-mode steps of 64 rollouts of 2 tokens; the mean reward of each step.
    top_k 8: the random policy is near uniform over 1200 tokens, so without it no token is drawn twice
    in a step; with it each prompt chooses among a few, and a few steps move the choice."""
    train_ppo.main(ppo_argv(toy, out, max_steps=steps, rollout_batch_size=64, mini_batch_size=32, micro_batch_size=32,
                            max_new_tokens=2, ppo_epochs=1, actor_lr=1e-2, critic_lr=1e-3, kl_coef=0.01, top_k=8))
    m = metrics_by_step(out)
    assert sorted(m) == list(range(1, steps + 1))
    return [m[step]["reward_mean"] for step in range(1, steps + 1)]


def test_ppo_raises_the_reward_and_a_flipped_advantage_does_not(tmp_path, monkeypatch, toy_dir):
    right = reward_curve(toy_dir, tmp_path / "right")
    # normalised scores have a std of about 1 within a step (about 0.1 for a step's mean of 64);
    # eight steps take the mean up by about 1
    assert sum(right[-2:]) / 2 - sum(right[:2]) / 2 > 0.75, right

    real = train_ppo.masked_whiten
    monkeypatch.setattr(train_ppo, "masked_whiten", lambda *a, **kw: -real(*a, **kw))
    flipped = reward_curve(toy_dir, tmp_path / "flipped")
    assert flipped[0] == right[0]  # the same first rollouts: only the update differs
    assert sum(flipped[-2:]) / 2 - sum(flipped[:2]) / 2 < -0.5, flipped  # descends instead


# -----------------------------------------------------------------------------
# a 2-stage pipeline (gloo) gives the single-process steps

def pipeline_runs(toy, out):
    """{mode: flags} of the compared runs: two steps, two PPO epochs, 1F1B over two micro-batches a
    mini-batch; the full run adds the PPO-ptx term and an adaptive beta."""
    ptx = write_jsonl(os.path.join(out, "ptx.jsonl"), head_lines(TOY_SFT, 8))
    return {"full": ppo_argv(toy, os.path.join(out, "full"), "full", ptx_coef=0.5, ptx_data=ptx, ptx_batch_size=2,
                         target_kl=0.01, kl_horizon=100),
            "lora": ppo_argv(toy, os.path.join(out, "lora"), "lora", actor_lr=1e-2, critic_lr=1e-2)}


def test_gloo_p2_ppo_steps_equal_one_process(tmp_path, toy_dir, gloo_mains):
    one, two = tmp_path / "p1", tmp_path / "p2"
    os.makedirs(one)
    os.makedirs(two)
    single, piped = pipeline_runs(toy_dir, str(one)), pipeline_runs(toy_dir, str(two))
    for flags in single.values():
        train_ppo.main(flags)
    gloo_mains("train_ppo", [flags + ["--pp", "2"] for flags in piped.values()])
    for mode in ("full", "lora"):
        a, b = metrics_by_step(one / mode), metrics_by_step(two / mode)
        assert sorted(a) == sorted(b) == [1, 2]
        for step in (1, 2):
            for key in METRICS:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (mode, step, key)
        assert a[2]["kl"] != 0  # the policy moved away from the reference: step 2 compares trained weights
    assert metrics_by_step(one / "full")[2]["beta"] != 0.05  # the adaptive beta moved (and matched)


# -----------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resumed_run_continues_with_the_same_steps(tmp_path, toy_dir, mode):
    """Stopped after step 2 and resumed: steps 3 and 4 as in the run that never stopped. 20 prompts at 8 a step:
    step 3 takes the epoch's last 4, step 4 starts the next epoch. 10 PPO-ptx examples at 4 (3 batches an
    epoch), one batch per mini-batch, 4 a step: the resumed run starts inside the third epoch. Beta adapts,
    so it has to be restored too."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", head_lines(os.path.join(toy_dir, "prompts.jsonl"), 20))
    ptx = write_jsonl(tmp_path / "ptx.jsonl", head_lines(TOY_SFT, 10))
    run = lambda out, *extra, **kw: train_ppo.main(ppo_argv(
        toy_dir, out, mode, *extra, data=prompts, ptx_coef=0.2, ptx_data=ptx, ptx_batch_size=4, target_kl=0.01,
        kl_horizon=100, save_every=2, actor_lr=1e-2, critic_lr=1e-2, micro_batch_size=4, **kw))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(whole, max_steps=4)
    run(cut, max_steps=2)
    with open(newest_checkpoint(cut) / "train_state.json", encoding="utf-8") as f:
        assert json.load(f)["step"] == 2
    run(cut, "--resume", max_steps=4)
    a, b = metrics_by_step(whole), metrics_by_step(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in METRICS:
            assert b[step][key] == a[step][key], (step, key, b[step][key], a[step][key])
    assert a[4]["beta"] != a[2]["beta"]
    # the checkpoints at step 4 hold the same policy, critic and value head
    for sub in ("policy", "critic", ""):
        sa, sb = load_tensors(newest_checkpoint(whole) / sub), load_tensors(newest_checkpoint(cut) / sub)
        assert sa and sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (sub, key)


# -----------------------------------------------------------------------------
# the toy run: the quickstart's last step


def test_toy_run_uses_the_toy_sft_and_rm_results_beside_out(toy_chain):
    """`python train_ppo.py` after the toy SFT and RM runs: the toy preset in full mode on those two
    results and the held-out toy questions, the before/after table, the trained policy in final/."""
    runs, printed = toy_chain.runs, toy_chain.toy_ppo.printed
    cfg = printed_config(printed)
    assert (cfg["mode"], cfg["actor"], cfg["rm_dir"], cfg["data"]) == \
        ("full", str(runs / "toy_sft" / "final"), str(runs / "toy_rm" / "final"), data.toy_file("sft_eval"))
    assert (cfg["max_new_tokens"], cfg["kl_coef"], cfg["rollout_batch_size"]) == \
        (data.TOY_PPO["max_new_tokens"], data.TOY_PPO["kl_coef"], 8)
    assert sorted(metrics_by_step(runs / "toy_ppo")) == [1]
    for row in ("accuracy of the greedy answers", "RM score of the greedy answers", "greedy answers that changed"):
        assert row in printed, row
    # final/ is the policy: the SFT model after one PPO step
    sft, final = load_tensors(runs / "toy_sft" / "final"), load_tensors(runs / "toy_ppo" / "final")
    assert sft.keys() == final.keys() and any(not torch.equal(sft[k], final[k]) for k in sft)


def test_toy_table_is_right_under_pp_2_and_after_resume(toy_chain, tmp_path, gloo_mains):
    """The toy table's "before" column is the SFT policy's, measured once: the same under --pp 2 (the
    RM score is read on the last stage and shared) and in a resumed run (carried by the checkpoint,
    not measured again on the trained policy); the step rows come from the whole metrics.jsonl."""
    def before_column(text):
        rows = [line for line in text.splitlines() if line.startswith(("accuracy of the greedy", "RM score of the"))]
        assert len(rows) == 2, text
        return [row.split()[-2] for row in rows]
    single = before_column(toy_chain.toy_ppo.printed)
    out = tmp_path / "runs" / "toy_ppo"
    shutil.copytree(toy_chain.runs / "toy_sft", tmp_path / "runs" / "toy_sft")
    shutil.copytree(toy_chain.runs / "toy_rm", tmp_path / "runs" / "toy_rm")
    argv = ["--out", str(out), "--rollout_batch_size", "8", "--mini_batch_size", "8", "--micro_batch_size", "8"]
    gloo_mains("train_ppo", [argv + ["--pp", "2", "--max_steps", "1", "--save_every", "1"]])
    piped = (tmp_path / "train_ppo-ranks" / "rank-0.log").read_text()
    assert before_column(piped) == single and "nan" not in piped and "greedy answers that changed: " in piped
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_ppo.main(argv + ["--max_steps", "2", "--resume"])
    assert before_column(printed.getvalue()) == single
    rows = [r for r in ckpt.read_metrics(out) if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]  # the first row, logged before the resume, is in the table too


def test_toy_prerequisites_are_trained_by_their_own_scripts(tmp_path, monkeypatch):
    """A missing toy SFT or RM result is made by `python train_sft.py` / `python train_rm.py` as
    subprocesses (scripts do not import each other); present ones are used; a failed one stops the
    run with its command."""
    calls = []
    monkeypatch.setenv("RANK", "3")  # as under torchrun: the toy runs must not see it
    monkeypatch.setenv("WORLD_SIZE", "8")

    def run(cmd, env, code=0):
        assert "RANK" not in env and "WORLD_SIZE" not in env and env["PATH"] == os.environ["PATH"]
        calls.append(cmd)
        os.makedirs(os.path.join(cmd[-1], "final"))
        return SimpleNamespace(returncode=code)
    monkeypatch.setattr(train_ppo.subprocess, "run", run)
    runs = tmp_path / "runs"
    fresh = lambda: train_ppo.Config(out=str(runs / "toy_ppo"))
    cfg = train_ppo.toy_models_and_data(fresh(), dist.Dist())
    assert calls == [[sys.executable, os.path.join(ROOT, "train_sft.py"), "--out", str(runs / "toy_sft")],
                     [sys.executable, os.path.join(ROOT, "train_rm.py"), "--out", str(runs / "toy_rm")]]
    assert (cfg.actor, cfg.rm_dir, cfg.data) == \
        (str(runs / "toy_sft" / "final"), str(runs / "toy_rm" / "final"), data.toy_file("sft_eval"))
    calls.clear()
    shutil.rmtree(runs / "toy_rm")
    train_ppo.toy_models_and_data(fresh(), dist.Dist())
    assert calls == [[sys.executable, os.path.join(ROOT, "train_rm.py"), "--out", str(runs / "toy_rm")]]
    shutil.rmtree(runs / "toy_rm")
    monkeypatch.setattr(train_ppo.subprocess, "run", lambda cmd, env: run(cmd, env, code=3))
    with pytest.raises(SystemExit, match=r"train_rm.py --out .*failed \(exit code 3\)"):
        train_ppo.toy_models_and_data(fresh(), dist.Dist())


def test_under_torchrun_rank_0_trains_the_toy_prerequisites_while_the_others_wait(tmp_path):
    """`torchrun --nproc_per_node=N train_ppo.py`: rank 0 starts the two toy runs, the other ranks
    wait for their results (longer than a barrier would), and every rank goes on with the same models."""
    import time
    from conftest import fork_ranks

    def rank_main(rank):
        calls = []

        def run(cmd, env):  # a toy run that takes a while, as one process of its own
            assert "RANK" not in env and "MASTER_PORT" not in env
            calls.append(cmd[1])
            time.sleep(0.6)
            os.makedirs(os.path.join(cmd[-1], "final"))
            return SimpleNamespace(returncode=0)
        train_ppo.subprocess.run = run
        d = dist.setup(1, timeout_min=0.015)  # a barrier over both toy runs (1.2 s) would time out after 0.9 s
        cfg = train_ppo.toy_models_and_data(train_ppo.Config(out=str(tmp_path / "runs" / "toy_ppo")), d)
        (tmp_path / f"rank{rank}.json").write_text(json.dumps([cfg.actor, cfg.rm_dir, calls]))
        dist.teardown()

    fork_ranks(rank_main, tmp_path / "logs", nproc=2, timeout=60)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0[:2] == r1[:2] == [str(tmp_path / "runs" / n / "final") for n in ("toy_sft", "toy_rm")]
    assert [os.path.basename(c) for c in r0[2]] == ["train_sft.py", "train_rm.py"] and r1[2] == []


def test_toy_prerequisites_are_found_when_out_ends_in_a_slash(tmp_path, monkeypatch):
    """`--out runs/toy_ppo/` (as shell completion writes it) names the same run as `--out runs/toy_ppo`."""
    monkeypatch.setattr(train_ppo.subprocess, "run", lambda cmd, env: SimpleNamespace(
        returncode=os.makedirs(os.path.join(cmd[-1], "final")) or 0))
    cfg = train_ppo.toy_models_and_data(train_ppo.Config(out=str(tmp_path / "runs" / "toy_ppo") + "/"), dist.Dist())
    assert cfg.actor == str(tmp_path / "runs" / "toy_sft" / "final")


# -----------------------------------------------------------------------------
# errors a user can cause: clear, and before any rollout


def test_ptx_coef_without_ptx_data_is_a_clear_error(tmp_path, toy_dir):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--ptx_data"):
        train_ppo.main(ppo_argv(toy_dir, out, ptx_coef=0.5))
    assert not out.exists()


@pytest.mark.parametrize("mode,drop", [("lora", "model"), ("full", "actor")])
def test_missing_model_flag_is_a_clear_error(tmp_path, toy_dir, mode, drop):
    flags = ppo_argv(toy_dir, tmp_path / "run", mode)
    i = flags.index(f"--{drop}")
    del flags[i:i + 2]
    with pytest.raises(ValueError, match=f"--{drop}"):
        train_ppo.main(flags)
    assert not (tmp_path / "run").exists()


def test_unknown_mode_is_a_clear_error(tmp_path, toy_dir):
    flags = ppo_argv(toy_dir, tmp_path / "run", "full")
    flags[flags.index("--mode") + 1] = "lroa"
    with pytest.raises(ValueError, match="--mode 'lroa'"):
        train_ppo.main(flags)
    assert not (tmp_path / "run").exists()


def test_sample_text_counts_ids_the_tokenizer_lacks():
    tok = glm.Tokenizer(os.path.join(ROOT, "data", "ice_text.model"))
    ids = torch.tensor(tok.encode_text("12 加 3") + [tok.vocab_size + 5, tok.vocab_size])
    assert train_ppo.sample_text(tok, ids) == "12 加 3 [+2 ids outside the tokenizer]"
    assert train_ppo.sample_text(tok, ids[:-2]) == "12 加 3"


# -----------------------------------------------------------------------------
# rollouts generated in chunks (--gen_batch_size)


def rollout_cfg(gen_batch_size, top_k=0):
    return SimpleNamespace(gen_batch_size=gen_batch_size, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=top_k,
                           group_size=2)


def test_rollout_chunks_are_generated_in_order_and_right_padded():
    """A stand-in actor whose answers are as long as the chunk's first prompt id: chunks of 2 prompts
    each, every answer row padded to the longest chunk's, rows in the prompts' order."""
    calls = []

    class Actor:
        config = SimpleNamespace(pad_token_id=3)

        def generate(self, ids, max_new_tokens, group_size, **_):
            calls.append(ids[:, 0].tolist())
            ids = ids.repeat_interleave(group_size, 0)
            return torch.cat([ids, torch.full((ids.shape[0], int(ids[0, 0])), 9)], 1), None

    prompts = torch.tensor([[2, 5], [1, 5], [4, 6], [1, 6], [1, 7]])  # chunks: answers of 2, 4 and 1 tokens
    out = train_ppo.generate_rollout(Actor(), SimpleNamespace(P=1), prompts, rollout_cfg(2), None)
    assert calls == [[2, 1], [4, 1], [1]]
    lengths = [2, 2, 2, 2, 4, 4, 4, 4, 1, 1]  # per answer row (2 a prompt)
    want = torch.full((10, 2 + 4), 3)
    want[:, :2] = prompts.repeat_interleave(2, 0)
    for r, n in enumerate(lengths):
        want[r, 2:2 + n] = 9
    assert torch.equal(out, want)


def test_rollout_in_chunks_equals_one_batch_when_every_draw_is_the_argmax(tok):
    model = glm.ChatGLM(glm.GLMConfig.toy()).init_weights(1, std=0.3).eval()
    prompts = glm.left_pad([tok.encode(t) for t in ("1 plus 2", "hello there", "7", "what is 3 times 4", "x")],
                           tok.pad_id)
    runs = [train_ppo.generate_rollout(model, dist.setup(1), prompts, rollout_cfg(g, top_k=1), torch.Generator())
            for g in (0, 2)]
    assert runs[0].shape == (10, prompts.shape[1] + 6) and torch.equal(runs[0], runs[1])


def test_a_rollout_that_does_not_fit_at_once_is_generated_in_the_largest_chunk_that_does(toy_dir, capsys):
    from flags import parse
    cfg = parse(train_ppo.Config, ppo_argv(toy_dir, "/tmp/unused", "lora", rollout_batch_size=64, max_new_tokens=200,
                                           micro_batch_size=1), positive=(), non_negative=())
    gcfg, d = glm.GLMConfig.from_json(os.path.join(toy_dir, "config.json")), dist.setup(1)
    whole, n = train_ppo.rl_plan(cfg, gcfg, d)  # the CPU: no budget, all 64 at once
    st = whole.stages[0]
    static = sum(st.mem[k] for k in ("params", "grads", "optim"))
    budget = max(whole.max_mem - st.mem["rollout"] / 2, static + st.mem["rollout"] / 2)  # about half the cache fits
    cfg.gpu_mem_gib = budget / plan.GiB
    fitted, k = train_ppo.rl_plan(cfg, gcfg, d)
    assert n == 64 and 0 < k < 64 and fitted.max_mem <= budget
    assert f"generating {k} prompts at a time" in capsys.readouterr().out
    for asked in (k + 1, 64):  # one more does not fit, and an explicit flag is not overridden
        cfg.gen_batch_size = asked
        with pytest.raises(plan.PlanError, match=f"--gen_batch_size {k} fits"):
            train_ppo.rl_plan(cfg, gcfg, d)
