"""Adapter files: round trips (in a fresh process with another seed), PEFT key layout, metadata,
NumPy <-> torch, and every kind of bad file rejected before the model changes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_close, requires_cuda
from safetensors import safe_open
from safetensors.numpy import save_file

import lowrank_ref as lr
from lowrank_ref.adapters import LoRALinear
from lowrank_ref.inject import adapter_layers, inject
from lowrank_ref.io import load_adapter, read_adapter_metadata, save_adapter
from lowrank_ref.nn.gpt import GPT, GPTConfig

GPT_CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpt():
    return GPT(GPTConfig(**GPT_CFG), rng=np.random.default_rng(0), dtype=np.float64)


def _randomise_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    for p in model.trainable_parameters().values():
        p.data = rng.standard_normal(p.shape).astype(p.data.dtype)


def _adapted_gpt(cfg=None, seed=1):
    model = _gpt()
    cfg = cfg or lr.LoRAConfig(r=2, alpha=4.0)
    inject(model, cfg, targets=("attn", "fc"), ranks={"blocks.1.*": 3, "o": 1}, alphas={"v": 7.0}, rng=0)
    _randomise_adapters(model, seed)
    return model


IDX = np.random.default_rng(5).integers(0, 13, (2, 7))


def _run_child(code: str, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr


CHILD_HEAD = """
    import numpy as np
    from lowrank_ref.nn.gpt import GPT, GPTConfig
    from lowrank_ref.io import load_adapter
    np.random.seed(98765)  # a different global seed, and a different seed for the adapters' init
    model = GPT(GPTConfig(**{cfg}), rng=np.random.default_rng(0), dtype=np.float64)
    idx = np.load({idx!r})
"""


@pytest.mark.parametrize("pre_inject", [False, True])
def test_roundtrip_in_a_fresh_process_with_another_seed(tmp_path, pre_inject):
    model = _adapted_gpt()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    np.save(tmp_path / "idx.npy", IDX)
    inject_line = ""
    if pre_inject:  # the child builds the adapters itself (another rng), then loads the weights
        inject_line = ("import lowrank_ref as lr; from lowrank_ref.inject import inject\n"
                       "    inject(model, lr.LoRAConfig(r=2, alpha=4.0), targets=('attn', 'fc'), "
                       "ranks={'blocks.1.*': 3, 'o': 1}, alphas={'v': 7.0}, rng=4242)\n")
    _run_child(CHILD_HEAD.format(cfg=GPT_CFG, idx=str(tmp_path / "idx.npy")) + f"""
    {inject_line}
    load_adapter(model, {str(path)!r})
    np.save({str(tmp_path / 'out.npy')!r}, model.forward(idx))
    """, tmp_path)
    child = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(child, model.forward(IDX))
    assert not np.allclose(child, _gpt().forward(IDX))  # the adapters do change the output


def test_torch_roundtrip_in_a_fresh_process(tmp_path):
    from lowrank_gpu.nn.gpt import from_numpy

    tm = from_numpy(_gpt())
    inject(tm, lr.LoRAConfig(r=2, rslora=True), targets="all", ranks={"q": 4}, rng=3)
    with torch.no_grad():
        for p in tm.parameters():
            if p.requires_grad:
                p.normal_()
    path = tmp_path / "t.safetensors"
    save_adapter(tm, path)
    np.save(tmp_path / "idx.npy", IDX)
    _run_child(CHILD_HEAD.format(cfg=GPT_CFG, idx=str(tmp_path / "idx.npy")) + f"""
    import torch
    torch.manual_seed(2024)
    from lowrank_gpu.nn.gpt import from_numpy
    tm = from_numpy(model)
    load_adapter(tm, {str(path)!r})
    np.save({str(tmp_path / 'out.npy')!r}, tm(torch.tensor(idx)).detach().numpy())
    """, tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), tm(torch.tensor(IDX)).detach().numpy())


def test_keys_follow_peft_layout_and_metadata_holds_full_configs(tmp_path):
    model = _adapted_gpt()
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, metadata={"task": "copy", "steps": 3})
    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        header = f.metadata()
        A = f.get_tensor("base_model.model.blocks.1.attn.q.lora_A.weight")
        B = f.get_tensor("base_model.model.blocks.1.attn.q.lora_B.weight")
    layers = adapter_layers(model)
    assert keys == {f"base_model.model.{p}.lora_{t}.weight" for p in layers for t in "AB"}
    assert A.shape == (3, 8) and B.shape == (8, 3)  # A (r, in), B (out, r)
    np.testing.assert_array_equal(A, layers["blocks.1.attn.q"].A.data)
    assert header["format"] == "pt" and header["adapter_format"] == "lowrank-ref-adapter"
    meta = read_adapter_metadata(path)
    assert meta["user"] == {"task": "copy", "steps": 3} and meta["format_version"] == 1
    v0 = meta["layers"]["blocks.0.attn.v"]
    assert v0["method"] == "lora" and v0["config"]["r"] == 2 and v0["config"]["alpha"] == 7.0
    assert v0["scaling_rule"] == "alpha/r" and v0["scaling"] == pytest.approx(3.5)
    assert meta["layers"]["blocks.1.attn.o"]["config"]["r"] == 1  # "o" overrides "blocks.1.*"
    assert meta["layers"]["blocks.1.mlp.fc"]["config"]["r"] == 3
    assert v0["config"]["config_class"] == "LoRAConfig"


def test_rslora_scaling_survives(tmp_path):
    model = _adapted_gpt(lr.LoRAConfig(r=4, alpha=8.0, rslora=True))
    save_adapter(model, tmp_path / "a.safetensors")
    meta = read_adapter_metadata(tmp_path / "a.safetensors")["layers"]["blocks.0.attn.q"]
    assert meta["scaling_rule"] == "alpha/sqrt(r)" and meta["scaling"] == pytest.approx(8.0 / 2.0)
    fresh = _gpt()
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert fresh.get_submodule("blocks.0.attn.q").scaling == pytest.approx(4.0)
    np.testing.assert_array_equal(fresh.forward(IDX), model.forward(IDX))


def test_file_is_plain_safetensors_no_pickle(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(_adapted_gpt(), path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw data
    header = json.loads(raw[8:8 + n])
    assert "__metadata__" in header and b"\x80\x04" not in raw[:8 + n]
    entry = header["base_model.model.blocks.0.attn.q.lora_A.weight"]
    assert entry["dtype"] == "F64" and entry["shape"] == [2, 8]


def test_numpy_to_torch_and_back(tmp_path):
    from lowrank_gpu.nn.gpt import from_numpy

    model = _adapted_gpt()
    save_adapter(model, tmp_path / "np.safetensors")
    tm = from_numpy(_gpt())
    load_adapter(tm, tmp_path / "np.safetensors")
    assert_close(tm(torch.tensor(IDX)), model.forward(IDX), "torch loaded from numpy file")
    save_adapter(tm, tmp_path / "t.safetensors")
    back = _gpt()
    load_adapter(back, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(back.forward(IDX), model.forward(IDX))


def test_single_layer_roundtrip_across_backends(tmp_path, rng):
    from lowrank_gpu.adapters import LoRALinear as TorchLoRA

    W, b = rng.standard_normal((5, 4)), rng.standard_normal(5)
    cfg = lr.LoRAConfig(r=3, alpha=2.0)
    layer = LoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=np.random.default_rng(1))
    layer.B.data = rng.standard_normal(layer.B.shape)
    save_adapter(layer, tmp_path / "l.safetensors")
    with safe_open(str(tmp_path / "l.safetensors"), framework="np") as f:
        assert set(f.keys()) == {"base_model.model.lora_A.weight", "base_model.model.lora_B.weight"}
    other = LoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=np.random.default_rng(2))
    load_adapter(other, tmp_path / "l.safetensors")
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(other.forward(x), layer.forward(x))
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=9)
    assert isinstance(tl, TorchLoRA)
    load_adapter(tl, tmp_path / "l.safetensors")
    assert_close(tl(torch.tensor(x)), layer.forward(x), "torch layer from numpy file")
    with pytest.raises(ValueError, match="single adapter layer"):
        load_adapter(lr.nn.Linear.from_arrays(W, b), tmp_path / "l.safetensors")


def test_bfloat16_layer_is_stored_as_float32(tmp_path):
    base = torch.nn.Linear(4, 3, dtype=torch.bfloat16)
    layer = lr.adapt(base, lr.LoRAConfig(r=2), backend="torch", rng=0)
    with torch.no_grad():
        layer.B.normal_()
    save_adapter(layer, tmp_path / "bf.safetensors")
    meta = read_adapter_metadata(tmp_path / "bf.safetensors")
    assert meta["layers"][""]["tensors"]["B"]["dtype"] == "float32"
    other = lr.adapt(torch.nn.Linear(4, 3, dtype=torch.bfloat16), lr.LoRAConfig(r=2), backend="torch", rng=1)
    load_adapter(other, tmp_path / "bf.safetensors")
    assert torch.equal(other.B, layer.B) and other.B.dtype == torch.bfloat16


# --- bad files and mismatches: ValueError, and the model is left as it was --------------------
def _rewrite(src, dst, edit_tensors=None, edit_layers=None, header_edit=None):
    with safe_open(str(src), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata())
    layers = json.loads(header["layers"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_layers:
        edit_layers(layers)
    header["layers"] = json.dumps(layers)
    if header_edit:
        header_edit(header)
    save_file(tensors, str(dst), metadata=header)
    return dst


def _state(model):
    return {n: (type(m), {k: p.data.copy() for k, p in m._params.items()}) for n, m in model.named_modules()}


def _assert_unchanged(model, before):
    after = _state(model)
    assert after.keys() == before.keys()
    for n in before:
        assert after[n][0] is before[n][0], n
        for k in before[n][1]:
            np.testing.assert_array_equal(after[n][1][k], before[n][1][k], err_msg=f"{n}.{k}")


KEY = "base_model.model.blocks.0.attn.q.lora_A.weight"


def _nan(t):
    t[KEY] = t[KEY].copy()
    t[KEY][0, 0] = np.nan


def _wrong_shape(t):
    t[KEY] = np.zeros((5, 8))


def _as_int(t):
    t[KEY] = t[KEY].astype(np.int64)


def _fix_meta(shape=None, dtype=None):
    def edit(layers):
        entry = layers["blocks.0.attn.q"]["tensors"]["A"]
        if shape:
            entry["shape"] = shape
        if dtype:
            entry["dtype"] = dtype
    return edit


BAD_EDITS = {
    "missing tensor": (dict(edit_tensors=lambda t: t.pop(KEY)), "missing"),
    "extra tensor": (dict(edit_tensors=lambda t: t.update({"base_model.model.x.lora_A.weight": np.ones(2)})), "extra"),
    "nan": (dict(edit_tensors=_nan), "NaN"),
    "shape disagrees with metadata": (dict(edit_tensors=_wrong_shape), "shape"),
    "shape disagrees with model": (dict(edit_tensors=_wrong_shape, edit_layers=_fix_meta(shape=[5, 8])), "shape"),
    "dtype disagrees with metadata": (dict(edit_tensors=_as_int), "dtype"),
    "integer dtype": (dict(edit_tensors=_as_int, edit_layers=_fix_meta(dtype="int64")), "dtype"),
    "unknown method": (dict(edit_layers=lambda L: L["blocks.0.attn.q"].update(method="lorax")), "known methods"),
    "bad config": (dict(edit_layers=lambda L: L["blocks.0.attn.q"]["config"].update(r=0)), "config"),
    "unknown config field": (dict(edit_layers=lambda L: L["blocks.0.attn.q"]["config"].update(rank=2)), "config"),
    "not our format": (dict(header_edit=lambda h: h.pop("adapter_format")), "not a lowrank-ref adapter"),
    "future version": (dict(header_edit=lambda h: h.update(adapter_format_version="9")), "version"),
    "damaged layers json": (dict(header_edit=lambda h: h.update(layers="{not json")), "damaged"),
    "layer the model lacks": (dict(edit_layers=lambda L: L.update(
        {"blocks.0.attn.zz": {**L["blocks.0.attn.q"], "tensors": {}}})), "zz"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
@pytest.mark.parametrize("pre_inject", [False, True])
def test_bad_files_are_rejected_before_anything_changes(tmp_path, case, pre_inject):
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted_gpt(), good)
    kwargs, match = BAD_EDITS[case]
    bad = _rewrite(good, tmp_path / "bad.safetensors", **kwargs)
    model = _gpt()
    if pre_inject:
        inject(model, lr.LoRAConfig(r=2, alpha=4.0), targets=("attn", "fc"),
               ranks={"blocks.1.*": 3, "o": 1}, alphas={"v": 7.0}, rng=0)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad header", "empty"])
def test_corrupt_bytes_are_rejected(tmp_path, damage):
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted_gpt(), good)
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = {
        "truncated": raw[: len(raw) - 17],
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
        "bad header": raw[:8] + b"{" * n + raw[8 + n:],
        "empty": b"",
    }[damage]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    model = _gpt()
    before = _state(model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(model, bad)
    _assert_unchanged(model, before)


def test_mismatched_models_and_states(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(_adapted_gpt(), path)
    # adapters on other layers
    other = _gpt()
    inject(other, lr.LoRAConfig(r=2, alpha=4.0), targets="q", rng=0)
    with pytest.raises(ValueError, match="do not match"):
        load_adapter(other, path)
    # same layers, another config (alpha differs): the file's scaling must not be silently lost
    other = _gpt()
    inject(other, lr.LoRAConfig(r=2, alpha=5.0), targets=("attn", "fc"),
           ranks={"blocks.1.*": 3, "o": 1}, alphas={"v": 7.0}, rng=0)
    with pytest.raises(ValueError, match="config differs"):
        load_adapter(other, path)
    # merged layers
    model = _adapted_gpt()
    model.get_submodule("blocks.1.mlp.fc").merge()
    before = _state(model)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(model, path)
    _assert_unchanged(model, before)
    with pytest.raises(FileNotFoundError):
        load_adapter(_gpt(), tmp_path / "nope.safetensors")


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(_gpt(), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="JSON"):
        save_adapter(_adapted_gpt(), tmp_path / "x.safetensors", metadata={"f": object()})
    with pytest.raises(TypeError, match="metadata"):
        save_adapter(_adapted_gpt(), tmp_path / "x.safetensors", metadata="notes")
    with pytest.raises(TypeError, match="model_or_layer"):
        save_adapter({"A": np.ones(2)}, tmp_path / "x.safetensors")
    assert not any(p.name.endswith(".safetensors") for p in tmp_path.iterdir())


@requires_cuda
@pytest.mark.gpu
def test_cuda_model_saves_and_loads(tmp_path):
    from lowrank_gpu.nn.gpt import from_numpy

    model = _adapted_gpt()
    save_adapter(model, tmp_path / "np.safetensors")
    tm = from_numpy(_gpt(), device="cuda")
    load_adapter(tm, tmp_path / "np.safetensors")
    assert all(p.is_cuda for p in tm.parameters())
    assert_close(tm(torch.tensor(IDX, device="cuda")), model.forward(IDX), "cuda model from numpy file")
    save_adapter(tm, tmp_path / "cuda.safetensors")
    back = _gpt()
    load_adapter(back, tmp_path / "cuda.safetensors")
    np.testing.assert_array_equal(back.forward(IDX), model.forward(IDX))
