"""The critic-free algorithms of train_ppo.py (GRPO, RLOO, REINFORCE++) and rewards.py: each
advantage estimator against a naive loop, the k3 KL estimate against the exact KL, the loss
weights, reward functions and their errors, and whole runs: P = 2 against one process, resume,
and a controlled reward that rises (and falls with the advantage's sign flipped)."""
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import dist
import rewards
import train_ppo
from conftest import metrics_by_step, ppo_argv

pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# advantages, against naive loops in float64


def naive_group_advantages(reward, n, algo, std_norm):
    out = []
    for g in range(0, len(reward), n):
        group = [float(x) for x in reward[g:g + n]]
        mean = sum(group) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
        for i, x in enumerate(group):
            if algo == "rloo":
                out.append(x - (sum(group) - x) / (n - 1))  # leave-one-out baseline
            else:
                out.append((x - mean) / (std + 1e-6) if std_norm else x - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("algo,std_norm", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_a_naive_loop(algo, std_norm):
    reward = torch.randn(12, generator=torch.Generator().manual_seed(3))
    got = train_ppo.group_advantages(reward, 4, algo, std_norm)
    torch.testing.assert_close(got.double(), naive_group_advantages(reward, 4, algo, std_norm), atol=1e-5, rtol=1e-5)


def rollout_scores(B=6, A=7, seed=5):
    """A rollout's log-probs and masks: answers of different lengths after prompts of 2 actions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, A, dtype=torch.bool)
    end = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        stop = 3 + b % 4
        mask[b, 2:stop] = True
        end[b] = stop  # the token index of the answer's last token: action stop - 1 produced it
    return dict(mask=mask, end=end, logp=torch.randn(B, A, generator=g) * 0.3 - 1,
                ref_logp=torch.randn(B, A, generator=g) * 0.3 - 1), torch.randn(B, generator=g)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_grpo_and_rloo_put_one_advantage_on_every_token_of_an_answer(kl_in):
    r, score = rollout_scores()
    beta = 0.2
    for algo in ("grpo", "rloo"):
        cfg = SimpleNamespace(algo=algo, group_size=3, no_std_norm=False, kl_in=kl_in)
        got = train_ppo.advantages(cfg, dict(r), score, beta, dist.Dist())
        seq = [float(score[b]) - (beta * float(((r["logp"][b] - r["ref_logp"][b]) * r["mask"][b]).sum())
                                  if kl_in == "reward" else 0.0) for b in range(len(score))]
        per_answer = naive_group_advantages(torch.tensor(seq), 3, algo, True)
        want = per_answer[:, None] * r["mask"].double()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_reinforce_pp_returns_are_the_whitened_sums_of_later_rewards():
    """Per-token rewards -beta (log pi - log pi_ref), the score on the last action; A_t = sum of the
    rewards from t on (gamma 1); whitened over all response tokens. With groups, each answer's score
    is first taken relative to its group's mean."""
    r, score = rollout_scores()
    beta = 0.1
    for n in (1, 3):
        cfg = SimpleNamespace(algo="reinforce_pp", group_size=n, kl_in="reward", gamma=1.0)
        got = train_ppo.advantages(cfg, dict(r), score, beta, dist.Dist())
        s = [float(x) for x in score]
        if n > 1:
            s = [x - sum(s[g:g + n]) / n for g in range(0, len(s), n) for x in s[g:g + n]]
        rets, values = torch.zeros(r["mask"].shape, dtype=torch.float64), []
        for b in range(len(s)):
            steps = r["mask"][b].nonzero()[:, 0].tolist()
            running = 0.0
            for t in reversed(steps):
                reward = -beta * float(r["logp"][b, t] - r["ref_logp"][b, t]) + (s[b] if t == steps[-1] else 0.0)
                running += reward
                rets[b, t] = running
            values += [rets[b, t].item() for t in steps]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        want = ((rets - mean) / std) * r["mask"].double()
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_k3_is_never_negative_and_its_mean_is_the_kl():
    """k3 = exp(d) - d - 1, d = log q(x) - log p(x), x ~ p: each sample >= 0, and its mean over
    many samples is KL(p || q) on a small categorical."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    d = (q.log() - p.log())[x].double()
    k3 = torch.exp(d) - d - 1
    exact = float((p * (p.log() - q.log())).sum())
    assert float(k3.min()) >= 0
    assert abs(float(k3.mean()) - exact) < 0.02 * exact + 1e-3, (float(k3.mean()), exact)


def test_loss_weights_count_tokens_or_answers():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    keep = torch.tensor([1.0, 1.0, 0.0])
    tok = train_ppo.loss_weights(mask, keep, "token_mean", None)
    torch.testing.assert_close(tok, torch.tensor([[0, .25, .25, .25], [0, .25, 0, 0], [0, 0, 0, 0]]))
    seq = train_ppo.loss_weights(mask, keep, "seq_mean", None)
    torch.testing.assert_close(seq, torch.tensor([[0, 1 / 6, 1 / 6, 1 / 6], [0, .5, 0, 0], [0, 0, 0, 0]]))


# -----------------------------------------------------------------------------
# rewards.py


def test_reward_functions_are_summed_with_their_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, responses):\n"
                                            "    return [float(r.isupper()) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = rewards.load("toy_exact, my_rewards:shout=0.5")
    prompts, answers = ["What is 2 plus 3?", "What is 2 plus 3?", "What is 9 minus 4?"], ["5", "FIVE", "5"]
    assert rewards.score(fns, prompts, answers) == [1.0, 0.5, 1.0]
    assert rewards.brevity(["q"], ["x" * 64, "x" * 96]) == [0.0, -0.5]


@pytest.mark.parametrize("spec,words", [
    ("", ["names no function"]),
    ("toy_exact=lots", ["toy_exact=lots", "not a number"]),
    ("nothing_here", ["nothing_here", "not a built-in reward"]),
    ("no_such_module_xyz:f", ["no_such_module_xyz", "cannot import"]),
    ("math:no_such_fn", ["math has no no_such_fn"]),
])
def test_a_bad_reward_spec_is_named(spec, words):
    with pytest.raises(ValueError) as e:
        rewards.load(spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_failing_reward_function_names_itself_and_the_sample(tmp_path, monkeypatch):
    (tmp_path / "fragile.py").write_text("def judge(prompts, responses):\n"
                                         "    return [1.0 / len(r) for r in responses]\n"
                                         "def short(prompts, responses):\n"
                                         "    return [1.0]\n"
                                         "def nan(prompts, responses):\n"
                                         "    return [float('nan') if r == 'b' else 0.0 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fragile", None)
    with pytest.raises(ValueError, match=r"--reward_fn fragile:judge raised ZeroDivisionError: .* on prompt 'q2', "
                                         r"response ''"):
        rewards.score(rewards.load("fragile:judge"), ["q1", "q2"], ["a", ""])
    with pytest.raises(ValueError, match=r"fragile:short returned 1 values for 2 pairs"):
        rewards.score(rewards.load("fragile:short"), ["q1", "q2"], ["a", "b"])
    with pytest.raises(ValueError, match=r"fragile:nan returned nan for prompt 'q2', response 'b'"):
        rewards.score(rewards.load("fragile:nan"), ["q1", "q2"], ["a", "b"])


# -----------------------------------------------------------------------------
# whole runs


def rl_argv(toy, out, algo, mode="full", **flags):
    """A small GRPO / RLOO / REINFORCE++ run: 8 answers a step (4 prompts x 2), two updates of 4 (the
    reward model as the reward)."""
    return ppo_argv(toy, out, mode, algo=algo, group_size=2 if algo != "reinforce_pp" else 1,
                    rollout_batch_size=4 if algo != "reinforce_pp" else 8, mini_batch_size=4, micro_batch_size=4,
                    ppo_epochs=1, **flags)


@pytest.mark.parametrize("algo,mode", [("grpo", "full"), ("rloo", "lora"), ("reinforce_pp", "full")])
def test_critic_free_runs_have_no_critic_and_resume_exactly(tmp_path, toy_dir, algo, mode):
    """No critic role, optimiser or checkpoint folder; stopped after step 2 and resumed, steps 3 and 4
    are those of the run that never stopped."""
    run = lambda out, **kw: train_ppo.main(rl_argv(toy_dir, out, algo, mode, save_every=2, **kw))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(whole, max_steps=4)
    run(cut, max_steps=2)
    assert sorted(os.listdir(cut / "checkpoint-000002")) == sorted(
        ["policy", "optim-actor-stage000.pt", "rng-rank000.pt", "train_state.json"])
    run(cut, max_steps=4, resume="true")
    a, b = metrics_by_step(whole), metrics_by_step(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and "value_loss" not in a[4]
    for step in (3, 4):
        for key in ("reward_mean", "kl", "clip_frac", "entropy", "group_reward_std"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_gloo_p2_grpo_steps_equal_one_process(tmp_path, toy_dir, gloo_mains):
    one, two = tmp_path / "p1", tmp_path / "p2"
    flags = dict(kl_in="loss", loss_agg="seq_mean", skip_uniform_groups="true")
    train_ppo.main(rl_argv(toy_dir, one, "grpo", "lora", **flags))
    gloo_mains("train_ppo", [rl_argv(toy_dir, two, "grpo", "lora", **flags) + ["--pp", "2"]])
    a, b = metrics_by_step(one), metrics_by_step(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        for key in ("reward_mean", "kl", "clip_frac", "approx_kl", "entropy", "group_reward_std", "uniform_groups"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert a[2]["kl"] != 0


def reward_curve(toy, out, steps=6):
    """Six GRPO steps of 8 prompts x 4 answers of 2 tokens, the reward model as the reward; the
    mean reward of each step (top_k 8 as in PPO's test: each prompt picks among a few tokens)."""
    train_ppo.main(ppo_argv(toy, out, algo="grpo", group_size=4, max_steps=steps, rollout_batch_size=8,
                            mini_batch_size=32, micro_batch_size=32, max_new_tokens=2, ppo_epochs=1, actor_lr=1e-2,
                            kl_coef=0.01, top_k=8))
    m = metrics_by_step(out)
    return [m[step]["reward_mean"] for step in range(1, steps + 1)]


def test_grpo_raises_the_reward_and_a_flipped_advantage_does_not(tmp_path, monkeypatch, toy_dir):
    right = reward_curve(toy_dir, tmp_path / "right")
    assert sum(right[-2:]) / 2 - sum(right[:2]) / 2 > 0.4, right  # +0.6 when written
    real = train_ppo.group_advantages
    monkeypatch.setattr(train_ppo, "group_advantages", lambda *a, **kw: -real(*a, **kw))
    flipped = reward_curve(toy_dir, tmp_path / "flipped")
    assert flipped[0] == right[0]  # the same first rollouts: only the update differs
    assert sum(flipped[-2:]) / 2 - sum(flipped[:2]) / 2 < -1.0, flipped  # -1.5 when written
