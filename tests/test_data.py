"""data.py: formats, label masks, truncation, batching, resumable shuffling, the toy task."""
import json
import os

import pytest
import torch

import data
import flags
import glm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOK_PATH = os.path.join(HERE, "fixtures", "case_small", "ice_text.model")


@pytest.fixture(scope="module")
def tok():
    return glm.Tokenizer(TOK_PATH)


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\n" for l in lines))
    return str(path)


def row(**kw):
    return json.dumps(kw, ensure_ascii=False)


# -----------------------------------------------------------------------------
# labels


@pytest.mark.parametrize("history", [[], [["3加5等于多少?", "8"]], [["What is 2 plus 2?", "4"], ["小明有3本书", "好"]]])
def test_labels_cover_exactly_response_and_eop(tok, history):
    ex = dict(prompt="What is 7 minus 4?", response="The answer is 3.", history=history)
    ids, labels = data.encode_sft(tok, ex, max_len=512)
    # independent construction: the tokenizer's own training pair over the chat template
    assert ids == tok.encode_pair(glm.chat_prompt(ex["prompt"], history), ex["response"])
    on = [t for t, l in enumerate(labels) if l != data.IGNORE]
    assert len(on) == len(tok.encode_text(ex["response"])) + 1
    assert on == list(range(len(ids) - len(on), len(ids)))  # one contiguous run at the end
    assert all(labels[t] == ids[t] for t in on)
    assert labels[on[-1]] == tok.eop_id
    assert tok.decode([labels[t] for t in on[:-1]]) == ex["response"]
    # the prompt's [gMASK] <sop> take no loss
    assert ids[on[0] - 2:on[0]] == [tok.gmask_id, tok.sop_id]
    assert labels[on[0] - 2:on[0]] == [data.IGNORE, data.IGNORE]


def test_lm_loss_matches_float64_recompute():
    torch.manual_seed(0)
    B, T, C, V = 3, 7, 5, 11
    h, W = torch.randn(B, T, C), torch.randn(V, C)
    labels = torch.full((B, T), data.IGNORE)
    labels[0, 4:] = torch.tensor([1, 2, 3])
    labels[1, 6] = 5
    labels[2, 2:5] = torch.tensor([7, 8, 9])
    terms = []
    for b in range(B):
        for t in range(1, T):  # the label at t is predicted by the logits at t - 1
            if labels[b, t] != data.IGNORE:
                lp = torch.log_softmax(W.double() @ h[b, t - 1].double(), -1)
                terms.append(-lp[labels[b, t]])
    want = torch.stack(terms).sum()
    head = torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(W)
    got = data.lm_loss(head, h, labels)
    assert got.dtype == torch.float32
    assert len(terms) == int(data.count_labels(labels))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    head.requires_grad_(False)  # a frozen head: the chunked path, the same sum
    torch.testing.assert_close(data.lm_loss(head, h, labels).double(), want, atol=1e-5, rtol=0)
    half = data.lm_loss(head.to(torch.bfloat16), h.bfloat16(), labels)  # bf16 logits: the loss is still float32
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), want, atol=2e-2, rtol=0)


# -----------------------------------------------------------------------------
# truncation


def test_truncation_keeps_prompt_end_and_gmask_sop(tok):
    ex = dict(prompt=" ".join(f"w{i}" for i in range(200)) + " What is 7 minus 4?", response="3", history=[])
    stats = data.TruncationStats()
    ids, labels = data.encode_sft(tok, ex, max_len=32, stats=stats)
    full = tok.encode_text(ex["prompt"])
    answer = tok.encode_text("3") + [tok.eop_id]
    assert len(ids) == 32
    assert ids[-len(answer):] == answer                       # the short answer survives whole
    assert ids[-len(answer) - 2:-len(answer)] == [tok.gmask_id, tok.sop_id]
    kept = ids[:-len(answer) - 2]
    assert kept == full[-len(kept):]                          # the prompt's END is kept
    assert tok.decode(kept).endswith("What is 7 minus 4?")
    assert (stats.seqs, stats.truncated, stats.prompt_cut, stats.response_cut) == (1, 1, 1, 0)
    assert stats.tokens_dropped == len(full) - len(kept)
    data.encode_sft(tok, dict(prompt="hi", response="ok"), max_len=32, stats=stats)
    assert (stats.seqs, stats.truncated) == (2, 1)
    assert "truncated 1 of 2" in str(stats)


def test_truncation_long_prompt_and_response_share_room(tok):
    words = " ".join(f"w{i}" for i in range(200))
    stats = data.TruncationStats()
    ids, labels = data.encode_sft(tok, dict(prompt=words, response=words), max_len=40, stats=stats)
    sop = ids.index(tok.sop_id)
    assert len(ids) == 40 and ids[sop - 1] == tok.gmask_id
    assert sop - 1 == int(38 * 0.5)                         # the prompt keeps half the room
    answer = ids[sop + 1:]
    assert answer == tok.encode_text(words)[:len(answer)]   # the response keeps its START
    assert tok.eop_id not in ids                            # a cut SFT answer must not learn to stop
    assert [l for l in labels if l != data.IGNORE] == answer
    assert (stats.prompt_cut, stats.response_cut) == (1, 1)
    # the reward model reads its score at <eop>: its cut answers keep one
    seqs = data.encode_ranked(tok, dict(prompt=words, answers=[words, "no"]), max_len=40)
    assert all(s[-1] == tok.eop_id and len(s) <= 40 for s in seqs)
    p = data.encode_prompt(tok, dict(prompt=words), max_len=20)
    assert len(p) == 20 and p[-2:] == [tok.gmask_id, tok.sop_id]


# -----------------------------------------------------------------------------
# batches


def test_collate_pads_left_to_longest(tok):
    exs = [data.encode_sft(tok, dict(prompt=p, response=r), 512)
           for p, r in [("What is 1 plus 1?", "2"), ("hi", "a much longer answer here"), ("x", "y")]]
    ids, labels = data.collate(exs, tok.pad_id)
    T = max(len(e[0]) for e in exs)
    assert ids.shape == labels.shape == (3, T)
    for (i, l), row_ids, row_labels in zip(exs, ids.tolist(), labels.tolist()):
        pad = T - len(i)
        assert row_ids == [tok.pad_id] * pad + i
        assert row_labels == [data.IGNORE] * pad + l
    layout = glm.derive_layout(ids, glm.GLMConfig.toy())   # the model sees the pads as padding
    assert layout.key_valid.sum(1).tolist() == [len(e[0]) for e in exs]


def test_ranked_collate_and_pairs():
    ids, sizes = data.collate_ranked([[[1, 2], [1]], [[5], [6, 7, 8], [9]]], pad_id=3)
    assert ids.tolist() == [[3, 1, 2], [3, 3, 1], [3, 3, 5], [6, 7, 8], [3, 3, 9]] and sizes == [2, 3]
    better, worse, ex = data.ranked_pairs(sizes)
    assert list(zip(better.tolist(), worse.tolist(), ex.tolist())) == [
        (0, 1, 0), (2, 3, 1), (2, 4, 1), (3, 4, 1)]


def take(batches, n):
    """The next n batches, crossing epochs the way a step-counting training loop does."""
    out = []
    while len(out) < n:
        for idx in batches:
            out.append(idx)
            if len(out) == n:
                break
    return out


def test_batches_deterministic_and_cover_each_epoch():
    a, b = data.Batches(23, 4, seed=7), data.Batches(23, 4, seed=7)
    ea, eb = list(a), list(b)
    assert ea == eb and len(ea) == len(a) == 6
    assert sorted(i for batch in ea for i in batch) == list(range(23))
    assert [len(x) for x in ea] == [4] * 5 + [3]
    assert list(a) != ea                                     # the next epoch is another permutation
    assert list(data.Batches(23, 4, seed=8)) != ea
    assert len(data.Batches(23, 4, drop_last=True)) == 5


@pytest.mark.parametrize("stop", [0, 3, 5, 6, 9])
def test_batches_resume_yields_exactly_the_remaining(stop):
    full = take(data.Batches(23, 4, seed=1), 12)              # two epochs of 6 steps
    run = data.Batches(23, 4, seed=1)
    seen = take(run, stop)
    state = json.loads(json.dumps(run.state_dict()))         # as a checkpoint would store it
    resumed = data.Batches(23, 4, seed=1)                    # a new object, as after a restart
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == divmod(stop, 6)
    rest_of_epoch = list(resumed)
    assert rest_of_epoch == full[stop:(stop // 6 + 1) * 6]   # exactly the remaining batches
    assert seen + rest_of_epoch + take(resumed, 12 - (stop // 6 + 1) * 6) == full[:max(12, (stop // 6 + 1) * 6)]
    with pytest.raises(ValueError, match="seed=1"):
        data.Batches(23, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch=4"):
        data.Batches(23, 8, seed=1).load_state_dict(state)


def test_dp_shards_are_disjoint_and_cover_the_global_batch():
    world, bs = 3, 4
    whole = list(data.Batches(50, bs * world, seed=3))
    shards = [list(data.Batches(50, bs, seed=3, rank=r, world=world)) for r in range(world)]
    assert all(len(s) == len(whole) for s in shards)
    for step, g in enumerate(whole[:-1]):
        parts = [s[step] for s in shards]
        assert all(len(p) == bs for p in parts)
        assert sum(parts, []) == g                            # contiguous slices, in rank order
    # last global batch: 50 - 4 * 12 = 2 indices, topped up to one each for 3 replicas
    last = [s[-1] for s in shards]
    assert all(len(p) == 1 for p in last) and sum(last, [])[:2] == whole[-1]
    # same global batch with another world size resumes the same sequence
    run = data.Batches(48, 2, seed=3, rank=0, world=6)
    take(run, 2)
    other = [data.Batches(48, 4, seed=3, rank=r, world=3) for r in range(3)]
    for o in other:
        o.load_state_dict(run.state_dict())
    ref = list(data.Batches(48, 12, seed=3))
    assert sum((next(iter(o)) for o in other), []) == ref[2]


# -----------------------------------------------------------------------------
# loading and errors


def test_sft_and_alpaca_shapes(tmp_path):
    path = write(tmp_path, [
        row(prompt="p1", response="r1", history=[["q", "a"]]),
        "",
        row(instruction="Translate", input="你好", output="hello"),
        row(instruction="Say hi", input="", output="hi"),
        row(instruction="Say hi", output="hi"),
    ])
    got = data.load_sft(path)
    assert [(e["prompt"], e["response"], e["history"]) for e in got] == [
        ("p1", "r1", [("q", "a")]), ("Translate\n你好", "hello", []), ("Say hi", "hi", []), ("Say hi", "hi", [])]
    assert got[1]["source"] == f"{path}:3"                   # the blank line still counts


def test_ranked_and_prompt_shapes(tmp_path):
    path = write(tmp_path, [row(prompt="p", answers=["a", "b", "c"], margin=1),
                            row(prompt="p", chosen="good", rejected="bad", history=[["q", "a"]])])
    got = data.load_ranked(path)
    assert got[0]["answers"] == ["a", "b", "c"] and got[0]["margin"] == 1.0
    assert got[1]["answers"] == ["good", "bad"] and got[1]["margin"] is None
    got = data.load_prompts(write(tmp_path, [row(prompt="p", history=[]), row(prompt="q", response="r")], "p.jsonl"))
    assert [e["prompt"] for e in got] == ["p", "q"]


BAD = [  # (loader, lines, bad line, words the message must contain)
    ("sft", [row(prompt="p", response="r"), '{"prompt": "p", "response": '], 2, "not valid JSON"),
    ("sft", ['["p", "r"]'], 1, "not an object"),
    ("sft", [row(prompt="p")], 1, "'response' is missing"),
    ("sft", [row(response="r")], 1, "'prompt' is missing"),
    ("sft", [row(prompt="p", response=3)], 1, "'response' is a number"),
    ("sft", [row(prompt="p", response="r", history="q")], 1, "'history'"),
    ("sft", [row(prompt="p", response="r", history=[["q"]])], 1, "history[0]"),
    ("sft", [row(prompt="p", response="r"), row(prompt="p", response="  ")], 2, "'response' is empty"),
    ("sft", [row(instruction="i", input="x")], 1, "'output' is missing"),
    ("sft", [row(prompt="p", response="r"), row(prompt="p", response="r").encode() + b"\xff"], 2, "not UTF-8"),
    ("sft", [row(prompt="p", response="r"), "你好".encode("gbk")], 2, "not UTF-8"),
    ("rm", [row(prompt="p", answers=["only"])], 1, "at least 2"),
    ("rm", [row(prompt="p", answers=["a", "b", "a"])], 1, "answers 0 and 2 are the same"),
    ("rm", [row(prompt="p", chosen="a", rejected="a")], 1, "same text"),
    ("rm", [row(prompt="p", answers="a")], 1, "'answers' is a string"),
    ("rm", [row(prompt="p", answers=["a", 2])], 1, "answers[1]"),
    ("rm", [row(prompt="p", chosen="a")], 1, "'rejected' is missing"),
    ("rm", [row(prompt="p", answers=["a", "b"], margin="1")], 1, "'margin'"),
    ("prompts", [row(prompt=["p"])], 1, "'prompt' is a list"),
]
LOADERS = {"sft": data.load_sft, "rm": data.load_ranked, "prompts": data.load_prompts}


def test_bad_input_names_file_line_and_field(tmp_path):
    for kind, lines, lineno, words in BAD + CHAT_BAD:  # conversations (CHAT_BAD) are defined below
        path = write(tmp_path, lines)
        with pytest.raises(data.DataError) as e:
            LOADERS[kind](path)
        msg = str(e.value)
        assert msg.startswith(f"{path}:{lineno}: ") and words in msg and "HINT" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match="no examples") as e:
        data.load_sft(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        data.load_sft(str(tmp_path / "missing.jsonl"))


def test_split_holdout_is_deterministic_and_disjoint():
    xs = list(range(100))
    tr, ho = data.split_holdout(xs, 0.2, seed=5)
    assert (tr, ho) == data.split_holdout(xs, 0.2, seed=5)
    assert len(ho) == 20 and sorted(tr + ho) == xs and tr == sorted(tr)
    assert data.split_holdout(xs, 0.2, seed=6)[1] != ho
    assert len(data.split_holdout(xs, 7)[1]) == 7
    with pytest.raises(ValueError, match="no training data"):
        data.split_holdout(xs, 100)


# -----------------------------------------------------------------------------
# the toy task


TOY_FILES = ["toy_sft_train", "toy_sft_eval", "toy_rm_train", "toy_rm_eval", "toy_prompts"]


def test_bundled_toy_files_are_what_the_generator_writes(tmp_path):
    data.write_toy(str(tmp_path))
    for name in TOY_FILES:
        with open(os.path.join(ROOT, "data", name + ".jsonl"), "rb") as f, open(tmp_path / f"{name}.jsonl", "rb") as g:
            assert f.read() == g.read(), f"data/{name}.jsonl is stale: run `python data.py toy --out data`"
    assert sum(os.path.getsize(os.path.join(ROOT, "data", n + ".jsonl")) for n in TOY_FILES) < 1 << 20


def test_toy_data_round_trips_the_toy_tokenizer(tok):
    d = os.path.join(ROOT, "data")
    sft = data.load_sft(os.path.join(d, "toy_sft_train.jsonl")) + data.load_sft(os.path.join(d, "toy_sft_eval.jsonl"))
    rm = data.load_ranked(os.path.join(d, "toy_rm_train.jsonl")) + data.load_ranked(os.path.join(d, "toy_rm_eval.jsonl"))
    texts = {e["prompt"] for e in sft} | {e["response"] for e in sft} | {a for e in rm for a in e["answers"]}
    texts |= {s for e in sft for turn in e["history"] for s in turn}
    for text in texts:
        ids = tok.encode_text(text)
        assert 0 not in ids, f"{text!r} has an unknown token"
        assert tok.decode(ids) == text
    stats = data.TruncationStats()
    for e in sft:
        ids, _ = data.encode_sft(tok, e, 128, stats)
        assert 0 not in ids
    for e in rm:
        data.encode_ranked(tok, e, 128, stats)
    assert stats.truncated == 0


def test_toy_answers_and_split(tok):
    d = os.path.join(ROOT, "data")
    train = data.load_sft(os.path.join(d, "toy_sft_train.jsonl"))
    held = data.load_sft(os.path.join(d, "toy_sft_eval.jsonl"))
    for e in train + held:
        assert data.toy_answer_correct(e["prompt"], e["response"])
        assert data.toy_answer_correct(e["prompt"], f" {e['response']} ")
        assert not data.toy_answer_correct(e["prompt"], str(int(e["response"]) + 1))
    with pytest.raises(ValueError, match="not a toy question"):
        data.toy_answer_correct("What is the capital of France?", "Paris")
    # held-out questions are unseen as (wording, numbers), yet every (op, a, b) is taught once
    def key(p):
        for t, (op, rx) in enumerate(data._TOY_PARSERS):
            m = rx.match(p)
            if m:
                return t, op, int(m["a"]), int(m["b"])
    tk, hk = {key(e["prompt"]) for e in train}, {key(e["prompt"]) for e in held}
    assert not tk & hk and None not in tk | hk
    assert {k[1:] for k in hk} <= {k[1:] for k in tk}
    for e in data.load_ranked(os.path.join(d, "toy_rm_train.jsonl")):
        c, near, wrong = (int(a) for a in e["answers"])
        assert str(c) == data.toy_answer(e["prompt"]) and abs(near - c) == 1 and abs(wrong - c) >= 2
    assert len(data.load_prompts(os.path.join(d, "toy_prompts.jsonl"))) == len(train)


def test_ranked_ranks_field(tmp_path):
    """Explicit ranks travel with the answers; malformed ones name file:line and the field."""
    good = write(tmp_path, [row(prompt="p", answers=["a", "b", "c"], ranks=[2, 1, 3])])
    assert data.load_ranked(good)[0]["ranks"] == [2, 1, 3]
    plain = write(tmp_path, [row(prompt="p", answers=["a", "b"])], name="plain.jsonl")
    assert data.load_ranked(plain)[0]["ranks"] is None
    for bad in ([1, 1, 2], [1, 2], ["1", "2", "3"], [1, 2, True]):
        path = write(tmp_path, [row(prompt="p", answers=["a", "b", "c"]), row(prompt="q", answers=["a", "b", "c"], ranks=bad)],
                     name="bad.jsonl")
        with pytest.raises(data.DataError, match=r"bad\.jsonl:2: field 'ranks'"):
            data.load_ranked(path)
    mixed = write(tmp_path, [row(prompt="p", chosen="a", rejected="b", ranks=[1, 2])], name="mixed.jsonl")
    with pytest.raises(data.DataError, match="mixed.jsonl:1: 'ranks' goes with 'answers'"):
        data.load_ranked(mixed)


# -----------------------------------------------------------------------------
# conversations: "messages" and ShareGPT "conversations"

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def conversation(key, *turns):
    """A conversation line in the "messages" or the ShareGPT shape; turns are (role, text) pairs."""
    if key == "messages":
        return row(messages=[dict(role=r, content=t) for r, t in turns])
    return row(conversations=[{"from": SHAREGPT_ROLE[r], "value": t} for r, t in turns])


CALC = "You are a calculator."
CONVERSATIONS = [  # (turns, the same example written by hand in our own shape)
    ([("system", CALC), ("user", "What is 1 plus 1?"), ("assistant", "2"), ("user", "What is 7 minus 4?"),
      ("assistant", "It is 3.")],
     dict(prompt="What is 7 minus 4?", response="It is 3.", history=[[CALC + "\nWhat is 1 plus 1?", "2"]])),
    ([("user", "3 加 5 等于多少?"), ("assistant", "8")], dict(prompt="3 加 5 等于多少?", response="8")),
    ([("system", CALC), ("user", "What is 2 plus 2?"), ("assistant", "4")],
     dict(prompt=CALC + "\nWhat is 2 plus 2?", response="4")),
    ([("user", "What is 1 plus 1?"), ("assistant", "2"), ("user", "小明有 3 本书"), ("assistant", "好"),
      ("user", "What is 9 minus 1?"), ("assistant", "8")],
     dict(prompt="What is 9 minus 1?", response="8", history=[["What is 1 plus 1?", "2"], ["小明有 3 本书", "好"]])),
]


@pytest.mark.parametrize("key", ["messages", "conversations"])
def test_conversations_give_the_tokens_of_the_same_example_in_our_shape(tmp_path, tok, key):
    chats = data.load_sft(write(tmp_path, [conversation(key, *turns) for turns, _ in CONVERSATIONS], "chat.jsonl"))
    ours = data.load_sft(write(tmp_path, [row(**ex) for _, ex in CONVERSATIONS], "ours.jsonl"))
    assert len(chats) == len(ours) == len(CONVERSATIONS)
    for got, want, (_, ex) in zip(chats, ours, CONVERSATIONS):
        ids, labels = data.encode_sft(tok, got, 512)
        assert (ids, labels) == data.encode_sft(tok, want, 512)
        # and the tokenizer's own pair over ChatGLM's template, from the hand-written example
        assert ids == tok.encode_pair(glm.chat_prompt(ex["prompt"], ex.get("history", [])), ex["response"])
        assert labels[-len(tok.encode_text(ex["response"])) - 1:] == tok.encode_text(ex["response"]) + [tok.eop_id]
    assert chats[2]["source"].endswith("chat.jsonl:3")


@pytest.mark.parametrize("key", ["messages", "conversations"])
def test_conversations_as_ppo_prompts(tmp_path, tok, key):
    # one ending with the user's turn (the prompt), one with a reply (dropped, as an SFT line's response is)
    lines = [conversation(key, ("system", CALC), ("user", "What is 1 plus 1?"), ("assistant", "2"),
                          ("user", "What is 7 minus 4?")),
             conversation(key, ("user", "What is 2 plus 2?"), ("assistant", "4"))]
    got = data.load_prompts(write(tmp_path, lines, "chat.jsonl"))
    want = data.load_prompts(write(tmp_path, [
        row(prompt="What is 7 minus 4?", history=[[CALC + "\nWhat is 1 plus 1?", "2"]]),
        row(prompt="What is 2 plus 2?")], "ours.jsonl"))
    assert [data.encode_prompt(tok, e, 64) for e in got] == [data.encode_prompt(tok, e, 64) for e in want]
    assert [(e["prompt"], e["history"]) for e in got] == [(e["prompt"], e["history"]) for e in want]


def msgs(*turns):
    return conversation("messages", *turns)


GOOD_CHAT = msgs(("user", "q"), ("assistant", "a"))
CHAT_BAD = [  # (loader, lines, bad line, words the message must contain)
    ("sft", [GOOD_CHAT, msgs(("user", "q"), ("user", "q2"), ("assistant", "a"))], 2,
     "messages[1].role is 'user' where 'assistant' should come"),
    ("sft", [msgs(("assistant", "a"), ("user", "q"))], 1, "messages[0].role is 'assistant' where 'user'"),
    ("sft", [msgs(("user", "q"), ("assistant", "a"), ("system", "s"), ("assistant", "a"))], 1, "messages[2].role is 'system'"),
    ("sft", [GOOD_CHAT, msgs(("user", "q"), ("assistant", "a"), ("user", "q2"))], 2, "ends with 'user', not 'assistant'"),
    ("sft", [conversation("conversations", ("user", "q"))], 1, "ends with 'human', not 'gpt'"),
    ("sft", [msgs(("user", "q"), ("bot", "a"))], 1, "messages[1].role is \"bot\", an unknown role"),
    ("sft", [row(conversations=[{"from": "user", "value": "q"}])], 1, "conversations[0].from is \"user\", an unknown role"),
    ("sft", [row(messages=[dict(role="user", content=["q"]), dict(role="assistant", content="a")])], 1,
     "'messages[0].content' is a list, not a string"),
    ("sft", [row(messages=[dict(role="user", text="q")])], 1, "messages[0] is"),
    ("sft", [row(messages=[dict(role=["user"], content="q")])], 1, "unknown role"),
    ("sft", [row(messages=[])], 1, "'messages' is empty"),
    ("sft", [row(conversations="hi")], 1, "'conversations' is a string"),
    ("sft", [msgs(("system", "s"))], 1, "only a 'system' message"),
    ("sft", [msgs(("user", "q"), ("assistant", " "))], 1, "'messages[1].content' is empty"),
    ("sft", [row(messages=[dict(role="user", content="q"), dict(role="assistant", content="a")], prompt="p")], 1,
     "both 'messages' and 'prompt'"),
    ("prompts", [msgs(("assistant", "a"))], 1, "messages[0].role is 'assistant'"),
    ("prompts", [GOOD_CHAT, msgs(("system", "s"), ("user", ""))], 2, "'messages[1].content' is empty"),
]


def test_check_takes_max_len_and_its_old_spelling(tmp_path, capsys):
    long = " ".join(["What is 1 plus 1?"] * 8)  # well over 16 tokens
    path = write(tmp_path, [row(prompt="What is 1 plus 1?", response="2"), msgs(("user", long), ("assistant", "2"))])
    printed = []
    for flag in ("--max_len", "--max-len"):
        data.main(["check", path, "--kind", "sft", "--tokenizer", TOK_PATH, flag, "16"])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    assert f"{path}: 2 sft examples, all well-formed" in printed[0]
    assert "max_len 16: truncated 1 of 2 sequences (prompt cut in 1," in printed[0]
    # a bad line through the command line: one line on stderr, exit code 2
    bad = write(tmp_path, [GOOD_CHAT, msgs(("user", "q"))], "bad.jsonl")
    with pytest.raises(SystemExit) as e:
        flags.run(data.main, ["check", bad, "--kind", "sft"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {bad}:2: the conversation ends with") and err.count("\n") == 1
