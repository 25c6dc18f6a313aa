"""Bad model and adapter files are refused at load with one clear error naming the file and the
field, key or tensor: config.json values, tokenizer/model disagreement, corrupt or hostile
safetensors and indexes, non-float or non-finite weights, adapters made for another base."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glm
import lora

from conftest import FIXTURE, make_base

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_fixture(tmp_path, config_edits=None):
    """A copy of the golden fixture's model folder, with config.json fields replaced."""
    d = str(tmp_path / "model")
    shutil.copytree(FIXTURE, d)
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, **(config_edits or {})}, f)
    return d


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -----------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("field, value", [
    ("num_layers", 2.7), ("num_layers", "2"), ("num_layers", True), ("num_layers", 0), ("hidden_size", -64),
    ("vocab_size", None), ("layernorm_epsilon", "1e-5"), ("layernorm_epsilon", float("nan")),
    ("layernorm_epsilon", 0.0), ("bos_token_id", 1200), ("pad_token_id", -1), ("gmask_token_id", 5.0),
])
def test_config_values_are_checked(tmp_path, field, value):
    path = os.path.join(copy_fixture(tmp_path, {field: value}), "config.json")
    with pytest.raises(ValueError, match=re.escape(path) + f": {field} is .*must be.*HINT"):
        glm.GLMConfig.from_json(path)


@pytest.mark.parametrize("text, what", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                        ('{"num_layers": 2}', "field 'hidden_size' is missing")])
def test_config_file_that_is_not_a_config(tmp_path, text, what):
    write(tmp_path / "config.json", text)
    with pytest.raises((ValueError, KeyError), match=re.escape(str(tmp_path / "config.json")) + ".*" + what):
        glm.GLMConfig.from_json(str(tmp_path / "config.json"))


# -----------------------------------------------------------------------------
# tokenizer and model agree


@pytest.mark.parametrize("edits, what", [
    ({"vocab_size": 1000}, r"ice_text.model has 1200 pieces but .*config.json has vocab_size 1000"),
    ({"bos_token_id": 7}, r"config.json: bos_token_id is 7, but .*ice_text.model has '<sop>' at id 8"),
    ({"pad_token_id": 0}, r"config.json: pad_token_id is 0, but .*ice_text.model has '<pad>' at id 3"),
], ids=["vocab", "bos", "pad"])
def test_tokenizer_must_fit_the_model(tmp_path, edits, what):
    d = copy_fixture(tmp_path, edits)
    for load in (glm.ChatGLM.from_pretrained, glm.Tokenizer.from_dir):
        with pytest.raises(ValueError, match=what + ".*HINT"):
            load(d)


def test_missing_model_folder_is_named(tmp_path):
    merge = lambda d: lora.merge_to_dir(d, d, str(tmp_path / "out"))  # noqa: E731
    for load in (glm.ChatGLM.from_pretrained, glm.Tokenizer.from_dir, merge):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + ": no such model folder"):
            load(str(tmp_path / "nope"))


# -----------------------------------------------------------------------------
# weight files


@pytest.mark.parametrize("damage", ["empty", "truncated", "header"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    d = copy_fixture(tmp_path)
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    data = {"empty": b"", "truncated": data[: len(data) // 2], "header": b"\xff" * 8 + data[8:]}[damage]
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=re.escape(path) + ": not a readable safetensors file.*HINT"):
        glm.ChatGLM.from_pretrained(d)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A toy model folder written by save_pretrained: shards and model.safetensors.index.json."""
    return make_base(tmp_path_factory.mktemp("sharded") / "base")


def remap(name):
    """An index edit: lm_head.weight mapped to `name`."""
    return lambda m: json.dumps({"weight_map": {**m, "lm_head.weight": name}})


@pytest.mark.parametrize("edit, what", [
    (lambda m: "{broken", "not valid JSON"),
    (lambda m: json.dumps({"metadata": {}}), "it has no 'weight_map' object"),
    (lambda m: json.dumps([m]), "not a JSON object"),
    (remap("../outside.safetensors"), "'lm_head.weight' maps to '../outside.safetensors', not a file in the model"),
    (remap("/etc/passwd"), "'lm_head.weight' maps to '/etc/passwd'"),
    (remap(3), "'lm_head.weight' maps to 3"),
], ids=["json", "no-map", "list", "dotdot", "absolute", "not-str"])
def test_broken_index_is_named(tmp_path, sharded, edit, what):
    d = str(tmp_path / "m")
    shutil.copytree(sharded, d)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    write(index, edit(weight_map))
    with pytest.raises(ValueError, match=re.escape(index) + ": " + re.escape(what) + ".*HINT"):
        glm.ChatGLM.from_pretrained(d)


def test_missing_index_and_misdirected_entry(tmp_path, sharded):
    d = str(tmp_path / "m")
    shutil.copytree(sharded, d)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index, encoding="utf-8") as f:
        saved = json.load(f)
    # an index entry that names a real shard which does not hold the tensor
    shards = sorted(set(saved["weight_map"].values()))
    other = {**saved["weight_map"], "lm_head.weight": "elsewhere.safetensors"}
    save_file({"x": torch.zeros(1)}, os.path.join(d, "elsewhere.safetensors"))
    write(index, json.dumps({"weight_map": other}))
    with pytest.raises(KeyError, match="elsewhere.safetensors: the index maps tensor 'lm_head.weight'"):
        glm.ChatGLM.from_pretrained(d)
    os.remove(index)
    with pytest.raises(FileNotFoundError, match=f"but {len(shards)} model-\\*.safetensors shards.*index"):
        glm.ChatGLM.from_pretrained(d)


@pytest.mark.parametrize("key, bad, what", [
    ("lm_head.weight", lambda t: t.to(torch.int32), "has dtype torch.int32; weights are floating point"),
    ("transformer.layers.1.mlp.dense_h_to_4h.bias", lambda t: t.index_fill(0, torch.tensor([7]), float("nan")),
     "holds NaN or Inf"),
    ("transformer.word_embeddings.weight", lambda t: t.index_fill(1, torch.tensor([3]), float("-inf")),
     "holds NaN or Inf"),
], ids=["int", "nan", "inf"])
def test_bad_tensor_values_name_the_tensor(tmp_path, key, bad, what):
    d = copy_fixture(tmp_path)
    path = os.path.join(d, "model.safetensors")
    state = load_file(path)
    state[key] = bad(state[key])
    save_file(state, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor '{key}' {what}") + ".*HINT"):
        glm.ChatGLM.from_pretrained(d)


# -----------------------------------------------------------------------------
# adapters


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two toy bases of the same shapes (seeds 0 and 1) and an adapter trained on the first."""
    root = tmp_path_factory.mktemp("bases")
    a, b = make_base(root / "a", seed=0), make_base(root / "b", seed=1)
    model = glm.ChatGLM.from_pretrained(a)
    lora.inject_lora(model, r=4, alpha=8)
    lora.save_adapter(model, root / "adapter")
    return a, b, str(root / "adapter")


def test_adapter_for_another_base_is_refused(bases):
    a, b, adapter = bases
    config = json.load(open(os.path.join(adapter, lora.CONFIG_FILE), encoding="utf-8"))
    assert config["base_model_name_or_path"] == a and "base_model_fingerprint" not in config  # PEFT's keys only
    lora.load_adapter(glm.ChatGLM.from_pretrained(a, dtype=torch.bfloat16), adapter)  # same base, other dtype
    with pytest.raises(ValueError, match=f"{re.escape(adapter)}.*trained on base {re.escape(a)}, whose "
                                         rf"'transformer.word_embeddings.weight' differs .*\({re.escape(b)}\)"):
        lora.load_adapter(glm.ChatGLM.from_pretrained(b), adapter)
    last_stage = glm.ChatGLM.from_pretrained(b, layer_ids=[1], first=False)  # compares what it holds
    with pytest.raises(ValueError, match="'lm_head.weight' differs"):
        lora.load_adapter(last_stage, adapter)


def test_adapter_without_fingerprint_still_loads(tmp_path, bases):
    _, b, adapter = bases
    peft = str(tmp_path / "peft")
    shutil.copytree(adapter, peft)
    weights = os.path.join(peft, lora.ADAPTER_FILE)
    save_file(load_file(weights), weights)  # as PEFT writes it: no fingerprint in the metadata
    lora.load_adapter(glm.ChatGLM.from_pretrained(b), peft)


@pytest.mark.parametrize("damage, what", [
    ("config", "adapter_config.json: not valid JSON"),
    ("truncated", "adapter_model.safetensors: not a readable safetensors file"),
    ("nan", "adapter_model.safetensors: tensor '.*' holds NaN or Inf"),
])
def test_corrupt_adapter_names_the_file(tmp_path, bases, damage, what):
    a, _, adapter = bases
    d = str(tmp_path / "ad")
    shutil.copytree(adapter, d)
    weights = os.path.join(d, lora.ADAPTER_FILE)
    if damage == "config":
        write(os.path.join(d, lora.CONFIG_FILE), "{")
    elif damage == "truncated":
        os.truncate(weights, os.path.getsize(weights) - 10)
    else:
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match=re.escape(d) + "/" + what + ".*HINT"):
        lora.load_adapter(glm.ChatGLM.from_pretrained(a), d)
