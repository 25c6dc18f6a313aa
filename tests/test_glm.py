"""glm.py against the reference implementation's golden outputs and independent naive references."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glm

ATOL = 1e-5


@pytest.fixture(scope="module")
def golden(fixture_dir):
    with open(os.path.join(fixture_dir, "expected.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(fixture_dir, "expected.safetensors"))


def toy_model(seed=0, **overrides):
    cfg = glm.GLMConfig.toy()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return glm.ChatGLM(cfg).init_weights(seed, std=0.3).eval()


# -- golden parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seq0", "seq1", "seq2"])
def test_golden_logits(golden, golden_model, name):
    _, exp = golden
    ids = exp[f"{name}.input_ids"][None]
    layout = glm.derive_layout(ids, golden_model.config)
    assert torch.equal(layout.position_ids[0], exp[f"{name}.position_ids"])
    assert torch.equal(~layout.attend[0, 0], exp[f"{name}.attention_mask"])  # ours: True = attend
    with torch.no_grad():
        logits = golden_model(ids)[0]
    torch.testing.assert_close(logits, exp[f"{name}.logits"], atol=ATOL, rtol=0)


def test_golden_padded_batch(golden, golden_model):
    meta, exp = golden
    ids = exp["batch.input_ids"]
    layout = glm.derive_layout(ids, golden_model.config)
    assert torch.equal(layout.position_ids, exp["batch.position_ids"])
    with torch.no_grad():
        given = golden_model(ids, position_ids=exp["batch.position_ids"],
                             attention_mask=exp["batch.attention_mask"])
        derived = golden_model(ids)
    for row in meta["batch"]["rows"]:
        r, pad = row["row"], row["num_left_pad"]
        ref = exp[row["logits_tensor"]]
        torch.testing.assert_close(given[r, pad:], ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(derived[r, pad:], ref, atol=ATOL, rtol=0)


def test_golden_greedy_generation(golden, golden_model, tok):
    meta, _ = golden
    for case in meta["generation"]["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"]
        ids = torch.tensor([case["prompt_ids"]])
        out = golden_model.generate(ids, max_new_tokens=case["num_new"])
        assert out[0, ids.shape[1]:].tolist() == case["new_ids"]


def test_group_generation_computes_each_prompt_once(golden, golden_model, tok):
    """n completions of a prompt (GRPO's group) share one prefill: the embedding sees each prompt's
    tokens once, not n times; greedy, each completion is the golden answer, and sampled, the n
    completions differ from each other and match the golden model's own log-probabilities."""
    meta, _ = golden
    cases = meta["generation"]["cases"][:2]
    ids = glm.left_pad([c["prompt_ids"] for c in cases], tok.pad_id)  # [2, T]
    N = min(c["num_new"] for c in cases)
    seen = []
    hook = golden_model.transformer.word_embeddings.register_forward_hook(lambda m, x, y: seen.append(x[0].numel()))
    try:
        out = golden_model.generate(ids, max_new_tokens=N, group_size=4, stop_at_eop=False)
    finally:
        hook.remove()
    assert seen[0] == ids.numel() and seen[1:] == [2 * 4] * (N - 1)  # the prompts once, then 8 rows a step
    for i, case in enumerate(cases):
        for j in range(4):
            assert out[i * 4 + j, ids.shape[1]:].tolist() == case["new_ids"][:N]
    gen = torch.Generator().manual_seed(0)
    sampled, logprobs = golden_model.generate(ids, max_new_tokens=N, group_size=4, do_sample=True, generator=gen,
                                              return_logprobs=True, stop_at_eop=False)
    assert len({tuple(r) for r in sampled[:4, ids.shape[1]:].tolist()}) > 1
    with torch.no_grad():  # each sampled token's log-probability, recomputed without a cache
        full = torch.log_softmax(golden_model(sampled).float(), dim=-1)[:, ids.shape[1] - 1:-1]
    want = full.gather(-1, sampled[:, ids.shape[1]:, None])[..., 0]
    torch.testing.assert_close(logprobs, want, atol=1e-4, rtol=0)


def test_golden_tokenizer(golden, tok):
    meta, _ = golden
    for case in meta["tokenizer_cases"]["encode"]:
        assert tok.encode(case["text"]) == case["encode_ids"], case["text"]
        assert tok.decode(case["encode_ids"]) == case["decode_text"]
    for case in meta["tokenizer_cases"]["pairs"] + meta["sequences"]:
        key = "input_ids"
        assert tok.encode_pair(case["prompt"], case["answer"]) == case[key]
    special = meta["tokenizer"]["special_token_ids"]
    assert (tok.mask_id, tok.gmask_id, tok.sop_id, tok.eop_id, tok.pad_id) == \
        (special["[MASK]"], special["[gMASK]"], special["<sop>"], special["<eop>"], special["<pad>"])


def test_tokenizer_conventions(tok):
    # typed special strings become their ids; whitespace pieces round-trip; skip_special drops them
    ids = tok.encode_text("x[gMASK]y<sop>")
    assert ids.count(tok.gmask_id) == 1 and ids[-1] == tok.sop_id
    text = "a\tb\n" + " " * 7 + "c" + " " * 85 + "d"
    assert tok.decode(tok.encode_text(text)) == text
    assert tok.decode(tok.encode("hi"), skip_special_tokens=True) == "hi"
    assert "<|blank_7|>" in [tok.sp.id_to_piece(i) for i in tok.encode_text(" " * 7 + "x")]


def test_tokenizer_typed_specials(tok):
    # the reference has no no-split tokens: sentencepiece sees the whole text, so the "▁" before a
    # typed special stays, text after it gets no "▁" of its own, and <pad>/<unk> are plain text;
    # ids composed by hand from the pieces sentencepiece gives each text
    assert tok.encode("[MASK] and <sop> then <eop>, also <n> and <|tab|> and <|blank_5|>") == \
        [640, 4, 391, 640, 8, 441, 646, 640, 9, 669, 357, 655, 643, 644, 640, 12, 391, 640, 13, 391, 640, 17, 5, 8]
    assert tok.encode_text("a[MASK]b") == [357, 4, 677]  # ▁a [MASK] b
    assert tok.encode_text("x <eop>") == [640, 753, 640, 9]  # ▁ x ▁ <eop>
    assert tok.encode_text("<sop><eop> ok") == [640, 8, 9, 495, 695]  # ▁ <sop> <eop> ▁o k
    assert tok.encode_text("a\n<eop>  b<sop>") == [357, 12, 9, 14, 677, 8]  # ▁a <n> <eop> <|blank_2|> b <sop>
    assert tok.encode_text("hi <pad> <unk>") == \
        [640, 651, 647, 640, 717, 653, 642, 659, 715, 640, 717, 551, 695, 715]  # ▁ h i ▁ < p a d > ▁ < un k >


def test_chat_prompt():
    assert glm.chat_prompt("你好") == "你好"
    assert glm.chat_prompt("q2", [("q0", "a0"), ("q1", "a1")]) == \
        "[Round 0]\n问：q0\n答：a0\n[Round 1]\n问：q1\n答：a1\n[Round 2]\n问：q2\n答："


# -- independent references ----------------------------------------------------------------------


def naive_attention(attn, x, position_ids, masked):
    """Attention written out: per-head q/k/v slices, explicit rotary angles, masked_fill, softmax."""
    B, T, C = x.shape
    nh, hs = attn.nh, attn.hs
    qkv = (x.double() @ attn.query_key_value.weight.double().T + attn.query_key_value.bias.double())
    qkv = qkv.view(B, T, nh, 3, hs)  # per head: q, k, v of hs each
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    rd = hs // 2
    inv = torch.tensor([float(torch.tensor(1.0 / 10000 ** (2 * i / rd)).half()) for i in range(rd // 2)],
                       dtype=torch.float64)

    def rotate(t, pos):  # t [B, T, nh, rd], pos [B, T]
        ang = pos.double()[..., None] * inv  # [B, T, rd/2]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, :, None], torch.cat([ang.sin()] * 2, -1)[:, :, None]
        t1, t2 = t[..., :rd // 2], t[..., rd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q = torch.cat([rotate(q[..., :rd], position_ids[:, 0]), rotate(q[..., rd:], position_ids[:, 1])], -1)
    k = torch.cat([rotate(k[..., :rd], position_ids[:, 0]), rotate(k[..., rd:], position_ids[:, 1])], -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs)
    scores = scores.masked_fill(masked, -10000.0)
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, C)
    return y @ attn.dense.weight.double().T + attn.dense.bias.double()


def test_sdpa_attention_matches_naive(golden, golden_model):
    meta, exp = golden
    attn = golden_model.transformer.layers["0"].attention
    ids = exp["batch.input_ids"]
    x = torch.randn(*ids.shape, golden_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rope, attend = golden_model.inputs(ids)
    bias = torch.zeros(attend.shape).masked_fill(~attend, float("-inf"))
    with torch.no_grad():
        fast = attn(x, rope, bias)
    ref = naive_attention(attn, x, exp["batch.position_ids"], exp["batch.attention_mask"])
    for row in meta["batch"]["rows"]:  # pad rows differ by convention only; compare real tokens
        pad = row["num_left_pad"]
        torch.testing.assert_close(fast[row["row"], pad:].double(), ref[row["row"], pad:], atol=1e-5, rtol=1e-5)


def argmax_loop(model, ids, n, eop):
    """Greedy decoding without a cache: a full forward over the whole sequence at every step."""
    out = ids.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        with torch.no_grad():
            nxt = model(out)[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, model.config.pad_token_id)
        done |= nxt == eop
        out = torch.cat([out, nxt[:, None]], 1)
    return out


def test_cached_greedy_equals_no_cache_argmax(tok, monkeypatch):
    model = toy_model(seed=1)
    prompts = [tok.encode("What is 12 plus 7?"), tok.encode("你好"), tok.encode("[Round 0]\n问：3加5\n答：")]
    ids = glm.left_pad(prompts, tok.pad_id)
    out = model.generate(ids, max_new_tokens=12, stop_at_eop=False)
    assert torch.equal(out, argmax_loop(model, ids, 12, eop=-1))
    # the static-shape step that CUDA graphs capture (window of 5 slots: several windows crossed)
    monkeypatch.setattr(glm.Decoder, "bucket", 5)
    static = model.generate(ids, max_new_tokens=12, stop_at_eop=False, cuda_graph=True)
    assert torch.equal(static, out)


def test_eop_stops_and_pads():
    model = toy_model(seed=2)
    cfg = model.config
    ids = torch.tensor([[20, 30, cfg.gmask_token_id, cfg.bos_token_id]])
    first = model.generate(ids, max_new_tokens=1)[0, -1].item()
    # make the first greedy token the end token: every later slot must be padding
    with torch.no_grad():
        model.lm_head.weight[cfg.eos_token_id] = model.lm_head.weight[first] * 2
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (1, 4 + 1) and out[0, 4].item() == cfg.eos_token_id  # nothing after <eop>
    # in a batch, a finished row pads while the other goes on
    both = torch.tensor([[20, 30, cfg.gmask_token_id, cfg.bos_token_id], [21, 31, cfg.gmask_token_id, cfg.bos_token_id]])
    with torch.no_grad():
        model.lm_head.weight[cfg.eos_token_id] = model.lm_head.weight[first] * 2
    unstopped = model.generate(both, max_new_tokens=5, stop_at_eop=False)
    out = model.generate(both, max_new_tokens=5)
    for r in range(2):
        row = unstopped[r, 4:].tolist()
        if cfg.eos_token_id in row:
            n = row.index(cfg.eos_token_id) + 1
            assert out[r, 4:4 + n].tolist() == row[:n] and (out[r, 4 + n:] == cfg.pad_token_id).all()
        else:
            assert out[r, 4:].tolist() == row


def test_left_padded_batch_equals_single_runs(tok):
    model = toy_model(seed=3)
    prompts = [tok.encode("a"), tok.encode("What is the capital of France?"), tok.encode("你好，世界")]
    batch = glm.left_pad(prompts, tok.pad_id)
    with torch.no_grad():
        logits = model(batch)
    out = model.generate(batch, max_new_tokens=8, stop_at_eop=False)
    for r, p in enumerate(prompts):
        single = torch.tensor([p])
        with torch.no_grad():
            torch.testing.assert_close(logits[r, -len(p):], model(single)[0], atol=1e-5, rtol=1e-5)
        alone = model.generate(single, max_new_tokens=8, stop_at_eop=False)
        assert out[r, batch.shape[1]:].tolist() == alone[0, len(p):].tolist()


def test_sampling_and_logprobs(tok):
    model = toy_model(seed=4)
    ids = glm.left_pad([tok.encode("hello"), tok.encode("你好吗")], tok.pad_id)
    greedy = model.generate(ids, max_new_tokens=6, stop_at_eop=False)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):  # both filters leave only the top token
        out = model.generate(ids, max_new_tokens=6, do_sample=True, stop_at_eop=False, **kw)
        assert torch.equal(out, greedy)
    g = torch.Generator().manual_seed(0)
    out, lp = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
                             generator=g, stop_at_eop=False, return_logprobs=True)
    with torch.no_grad():  # independent: one no-cache forward over the finished sequences
        logits = model(out)[:, ids.shape[1] - 1:-1].double() / 0.7
    ref = torch.log_softmax(logits, -1).gather(2, out[:, ids.shape[1]:, None])[..., 0]
    torch.testing.assert_close(lp.double(), ref, atol=1e-4, rtol=1e-4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model.generate(ids, max_new_tokens=6, do_sample=True, generator=g1, stop_at_eop=False)
    b = model.generate(ids, max_new_tokens=6, do_sample=True, generator=g2, stop_at_eop=False)
    assert torch.equal(a, b)


def test_top_p_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        t, _ = glm.sample_next(logits, True, 1.0, 0.75, 0, g)
        seen.add(t.item())
    assert seen == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops there


def test_bf16_runs(fixture_dir):
    model16 = glm.ChatGLM.from_pretrained(fixture_dir, dtype=torch.bfloat16)
    model32 = glm.ChatGLM.from_pretrained(fixture_dir, dtype=torch.float32)
    ids = torch.tensor([[418, 363, 457, 517, 377, 667, 5, 8, 389, 420]])
    with torch.no_grad():
        a, b = model16(ids), model32(ids)
    assert a.dtype == torch.bfloat16
    assert (a.float() - b).abs().max() < 0.05 * b.abs().max()
    out = model16.generate(ids[:, :8], max_new_tokens=4)
    assert out.shape == (1, 12)


# -- checkpoints ----------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path, golden_model, tok):
    golden_model.save_pretrained(tmp_path / "m", tokenizer=tok, max_shard_bytes=100_000)
    files = sorted(os.listdir(tmp_path / "m"))
    assert "model.safetensors.index.json" in files and "ice_text.model" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # really sharded
    back = glm.ChatGLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[640, 830, 777, 5, 8, 640, 830]])
    with torch.no_grad():
        assert torch.equal(back(ids), golden_model(ids))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_save_is_atomic(tmp_path, golden_model, monkeypatch):
    golden_model.save_pretrained(tmp_path / "m")
    before = sorted(os.listdir(tmp_path / "m"))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(glm, "write_safetensors_shards", boom)
    with pytest.raises(OSError):
        golden_model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def edited_checkpoint(tmp_path, fixture_dir, edit):
    d = tmp_path / "edited"
    shutil.copytree(fixture_dir, d)
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors")
    return d


def test_missing_tensor_is_named(tmp_path, fixture_dir):
    d = edited_checkpoint(tmp_path, fixture_dir, lambda s: s.pop("transformer.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(KeyError, match="transformer.layers.1.mlp.dense_4h_to_h.bias"):
        glm.ChatGLM.from_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path, fixture_dir):
    d = edited_checkpoint(tmp_path, fixture_dir, lambda s: s.update({"transformer.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match="transformer.extra.weight"):
        glm.ChatGLM.from_pretrained(d)


def test_misshaped_tensor_is_named(tmp_path, fixture_dir):
    def edit(s):
        s["transformer.layers.0.attention.dense.weight"] = torch.zeros(64, 32)
    d = edited_checkpoint(tmp_path, fixture_dir, edit)
    with pytest.raises(ValueError, match=r"transformer.layers.0.attention.dense.weight.*\[64, 32\]"):
        glm.ChatGLM.from_pretrained(d)


def test_inv_freq_is_dropped(tmp_path, fixture_dir, golden_model):
    d = edited_checkpoint(tmp_path, fixture_dir, lambda s: s.update(
        {"transformer.layers.0.attention.rotary_emb.inv_freq": torch.zeros(4)}))
    m = glm.ChatGLM.from_pretrained(d)
    ids = torch.tensor([[418, 363, 5, 8, 389]])
    with torch.no_grad():
        assert torch.equal(m(ids), golden_model(ids))


def write_release(src, state, config, tokenizer_path):
    """An official-style release: two pytorch_model-*.bin shards + index + config + tokenizer."""
    os.makedirs(src)
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, ks in halves.items():
        torch.save({k: state[k] for k in ks}, os.path.join(src, name))
        weight_map.update({k: name for k in ks})
    with open(os.path.join(src, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.copy(tokenizer_path, os.path.join(src, "ice_text.model"))


@pytest.mark.parametrize("early", [False, True])
def test_convert_roundtrip(tmp_path, fixture_dir, golden_model, early):
    state = {k: v.half() for k, v in load_file(os.path.join(fixture_dir, "model.safetensors")).items()}
    state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4).half()
    with open(os.path.join(fixture_dir, "config.json")) as f:
        config = json.load(f)
    if early:  # 20000 image-token rows in front, special ids shifted by 20000
        for k in ("transformer.word_embeddings.weight", "lm_head.weight"):
            state[k] = torch.cat([torch.randn(20000, 64).half(), state[k]])
        config["vocab_size"] += 20000
        for k in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id"):
            config[k] += 20000
    write_release(tmp_path / "src", state, config, os.path.join(fixture_dir, "ice_text.model"))
    glm.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    out = glm.ChatGLM.from_pretrained(tmp_path / "dst")
    assert out.config.vocab_size == 1200 and out.config.bos_token_id == 8 and out.config.gmask_token_id == 5
    ids = torch.tensor([[418, 363, 457, 517, 377, 667, 5, 8, 389, 420]])
    with torch.no_grad():
        ref = golden_model(ids)
        # the .bin was float16: compare against the golden weights rounded the same way
        torch.testing.assert_close(out(ids), ref, atol=5e-3, rtol=0)
        for k, v in state.items():
            if "inv_freq" not in k:
                assert torch.equal(out.state_dict()[k].half(), v[-out.state_dict()[k].shape[0]:]), k


def test_convert_rejects_wrong_shape(tmp_path, fixture_dir):
    state = load_file(os.path.join(fixture_dir, "model.safetensors"))
    state["lm_head.weight"] = torch.zeros(1300, 64)
    with open(os.path.join(fixture_dir, "config.json")) as f:
        config = json.load(f)
    write_release(tmp_path / "src", state, config, os.path.join(fixture_dir, "ice_text.model"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        glm.convert(tmp_path / "src", tmp_path / "dst")
    assert not os.path.exists(tmp_path / "dst")


# -- bad input --------------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        glm.ChatGLM.from_pretrained(tmp_path / "nope")


def test_config_missing_field(tmp_path, fixture_dir):
    with open(os.path.join(fixture_dir, "config.json")) as f:
        config = json.load(f)
    del config["num_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="num_layers"):
        glm.GLMConfig.from_json(tmp_path / "config.json")


def test_tokenizer_not_sentencepiece(tmp_path):
    bad = tmp_path / "ice_text.model"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        glm.Tokenizer(str(bad))


def test_ids_outside_vocab(golden_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        golden_model(torch.tensor([[1, 2, 5000]]))


def test_prompt_too_long(golden_model):
    ids = torch.full((1, 2049), 640)
    with pytest.raises(ValueError, match="max_sequence_length"):
        golden_model(ids)
    with pytest.raises(ValueError, match="max_new_tokens"):
        golden_model.generate(ids[:, :2040], max_new_tokens=20)


def test_missing_shard_is_named(tmp_path, golden_model):
    golden_model.save_pretrained(tmp_path / "m", max_shard_bytes=100_000)
    shard = sorted(f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / "m" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        glm.ChatGLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("train_head", [False, True])
def test_head_logprobs_in_chunks_equal_the_full_log_softmax(train_head):
    """Log-probs, entropies and their gradients (h, and the head when it trains: recomputed per chunk
    in backward; else taken in forward) from chunks of tokens equal a float64 log_softmax over all
    logits; unless asked for "grad", the entropy is a number that takes no gradient."""
    g = torch.Generator().manual_seed(3)
    N, C, V, tau = 23, 8, 40, 0.7
    h = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=train_head)
    t = torch.randint(0, V, (N,), generator=g)
    g_logp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    logp, ent = glm.HeadLogProbs.apply(h, w, t, tau, 5, "grad")  # 5 chunks, the last one short
    grads = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), [h, w] if train_head else [h])
    logp_all = torch.log_softmax(h @ w.t() / tau, -1)  # the reference: every logit at once
    want_logp, want_ent = logp_all.gather(1, t[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)
    want = torch.autograd.grad((want_logp * g_logp + want_ent * g_ent).sum(), [h, w] if train_head else [h],
                               retain_graph=True)
    torch.testing.assert_close(logp, want_logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-12, rtol=0)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    logp, ent = glm.HeadLogProbs.apply(h, w, t, tau, 5, True)
    assert not ent.requires_grad
    torch.testing.assert_close(ent, want_ent.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad((logp * g_logp).sum(), h)[0],
                               torch.autograd.grad((want_logp * g_logp).sum(), h)[0], atol=1e-12, rtol=0)
