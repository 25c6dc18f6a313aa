"""train_dpo.py: each loss against a float64 recompute of its formula written here, listwise with K = 2
equal to DPO, SimPO without a reference, the shared-prompt layout against separate sequences (toy model
and golden fixture, log-probs, gradients and RM scores), cached reference log-probs against live ones
(full and LoRA), exact resuming, a stale cache rebuilt, and the bad inputs a user can give. P = 2 x D = 2
against one process runs in tests/test_pipeline.py's launch."""
import math
import os
import random

import pytest
import torch

import data
import dist
import flags
import glm
import lora
import train_dpo
import train_rm

from conftest import dpo_argv, head_lines, losses, make_base, write_jsonl

TOY_RM_TRAIN = data.toy_file("rm_train")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 2-block toy ChatGLM (std 0.1, so answers' log-probs differ)."""
    return make_base(tmp_path_factory.mktemp("base") / "toy", std=0.1)


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """8 toy prompts of 3 ranked answers: 2 steps an epoch at 2 micro-batches of 2 prompts."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "rank8.jsonl", head_lines(TOY_RM_TRAIN, 8))


# -----------------------------------------------------------------------------
# the losses against float64 loops


def logsig64(x):
    """log sigmoid(x) in float64 without overflow."""
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))


def brute_loss(cfg, pi, ref, lens, sizes):
    """The step loss of train_dpo.py's docstring, in float64 loops over prompts and pairs."""
    terms, groups, start, sft = [], 0, 0, 0.0
    for k in sizes:
        p, q, n = pi[start:start + k], ref[start:start + k], lens[start:start + k]
        r = [cfg.beta * (a - b) for a, b in zip(p, q)]
        if cfg.loss == "listwise":
            terms.append(sum(math.log(sum(math.exp(x) for x in r[i:])) - r[i] for i in range(k)))
        for i in range(k):
            for j in range(i + 1, k):
                if cfg.loss == "listwise" or (cfg.pairs == "adjacent" and j != i + 1):
                    continue
                h = (p[i] - q[i]) - (p[j] - q[j])
                if cfg.loss == "ipo":
                    terms.append((h - 1 / (2 * cfg.beta)) ** 2)
                    continue
                z = cfg.beta * h if cfg.loss == "dpo" else cfg.beta * (p[i] / n[i] - p[j] / n[j]) - cfg.simpo_gamma
                e = cfg.label_smoothing
                terms.append(-(1 - e) * logsig64(z) - e * logsig64(-z))
        sft += -p[0] / n[0]
        groups, start = groups + 1, start + k
    return sum(terms) / len(terms) + cfg.sft_coef * sft / groups


def random_batch(tok, sizes, seed):
    """One micro-batch of prompts with `sizes` answers of 1-4 tokens, random per-token log-probs for the
    policy and the reference (in float64), and the per-answer sums and lengths the loops use."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    groups = [dict(prompt=[20, 21, tok.gmask_id, tok.sop_id],
                   answers=[[30 + rng.randrange(50) for _ in range(rng.randrange(1, 4))] + [tok.eop_id]
                            for _ in range(k)]) for k in sizes]
    mb = train_dpo.microbatches(groups, list(range(len(groups))), len(groups), tok.pad_id, "cpu")[0]
    n = len(mb["target"])
    pi_tok, ref_tok = -torch.rand(n, generator=g, dtype=torch.float64) * 3, -torch.rand(n, generator=g,
                                                                                         dtype=torch.float64) * 3
    mb["ref_tok"] = ref_tok
    sums = lambda t: [float(t[mb["tok_answer"] == i].sum()) for i in range(len(mb["answer_len"]))]
    return mb, pi_tok, sums(pi_tok), sums(ref_tok), [len(a) for g in groups for a in g["answers"]]


@pytest.mark.parametrize("flags", [
    dict(loss="dpo"), dict(loss="dpo", pairs="adjacent", label_smoothing=0.1, sft_coef=0.3),
    dict(loss="ipo", beta=0.3), dict(loss="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.2),
    dict(loss="listwise", sft_coef=0.5), dict(loss="ipo", pairs="adjacent"),
], ids=["dpo", "dpo_adjacent_smoothed_sft", "ipo", "simpo", "listwise_sft", "ipo_adjacent"])
def test_loss_equals_float64_formula(tok, flags):
    cfg = train_dpo.Config(**{"beta": 0.5, **flags})
    mb, pi_tok, pi, ref, lens = random_batch(tok, [2, 3, 4], seed=1)
    n_pairs, n_groups = train_dpo.counts([mb], cfg.pairs)
    assert (int(n_pairs), int(n_groups)) == ((1 + 2 + 3) if cfg.pairs == "adjacent" else (1 + 3 + 6), 3)
    got = train_dpo.mb_loss(cfg, pi_tok, mb, n_pairs, n_groups)
    torch.testing.assert_close(got, torch.tensor(brute_loss(cfg, pi, ref, lens, [2, 3, 4]), dtype=torch.float64),
                               atol=1e-9, rtol=1e-9)


def test_listwise_with_two_answers_is_dpo_and_simpo_reads_no_reference(tok):
    mb, pi_tok, *_ = random_batch(tok, [2, 2, 2], seed=2)
    loss = lambda name, mb: train_dpo.mb_loss(train_dpo.Config(loss=name, beta=0.7), pi_tok, mb, 3, 3)
    torch.testing.assert_close(loss("listwise", mb), loss("dpo", mb), atol=1e-12, rtol=0)
    assert float(loss("dpo", mb)) != float(loss("dpo", {**mb, "ref_tok": mb["ref_tok"] * 0}))
    torch.testing.assert_close(loss("simpo", mb), loss("simpo", {k: v for k, v in mb.items() if k != "ref_tok"}),
                               atol=0, rtol=0)
    assert train_dpo.reference_runner(train_dpo.Config(loss="simpo"), "full", None, None, None, True) is None


# -----------------------------------------------------------------------------
# the shared-prompt layout against separate sequences


def grads_and_logps(model, mb, weights):
    """Per-answer log-probs [N] and the gradient of sum(weights * log-probs) for every parameter."""
    rope, attend = model.batch_inputs(mb)
    h = model.transformer(mb["input_ids"], rope, attend)
    logps = train_dpo.per_answer(train_dpo.token_logps(model, h, mb), mb)
    params = [p for p in model.parameters()]
    return logps.detach(), torch.autograd.grad((logps * weights).sum(), params), h


def test_shared_prompt_rows_give_separate_sequences_log_probs_gradients_and_scores(tok, base, fixture_dir):
    exs = [dict(prompt="5 减 2 等于多少?", answers=["3", "4", "It is 9"], history=[["1 加 1 等于多少?", "2"]]),
           dict(prompt=" ".join(["What is 3 plus 4?"] * 6), answers=["7", "8 " + "apples " * 12]),  # cut at 40
           dict(prompt="What is 9 minus 1?", answers=["8", "7", "It is 12", "I am not sure"])]
    groups = data.encode_groups(tok, exs, 40, data.TruncationStats(), data.RankStats())
    assert [len(g["answers"]) for g in groups] == [3, 2, 4]
    # the long answer's cut holds for both: "7" alone would keep more of the prompt
    assert len(groups[1]["ids"][0]) < len(data.encode_ranked(tok, exs[1], 40)[0])
    for model in (glm.ChatGLM.from_pretrained(base), glm.ChatGLM.from_pretrained(fixture_dir)):
        model.eval()
        head = glm.reward_head(model.config.hidden_size, seed=3)
        shared, separate = (train_dpo.microbatches(groups, [0, 1, 2], 3, tok.pad_id, "cpu", gcfg)[0]
                            for gcfg in (model.config, None))
        assert shared["input_ids"].shape[0] == 3 and separate["input_ids"].shape[0] == 9
        weights = torch.linspace(-1, 1, 9)
        a, ga, ha = grads_and_logps(model, shared, weights)
        b, gb, hb = grads_and_logps(model, separate, weights)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
        # and each answer's reward, read at its own <eop>, as train_rm.py reads it in either layout
        torch.testing.assert_close(train_rm.rewards(head, ha, shared), train_rm.rewards(head, hb, separate),
                                   atol=1e-5, rtol=1e-5)
        # the separate rows hold what one answer alone is (the row check of the reference itself)
        with torch.no_grad():
            alone = model(torch.tensor([groups[2]["ids"][3]])).log_softmax(-1)[0]
        p = len(groups[2]["prompt"])
        want = sum(float(alone[p - 1 + j, t]) for j, t in enumerate(groups[2]["answers"][3]))
        assert abs(float(a[8]) - want) < 1e-4


# -----------------------------------------------------------------------------
# whole runs: the cache, resuming, LoRA's reference adapter, SimPO


def test_cached_reference_equals_live_and_resume_is_exact(tmp_path, base, data8, killed_after_step, capsys):
    held = write_jsonl(tmp_path / "held.jsonl", head_lines(TOY_RM_TRAIN, 10)[8:])  # 2 held-out prompts
    cached, live, cut = tmp_path / "cached", tmp_path / "live", tmp_path / "cut"
    train_dpo.main(dpo_argv(base, data8, cached, save_every=2, eval_data=held))
    assert "reference log-probs: computed" in capsys.readouterr().out
    ref = torch.load(cached / train_dpo.REF_FILE, weights_only=True)
    assert ref["train"].shape[0] > ref["eval"].shape[0] > 0 and bool((ref["train"] < 0).all())
    train_dpo.main(dpo_argv(base, data8, live, "--no_ref_cache", eval_data=held))
    assert not (live / train_dpo.REF_FILE).exists()
    want, got = losses(cached), losses(live)
    assert sorted(want) == [1, 2, 3, 4] and want[1] == pytest.approx(math.log(2), abs=1e-6)  # pi = pi_ref
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s
    assert losses(live, "eval_loss") == pytest.approx(losses(cached, "eval_loss"), rel=1e-5)
    # one row per answer: the same curve as the shared-prompt rows
    train_dpo.main(dpo_argv(base, data8, tmp_path / "rows", "--no_shared_prompt", eval_data=held))
    assert losses(tmp_path / "rows") == pytest.approx(want, rel=1e-5, abs=1e-6)
    # killed after step 2: the resumed run reads the cache back and continues the same curve
    with killed_after_step(2):
        train_dpo.main(dpo_argv(base, data8, cut, save_every=2, eval_data=held))
    capsys.readouterr()
    train_dpo.main(dpo_argv(base, data8, cut, "--resume", save_every=2, eval_data=held))
    assert "reference log-probs: read" in capsys.readouterr().out
    assert losses(cut) == want


def test_a_stale_cache_is_computed_again_and_says_why(tmp_path, tok, base, capsys):
    cfg = train_dpo.Config(model=base, micro_batch_size=2)
    exs = [dict(prompt="What is 3 plus 4?", answers=["7", "8", "12"]), dict(prompt="1 加 1 等于多少?", answers=["2", "3"])]
    groups = {"train": data.encode_groups(tok, exs, 48, data.TruncationStats(), data.RankStats()), "eval": []}
    calls = []

    def ref_run(mbs):  # a stand-in reference: each token's log-prob is minus its id
        calls.append(len(mbs))
        return [-mb["target"].float() for mb in mbs]
    path, d = str(tmp_path / train_dpo.REF_FILE), dist.get()
    key = train_dpo.ref_key(cfg, groups, torch.float32)
    first = train_dpo.reference_cache(path, key, ref_run, groups, cfg, tok.pad_id, None, d)
    assert calls == [1] and [t.tolist() for t in first["train"]] == [[-t for a in g["answers"] for t in a]
                                                                     for g in groups["train"]]
    again = train_dpo.reference_cache(path, key, ref_run, groups, cfg, tok.pad_id, None, d)
    assert calls == [1] and "read" in capsys.readouterr().out
    assert [t.tolist() for t in again["train"]] == [t.tolist() for t in first["train"]]
    # other answers, or another reference (here: the SFT adapter's file): stale, said, computed again
    groups["train"] = groups["train"][:1]
    train_dpo.reference_cache(path, train_dpo.ref_key(cfg, groups, torch.float32), ref_run, groups, cfg, tok.pad_id,
                              None, d)
    assert calls == [1, 1] and "is stale (answers changed): computing them again" in capsys.readouterr().out
    os.makedirs(tmp_path / "sft")
    (tmp_path / "sft" / lora.ADAPTER_FILE).write_bytes(b"adapter")
    cfg.sft_adapter = str(tmp_path / "sft")
    train_dpo.reference_cache(path, train_dpo.ref_key(cfg, groups, torch.float32), ref_run, groups, cfg, tok.pad_id,
                              None, d)
    assert calls == [1, 1, 1] and "is stale (reference changed)" in capsys.readouterr().out


def test_lora_reference_is_the_frozen_sft_adapter(tmp_path, base, data8):
    """--sft_adapter: the policy's adapter starts from it and a frozen copy is the reference, so the
    first loss is log 2 (pi = pi_ref, where the bare base would give another value), it trains, and
    the live reference adapter gives the cached curve."""
    model = glm.ChatGLM.from_pretrained(base)
    lora.inject_lora(model, r=4, alpha=8.0)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    lora.save_adapter(model, tmp_path / "sft")
    out, live = tmp_path / "lora", tmp_path / "live"
    for run, extra in ((out, []), (live, ["--no_ref_cache"])):
        train_dpo.main(dpo_argv(base, data8, run, "--sft_adapter", str(tmp_path / "sft"), *extra, max_steps=2, lr=1e-2))
    got = losses(out)
    assert got[1] == pytest.approx(math.log(2), abs=1e-6) and got[2] != pytest.approx(math.log(2), abs=1e-4)
    assert losses(live) == pytest.approx(got, rel=1e-5)
    final = os.listdir(out / "final")
    assert lora.ADAPTER_FILE in final and not any(n.startswith("model") for n in final)  # the adapter alone


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("rows,extra,words", [
    ([dict(prompt="What is 1 plus 1?", answers=["2"])], [], ["has 1 answer(s)", "at least 2"]),
    ([dict(prompt="What is 1 plus 1?", answers=["2", " 2 "])], [], ["answers 0 and 1 are the same text"]),
    (None, ["--beta", "0"], ["--beta: 0.0 is not > 0"]),
    (None, ["--loss", "kto"], ["--loss 'kto'", "dpo, listwise, ipo, simpo"]),
    (None, ["--loss", "ipo", "--label_smoothing", "0.1"], ["--label_smoothing is for --loss dpo and simpo"]),
    (None, ["--sft_adapter", "nowhere"], ["nowhere"]),
], ids=["one_answer", "identical_answers", "beta_zero", "unknown_loss", "smoothing_with_ipo", "missing_adapter"])
def test_bad_input_is_one_line(tmp_path, capsys, base, data8, rows, extra, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows) if rows else data8
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        flags.run(train_dpo.main, dpo_argv(base, path, out, *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    assert not (out / "checkpoint-4").exists()


def test_adapter_of_another_base_is_refused(tmp_path, capsys, base, data8):
    other = make_base(tmp_path / "other", seed=5)  # same shapes, other weights: only the fingerprint tells
    model = lora.inject_lora(glm.ChatGLM.from_pretrained(other), r=4, alpha=8.0)
    lora.save_adapter(model, tmp_path / "sft")
    with pytest.raises(SystemExit):
        flags.run(train_dpo.main, dpo_argv(base, data8, tmp_path / "run", "--sft_adapter", str(tmp_path / "sft")))
    assert "differs from this model" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the held-out KL to the reference


def test_kl_on_the_references_samples_estimates_the_exact_kl(tmp_path, tok, base):
    """kl_to_reference (k3 on answers sampled from the reference) against the exact KL(ref || pi)
    of the next-token distributions at the same positions, summed over the whole vocabulary in
    float64: equal in expectation, so within a few percent over ~1,000 sampled tokens; and 0 for
    pi = ref. The cache keeps the samples: read back, they are the same, not drawn again."""
    d, ref_model = dist.get(), glm.ChatGLM.from_pretrained(base).eval()
    policy = glm.ChatGLM.from_pretrained(base).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    exs = [dict(prompt=f"What is {i % 10} plus {i // 10}?", answers=["1 2 3 4 5 6", "7"]) for i in range(100)]
    groups = data.encode_groups(tok, exs, 48, data.TruncationStats(), data.RankStats())
    reference = train_dpo.Reference(train_dpo.Config(), False, ref_model, None, d, fresh=True)
    samples = reference.sample(groups * 2, tok.pad_id, tok.eop_id, seed=0)
    mbs = train_dpo.microbatches(samples, list(range(len(samples))), 50, tok.pad_id, d.device)
    train_dpo.attach_reference(mbs, reference)
    exact, n = 0.0, 0
    with torch.no_grad():
        for mb in mbs:
            at = lambda m: m.lm_head(m.transformer(mb["input_ids"], *m.batch_inputs(mb))[mb["pred_row"], mb["pred_col"]])
            q, p = at(ref_model).double().log_softmax(-1), at(policy).double().log_softmax(-1)  # [N_tok, V]
            exact, n = exact + float((q.exp() * (q - p)).sum()), n + len(q)
    assert n > 1000 and exact / n > 0.05
    assert train_dpo.kl_to_reference(policy, d, mbs) == pytest.approx(exact / n, rel=0.05)
    assert train_dpo.kl_to_reference(ref_model, d, mbs) == pytest.approx(0.0, abs=1e-6)
    # the cache: written with the samples and their log-probs, read back without drawing again
    path, cfg, split = str(tmp_path / train_dpo.REF_FILE), train_dpo.Config(micro_batch_size=50), {"eval": groups}
    first = train_dpo.reference_cache(path, {"k": 1}, reference, split, cfg, tok.pad_id, None, d, lambda: samples)
    again = train_dpo.reference_cache(path, {"k": 1}, reference, split, cfg, tok.pad_id, None, d, lambda: 1 / 0)
    assert again["kl_groups"] == first["kl_groups"] == samples
    assert torch.equal(torch.cat(again["kl"]), torch.cat([mb["ref_tok"] for mb in mbs]))
