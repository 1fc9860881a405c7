"""backend="cupy" for DoRA: the reference's own DoRA array code on CuPy arrays (forward, both
backward passes, merge, the dropout mask drawn on the device). Skips visibly without CuPy and a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, requires_cupy

import lowrank_ref as lr
from lowrank_ref.nn.module import array_module


def _layer(rng, dropout=0.0, detach_norm=True):
    base = lr.nn.Linear.from_arrays(rng.standard_normal((6, 5)), rng.standard_normal(6))
    cfg = lr.DoRAConfig(r=3, alpha=6, dropout=dropout, detach_norm=detach_norm)
    layer = lr.adapters.DoRALinear(base, cfg, rng=rng)
    layer.B.data = rng.standard_normal(layer.B.shape)  # non-zero ΔW
    layer.m.data = layer.m.data * rng.uniform(0.5, 1.5, 6)  # m ≠ n
    return layer


@requires_cupy
@pytest.mark.parametrize("detach", [True, False])
def test_cupy_dora_matches_numpy_forward_backward_and_merge(detach):
    import cupy as cp

    rng = np.random.default_rng(0)
    ref = _layer(rng, detach_norm=detach)
    x = rng.standard_normal((4, 5))
    dy = rng.standard_normal((4, 6))
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dy)

    base = lr.nn.Linear.from_arrays(ref.base.weight.data, ref.base.bias.data)
    gpu = lr.adapt(base, ref.config, backend="cupy")
    gpu.A.data, gpu.B.data, gpu.m.data = cp.asarray(ref.A.data), cp.asarray(ref.B.data), cp.asarray(ref.m.data)
    y = gpu.forward(cp.asarray(x))
    dx = gpu.backward(cp.asarray(dy))
    assert array_module(y) is cp and array_module(gpu.A.grad) is cp and array_module(gpu.m.grad) is cp
    assert_close(cp.asnumpy(y), y_ref, "y", 1e-10, 1e-12)
    assert_close(cp.asnumpy(dx), dx_ref, "dx", 1e-10, 1e-12)
    for k in ("A", "B", "m"):
        assert_close(cp.asnumpy(getattr(gpu, k).grad), getattr(ref, k).grad, f"d{k}", 1e-10, 1e-12)
    assert_close(cp.asnumpy(gpu.weight_norm()), ref.weight_norm(), "n", 1e-10, 1e-12)
    W0 = cp.asnumpy(gpu.base.weight.data).copy()
    gpu.merge()
    assert_close(cp.asnumpy(gpu.forward(cp.asarray(x))), y_ref, "merged y", 1e-10, 1e-12)
    gpu.unmerge()
    np.testing.assert_array_equal(cp.asnumpy(gpu.base.weight.data), W0)


@requires_cupy
def test_cupy_dora_dropout_mask_stays_on_the_device():
    import cupy as cp

    layer = _layer(np.random.default_rng(1), dropout=0.5)
    layer.base.weight.data = cp.asarray(layer.base.weight.data)
    layer.base.bias.data = cp.asarray(layer.base.bias.data)
    layer.A.data, layer.B.data, layer.m.data = (cp.asarray(layer.A.data), cp.asarray(layer.B.data),
                                                cp.asarray(layer.m.data))
    layer.clear_norm_cache()
    y = layer.train().forward(cp.ones((8, 5)))
    dx = layer.backward(cp.ones((8, 6)))
    assert array_module(y) is cp and array_module(dx) is cp
    assert bool(cp.all(cp.isfinite(y))) and bool(cp.all(cp.isfinite(layer.A.grad)))


def test_dropout_mask_comes_from_the_inputs_array_module(monkeypatch):
    """Runs without a GPU: for a non-NumPy array module the mask is drawn from that module's
    generator (``xp.random.random``), never from the layer's NumPy ``rng`` (a NumPy mask times a
    CuPy array is an error)."""
    import lowrank_ref.adapters.dora as dora_mod
    from lowrank_ref.adapters.dora import dora_forward

    shapes = []

    class FakeXP:
        class random:
            @staticmethod
            def random(shape):
                shapes.append(shape)
                return np.tile([0.9, 0.1], (shape[0], 3))[:, : shape[1]]  # keep, drop, keep, drop, keep

    class NoRNG:
        def random(self, *a, **k):
            raise AssertionError("the NumPy rng was used for a non-NumPy array")

    layer = _layer(np.random.default_rng(2), dropout=0.5)
    layer.rng = NoRNG()
    monkeypatch.setattr(dora_mod, "array_module", lambda a: FakeXP)
    x = np.random.default_rng(3).standard_normal((4, 5))
    y = layer.train().forward(x)
    assert shapes == [(4, 5)]
    mask = np.tile([2.0, 0.0, 2.0, 0.0, 2.0], (4, 1))  # kept entries scaled by 1/(1−p)
    params = {"W": layer.base.weight.data, "b": layer.base.bias.data, "A": layer.A.data, "B": layer.B.data,
              "m": layer.m.data}
    assert_close(y, dora_forward(x, params, layer.config, mask=mask)[0], "y with the module's mask")
