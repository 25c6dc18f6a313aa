"""LoRA: layer math against float64 recomputes, merge/unmerge, adapter files, strict loading, roles."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glm
import lora

from conftest import FIXTURE

pytestmark = pytest.mark.usefixtures("one_thread")
ALL_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def base_model():
    return glm.ChatGLM.from_pretrained(FIXTURE).eval()


def batch_ids():
    """The golden fixture's left-padded batch of two prompts [2, 22]."""
    return load_file(os.path.join(FIXTURE, "expected.safetensors"))["batch.input_ids"]


def randomize_B(model, name="default", std=0.1, seed=0):
    """Give adapter `name` nonzero B factors so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            if name in m.lora_B:
                B = m.lora_B[name]
                B.copy_(torch.randn(B.shape, generator=g) * std)


def logits(model, ids=None):
    with torch.no_grad():
        return model(batch_ids() if ids is None else ids)


def hand_merged_model(model, name="default"):
    """A plain base model whose weights are W + (alpha/r) B A, formed here in float64."""
    ref = base_model()
    with torch.no_grad():
        for path, m in lora.lora_modules(model):
            if name in m.lora_A:
                W = ref.get_submodule(path).weight
                s = m.alpha[name] / m.r[name]
                W.copy_(W.double() + s * m.lora_B[name].double() @ m.lora_A[name].double())
    return ref


def test_zero_B_changes_nothing_and_keeps_base_tensors():
    model = base_model()
    want = logits(model)
    qkv = model.transformer.layers["0"].attention.query_key_value
    weight, ptr = qkv.weight, qkv.weight.data_ptr()
    lora.inject_lora(model, targets=ALL_TARGETS, r=4, alpha=8)
    qkv = model.transformer.layers["0"].attention.query_key_value
    assert isinstance(qkv, lora.LoRALinear)
    assert qkv.weight is weight and qkv.weight.data_ptr() == ptr  # no copy of the base
    assert torch.equal(logits(model), want)
    # "dense" is attention.dense only, never the MLP's dense_h_to_4h / dense_4h_to_h
    model2 = base_model()
    lora.inject_lora(model2, targets=("dense",))
    assert [p for p, _ in lora.lora_modules(model2)] == [f"transformer.layers.{i}.attention.dense" for i in (0, 1)]


def test_forward_matches_float64_recompute():
    model = base_model()
    lora.inject_lora(model, targets=ALL_TARGETS, r=4, alpha=8)
    randomize_B(model)
    # one layer against x (W + s B A)^T + b in float64
    m = model.transformer.layers["1"].mlp.dense_h_to_4h
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    W = m.weight.double() + 2.0 * m.lora_B["default"].double() @ m.lora_A["default"].double()
    want = x.double() @ W.T + m.bias.double()
    torch.testing.assert_close(m(x).double(), want, atol=1e-5, rtol=1e-5)
    # the whole model against a plain model carrying the hand-merged weights
    got = logits(model)
    assert (got - logits(base_model())).abs().max() > 1e-2  # the adapter really moves the logits
    torch.testing.assert_close(got, logits(hand_merged_model(model)), atol=1e-5, rtol=1e-5)


def test_merge_unmerge():
    model = base_model()
    lora.inject_lora(model, targets=ALL_TARGETS, r=4, alpha=8)
    randomize_B(model)
    base_w = {p: m.weight.detach().clone() for p, m in lora.lora_modules(model)}
    hand_merged = logits(hand_merged_model(model))
    lora.merge_lora(model)
    for p, m in lora.lora_modules(model):
        want = base_w[p].double() + 2.0 * m.lora_B["default"].double() @ m.lora_A["default"].double()
        torch.testing.assert_close(m.weight.double(), want, atol=1e-6, rtol=0)
    merged_w = {p: m.weight.detach().clone() for p, m in lora.lora_modules(model)}
    torch.testing.assert_close(logits(model), hand_merged, atol=1e-5, rtol=1e-5)  # the delta is not added twice
    lora.merge_lora(model)  # idempotent
    model.train()
    model.eval()  # never merges or unmerges on its own
    for p, m in lora.lora_modules(model):
        assert torch.equal(m.weight, merged_w[p])
    lora.unmerge_lora(model)
    lora.unmerge_lora(model)
    for p, m in lora.lora_modules(model):
        torch.testing.assert_close(m.weight, base_w[p], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), hand_merged, atol=1e-5, rtol=1e-5)


def test_adapter_file_holds_peft_keys_and_config(tmp_path):
    model = base_model()
    lora.inject_lora(model, targets=("query_key_value",), r=4, alpha=8, dropout=0.05)
    randomize_B(model)
    lora.save_adapter(model, tmp_path / "ad", base_model_name_or_path="THUDM/chatglm-6b")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    state = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert set(state) == {
        "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight",
        "base_model.model.transformer.layers.0.attention.query_key_value.lora_B.weight",
        "base_model.model.transformer.layers.1.attention.query_key_value.lora_A.weight",
        "base_model.model.transformer.layers.1.attention.query_key_value.lora_B.weight",
    }
    qkv = model.transformer.layers["1"].attention.query_key_value
    assert state["base_model.model.transformer.layers.1.attention.query_key_value.lora_A.weight"].shape == (4, 64)
    assert torch.equal(state["base_model.model.transformer.layers.1.attention.query_key_value.lora_B.weight"],
                       qkv.lora_B["default"].detach())
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    expect = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
              "target_modules": ["query_key_value"], "bias": "none", "task_type": "CAUSAL_LM",
              "inference_mode": True, "base_model_name_or_path": "THUDM/chatglm-6b", "fan_in_fan_out": False}
    assert {k: cfg[k] for k in expect} == expect


def test_save_then_load_into_fresh_model(tmp_path):
    model = base_model()
    lora.inject_lora(model, targets=("query_key_value", "dense_4h_to_h"), r=4, alpha=8)
    randomize_B(model)
    lora.save_adapter(model, tmp_path / "ad")
    fresh = base_model()
    lora.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh), logits(model))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def saved_adapter(tmp_path, targets=("query_key_value",)):
    model = base_model()
    lora.inject_lora(model, targets=targets, r=4, alpha=8)
    randomize_B(model)
    lora.save_adapter(model, tmp_path / "good")
    return model, tmp_path / "good"


def edited_copy(src, dst, edit):
    """A copy of adapter folder src whose tensors went through edit(state)."""
    shutil.copytree(src, dst)
    state = load_file(src / "adapter_model.safetensors")
    edit(state)
    save_file(state, dst / "adapter_model.safetensors")
    return dst


def test_loading_is_strict(tmp_path):
    _, good = saved_adapter(tmp_path)
    qkv_A = "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight"
    cases = {
        # a layer the 2-layer base does not have: the adapter belongs to a bigger model
        "base_model.model.transformer.layers.2.attention.query_key_value.lora_A.weight":
            lambda s, k: s.__setitem__(k, torch.zeros(4, 64)),
        # a real layer that adapter_config.json does not target
        "base_model.model.transformer.layers.0.mlp.dense_h_to_4h.lora_A.weight":
            lambda s, k: s.__setitem__(k, torch.zeros(4, 64)),
        "base_model.model.lm_head.lora_A.weight": lambda s, k: s.__setitem__(k, torch.zeros(4, 64)),
        qkv_A: lambda s, k: s.pop(k),  # missing
    }
    for i, (key, edit) in enumerate(cases.items()):
        bad = edited_copy(good, tmp_path / f"bad{i}", lambda s: edit(s, key))
        with pytest.raises((KeyError, ValueError), match=re.escape(key)):
            lora.load_adapter(base_model(), bad)
    # mis-shaped: an adapter of a base with another hidden size
    bad = edited_copy(good, tmp_path / "shape", lambda s: s.__setitem__(qkv_A, torch.zeros(4, 128)))
    with pytest.raises(ValueError, match=re.escape(qkv_A) + ".*different base model"):
        lora.load_adapter(base_model(), bad)
    # the model expects a layer the file lacks (a 3-layer base reading a 2-layer adapter)
    cfg = glm.GLMConfig.from_json(os.path.join(FIXTURE, "config.json"))
    cfg.num_layers = 3
    bigger = glm.ChatGLM(cfg)
    missing = "base_model.model.transformer.layers.2.attention.query_key_value.lora_A.weight"
    with pytest.raises(KeyError, match=re.escape(missing) + ".*different base model"):
        lora.load_adapter(bigger, good)
    assert not lora.lora_modules(bigger)  # a failed load leaves the model as it was


def test_two_named_adapters_and_adapters_off():
    model = base_model()
    lora.inject_lora(model, targets=("query_key_value",), r=4, alpha=8, name="policy")
    randomize_B(model, "policy", seed=1)
    lora.inject_lora(model, targets=("query_key_value", "dense"), r=2, alpha=4, name="critic")
    randomize_B(model, "critic", seed=2)
    # each against a plain model carrying only its own weights
    base, policy, critic = logits(base_model()), logits(hand_merged_model(model, "policy")), \
        logits(hand_merged_model(model, "critic"))
    assert min((policy - critic).abs().max(), (policy - base).abs().max(), (critic - base).abs().max()) > 1e-2
    close = lambda want: torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)
    close(critic)  # the adapter injected last is active
    lora.set_adapter(model, "policy")
    close(policy)
    with lora.adapters_off(model):
        close(base)
    close(policy)  # the context restores the active adapter
    lora.set_adapter(model, None)
    close(base)
    lora.set_adapter(model, "critic")
    close(critic)
    with pytest.raises(KeyError, match="no adapter named 'actor'"):
        lora.set_adapter(model, "actor")
    lora.merge_lora(model)  # a merged weight is not the base: switching must be refused
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with lora.adapters_off(model):
            pass
    lora.unmerge_lora(model)


def test_only_lora_params_train():
    model = base_model()
    lora.inject_lora(model, targets=("query_key_value", "dense"), r=4, name="policy")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"transformer.layers.{i}.attention.{t}.lora_{ab}.policy"
            for i in (0, 1) for t in ("query_key_value", "dense") for ab in "AB"}
    assert trainable == want
    lora.inject_lora(model, targets=("query_key_value",), r=4, name="critic")  # the policy stays trainable
    critic = {f"transformer.layers.{i}.attention.query_key_value.lora_{ab}.critic" for i in (0, 1) for ab in "AB"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want | critic
    lora.mark_only_lora_trainable(model, "critic")
    assert all(n.endswith(".critic") for n, p in model.named_parameters() if p.requires_grad)
    # gradients reach only the trainable factors
    randomize_B(model, "critic")
    model(batch_ids()).float().pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_unknown_target_raises():
    model = base_model()
    for bad in ("xyz", "lm_head", "query"):
        with pytest.raises(ValueError, match=f"LoRA target '{bad}' matches no module; valid: "
                                             "query_key_value, dense, dense_h_to_4h, dense_4h_to_h"):
            lora.inject_lora(model, targets=("query_key_value", bad))
    assert not lora.lora_modules(model)


def test_meta_injection_then_load(tmp_path):
    trained, adir = saved_adapter(tmp_path, targets=ALL_TARGETS)
    cfg = glm.GLMConfig.from_json(os.path.join(FIXTURE, "config.json"))
    with torch.device("meta"):
        model = glm.ChatGLM(cfg)
    lora.inject_lora(model, targets=ALL_TARGETS, r=4, alpha=8)
    assert all(m.lora_A["default"].is_meta for _, m in lora.lora_modules(model))
    # base weights straight into place, as a pipeline stage loads them; LoRA factors are not in the base
    lora_keys = {k for k in model.state_dict() if ".lora_" in k}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in lora_keys}
    result = model.load_state_dict(glm.read_safetensors(FIXTURE, shapes), strict=False, assign=True)
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys
    lora.load_adapter(model, adir)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(logits(model.eval()), logits(trained))


def test_pipeline_stage_loads_only_its_layers(tmp_path):
    trained, adir = saved_adapter(tmp_path)
    stage = glm.ChatGLM.from_pretrained(FIXTURE, layer_ids=range(1, 2), first=False, last=True)
    lora.load_adapter(stage, adir)
    assert [p for p, _ in lora.lora_modules(stage)] == ["transformer.layers.1.attention.query_key_value"]
    full = trained.transformer.layers["1"].attention.query_key_value
    mine = stage.transformer.layers["1"].attention.query_key_value
    assert torch.equal(mine.lora_A["default"], full.lora_A["default"])
    assert torch.equal(mine.lora_B["default"], full.lora_B["default"])
    # a key that fits no layer of the full model is still an error on a stage
    key = "base_model.model.transformer.layers.7.attention.query_key_value.lora_B.weight"
    bad = edited_copy(adir, tmp_path / "bad", lambda s: s.__setitem__(key, torch.zeros(192, 4)))
    stage = glm.ChatGLM.from_pretrained(FIXTURE, layer_ids=range(0, 1), first=True, last=False)
    with pytest.raises(KeyError, match=re.escape(key)):
        lora.load_adapter(stage, bad)


def test_merge_cli(tmp_path):
    trained, adir = saved_adapter(tmp_path, targets=ALL_TARGETS)
    lora.main(["merge", "--model", FIXTURE, "--adapter", str(adir), "--out", str(tmp_path / "merged")])
    assert os.path.isfile(tmp_path / "merged" / "ice_text.model")
    merged = glm.ChatGLM.from_pretrained(tmp_path / "merged").eval()
    assert not lora.lora_modules(merged)
    want = logits(trained)
    assert (want - logits(base_model())).abs().max() > 1e-2
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=1e-5)
