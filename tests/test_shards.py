"""Tokenised folders (data.py tokenize), lazy reading, packing and --group_by_length.

Shards decode back to their source lines; packed rows give each example the positions and mask it
has alone (checked against the rules of DESIGN.md, written out here) and the same per-example losses
and gradients as unpacked training; resume over a folder is exact; bad folders fail in one line.
P = 2 with packing is in tests/test_pipeline.py's launch (sft_p2d2_pack).
"""
import json
import os
import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import glm
import train_ppo
import train_rm
import train_sft
from conftest import TOK_PATH, head_lines, losses, make_base, ppo_argv, read_metrics, rm_argv, sft_argv, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [  # ours, Alpaca, a conversation, history; one too long for MAX_LEN (cut, counted)
    dict(prompt="What is 3 plus 4?", response="7"),
    dict(instruction="小明有 3 本书,又买了 5 本,一共有几本?", input="", output="8"),
    dict(instruction="What is 9 minus 2?", input="Alice asks", output="The answer is 7."),
    dict(messages=[{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]),
    dict(prompt="What is 5 minus 5?", response="0", history=[["What is 2 plus 2?", "4"]]),
    dict(prompt="Bob has 4 apples and Carol gives Bob 2 more. " * 4, response="6 apples " * 6),
] * 3
MAX_LEN = 40


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return glm.Tokenizer(TOK_PATH)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROWS tokenised by 2 worker processes into several shards (a small SHARD_BYTES), with a blank line."""
    root = tmp_path_factory.mktemp("shards")
    src = write_rows(root / "sft.jsonl", ROWS)
    with open(src, "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps(ROWS[0]) + "\n")
    old, data.SHARD_BYTES = data.SHARD_BYTES, 400
    try:
        data.tokenize("sft", [src], str(root / "sft"), TOK_PATH, MAX_LEN, workers=2)
    finally:
        data.SHARD_BYTES = old
    return root, src, str(root / "sft")


# -----------------------------------------------------------------------------
# what a folder holds


def test_shards_decode_back_to_the_source_lines(tok, folder):
    root, src, out = folder
    stats = data.TruncationStats()
    view = data.sft_dataset(tok, out, MAX_LEN, stats)
    lines = data.load_sft(src)
    assert len(view) == len(lines) == len(ROWS) + 1 and len(view.manifest["shards"]) > 2
    for i, ex in enumerate(lines):
        ids, labels = view[i]
        b = sum(1 for x in labels if x == data.IGNORE)
        assert labels[:b] == [data.IGNORE] * b and labels[b:] == ids[b:]
        prompt = unicodedata.normalize("NFKC", glm.chat_prompt(ex["prompt"], ex["history"]))  # as sentencepiece does
        if len(tok.encode_pair(prompt, ex["response"])) <= MAX_LEN:  # not cut: the whole line comes back
            assert tok.decode(ids[:b - 2]) == prompt and ids[b - 2:b] == [tok.gmask_id, tok.sop_id]
            assert tok.decode(ids[b:-1]) == ex["response"] and ids[-1] == tok.eop_id
        else:  # cut to MAX_LEN: the prompt loses its start, as DESIGN.md says
            assert len(ids) == MAX_LEN and prompt.rstrip().endswith(tok.decode(ids[:b - 2]).lstrip(". "))
            assert tok.decode(ids[b:-1]) == ex["response"].rstrip()
    cut = sum(1 for ex in lines if len(tok.encode_text(glm.chat_prompt(ex["prompt"], ex["history"])))
              + len(tok.encode_text(ex["response"])) + 3 > MAX_LEN)
    assert stats.truncated == cut == view.manifest["truncation"]["truncated"] == 3
    m = view.manifest
    assert m["sources"][0]["sha256"] == data.file_sha256(src) and m["tokenizer"]["sha256"] == data.file_sha256(TOK_PATH)
    assert m["tokens"] == sum(len(view[i][0]) for i in range(len(view))) == int(view.lengths().sum())


def test_prompt_and_ranked_folders_hold_what_the_jsonl_path_gives(tok, tmp_path):
    rm = write_rows(tmp_path / "rm.jsonl", [dict(prompt="What is 2 plus 3?", answers=["5", "6", "9"]),
                                           dict(prompt="What is 1 plus 1?", answers=["3", "2"], ranks=[2, 1]),
                                           dict(prompt="3 加 5 等于多少?", chosen="8", rejected="7", margin=1.5)])
    data.tokenize("rm", [rm], str(tmp_path / "rm"), TOK_PATH, MAX_LEN)
    want, _, _ = data.load_groups(tok, rm, rm, 0, 0, MAX_LEN)
    got = data.Shards(str(tmp_path / "rm"), tok, "rm", MAX_LEN)
    assert len(got) == len(want) == 3
    for i, w in enumerate(want):
        g = got[i]
        assert (g["prompt"], g["answers"], g["ids"], g["margin"]) == (w["prompt"], w["answers"], w["ids"], w["margin"])
    assert tok.decode(got[1]["answers"][0][:-1]) == "2"  # ranks: the best answer first
    pr = write_rows(tmp_path / "p.jsonl", [dict(prompt="What is 7 minus 4?"), dict(prompt="小明有几本书?", history=[["a", "b"]])])
    data.tokenize("prompts", [pr], str(tmp_path / "p"), TOK_PATH, 48)
    ids, texts = data.prompt_dataset(tok, str(tmp_path / "p"), 48)
    assert [ids[i] for i in range(2)] == [tok.encode(glm.chat_prompt(e["prompt"], e["history"])) for e in data.load_prompts(pr)]
    assert [texts[i] for i in range(len(texts))] == ["What is 7 minus 4?", "小明有几本书?"]


def test_holdout_split_of_a_folder_is_the_jsonl_split(tok, folder):
    _, src, out = folder
    from_jsonl = data.load_train_eval(lambda p: data.sft_dataset(tok, p, MAX_LEN), src, "", 0.25, 3)
    from_dir = data.load_train_eval(lambda p: data.sft_dataset(tok, p, MAX_LEN), out, "", 0.25, 3)
    for a, b in zip(from_jsonl, from_dir):
        assert isinstance(b, data.Subset) and [b[i] for i in range(len(b))] == a


# -----------------------------------------------------------------------------
# packing


def alone_layout(ids, tok):
    """DESIGN.md's rules written out for one unpadded example: positions 0.. over the context, then
    the [gMASK]'s position; block positions 0 over the context, 1, 2, ... from <sop>; the context
    seen by all, causal from <sop> on."""
    s, g = ids.index(tok.sop_id), ids.index(tok.gmask_id)
    pos = [t if t < s else g for t in range(len(ids))]
    block = [0 if t < s else t - s + 1 for t in range(len(ids))]
    sees = [[j < s or j <= i for j in range(len(ids))] for i in range(len(ids))]
    return torch.tensor([pos, block]), torch.tensor(sees)


def test_packed_rows_give_each_example_its_own_positions_and_mask(tok, folder):
    _, _, out = folder
    view = data.sft_dataset(tok, out, MAX_LEN)
    packed = data.Packed(view, MAX_LEN, seed=1, tok=tok)
    assert sorted(packed.order.tolist()) == list(range(len(view)))  # every example once
    assert len(packed) < len(view)
    mb = data.collate_sft([packed[r] for r in range(len(packed))], tok.pad_id)
    T = mb["input_ids"].shape[1]
    for r in range(len(packed)):
        members = packed.order[packed.starts[r]:packed.starts[r + 1]].tolist()
        o = T - sum(len(view[i][0]) for i in members)  # left padding
        assert (mb["input_ids"][r, :o] == tok.pad_id).all() and not mb["attend"][r, 0, o:, :o].any()
        for i in members:
            ids, labels = view[i]
            n = len(ids)
            pos, sees = alone_layout(ids, tok)
            assert mb["input_ids"][r, o:o + n].tolist() == ids and mb["labels"][r, o:o + n].tolist() == labels
            assert torch.equal(mb["position_ids"][r, :, o:o + n], pos)
            assert torch.equal(mb["attend"][r, 0, o:o + n, o:o + n], sees)
            rest = torch.ones(T, dtype=torch.bool)
            rest[o:o + n] = False
            assert not mb["attend"][r, 0, o:o + n][:, rest].any()  # no attention to another example
            o += n


def per_example_losses(model, mb, spans):
    """{example: summed cross-entropy over its response tokens} and the batch's summed loss; spans:
    (row, first column, length, example) of each example in the micro-batch."""
    logits = model.forward(mb["input_ids"], mb.get("position_ids"), None if "attend" not in mb else ~mb["attend"])
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), mb["labels"][:, 1:], ignore_index=data.IGNORE,
                         reduction="none")  # [B, T-1]: the loss of predicting token t + 1
    out = {e: ce[r, c:c + n - 1].sum() for r, c, n, e in spans}  # its tokens 1.. n-1, predicted from 0.. n-2
    return out, ce.sum()


@pytest.mark.parametrize("which", ["golden", "toy"])
def test_packed_training_equals_unpacked(tok, folder, fixture_dir, tmp_path, which):
    _, _, out = folder
    model = glm.ChatGLM.from_pretrained(fixture_dir if which == "golden" else make_base(tmp_path / "toy", std=0.2))
    view = data.Subset(data.sft_dataset(tok, out, MAX_LEN), range(12))  # two of them cut to MAX_LEN
    packed = data.Packed(view, MAX_LEN, seed=0, tok=tok)
    rows = [packed[r] for r in range(len(packed))]
    mb = data.collate_sft(rows, tok.pad_id)
    T, spans = mb["input_ids"].shape[1], []
    for r in range(len(packed)):
        members = packed.order[packed.starts[r]:packed.starts[r + 1]].tolist()
        c = T - sum(len(view[i][0]) for i in members)
        for i in members:
            spans.append((r, c, len(view[i][0]), i))
            c += len(view[i][0])
    got, total = per_example_losses(model, mb, spans)
    total.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want, ref_total = {}, 0.0
    for i in range(len(view)):  # each example alone, no padding, no packing
        one = data.collate_sft([view[i]], tok.pad_id)
        w, s = per_example_losses(model, one, [(0, 0, len(view[i][0]), i)])
        want.update(w)
        ref_total = ref_total + s
    ref_total.backward()
    assert sorted(got) == list(range(len(view)))
    for i in want:
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-5, msg=f"example {i}")
    for n, p in model.named_parameters():
        torch.testing.assert_close(got_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    n_labels = int(data.count_labels(mb["labels"]))  # the mean's denominator is unchanged by packing
    assert n_labels == sum(sum(1 for x in view[i][1][1:] if x != data.IGNORE) for i in range(len(view)))


def test_packing_is_tight_deterministic_and_fits():
    lens = np.random.default_rng(0).integers(5, 60, size=3000)
    order, starts = data.pack_rows(lens, 64, seed=7)
    again = data.pack_rows(lens, 64, seed=7)
    assert np.array_equal(order, again[0]) and np.array_equal(starts, again[1])
    assert sorted(order.tolist()) == list(range(len(lens)))
    fill = np.add.reduceat(lens[order], starts[:-1])
    assert fill.max() <= 64 and lens.sum() / (64 * len(fill)) > 0.95


# -----------------------------------------------------------------------------
# batches over a folder


def test_resume_over_a_folder_is_exact(tok, folder):
    _, _, out = folder
    view = data.sft_dataset(tok, out, MAX_LEN)
    for make in (lambda: data.Batches(len(view), 3, seed=5, rank=1, world=2),
                 lambda: data.LengthGrouped(data.lengths(view), 3, seed=5, rank=1, world=2, window=2)):
        a = make()
        for _ in range(4):  # into the second epoch
            a.next()
        b = make()
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for _ in range(3):
            x, y = a.next(), b.next()
            assert x == y
            ma, mb = data.collate_sft([view[i] for i in x], 3), data.collate_sft([view[i] for i in y], 3)
            assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_group_by_length_batches_hold_similar_lengths(tok):
    lens = np.random.default_rng(1).integers(1, 500, size=4000)
    plain, grouped = data.Batches(len(lens), 8, seed=2), data.LengthGrouped(lens, 8, seed=2)
    assert sorted(grouped.order(0)) == list(range(len(lens)))  # a permutation: every example once an epoch

    def padding(batches):
        return sum(int(lens[b].max() * len(b) - lens[b].sum()) for b in batches)
    assert padding(list(grouped)) < 0.1 * padding(list(plain))


def test_train_sft_reads_a_folder_as_its_jsonl(tok, folder, tmp_path):
    """The same run from the jsonl and from its tokenised folder: the same losses."""
    _, src, out = folder
    base = make_base(tmp_path / "base")
    train_sft.main(sft_argv(base, src, tmp_path / "a", max_len=MAX_LEN, max_steps=2))
    train_sft.main(sft_argv(base, out, tmp_path / "b", max_len=MAX_LEN, max_steps=2))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)


def test_packed_run_over_a_folder_resumes_exactly(tok, folder, tmp_path):
    """Stopped after step 2 and resumed: steps 3 and 4 as in the run that never stopped (warmup 4:
    the first four learning rates do not depend on max_steps)."""
    _, _, out = folder
    base = make_base(tmp_path / "base")
    run = lambda name, *extra, **kw: train_sft.main(sft_argv(base, out, tmp_path / name, "--pack", *extra,
                                                             max_len=MAX_LEN, micro_batch_size=1, **kw))
    run("whole", max_steps=4)
    run("cut", max_steps=2)
    run("cut", "--resume", max_steps=4)
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4] and cut == pytest.approx(whole, abs=1e-6)


def same_numbers(a, b):
    """metrics.jsonl of two runs agree on every logged number but the timings."""
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        keys = [k for k in x if isinstance(x[k], float) and not k.startswith(("t_", "tokens_per", "time"))
                and "per_s" not in k]
        assert keys and {k: x[k] for k in keys} == pytest.approx({k: y[k] for k in keys}, abs=1e-6)


def test_train_rm_and_train_ppo_read_folders_as_their_jsonl(tmp_path, toy_dir):
    """Ranked groups, PPO prompts and PPO-ptx data from folders: the runs of their jsonl files."""
    rm = write_jsonl(tmp_path / "rm.jsonl", head_lines(data.toy_file("rm_train"), 8))
    data.tokenize("rm", [rm], str(tmp_path / "rm"), TOK_PATH, 48)
    base = make_base(tmp_path / "base")
    train_rm.main(rm_argv(base, rm, tmp_path / "rm_a", max_steps=2))
    train_rm.main(rm_argv(base, str(tmp_path / "rm"), tmp_path / "rm_b", eval_data=rm, max_steps=2))
    same_numbers(tmp_path / "rm_a", tmp_path / "rm_b")
    prompts = os.path.join(toy_dir, "prompts.jsonl")
    ptx = write_jsonl(tmp_path / "ptx.jsonl", head_lines(data.toy_file("sft_train"), 8))
    data.tokenize("prompts", [prompts], str(tmp_path / "p"), TOK_PATH, 40)
    data.tokenize("sft", [ptx], str(tmp_path / "ptx"), TOK_PATH, 43)  # max_prompt_len + max_new_tokens
    for name, p, x, extra in (("a", prompts, ptx, ()), ("b", tmp_path / "p", tmp_path / "ptx", ()),
                              ("packed", tmp_path / "p", tmp_path / "ptx", ("--ptx_pack", "true"))):
        train_ppo.main(ppo_argv(toy_dir, tmp_path / name, "full", *extra, data=p, ptx_data=x, ptx_coef=0.5,
                                ptx_batch_size=2, max_steps=1))
    same_numbers(tmp_path / "a", tmp_path / "b")


# -----------------------------------------------------------------------------
# bad folders and bad input


def test_stale_or_truncated_folders_fail_in_one_line(tok, folder, tmp_path):
    _, src, out = folder
    with pytest.raises(ValueError, match=r"tokenised with --max_len 40, this run has 48\. HINT"):
        data.sft_dataset(tok, out, 48)
    bad = tmp_path / "stale"
    os.system(f"cp -r {out} {bad}")
    m = json.loads((bad / "manifest.json").read_text())
    for key, value, msg in (("template_version", 0, "chat template version 0"),
                            ("tokenizer", {"sha256": "0" * 64}, "another tokenizer")):
        (bad / "manifest.json").write_text(json.dumps({**m, key: value}))
        with pytest.raises(ValueError, match=msg) as e:
            data.sft_dataset(tok, str(bad), MAX_LEN)
        assert "\n" not in str(e.value) and "HINT: re-tokenise" in str(e.value)
    (bad / "manifest.json").write_text(json.dumps(m))
    ids = bad / "shard-00001.ids.npy"
    ids.write_bytes(ids.read_bytes()[:-8])
    with pytest.raises(ValueError, match="shard-00001.ids.npy: missing, truncated") as e:
        data.sft_dataset(tok, str(bad), MAX_LEN)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not a tokenised folder"):
        data.sft_dataset(tok, str(tmp_path), MAX_LEN)
    # `python data.py check` opens a folder as a run would: the truncated shard is named
    with pytest.raises(ValueError, match="shard-00001.ids.npy: missing, truncated"):
        data.main(["check", str(bad), "--kind", "sft", "--tokenizer", TOK_PATH, "--max_len", str(MAX_LEN)])


def test_check_reports_what_a_folder_holds(folder, capsys):
    _, src, out = folder
    data.main(["check", out, "--kind", "sft", "--tokenizer", TOK_PATH, "--max_len", str(MAX_LEN)])
    said = capsys.readouterr().out
    n = sum(1 for line in open(src, encoding="utf-8") if line.strip())  # the blank line is no example
    assert f"{out}: {n} sft examples" in said and "all present" in said
    with pytest.raises(ValueError, match="HINT: add --tokenizer"):
        data.main(["check", out, "--kind", "sft"])


def test_a_bad_line_leaves_no_folder(tmp_path):
    src = write_rows(tmp_path / "bad.jsonl", ROWS[:3])
    with open(src, "a") as f:
        f.write('{"prompt": "x"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:4: field 'response' is missing"):
        data.tokenize("sft", [src], str(tmp_path / "out"), TOK_PATH, MAX_LEN, workers=2)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # neither out nor a half-written out.tmp-PID
    with pytest.raises(FileExistsError, match="already exists"):
        data.tokenize("sft", [src], str(tmp_path), TOK_PATH, MAX_LEN)
