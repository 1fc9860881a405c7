"""Files that cannot be trusted, through the one io path (our adapter files; PEFT folders share
the reader and are covered in test_peft_interop.py): the safetensors container is checked before
anything is read into memory, metadata that claims sizes is checked against the tensors and the
model before anything is built, values that overflow the model's dtype are refused, deep JSON is a
ValueError (never a RecursionError), and NaN/inf are refused when saving. Both backends."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import lowrank_ref as lr
from lowrank_ref import io as lio
from lowrank_ref.inject import inject
from lowrank_ref.io import load_adapter, read_adapter_metadata, read_safetensors, save_adapter
from lowrank_ref.nn.gpt import GPT, GPTConfig

GPT_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, d_model=8)
KEY = "base_model.model.blocks.0.attn.q.lora_A.weight"


def _model(backend, dtype=np.float64):
    m = GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=dtype)
    if backend == "numpy":
        return m
    from lowrank_gpu.nn.gpt import from_numpy

    return from_numpy(m)


def _adapted(backend="numpy", cfg=None, method=None, **kw):
    model = _model(backend)
    inject(model, cfg or lr.LoRAConfig(r=2, alpha=4.0), targets=("q", "v"), method=method, rng=0, **kw)
    return model


def _state(model):
    if isinstance(model, torch.nn.Module):
        return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}
    return {n: type(m) for n, m in model.named_modules()}, {k: v.copy() for k, v in model.state_dict().items()}


def _assert_same(model, before):
    after = _state(model)
    assert after[0] == before[0]
    for k, v in before[1].items():
        assert np.array_equal(np.asarray(after[1][k]), np.asarray(v)), k


def _rewrite(src, dst, layers_edit=None, tensors_edit=None, layers_text=None):
    with safe_open(str(src), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata())
    if layers_edit:
        layers = json.loads(header["layers"])
        layers_edit(layers)
        header["layers"] = json.dumps(layers)
    if layers_text is not None:
        header["layers"] = layers_text
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(dst), metadata=header)
    return dst


# --- the container: header length, JSON depth, every tensor's byte range -------------------------
def _raw(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


GOOD = {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
CONTAINERS = {
    "header longer than the file": (struct.pack("<Q", 10**12) + b"{}", "claims 1000000000000 bytes"),
    "range past the data": (_raw({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8),
                            "the data holds 8"),
    "range of the wrong size": (_raw({"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16),
                                "for 64 bytes"),
    "a huge shape in a small file": (_raw({"t": {"dtype": "F64", "shape": [20_000_000, 8], "data_offsets": [0, 16]}},
                                          b"\0" * 16), "for 1280000000 bytes"),
    "overlapping tensors": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    "unknown dtype": (_raw({"t": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16), "known dtype"),
    "negative dim": (_raw({"t": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\0" * 16), "shape"),
    "bool dim": (_raw({"t": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, b"\0" * 16), "shape"),
    "metadata not strings": (_raw({"__metadata__": {"layers": {"a": 1}}, **GOOD}, b"\0" * 16), "strings to strings"),
    "deep header": (struct.pack("<Q", 200_002) + b"[" * 100_001 + b"]" * 100_001, "nests 100001 levels"),
    "header not an object": (_raw([1, 2], b""), "not a JSON object"),
    "not utf-8": (struct.pack("<Q", 2) + b"\xff\xfe", "UTF-8"),
}


@pytest.mark.parametrize("case", list(CONTAINERS))
def test_the_container_is_checked_before_it_is_read(tmp_path, case):
    raw, match = CONTAINERS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match) as err:
            read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "is not a readable safetensors file" in str(err.value)
    assert peak < 64 << 20  # nothing the header claims was allocated


def test_the_reader_agrees_with_safetensors_and_reads_bfloat16(tmp_path):
    from safetensors.torch import save_file as save_torch

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5).astype(np.float32),
               "c": np.arange(6, dtype=np.int32).reshape(2, 3), "e": np.zeros((0, 4))}
    save_file(tensors, str(tmp_path / "n.safetensors"), metadata={"k": "v"})
    got, meta = read_safetensors(tmp_path / "n.safetensors")
    assert meta == {"k": "v"} and set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    bf = torch.randn(4, 3).to(torch.bfloat16)
    save_torch({"w": bf}, str(tmp_path / "bf.safetensors"))
    got, _ = read_safetensors(tmp_path / "bf.safetensors")
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], bf.float().numpy())  # bf16 -> f32 is exact


def test_a_header_larger_than_the_cap_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_adapter(_adapted(), path)
    monkeypatch.setattr(lio, "MAX_HEADER_BYTES", 64)
    with pytest.raises(ValueError, match="larger than the 64 bytes read"):
        read_safetensors(path)


# --- the metadata: deep, malformed, or claiming sizes that the file does not hold ------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("what", ["layers", "user_metadata"])
def test_deeply_nested_metadata_is_a_value_error_not_a_recursion_error(tmp_path, backend, what):
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted(backend), good)
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(good), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata())
    header[what] = "[" * 100_000 + "]" * 100_000
    save_file(tensors, str(bad), metadata=header)
    model = _model(backend)
    before = _state(model)
    with pytest.raises(ValueError, match="nests 100000 levels"):
        load_adapter(model, bad)
    _assert_same(model, before)


@pytest.mark.parametrize("text, match", [
    ('{"blocks.0.attn.q": NaN}', "not JSON"),  # NaN is not JSON
    ('{"blocks.0.attn.q": {"method": "lora", "config": {"config_class": "LoRAConfig", "r": [2]}, '
     '"tensors": {}}}', "bad config.*r must be a positive integer"),
    ('{"blocks.0.attn.q": {"method": 3, "config": {}, "tensors": {}}}', "needs 'method'"),
    ('{"blocks.0.attn.q": {"method": "lora", "config": {}, "tensors": {"A": {"key": "k", "dtype": "float64",'
     ' "shape": [true, 8]}}}}', "needs key, shape, dtype"),
])
def test_malformed_layers_metadata_is_a_value_error(tmp_path, text, match):
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted(), good)
    bad = _rewrite(good, tmp_path / "bad.safetensors", layers_text=text)
    model = _model("numpy")
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, bad)
    _assert_same(model, before)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_a_huge_rank_in_a_small_file_is_refused_before_anything_is_built(tmp_path, backend, method):
    cfg = {"lora": lr.LoRAConfig(r=2, alpha=4.0), "dora": lr.DoRAConfig(r=2, alpha=4.0),
           "qlora": lr.LoRAConfig(r=2, alpha=4.0)}[method]
    kw = {"blocksize": 16} if method == "qlora" else {}
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted(backend, cfg, method=method, **kw), good)

    def huge(layers):
        for m in layers.values():
            m["config"]["r"] = 20_000_000  # A would be 20e6 x 8: 1.28 GB in float64

    bad = _rewrite(good, tmp_path / "bad.safetensors", layers_edit=huge)
    assert bad.stat().st_size < 8000
    model = _model(backend)
    before = _state(model)
    # lora and dora declare SPEC.shapes (an exact check); qlora does not (the generic bound)
    match = "config needs \\(20000000, 8\\)" if method != "qlora" else "r=20000000 is larger than"
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            load_adapter(model, bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    _assert_same(model, before)


# --- values: overflow on the cast, NaN/inf at save time ---------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_values_that_overflow_the_models_dtype_are_refused(tmp_path, backend):
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted("numpy"), good)  # float64 tensors

    def big(t):
        t[KEY] = t[KEY].copy()
        t[KEY][1, 3] = -1e300

    bad = _rewrite(good, tmp_path / "bad.safetensors", tensors_edit=big)
    model = _model(backend, dtype=np.float32)
    before = _state(model)
    with pytest.raises(ValueError, match="magnitude 1e\\+300 overflows the layer's .*float32"):
        load_adapter(model, bad)
    _assert_same(model, before)
    # a value float32 holds still loads
    fine = _rewrite(good, tmp_path / "fine.safetensors", tensors_edit=lambda t: t[KEY].__setitem__((1, 3), 3e38))
    load_adapter(_model(backend, dtype=np.float32), fine)


def test_bfloat16_model_refuses_what_bfloat16_cannot_hold(tmp_path):
    base = torch.nn.Linear(4, 3, dtype=torch.bfloat16)
    layer = lr.adapt(base, lr.LoRAConfig(r=2), backend="torch", rng=0)
    save_adapter(layer, tmp_path / "a.safetensors")  # stored as float32

    def big(t):
        k = "base_model.model.lora_B.weight"
        t[k] = t[k].copy()
        t[k][0, 0] = 3.39e38 * 1.001  # finite in float32, beyond bfloat16's largest (3.39e38)

    bad = _rewrite(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tensors_edit=big)
    with pytest.raises(ValueError, match="overflows the layer's torch.bfloat16"):
        load_adapter(layer, bad)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_saving_nan_or_inf_is_refused_and_writes_nothing(tmp_path, backend, value):
    model = _adapted(backend, lr.DoRAConfig(r=2, alpha=4.0))
    layer = model.get_submodule("blocks.0.attn.v")
    if backend == "numpy":
        layer.m.data[2] = value
    else:
        with torch.no_grad():
            layer.m[2] = float(value)
    with pytest.raises(ValueError, match="cannot save .*blocks.0.attn.v.lora_magnitude_vector.*NaN or inf"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_shapes_declared_by_specs_are_what_the_layers_hold():
    from lowrank_ref import registry

    checked = 0
    for spec in registry.methods().values():
        if spec.shapes is None or not spec.is_layer:
            continue
        ex = spec.example()
        for backend in ("numpy", "torch"):
            W = np.random.default_rng(0).standard_normal((ex.out_features, ex.in_features))
            b = np.zeros(ex.out_features) if ex.bias else None
            layer = lr.adapt(lr.nn.Linear.from_arrays(W, b), ex.config, backend=backend, rng=0, **ex.kwargs)
            held = {n: tuple(v.shape) for n, v in layer.adapter_state().items()}
            assert held == spec.shapes(ex.config, ex.in_features, ex.out_features), (spec.name, backend)
            checked += 1
    assert checked >= 4  # lora and dora, both backends


def test_metadata_read_back_is_checked_too(tmp_path):
    good = tmp_path / "good.safetensors"
    save_adapter(_adapted(), good)
    meta = read_adapter_metadata(good)
    assert meta["layers"]["blocks.0.attn.q"]["config"]["r"] == 2
    bad = _rewrite(good, tmp_path / "bad.safetensors", layers_text="[" * 50 + "]" * 50)
    with pytest.raises(ValueError, match="nests 50 levels"):
        read_adapter_metadata(bad)


def test_metadata_too_deep_to_load_is_refused_at_save(tmp_path):
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValueError, match="metadata nests 42 levels deep; files keep at most 32"):
        save_adapter(_adapted(), tmp_path / "a.safetensors", metadata={"d": deep})
    assert list(tmp_path.iterdir()) == []
    save_adapter(_adapted(), tmp_path / "b.safetensors", metadata={"d": [[[1]]]})
    assert read_adapter_metadata(tmp_path / "b.safetensors")["user"] == {"d": [[[1]]]}
