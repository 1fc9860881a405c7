"""QLoRA's blocksize and double_quant are fields of its config (QLoRAConfig), so adapter files
carry them and a layer saved with non-default settings reloads as the same layer; files written
before QLoRA had its own config (a LoRAConfig plus per-layer "options") still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrank_ref as lr
from lowrank_ref.inject import inject
from lowrank_ref.io import load_adapter, read_adapter_metadata, save_adapter
from lowrank_ref.nn import GPT, GPTConfig

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=16)


def _qlora_model(seed, blocksize=32, double_quant=False):
    model = GPT(CFG, rng=np.random.default_rng(0)).eval()  # the same base weights every time
    inject(model, lr.LoRAConfig(r=2, alpha=4), targets=("q", "v"), method="qlora",
           rng=np.random.default_rng(seed), blocksize=blocksize, double_quant=double_quant)
    for p in model.trainable_parameters().values():  # non-zero B, so the file matters
        p.data = np.random.default_rng(seed + 1).standard_normal(p.shape).astype(p.data.dtype)
    return model


def test_qlora_options_are_stored_and_rebuild_the_same_layer(tmp_path):
    model = _qlora_model(seed=1)
    path = tmp_path / "qlora.safetensors"
    save_adapter(model, path)
    meta = read_adapter_metadata(path)
    for layer in meta["layers"].values():
        assert layer["config"]["config_class"] == "QLoRAConfig" and "options" not in layer
        assert (layer["config"]["blocksize"], layer["config"]["double_quant"]) == (32, False)

    fresh = GPT(CFG, rng=np.random.default_rng(0)).eval()
    load_adapter(fresh, path)  # injects from the file: must use blocksize 32 without double quant
    q = fresh.get_submodule("blocks.0.attn.q")
    assert (q.blocksize, q.double_quant) == (32, False)
    idx = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 8))
    np.testing.assert_array_equal(fresh.forward(idx), model.forward(idx))


def test_a_model_built_with_other_options_is_refused_unchanged(tmp_path):
    path = tmp_path / "qlora.safetensors"
    save_adapter(_qlora_model(seed=1, blocksize=32), path)
    other = _qlora_model(seed=2, blocksize=64)
    before = {k: v.copy() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="config differs"):
        load_adapter(other, path)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_options_that_do_not_fit_the_method_are_a_clear_error(tmp_path):
    path = tmp_path / "qlora.safetensors"
    save_adapter(_qlora_model(seed=1), path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        header = dict(f.metadata())
    layers = json.loads(header["layers"])
    for layer in layers.values():
        layer["options"] = {"blocksize": 32, "no_such_option": True}
    header["layers"] = json.dumps(layers)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    fresh = GPT(CFG, rng=np.random.default_rng(0))
    names_before = set(fresh.parameters())
    with pytest.raises(ValueError, match="options"):
        load_adapter(fresh, bad)
    assert set(fresh.parameters()) == names_before  # nothing injected


def test_a_file_from_before_qloraconfig_still_loads(tmp_path):
    """The earlier layout: config_class LoRAConfig, blocksize/double_quant under "options"."""
    from safetensors import safe_open

    model = _qlora_model(seed=1)
    path = tmp_path / "qlora.safetensors"
    save_adapter(model, path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        header = dict(f.metadata())
    layers = json.loads(header["layers"])
    for layer in layers.values():
        cfg = layer["config"]
        layer["options"] = {"blocksize": cfg.pop("blocksize"), "double_quant": cfg.pop("double_quant")}
        cfg.pop("quant_type")
        cfg["config_class"] = "LoRAConfig"
    header["layers"] = json.dumps(layers)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=header)
    fresh = GPT(CFG, rng=np.random.default_rng(0)).eval()
    load_adapter(fresh, old)
    q = fresh.get_submodule("blocks.0.attn.q")
    assert type(q.config) is lr.QLoRAConfig and (q.blocksize, q.double_quant) == (32, False)
    idx = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 8))
    np.testing.assert_array_equal(fresh.forward(idx), model.forward(idx))


def test_r_alpha_and_scaling_rule_are_top_level_metadata(tmp_path):
    from safetensors import safe_open

    model = GPT(CFG, rng=np.random.default_rng(0))
    inject(model, lr.LoRAConfig(r=2, alpha=6, rslora=True), targets=("q", "v"), rng=0)
    path = tmp_path / "lora.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["method"] == "lora" and meta["r"] == "2" and meta["alpha"] == "6.0"
    assert meta["scaling_rule"] == "alpha/sqrt(r)"
    assert float(meta["scaling"]) == pytest.approx(6 / np.sqrt(2))

    mixed = GPT(CFG, rng=np.random.default_rng(0))
    inject(mixed, lr.LoRAConfig(r=2, alpha=6), targets=("q", "v"), ranks={"v": 3}, rng=0)
    save_adapter(mixed, path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["r"] == "per-layer" and meta["alpha"] == "6.0" and meta["scaling_rule"] == "alpha/r"
