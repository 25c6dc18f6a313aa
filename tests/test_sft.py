"""train_sft.py end to end on a 4-block toy model: overfitting, resuming, what trains, what loads back,
and the errors a user can cause. (Label masks are in test_data.py; LoRA layer math in test_lora.py.)"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ckpt
import data
import glm
import lora
import train_sft

from conftest import (TOK_PATH, head_lines, load_tensors, losses, make_base, newest_checkpoint,
                      printed_config, read_metrics, sft_argv, write_jsonl)

LAYERS = 4
pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# helpers


def toy_lines(n):
    """The first n lines of the bundled toy task (some carry a history turn)."""
    return head_lines(data.toy_file("sft_train"), n)


def probe_ids():
    """A fixed left-padded batch of two chat prompts with answers, [2, T]."""
    tok = glm.Tokenizer(TOK_PATH)
    rows = [tok.encode_pair("What is 3 plus 4?", "7"),
            tok.encode_pair(glm.chat_prompt("5减2等于多少?", [("1加1", "2")]), "3")]
    return glm.left_pad(rows, tok.pad_id)


def logits_of(model, ids=None):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(probe_ids() if ids is None else ids)
    model.train(was_training)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "toy4", num_layers=LAYERS)


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    """16 toy examples: 4 steps an epoch at 2 micro-batches of 2."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train16.jsonl", toy_lines(16))


# -----------------------------------------------------------------------------
# training


def test_single_batch_overfits(tmp_path, base):
    path = write_jsonl(tmp_path / "four.jsonl", toy_lines(4))
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, path, out, micro_batch_size=4, grad_accum=1, max_steps=25, lr=2e-2, warmup_steps=3))
    curve = losses(out)
    assert sorted(curve) == list(range(1, 26))
    assert curve[1] > 4.0  # about ln(1200) for a random 1200-token model
    assert curve[25] < 0.01, curve
    # eval on the same four examples: the trained model reproduces them
    assert [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r][-1] < 0.01


@pytest.mark.parametrize("mode", [
    [],
    # dropout draws random numbers every step: the resumed run must restore the RNG to match
    ["--lora_rank", "4", "--lora_targets", "query_key_value,dense_4h_to_h", "--lora_dropout", "0.1"],
    ["--train_layers", "2"],
], ids=["full", "lora", "last2"])
def test_resumed_run_continues_the_same_loss_curve(tmp_path, killed_after_step, base, data16, mode):
    N, k = 8, 3  # 4 steps an epoch: the resumed run starts mid-epoch and crosses into the next
    whole = tmp_path / "whole"
    train_sft.main(sft_argv(base, data16, whole, *mode, max_steps=N, save_every=k))
    want = losses(whole)
    assert sorted(want) == list(range(1, N + 1))

    cut = tmp_path / "cut"
    with killed_after_step(k):
        train_sft.main(sft_argv(base, data16, cut, *mode, max_steps=N, save_every=k))
    with open(newest_checkpoint(cut) / "train_state.json", encoding="utf-8") as f:
        assert json.load(f)["step"] == k
    assert sorted(losses(cut)) == list(range(1, k + 1))
    assert not (cut / "final").exists()

    train_sft.main(sft_argv(base, data16, cut, *mode, "--resume", max_steps=N, save_every=k))
    got = losses(cut)
    assert sorted(got) == list(range(1, N + 1))  # steps 1..k once from the first run, k+1..N from the second
    for step in range(1, N + 1):
        assert got[step] == want[step], (step, got[step], want[step])
    # the resumed run's result is the uninterrupted run's result (the adapter, or the HF weights)
    sa, sb = load_tensors(whole / "final"), load_tensors(cut / "final")
    assert sa and sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], atol=0, rtol=0, msg=key)


def test_train_layers_leaves_every_frozen_tensor_bit_identical(tmp_path, base, data16):
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data16, out, "--train_layers", "2", max_steps=3))
    before, after = load_tensors(base), load_tensors(out / "final")
    assert before.keys() == after.keys()
    for key in before:
        m = glm.LAYER_KEY.fullmatch(key)
        trained = m is not None and int(m.group(1)) >= LAYERS - 2
        if trained:  # every tensor of blocks 2-3 (weights, biases, LayerNorms) has moved
            assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:  # blocks 0-1, the embedding, the final LayerNorm and lm_head
            assert torch.equal(before[key], after[key]), f"{key} changed but is frozen"
    # optimiser state exists for the trained tensors only
    optim = torch.load(newest_checkpoint(out) / "optim-stage000.pt", weights_only=True)
    assert {m.group(1) if (m := glm.LAYER_KEY.fullmatch(k)) else k for k in optim} == {"2", "3"}


def capture_final_logits(monkeypatch):
    """Record the logits the in-memory model gives on probe_ids() when the run writes final/."""
    seen = {}
    real = ckpt.save

    def save_and_record(out_dir, d, tok_path, models, *a, **kw):
        if os.path.basename(out_dir) == "final":
            seen["logits"] = logits_of(models[""][0])
        return real(out_dir, d, tok_path, models, *a, **kw)
    monkeypatch.setattr(ckpt, "save", save_and_record)
    return seen


def test_full_finetune_result_loads_back(tmp_path, monkeypatch, base, data16):
    seen = capture_final_logits(monkeypatch)
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data16, out, max_steps=3))
    model = glm.ChatGLM.from_pretrained(out / "final")
    assert os.path.isfile(out / "final" / "ice_text.model")
    got = logits_of(model)
    torch.testing.assert_close(got, seen["logits"], atol=0, rtol=0)
    assert (got - logits_of(glm.ChatGLM.from_pretrained(base))).abs().max() > 1e-2  # it did train


def test_lora_result_loads_back_and_merges(tmp_path, monkeypatch, base, data16):
    seen = capture_final_logits(monkeypatch)
    out = tmp_path / "run"
    train_sft.main(sft_argv(base, data16, out, "--lora_rank", "4", "--lora_targets", "query_key_value,dense_h_to_4h",
                        max_steps=3))
    final = out / "final"
    with open(final / lora.CONFIG_FILE, encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["r"] == 4 and cfg["target_modules"] == ["dense_h_to_4h", "query_key_value"]
    assert not any(n.startswith("model") for n in os.listdir(final))  # the adapter only, no base weights
    assert len(load_file(final / lora.ADAPTER_FILE)) == 2 * 2 * LAYERS  # A and B, two targets, every block

    model = lora.load_adapter(glm.ChatGLM.from_pretrained(base), final)
    got = logits_of(model)
    torch.testing.assert_close(got, seen["logits"], atol=0, rtol=0)
    assert (got - logits_of(glm.ChatGLM.from_pretrained(base))).abs().max() > 1e-2
    lora.main(["merge", "--model", base, "--adapter", str(final), "--out", str(tmp_path / "merged")])
    merged = glm.ChatGLM.from_pretrained(tmp_path / "merged")
    assert not lora.lora_modules(merged)
    torch.testing.assert_close(logits_of(merged), got, atol=1e-5, rtol=1e-5)


def test_toy_default_run(toy_chain):
    """`python train_sft.py --max_steps 3`: the toy preset fills every flag not given, the toy base is
    made beside --out, and the result is a whole HF folder trained away from that base."""
    runs, printed = toy_chain.runs, toy_chain.toy_sft.printed
    cfg = printed_config(printed)
    assert cfg["max_steps"] == 3  # the flag wins over the preset's 900
    assert {k: cfg[k] for k in data.TOY_SFT if k not in ("max_steps", "out")} == \
        {k: v for k, v in data.TOY_SFT.items() if k not in ("max_steps", "out")}
    assert (cfg["model"], cfg["data"], cfg["eval_data"]) == \
        (str(runs / "toy_base"), data.toy_file("sft_train"), data.toy_file("sft_eval"))
    assert glm.GLMConfig.from_json(runs / "toy_base" / "config.json") == glm.GLMConfig.toy()
    out = runs / "toy_sft"
    assert losses(out).keys() == losses(out, "eval_loss").keys() == {3}  # the preset logs every 10 steps, and the last
    assert "toy held-out accuracy before training: " in printed and "toy held-out accuracy after training: " in printed
    before, after = load_tensors(runs / "toy_base"), load_tensors(out / "final")
    assert before.keys() == after.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []  # full fine-tuning moved every tensor
    assert glm.ChatGLM.from_pretrained(out / "final").config == glm.GLMConfig.toy()


def test_results_are_readable_by_teammates_and_by_the_release_s_own_code(toy_chain):
    """final/ as HF's loaders expect it: shards named model-00001-of-00001, a config.json with the
    fields the release's configuration/modeling code reads (tie_word_embeddings false: transformers
    would otherwise tie lm_head to the embedding), tokenizer_config.json; folders 0755 and files
    0644 under the usual umask of 022 (mkdtemp and safetensors alone would make them private)."""
    final = toy_chain.runs / "toy_sft" / "final"
    assert sorted(os.listdir(final)) == ["config.json", "ice_text.model", "model-00001-of-00001.safetensors",
                                         "model.safetensors.index.json", "tokenizer_config.json"]
    config = json.load(open(final / "config.json", encoding="utf-8"))
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["ChatGLMModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert config["torch_dtype"] == "float32" and config["model_type"] == "chatglm"
    toy = glm.GLMConfig.toy()
    assert (config["bos_token_id"], config["eos_token_id"], config["gmask_token_id"]) == \
        (toy.bos_token_id, toy.eos_token_id, toy.gmask_token_id)
    tokenizer = json.load(open(final / "tokenizer_config.json", encoding="utf-8"))
    assert tokenizer["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(toy_chain.runs / "toy_sft"):  # 0755 / 0644 under the usual umask 022
        assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask, root
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~umask, (root, name)


def test_small_file_without_eval_data_trains_to_the_end(tmp_path, capsys, base):
    """Fewer than 10 examples: the 5 % holdout rounds to none; the run says so, trains all four
    examples to the end and evaluates nothing."""
    path = write_jsonl(tmp_path / "four.jsonl", toy_lines(4))
    out = tmp_path / "run"
    flags = sft_argv(base, path, out, micro_batch_size=4, grad_accum=1, max_steps=2)
    i = flags.index("--eval_data")
    del flags[i:i + 2]
    train_sft.main(flags)
    printed = capsys.readouterr().out
    assert "data: 4 train / 0 held-out examples" in printed and "evaluation is off" in printed
    assert sorted(losses(out)) == [1, 2] and not losses(out, "eval_loss")
    assert os.path.isfile(out / "final" / "config.json")


# -----------------------------------------------------------------------------
# errors a user can cause: clear, and before any training


@pytest.mark.parametrize("which", ["data", "eval_data"])
def test_malformed_line_fails_before_training(tmp_path, base, which):
    good = write_jsonl(tmp_path / "good.jsonl", toy_lines(4))
    bad_line = '{"prompt": "What is 1 plus 1?", "response": 2}'
    bad = write_jsonl(tmp_path / "bad.jsonl", toy_lines(2) + [bad_line] + toy_lines(1))
    out = tmp_path / "run"
    flags = sft_argv(base, good, out, max_steps=2)
    flags[flags.index(f"--{which}") + 1] = bad
    with pytest.raises(data.DataError) as e:
        train_sft.main(flags)
    msg = str(e.value)
    assert f"{bad}:3:" in msg and "'response' is a number" in msg and "HINT" in msg
    assert not out.exists()  # no checkpoint, no metrics: it stopped before anything ran


@pytest.mark.parametrize("flags,words", [
    (["--train_layers", "5"], ["--train_layers 5", "4 blocks"]),
    (["--train_layers", "2", "--lora_rank", "4"], ["--lora_rank", "--train_layers", "exclusive"]),
    (["--lora_rank", "4", "--lora_targets", "query_key_value,query"], ["'query'", "query_key_value", "dense_4h_to_h"]),
    (["--pp", "2"], ["--pp 2", "world size 1"]),
], ids=["train_layers_too_many", "lora_and_train_layers", "lora_target_matches_nothing", "pp_without_processes"])
def test_bad_flags_are_clear_errors(tmp_path, base, data16, flags, words):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        train_sft.main(sft_argv(base, data16, out, *flags, max_steps=2))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--lora_rnak", "4"], "unrecognized arguments: --lora_rnak 4"),
    # a typo in a boolean must not silently mean False
    (["--resume", "ture"], "argument --resume: expected true or false, got 'ture'"),
    (["--max_steps", "2.5"], "argument --max_steps: invalid int value: '2.5'"),
], ids=["unknown_flag", "bad_boolean", "bad_int"])
def test_flag_errors_exit_with_one_line(tmp_path, capsys, base, data16, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_sft.main(sft_argv(base, data16, out, *flags))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}. HINT: train_sft.py --help lists the flags\n", err
    assert not out.exists()


# -----------------------------------------------------------------------------
# the loss


def test_sft_loss_is_the_mean_over_response_tokens(tmp_path, base):
    """sft_loss over micro-batches, summed, equals a float64 token-mean cross-entropy of the whole batch."""
    tok = glm.Tokenizer(TOK_PATH)
    exs = data.load_sft(write_jsonl(tmp_path / "six.jsonl", toy_lines(6)))
    enc = [data.encode_sft(tok, e, 48) for e in exs]
    model = glm.ChatGLM.from_pretrained(base)
    mbs = []
    for i in range(0, 6, 2):
        ids, labels = data.collate(enc[i:i + 2], tok.pad_id)
        mbs.append({"input_ids": ids, "labels": labels})
    n_tok = train_sft.count_label_tokens(mbs)
    # labels[:, 1:] drop the first position, which is always prompt
    assert int(n_tok) == sum(sum(l != data.IGNORE for l in labels) for _, labels in enc)
    with torch.no_grad():
        got = sum(train_sft.sft_loss(n_tok)(model, model(mb["input_ids"], return_hidden=True), mb) for mb in mbs)
        nll, count = 0.0, 0
        for ids, labels in enc:  # one unpadded example at a time, in float64
            logp = F.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            for t in range(len(ids) - 1):
                if labels[t + 1] != data.IGNORE:
                    nll -= logp[t, labels[t + 1]].item()
                    count += 1
    assert count == int(n_tok)
    torch.testing.assert_close(got.double(), torch.tensor(nll / count, dtype=torch.float64), atol=1e-5, rtol=1e-6)
