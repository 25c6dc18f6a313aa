"""The FlexAttention path (glm.ATTENTION = "flex", opt-in for full-sequence forwards) against the
dense SDPA path, on the golden 2-layer model, and its BlockMask's tiles against the dense mask.

FlexAttention runs forward only on the CPU (its backward raises NotImplementedError there), so
gradients are compared on a GPU by _exp/flex_bench.py; here: outputs, and which tiles are skipped."""
import pytest
import torch
import torch.nn.functional as F

import data
import glm

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def ids_of(n, seed):
    """n ordinary token ids (above the special ids, inside the toy vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 1000, (n,), generator=g).tolist()


def example(tok, n_prompt, n_answer, seed):
    """(ids, labels) of one SFT example: prompt [gMASK] <sop> answer <eop>."""
    ids = ids_of(n_prompt, seed) + [tok.gmask_id, tok.sop_id] + ids_of(n_answer, seed + 1) + [tok.eop_id]
    return ids, [-100] * (n_prompt + 1) + ids[n_prompt + 1:]


# Every batch is 2 x 256 (two 128-token tiles a side): eager FlexAttention pays ~0.4 s per new shape.


def packed_batch(tok):
    """Two packed rows of whole examples (left-padded to the longer row), as train_sft --pack makes them."""
    cfg = data.layout_ids(tok)
    rows = [data.PackedRow([example(tok, 30, 100, 1), example(tok, 70, 40, 3), example(tok, 5, 2, 5)], cfg),
            data.PackedRow([example(tok, 120, 40, 7), example(tok, 12, 20, 9)], cfg)]
    return data.collate_sft(rows, tok.pad_id)


def group_batch(tok, cfg):
    """Two shared-prompt groups (the prompt once, then its answers), as train_dpo / train_rm make them."""
    groups = [(ids_of(60, 11) + [tok.gmask_id, tok.sop_id],
               [ids_of(n, 12 + n) + [tok.eop_id] for n in (100, 50, 41)]),
              (ids_of(20, 13) + [tok.gmask_id, tok.sop_id], [ids_of(n, 14 + n) for n in (10, 25)])]
    return data.group_rows(groups, tok.pad_id, cfg)[0]


def plain_batch(tok):
    """Left-padded prefix-LM rows: the model derives positions and mask from the ids."""
    rows = [example(tok, p, a, 20 + p)[0] for p, a in ((150, 103), (8, 30))]
    return {"input_ids": glm.left_pad(rows, tok.pad_id)}


def logits(model, mb, mode, monkeypatch):
    """The model's logits for a micro-batch with glm.ATTENTION = mode (None: the default), and how
    often glm.flex ran."""
    calls = []
    flex = glm.flex
    if mode is not None:
        monkeypatch.setattr(glm, "ATTENTION", mode)
    monkeypatch.setattr(glm, "flex", lambda *a: calls.append(1) or flex(*a))
    with torch.no_grad():
        rope, attend = model.batch_inputs(mb)
        out = model.lm_head(model.transformer(mb["input_ids"], rope, attend))
    return out, len(calls)


@pytest.mark.parametrize("kind", ["packed", "group", "plain"])
def test_flex_forward_equals_dense(golden_model, tok, monkeypatch, kind):
    mb = {"packed": lambda: packed_batch(tok), "group": lambda: group_batch(tok, golden_model.config),
          "plain": lambda: plain_batch(tok)}[kind]()
    assert mb["input_ids"].shape == (2, 256)  # two 128-token tiles a side, so some can be skipped
    ref, n_dense = logits(golden_model, mb, "dense", monkeypatch)
    got, n_flex = logits(golden_model, mb, "flex", monkeypatch)
    assert (n_dense, n_flex) == (0, golden_model.config.num_layers)  # each path ran where it should
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_the_default_is_the_dense_path(golden_model, tok, monkeypatch):
    """By default no BlockMask is built (dense measured faster on GPUs): numerics are SDPA's."""
    def no_block_mask(attend):
        raise AssertionError("glm.block_mask was called by default")
    monkeypatch.setattr(glm, "block_mask", no_block_mask)
    _, n = logits(golden_model, packed_batch(tok), None, monkeypatch)
    assert n == 0


def test_a_kv_cache_always_takes_the_dense_path(golden_model, tok, monkeypatch):
    """Decoding with a cache ignores a forced "flex": greedy tokens equal the dense run's."""
    ids = glm.left_pad([example(tok, 6, 0, 30)[0][:-1], example(tok, 3, 0, 31)[0][:-1]], tok.pad_id)
    monkeypatch.setattr(glm, "ATTENTION", "dense")
    ref = golden_model.generate(ids, max_new_tokens=3)
    monkeypatch.setattr(glm, "ATTENTION", "flex")
    monkeypatch.setattr(glm, "block_mask", lambda attend: pytest.fail("a BlockMask was built with a KV cache"))
    assert torch.equal(golden_model.generate(ids, max_new_tokens=3), ref)


def tiles(attend, size=128):
    """Per 128 x 128 tile of a bool mask [B, 1, T, S] (padded with False): (any True, all True)."""
    B, _, T, S = attend.shape
    a = F.pad(attend[:, 0], (0, -S % size, 0, -T % size))  # [B, Tp, Sp]
    t = a.unflatten(1, (-1, size)).unflatten(3, (-1, size)).transpose(2, 3)  # [B, Tp/size, Sp/size, size, size]
    return t.any(-1).any(-1), t.all(-1).all(-1)


def full_tiles(bm):
    """The dense [B, nq, nkv] map of the tiles a BlockMask runs without reading the mask."""
    n, idx = bm.full_kv_num_blocks[:, 0], bm.full_kv_indices[:, 0]  # [B, nq], [B, nq, nkv]
    out = torch.zeros(idx.shape, dtype=torch.bool)
    for b, q in torch.cartesian_prod(torch.arange(n.shape[0]), torch.arange(n.shape[1])).tolist():
        out[b, q, idx[b, q, :n[b, q]]] = True
    return out


def test_block_mask_skips_exactly_the_empty_tiles(golden_model, tok):
    """Packed rows, groups and plain rows at several tiles: a tile is computed iff the dense mask has
    a True in it, and runs unmasked iff it is all True."""
    for mb in (packed_batch(tok), group_batch(tok, golden_model.config), plain_batch(tok)):
        attend = golden_model.batch_inputs(mb)[1]
        bm = glm.block_mask(attend)
        computed, full = tiles(attend)
        assert computed.any() and not computed.all()  # the layouts do leave tiles out
        assert torch.equal(bm.to_dense()[:, 0].bool(), computed)
        assert torch.equal(full_tiles(bm), full)
