"""train_rm.py: the pairwise loss against a float64 loop written here, ranks that travel with their answers,
the score read at <eop> under either padding, a toy ranking learnt to > 90 % held-out accuracy, a 2-stage
pipeline and 2 replicas against one process, exact resuming, the LoRA start from an SFT adapter, what
final/ holds and `score` reads back, and the bad inputs a user can give."""
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt
import data
import flags
import glm
import lora
import train_rm

from conftest import (TOK_PATH, head_lines, load_tensors, losses, make_base, newest_checkpoint,
                      printed_config, read_metrics, rm_argv, write_jsonl)

TOY_RM_TRAIN, TOY_RM_EVAL = data.toy_file("rm_train"), data.toy_file("rm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tok():
    return glm.Tokenizer(TOK_PATH)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 2-block toy ChatGLM as an HF folder (std 0.1, so rewards differ between answers)."""
    return make_base(tmp_path_factory.mktemp("base") / "toy", std=0.1)


@pytest.fixture(scope="module")
def data12(tmp_path_factory):
    """12 toy prompts of 3 ranked answers: 3 steps an epoch at 2 micro-batches of 2 prompts."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "rm12.jsonl", head_lines(TOY_RM_TRAIN, 12))


def softplus64(x):
    """log(1 + e^x) in float64 without overflow: -log sigmoid(d) = softplus(-d)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def reward_alone(model, head, ids):
    """One answer's reward from its unpadded sequence: the hidden state at its last token (<eop>), in float64."""
    with torch.no_grad():
        h = model(torch.tensor([ids]), return_hidden=True)[0, -1].double()  # [C]
    return float(h @ head.weight.detach().double()[0] + head.bias.detach().double()[0])


EXAMPLES = [  # K = 2, 3, 4; one margin; a history turn
    dict(prompt="What is 3 plus 4?", answers=["7", "8"], history=[], margin=None),
    dict(prompt="5 减 2 等于多少?", answers=["3", "4", "9"], history=[["1 加 1 等于多少?", "2"]], margin=0.5),
    dict(prompt="What is 9 minus 1?", answers=["8", "7", "It is 12", "I am not sure"], history=[], margin=-0.25),
]


# -----------------------------------------------------------------------------
# the loss


def test_loss_equals_float64_loop_over_pairs(base, tok):
    model = glm.ChatGLM.from_pretrained(base).eval()
    head = glm.reward_head(model.config.hidden_size, seed=1)
    enc = train_rm.encode_examples(tok, EXAMPLES, 64, data.TruncationStats(), train_rm.RankStats())
    mbs = train_rm.microbatches(enc, [0, 1, 2], 2, tok, "cpu")  # [ex 0, ex 1] and [ex 2]
    n = train_rm.count_pairs(mbs, None)  # one process: nothing to sum over
    assert int(n) == 1 + 3 + 6
    with torch.no_grad():
        got = sum(train_rm.rm_loss(head, n)(model, model(mb["input_ids"], return_hidden=True), mb) for mb in mbs)
    # reference: each answer alone, then every (better, worse) pair of a prompt in a plain double loop
    total, count = 0.0, 0
    for ex in EXAMPLES:
        seqs = data.encode_ranked(tok, ex, 64)
        r = [reward_alone(model, head, s) for s in seqs]
        for i in range(len(r)):
            for j in range(i + 1, len(r)):  # answers are best first: i beats j
                total += softplus64(-(r[i] - r[j] - (ex["margin"] or 0.0)))
                count += 1
    assert count == 10
    torch.testing.assert_close(got.double(), torch.tensor(total / count, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_pair_loss_is_stable_for_huge_gaps():
    r = torch.tensor([1000.0, -1000.0, 0.0], requires_grad=True)
    better, worse, margin = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2]), torch.zeros(3)
    loss = train_rm.pair_loss(r, better, worse, margin)
    # right by 2000: 0; wrong by 2000: 2000; a tie: log 2. log(sigmoid(-2000)) would be -inf
    assert torch.isinf(-torch.log(torch.sigmoid(r[1] - r[0])))
    torch.testing.assert_close(loss, torch.tensor(2000 + math.log(2)), atol=1e-4, rtol=0)
    loss.backward()
    assert torch.isfinite(r.grad).all()
    # only the wrong pair pulls: d/dr of softplus(r_0 - r_1) with r_1 the "better" one
    torch.testing.assert_close(r.grad, torch.tensor([1.0, -1.0, 0.0]), atol=1e-6, rtol=0)


def test_loss_is_invariant_to_stored_order_when_ranks_travel(base, tok):
    """B > A > D > C, stored four ways: best first, as A B C D with ranks, shuffled with ranks."""
    model = glm.ChatGLM.from_pretrained(base).eval()
    head = glm.reward_head(model.config.hidden_size, seed=2)
    A, B, C, D = "7", "It is 7", "I am not sure", "12"
    stored = [dict(answers=[B, A, D, C]),
              dict(answers=[A, B, C, D], ranks=[2, 1, 4, 3]),
              dict(answers=[C, A, D, B], ranks=[4, 2, 3, 1]),
              dict(answers=[D, C, B, A], ranks=[30, 40, 10, 20])]  # any distinct numbers, lower is better

    def loss_of(ex):
        ex = dict(prompt="What is 3 plus 4?", history=[], margin=0.1, **ex)
        enc = train_rm.encode_examples(tok, [ex], 64, data.TruncationStats(), train_rm.RankStats())
        mb = train_rm.microbatches(enc, [0], 1, tok, "cpu")[0]
        with torch.no_grad():
            return train_rm.rm_loss(head, 6)(model, model(mb["input_ids"], return_hidden=True), mb)

    want = loss_of(stored[0])
    for ex in stored[1:]:
        torch.testing.assert_close(loss_of(ex), want, atol=0, rtol=0)
    # the ranks matter: the same storage read as best-first is another ranking, another loss
    assert abs(float(loss_of(dict(answers=[A, B, C, D]))) - float(want)) > 1e-4
    with pytest.raises(data.DataError, match="its own rank"):
        loss_of(dict(answers=[A, B, C, D], ranks=[1, 1, 2, 3]))


def test_score_is_read_at_eop_under_left_and_right_padding(base, tok):
    model = glm.ChatGLM.from_pretrained(base).eval()
    head = glm.reward_head(model.config.hidden_size, seed=3)
    seqs = data.encode_ranked(tok, EXAMPLES[2], 64) + data.encode_ranked(tok, EXAMPLES[1], 64)  # lengths differ
    T = max(map(len, seqs))
    left = glm.left_pad(seqs, tok.pad_id)
    right = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])
    assert glm.eop_index(left, tok.eop_id).tolist() == [T - 1] * len(seqs)
    assert glm.eop_index(right, tok.eop_id).tolist() == [len(s) - 1 for s in seqs]
    with torch.no_grad():
        r = {name: glm.rewards_at(head, model(ids, return_hidden=True), glm.eop_index(ids, tok.eop_id))
             for name, ids in (("left", left), ("right", right))}
    alone = torch.tensor([reward_alone(model, head, s) for s in seqs], dtype=torch.float32)
    assert alone.std() > 1e-3  # the answers do get different scores
    torch.testing.assert_close(r["left"], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r["right"], alone, atol=1e-5, rtol=1e-5)
    # a row with no <eop> has no place to read its score
    with pytest.raises(ValueError, match="no <eop>"):
        glm.eop_index(torch.tensor([[5, 8, 20, 21]]), tok.eop_id)


# -----------------------------------------------------------------------------
# learning: a toy ranking to > 90 % held-out pairwise accuracy


def language_ranking(src, dst):
    """The bundled toy prompts, re-ranked by a rule a 2-block model learns in seconds from scratch and that
    needs prompt and answer together: the answer in the question's language > the bare number > the
    answer in the other language. (The bundled arithmetic ranking needs the sums themselves, which a
    random toy model cannot learn in a test's time; from the toy SFT model it reaches about 85 %.)"""
    rows = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            c, zh = r["answers"][0], re.search(r"[\u4e00-\u9fff]", r["prompt"]) is not None
            en_a, zh_a = f"The answer is {c}.", f"答案是 {c}"
            rows.append(dict(prompt=r["prompt"], answers=[zh_a if zh else en_a, c, en_a if zh else zh_a]))
    return write_jsonl(dst, rows)


def test_toy_ranking_held_out_accuracy_rises_above_90_percent(tmp_path, base):
    train = language_ranking(TOY_RM_TRAIN, tmp_path / "train.jsonl")
    held = language_ranking(TOY_RM_EVAL, tmp_path / "eval.jsonl")  # prompts of held-out wordings and sums
    flags = dict(eval_data=held, max_len=64, micro_batch_size=16, grad_accum=1, lr=3e-3, warmup_steps=5)
    before = train_rm.main(rm_argv(base, train, tmp_path / "before", max_steps=1, **{**flags, "lr": 0.0}))
    after = train_rm.main(rm_argv(base, train, tmp_path / "after", max_steps=20, **flags))
    assert before["pair_acc"] < 0.8, before
    assert after["pair_acc"] > 0.9, after
    assert after["rank_acc"] > 0.8, after
    assert after["loss"] < 0.3, after


# -----------------------------------------------------------------------------
# the pipeline and data parallelism against one process

def test_gloo_p2_and_d2_give_the_single_process_losses(tmp_path, base, data12, gloo_mains):
    """One step = 4 prompts: 2 micro-batches of 2 (one process, or P = 2), or 1 micro-batch of 2 on
    each of D = 2 replicas; the global pair count makes the step's loss the same mean."""
    eval_file = write_jsonl(tmp_path / "eval.jsonl", head_lines(TOY_RM_EVAL, 6))
    common = dict(max_steps=4, eval_every=2, eval_data=eval_file)
    one = rm_argv(base, data12, tmp_path / "one", **common)
    runs = {"p2": rm_argv(base, data12, tmp_path / "p2", "--pp", "2", **common),
            "d2": rm_argv(base, data12, tmp_path / "d2", **{**common, "grad_accum": 1})}
    train_rm.main(one)
    gloo_mains("train_rm", list(runs.values()))

    want = read_metrics(tmp_path / "one")
    assert [r["step"] for r in want if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in want if "eval_loss" in r] == [2, 4]
    final_one = load_tensors(tmp_path / "one" / "final")  # the backbone and the reward head
    assert {"reward_head.safetensors", "model.safetensors.index.json"} <= set(os.listdir(tmp_path / "one" / "final"))
    for name in runs:
        got = read_metrics(tmp_path / name)
        assert len(got) == len(want), name
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and a["step"] == b["step"], (name, a, b)
            for key in ("loss", "pairs", "eval_loss", "eval_pair_acc", "eval_rank_acc", "reward_mean", "reward_std"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (name, a["step"], key)
        # final/ holds what one process writes: the stages' weights joined into one folder, the
        # head the last stage wrote, the same statistics
        final = load_tensors(tmp_path / name / "final")
        assert final.keys() == final_one.keys(), name
        for key in final_one:
            torch.testing.assert_close(final[key], final_one[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
        sa, sb = (json.loads((tmp_path / n / "final" / "reward_stats.json").read_text()) for n in (name, "one"))
        assert sa["mean"] == pytest.approx(sb["mean"], abs=1e-4) and sa["std"] == pytest.approx(sb["std"], rel=1e-4)


# -----------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("mode", [
    [],
    # dropout draws random numbers every step: the resumed run must restore the RNG to match
    ["--lora_rank", "4", "--lora_targets", "query_key_value,dense_4h_to_h", "--lora_dropout", "0.1"],
    ["--train_layers", "1"],
], ids=["full", "lora", "last1"])
def test_resumed_run_continues_the_same_loss_curve(tmp_path, killed_after_step, base, data12, mode):
    N, k = 7, 4  # 3 steps an epoch: the resumed run starts in the second epoch and crosses into the third
    whole = tmp_path / "whole"
    train_rm.main(rm_argv(base, data12, whole, *mode, max_steps=N, save_every=k))
    want = losses(whole)
    assert sorted(want) == list(range(1, N + 1))

    cut = tmp_path / "cut"
    with killed_after_step(k):
        train_rm.main(rm_argv(base, data12, cut, *mode, max_steps=N, save_every=k))
    assert json.loads((newest_checkpoint(cut) / "train_state.json").read_text())["step"] == k
    assert os.path.isfile(newest_checkpoint(cut) / "reward_head.safetensors")
    train_rm.main(rm_argv(base, data12, cut, *mode, "--resume", max_steps=N, save_every=k))
    got = losses(cut)
    assert sorted(got) == list(range(1, N + 1))
    for step in range(1, N + 1):
        assert got[step] == want[step], (step, got[step], want[step])
    for name in ("reward_head.safetensors", lora.ADAPTER_FILE if mode[:1] == ["--lora_rank"] else None):
        if name:
            sa, sb = load_file(whole / "final" / name), load_file(cut / "final" / name)
            for key in sa:
                torch.testing.assert_close(sb[key], sa[key], atol=0, rtol=0, msg=key)
    assert json.loads((cut / "final" / "reward_stats.json").read_text()) == \
        json.loads((whole / "final" / "reward_stats.json").read_text())


# -----------------------------------------------------------------------------
# what final/ holds, and reading it back


def test_full_result_scores_back_and_its_statistics(tmp_path, base, data12, capsys):
    out = tmp_path / "run"
    ev = train_rm.main(rm_argv(base, data12, out, max_steps=3))
    final = out / "final"
    assert {"config.json", "model.safetensors.index.json", "ice_text.model", "reward_head.safetensors",
            "reward_stats.json"} <= set(os.listdir(final))
    assert set(load_file(final / "reward_head.safetensors")) == {"weight", "bias"}
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["count"] == 36 and stats["step"] == 3 and stats["data"] == data12
    # independently: the saved backbone and head, one unpadded answer at a time (best first)
    model = glm.ChatGLM.from_pretrained(final).eval()
    head = torch.nn.Linear(model.config.hidden_size, 1)
    head.load_state_dict(load_file(final / "reward_head.safetensors"))
    tok = glm.Tokenizer.from_dir(final)
    examples = data.load_ranked(data12)
    want = [[reward_alone(model, head, s) for s in data.encode_ranked(tok, ex, 48)] for ex in examples]
    flat = torch.tensor([r for rs in want for r in rs], dtype=torch.float64)
    assert stats["mean"] == pytest.approx(float(flat.mean()), abs=1e-5)
    assert stats["std"] == pytest.approx(float(flat.std(unbiased=False)), abs=1e-5)
    right = [[rs[i] > rs[j] for i in range(3) for j in range(i + 1, 3)] for rs in want]
    pair_acc, rank_acc = sum(map(sum, right)) / 36, sum(map(all, right)) / 12
    assert 0 < pair_acc < 1  # a partly right ranking: both kinds of pairs are counted
    assert (stats["pair_accuracy"], stats["ranking_accuracy"]) == pytest.approx((pair_acc, rank_acc))
    assert (ev["pair_acc"], ev["rank_acc"], ev["count"]) == pytest.approx((pair_acc, rank_acc, 36))
    capsys.readouterr()
    got = train_rm.score(["--model", str(final), "--data", data12, "--max_len", "48"])
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    printed = capsys.readouterr().out
    assert f"{data12}:1" in printed and "rank 1" in printed and " z " in printed
    assert f"pairwise accuracy {pair_acc:.1%} over 36 pairs" in printed
    # an SFT file scores its responses, one answer each
    sft = write_jsonl(tmp_path / "sft.jsonl", [dict(prompt="What is 3 plus 4?", response="7")])
    assert len(train_rm.score(["--model", str(final), "--data", sft])[0]) == 1


def sft_adapter(base, path, r=4, targets=("query_key_value",), seed=0):
    """A LoRA SFT result: an adapter with nonzero factors on the base, saved as train_sft.py writes it."""
    model = glm.ChatGLM.from_pretrained(base)
    lora.inject_lora(model, targets=targets, r=r, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].copy_(torch.randn(m.lora_B["default"].shape, generator=g) * 0.1)
    lora.save_adapter(model, path)
    return str(path)


def test_lora_starts_from_the_sft_adapter_and_scores_back(tmp_path, base, data12):
    sft = sft_adapter(base, tmp_path / "sft", targets=("query_key_value", "dense"))
    # lr 0: the saved adapter must be the SFT adapter itself (its r, alpha and targets adopted)
    out = tmp_path / "frozen"
    train_rm.main(rm_argv(base, data12, out, "--sft_adapter", sft, max_steps=1, lr=0.0))
    a, b = load_file(tmp_path / "sft" / lora.ADAPTER_FILE), load_file(out / "final" / lora.ADAPTER_FILE)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    assert not any(n.startswith("model") for n in os.listdir(out / "final"))  # the adapter, not the base
    # trained: the adapter moves on from the SFT one, and base + adapter + head score back
    out = tmp_path / "trained"
    train_rm.main(rm_argv(base, data12, out, "--sft_adapter", sft, max_steps=3))
    b = load_file(out / "final" / lora.ADAPTER_FILE)
    assert max(float((b[k] - a[k]).abs().max()) for k in a) > 1e-4
    got = train_rm.score(["--model", base, "--adapter", str(out / "final"), "--data", data12, "--max_len", "48"])
    model = lora.load_adapter(glm.ChatGLM.from_pretrained(base), out / "final").eval()
    head = glm.reward_head(model.config.hidden_size)
    ckpt.load_head(head, str(out / "final"), "reward_head")
    tok = glm.Tokenizer(TOK_PATH)
    seqs = data.encode_ranked(tok, data.load_ranked(data12)[0], 48)
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor([reward_alone(model, head, s) for s in seqs],
                                                                  dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_toy_default_run_starts_from_the_toy_sft_result(toy_chain):
    """`python train_rm.py --max_steps 2` after the toy SFT run: the RM starts from its result and
    trains on the bundled rankings; lm_head (an RM computes no logits) stays the SFT model's."""
    runs, rm = toy_chain.runs, toy_chain.toy_rm
    cfg = printed_config(rm.printed)
    assert (cfg["model"], cfg["sft_adapter"], cfg["data"], cfg["eval_data"]) == \
        (str(runs / "toy_sft" / "final"), "", TOY_RM_TRAIN, TOY_RM_EVAL)
    assert (cfg["max_steps"], cfg["lr"], cfg["micro_batch_size"]) == \
        (2, data.TOY_RM["lr"], data.TOY_RM["micro_batch_size"])  # the flag, then the preset's values
    assert "toy, before training: held-out pairwise accuracy" in rm.printed
    assert "toy, after training: held-out pairwise accuracy" in rm.printed
    assert rm.result["count"] == 3 * len(data.load_ranked(TOY_RM_EVAL))
    base, sft, out = (load_tensors(runs / p) for p in ("toy_base", "toy_sft/final", "toy_rm/final"))
    assert not torch.equal(sft["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(out["lm_head.weight"], sft["lm_head.weight"])
    assert not torch.equal(out["transformer.final_layernorm.weight"], sft["transformer.final_layernorm.weight"])


def test_toy_model_and_data_without_a_toy_sft_result_or_with_a_lora_one(tmp_path):
    # nothing beside --out: a random toy base there (main writes it once --out is checked)
    cfg = train_rm.toy_model_and_data(train_rm.Config(out=str(tmp_path / "toy_rm")))
    assert (cfg.model, cfg.sft_adapter, cfg.data, cfg.eval_data) == \
        (str(tmp_path / "toy_base"), "", TOY_RM_TRAIN, TOY_RM_EVAL)
    data.write_toy_model(cfg.model)
    assert glm.GLMConfig.from_json(tmp_path / "toy_base" / "config.json") == glm.GLMConfig.toy()
    # a LoRA toy SFT result: its adapter on the toy base; a --data given stays
    sft_adapter(cfg.model, tmp_path / "toy_sft" / "final")
    mine = write_jsonl(tmp_path / "mine.jsonl", head_lines(TOY_RM_TRAIN, 2))
    cfg = train_rm.toy_model_and_data(train_rm.Config(out=str(tmp_path / "toy_rm"), data=mine))
    assert (cfg.model, cfg.sft_adapter, cfg.data, cfg.eval_data) == \
        (str(tmp_path / "toy_base"), str(tmp_path / "toy_sft" / "final"), mine, "")


# -----------------------------------------------------------------------------
# bad input: clear errors, or counted and reported skips


@pytest.mark.parametrize("line,words", [
    (dict(prompt="What is 1 plus 1?", answers=["2"]), ["1 answer(s)", "at least 2"]),
    (dict(prompt="What is 1 plus 1?", answers=["2", "3", "2 "]), ["answers 0 and 2 are the same text"]),
    (dict(prompt="What is 1 plus 1?", chosen="2"), ["'rejected' is missing"]),
], ids=["one_answer", "duplicate_answers", "chosen_only"])
def test_bad_ranked_lines_fail_before_training(tmp_path, base, data12, line, words):
    bad = write_jsonl(tmp_path / "bad.jsonl", head_lines(data12, 2) + [json.dumps(line)])
    out = tmp_path / "run"
    with pytest.raises(data.DataError) as e:
        train_rm.main(rm_argv(base, bad, out))
    assert f"{bad}:3:" in str(e.value) and "HINT" in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists()


def test_truncation_keeps_eop_and_counts_what_it_cut(tmp_path, base, tok, capsys):
    long_prompt = " ".join(["What is 3 plus 4?"] * 20)
    rows = [dict(prompt=long_prompt, answers=["7", "8", "9"]),  # the prompt is cut from the left
            dict(prompt="What is 2 plus 2?", answers=["4 " + "apples " * 40 + "A", "4 " + "apples " * 40 + "B"]),
            dict(prompt="What is 5 plus 1?", answers=["6", "5 " + "apples " * 40, "5 " + "apples " * 40 + "B"])]
    stats, ranks = data.TruncationStats(), train_rm.RankStats()
    enc = train_rm.encode_examples(tok, [dict(r, history=[], source=f"f:{i + 1}") for i, r in enumerate(rows)], 24,
                                   stats, ranks)
    for e in enc:
        for s in e["ids"]:
            assert len(s) <= 24 and s[-1] == tok.eop_id and tok.sop_id in s  # the answer keeps its end token
    # example 2's answers differ only after the cut: identical, so the worse one is dropped and the
    # prompt, left with one answer, is skipped; example 3 keeps two of its three answers
    assert (ranks.merged, ranks.skipped) == (2, 1) and [len(e["ids"]) for e in enc] == [3, 2]
    # example 1 keeps its prompt's end, [gMASK] <sop>, its answer and <eop>
    assert enc[0]["ids"][0][-5:] == tok.encode_text(long_prompt)[-1:] + [tok.gmask_id, tok.sop_id] + \
        tok.encode_text("7") + [tok.eop_id]
    assert (stats.seqs, stats.truncated, stats.prompt_cut) == (8, 7, 3)
    # a run reports both counts before training (the file is its own held-out set here: counted twice)
    path = write_jsonl(tmp_path / "cut.jsonl", rows)
    train_rm.main(rm_argv(base, path, tmp_path / "run", max_len=24, max_steps=1))
    printed = capsys.readouterr().out
    assert "truncated 14 of 16 sequences" in printed
    assert "4 identical to a better answer after truncation (dropped), 2 prompts skipped" in printed
    # nothing left to train on is an error, not an empty run
    only = write_jsonl(tmp_path / "only.jsonl", rows[1:2])
    with pytest.raises(data.DataError, match="raise --max_len"):
        train_rm.main(rm_argv(base, only, tmp_path / "none", max_len=24, eval_data=path))


def test_sft_checkpoint_that_does_not_match_is_a_clear_error(tmp_path, base, data12):
    other = tmp_path / "wide"  # another base: a different hidden size
    cfg = glm.GLMConfig.toy()
    cfg.hidden_size, cfg.inner_hidden_size = 32, 128
    glm.ChatGLM(cfg).init_weights(0).save_pretrained(other, tokenizer=glm.Tokenizer(TOK_PATH))
    wrong = sft_adapter(str(other), tmp_path / "wide_sft")
    with pytest.raises(ValueError, match="different base model"):
        train_rm.main(rm_argv(base, data12, tmp_path / "a", "--sft_adapter", wrong))
    right = sft_adapter(base, tmp_path / "sft", r=4)
    with pytest.raises(ValueError, match="--lora_rank 8, but --sft_adapter .* has r=4.*leave out --lora_rank"):
        train_rm.main(rm_argv(base, data12, tmp_path / "b", "--sft_adapter", right, "--lora_rank", "8"))
    with pytest.raises(ValueError, match="--sft_adapter"):  # the adapter folder passed as the model
        train_rm.main(rm_argv(right, data12, tmp_path / "c"))
    with pytest.raises(ValueError, match="pick one"):
        train_rm.main(rm_argv(base, data12, tmp_path / "d", "--sft_adapter", right, "--train_layers", "1"))
    with pytest.raises(FileNotFoundError, match="reward_head.safetensors"):  # a model that is no RM
        train_rm.score(["--model", base, "--data", data12])


def test_score_reads_a_mixed_file_line_by_line(tmp_path, base, tok, capsys):
    rm = tmp_path / "rm"  # the random toy base with a reward head: an RM folder as train_rm.py leaves it
    shutil.copytree(base, rm)
    head = glm.reward_head(glm.GLMConfig.toy().hidden_size, seed=1)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(rm / "reward_head.safetensors"))
    ranked = [dict(prompt="What is 3 plus 4?", answers=["7", "8", "It is 12"]),
              dict(prompt="5 减 2 等于多少?", chosen="3", rejected="4", history=[["1 加 1 等于多少?", "2"]])]
    sft = [dict(prompt="What is 9 minus 1?", response="8"),
           dict(instruction="What is 2 plus 2?", output="4"),
           dict(messages=[dict(role="system", content="Be brief."), dict(role="user", content="What is 1 plus 1?"),
                          dict(role="assistant", content="2")]),
           dict(conversations=[{"from": "human", "value": "What is 6 minus 6?"}, {"from": "gpt", "value": "0"}])]
    mixed = [sft[0], ranked[0], sft[1], sft[2], ranked[1], sft[3]]
    flags_ = ["--model", str(rm), "--max_len", "48"]
    got = train_rm.score(flags_ + ["--data", write_jsonl(tmp_path / "mixed.jsonl", mixed)])
    printed = capsys.readouterr().out
    alone_rm = train_rm.score(flags_ + ["--data", write_jsonl(tmp_path / "rm.jsonl", ranked)])
    alone_sft = train_rm.score(flags_ + ["--data", write_jsonl(tmp_path / "sft.jsonl", sft)])
    want = [alone_sft[0], alone_rm[0], alone_sft[1], alone_sft[2], alone_rm[1], alone_sft[3]]
    assert [len(s) for s in got] == [1, 3, 1, 1, 2, 1]
    torch.testing.assert_close(torch.tensor(sum(got, [])), torch.tensor(sum(want, [])), atol=1e-5, rtol=1e-5)
    # independently: each answer alone, unpadded, from the examples written here in our own shape
    model = glm.ChatGLM.from_pretrained(rm).eval()
    by_hand = [dict(prompt="What is 9 minus 1?", answers=["8"]), dict(prompt="What is 3 plus 4?", answers=["7", "8", "It is 12"]),
               dict(prompt="What is 2 plus 2?", answers=["4"]), dict(prompt="Be brief.\nWhat is 1 plus 1?", answers=["2"]),
               dict(prompt="5 减 2 等于多少?", answers=["3", "4"], history=[["1 加 1 等于多少?", "2"]]),
               dict(prompt="What is 6 minus 6?", answers=["0"])]
    alone = [reward_alone(model, head, s) for ex in by_hand for s in data.encode_ranked(tok, ex, 48)]
    torch.testing.assert_close(torch.tensor(sum(got, []), dtype=torch.float64), torch.tensor(alone, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    # the output keeps each shape's form: ranks for ranked lines, "answer" for SFT lines, pairs of ranked lines only
    pairs = [got[1][0] > got[1][1], got[1][0] > got[1][2], got[1][1] > got[1][2], got[4][0] > got[4][1]]
    assert printed.count("rank 1: ") == 2 and printed.count("answer: ") == 4
    assert f"pairwise accuracy {sum(pairs) / 4:.1%} over 4 pairs" in printed
    assert f"mixed.jsonl:4  {'Be brief.' + chr(10) + 'What is 1 plus 1?'!r}" in printed
    # a line of no shape: one line naming file:line, exit code 2, before any weight is read
    bad = write_jsonl(tmp_path / "bad.jsonl", [ranked[0], {"text": "What is 1 plus 1?"}])
    with pytest.raises(data.DataError, match=re.escape(f"{bad}:2: the line is neither ranked answers nor an SFT")):
        train_rm.score(["--model", str(tmp_path / "nowhere"), "--data", bad])
    with pytest.raises(SystemExit) as e:
        flags.run(train_rm.score, ["--model", str(rm), "--data", bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {bad}:2: ") and err.count("\n") == 1
