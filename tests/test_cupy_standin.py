"""``backend="cupy"`` for whole models, proven without a GPU: the small GPT with every registered
method injected trains through the reference's own code (every nn layer, every hand-written
backward, the optimizer, the training loop and the methods' training hooks) on the CPU stand-in for
CuPy (``tests/xp_standin.py``), which fails on any call that bypasses the array module — and gives
the same losses and the same trained tensors as the NumPy run, to the last bit (in float64; in
float32 the NumPy GELU takes a fused fast path that a device array does not)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from xp_standin import Bypass, DeviceArray, standin, to_device

from lowrank_ref import registry
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.nn.module import array_module, to_array_module
from lowrank_ref.train import train

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8, dropout=0.1)
DATA = np.random.default_rng(3).integers(0, 11, 400)


# --- the stand-in refuses what CuPy refuses, so the test below can fail ----------------------
def test_the_standin_refuses_every_bypass():
    a = standin.asarray(np.ones((2, 3), dtype=np.float32))
    assert isinstance(a, DeviceArray) and array_module(a) is standin
    with pytest.raises(Bypass, match="implicit conversion"):
        np.asarray(a)
    with pytest.raises(Bypass, match="host numpy.ndarray"):
        a + np.ones(3, dtype=np.float32)
    with pytest.raises(Bypass, match="host numpy.ndarray"):
        np.einsum("ij,j->i", a, np.ones(3))
    import scipy.special

    with pytest.raises(Bypass, match="not a NumPy ufunc"):
        scipy.special.erf(a)
    # what goes through the array module works, and comes back with .get()
    b = np.exp(a) * 2 + standin.zeros((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(b.get(), np.exp(np.ones((2, 3), dtype=np.float32)) * 2)


def _methods():
    """Every layer method, and every whole-model mode that adds tensors of its own (an example
    config: prompt and prefix tuning)."""
    out = []
    for spec in registry.methods().values():
        if spec.numpy is None and spec.example is None:
            continue
        out.append(spec.name)
    return out


def _build(method: str, vocab: int = CFG.vocab_size, n_tasks: int | None = None):
    import dataclasses

    model = GPT(dataclasses.replace(CFG, vocab_size=vocab), rng=np.random.default_rng(0), dtype=np.float64)  # float64: NumPy's float32 GELU fast path is NumPy-only
    spec = registry.get_method(method)
    if not spec.is_layer:
        inject(model, None if spec.example is None else spec.example().config, method=method, rng=1)
        return model
    row = next(iter(spec.compare.values()), None)
    config = spec.example().config
    if n_tasks is not None:  # a conditional method, on the multi-task data's tasks
        config = dataclasses.replace(config, n_tasks=n_tasks)
    targets = row.targets if row is not None else ("q", "v")
    kwargs = dict(row.kwargs) if row is not None else {}
    inject(model, config, targets=targets, method=method, rng=1, **kwargs)
    return model


def _host(a):
    return a.get() if isinstance(a, DeviceArray) else np.asarray(a)


def _conditional(method: str) -> bool:
    spec = registry.get_method(method)
    return spec.is_layer and bool(getattr(registry.load_object(spec.numpy), "takes_condition", False))


@pytest.mark.parametrize("method", _methods())
def test_every_method_trains_on_the_standin_as_on_numpy(method):
    data = DATA
    if _conditional(method):  # a task id per row: train on the multi-task data, which passes cond=
        from lowrank_ref.data import multitask_data

        data = multitask_data(0, n_train=60, n_heldout=10)
    host = (_build(method, vocab=data.vocab_size, n_tasks=data.n_tasks) if data is not DATA else _build(method))
    dev = to_device(copy.deepcopy(host))
    assert all(isinstance(p.data, DeviceArray) for p in dev.parameters().values())
    r_host = train(host, data, 3, lr=1e-2, batch_size=2, rng=0, progress=False)
    r_dev = train(dev, data, 3, lr=1e-2, batch_size=2, rng=0, progress=False)
    assert r_dev.losses == r_host.losses
    got = dev.parameters()
    for name, p in host.parameters().items():
        assert isinstance(got[name].data, DeviceArray), f"{name} left the device"
        np.testing.assert_array_equal(_host(got[name].data), p.data, err_msg=name)


def test_moving_back_to_numpy_gives_plain_arrays():
    model = to_device(_build("lora"))
    to_array_module(model, np)
    assert all(type(p.data) is np.ndarray for p in model.parameters().values())
    logits = model.forward(DATA[:16].reshape(2, 8))
    assert type(logits) is np.ndarray


def test_train_cli_backend_cupy_trains_the_reference_on_device_arrays(tmp_path, monkeypatch):
    """``lowrank-ref train --backend cupy`` with the stand-in as CuPy: the whole run (training,
    evaluation, checkpoint, adapter folder) goes through it, and equals the NumPy run (float32: to
    rounding, since NumPy's float32 GELU takes a fused fast path)."""
    import json

    import lowrank_ref.backend as backend_mod
    from lowrank_ref.cli import main

    monkeypatch.setattr(backend_mod, "require_cupy", lambda: standin)
    common = ["train", "--steps", "3", "--batch-size", "2", "--block-size", "8", "--quiet",
              "--method", "lora", "--set", "r=2"]
    main([*common, "--backend", "cupy", "--out", str(tmp_path / "cupy")])
    main([*common, "--backend", "numpy", "--out", str(tmp_path / "numpy")])
    a = json.loads((tmp_path / "cupy" / "metrics.json").read_text())
    b = json.loads((tmp_path / "numpy" / "metrics.json").read_text())
    assert a["backend"] == "cupy"
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    from safetensors.numpy import load_file

    ta = load_file(str(tmp_path / "cupy" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "numpy" / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6)
    # a cupy checkpoint resumes on the same loop: run on to 4 steps
    main([*common[:2], "4", *common[3:], "--backend", "cupy", "--out", str(tmp_path / "cupy")])
    assert json.loads((tmp_path / "cupy" / "metrics.json").read_text())["resumed_from"] == 3


def test_longloras_shifted_sparse_attention_trains_on_the_standin_as_on_numpy():
    import dataclasses

    cfg = dataclasses.replace(CFG, dropout=0.1)  # T = 8: four groups of 2, dropout inside them
    host = GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64, attention="s2")
    inject(host, registry.get_method("lora").example().config, targets=("q", "v"), rng=0)
    dev = to_device(copy.deepcopy(host))
    r_host = train(host, DATA, 3, lr=1e-2, batch_size=2, rng=0, progress=False)
    r_dev = train(dev, DATA, 3, lr=1e-2, batch_size=2, rng=0, progress=False)
    assert r_dev.losses == r_host.losses
    for name, p in host.parameters().items():
        np.testing.assert_array_equal(_host(dev.parameters()[name].data), p.data, err_msg=name)
