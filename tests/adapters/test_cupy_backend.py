"""backend="cupy": the reference's own LoRA array code on CuPy arrays.

Without CuPy (as on CI) the GPU checks skip visibly, and asking for the backend must say what
to install."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import assert_close, requires_cupy

import lowrank_ref as lr
from lowrank_ref.nn.module import array_module


def _layer(rng, dropout=0.0):
    base = lr.nn.Linear.from_arrays(rng.standard_normal((6, 5)), rng.standard_normal(6))
    layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=3, alpha=6, dropout=dropout), rng=rng)
    layer.B.data = rng.standard_normal(layer.B.shape)  # non-zero ΔW
    return layer


def test_array_module_is_numpy_for_numpy_arrays():
    assert array_module(np.zeros(3)) is np


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cupy_backend_without_cupy_says_what_to_install():
    base = lr.nn.Linear.from_arrays(np.ones((2, 3)))
    with pytest.raises(ImportError, match=r"pip install 'lowrank-ref\[cupy\]'"):
        lr.adapt(base, lr.LoRAConfig(r=1), backend="cupy")


@requires_cupy
def test_cupy_lora_matches_numpy_forward_backward_and_merge():
    import cupy as cp

    rng = np.random.default_rng(0)
    ref = _layer(rng)
    x = rng.standard_normal((4, 5))
    dy = rng.standard_normal((4, 6))
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dy)

    base = lr.nn.Linear.from_arrays(ref.base.weight.data, ref.base.bias.data)
    gpu = lr.adapt(base, ref.config, backend="cupy")
    gpu.A.data, gpu.B.data = cp.asarray(ref.A.data), cp.asarray(ref.B.data)
    y = gpu.forward(cp.asarray(x))
    dx = gpu.backward(cp.asarray(dy))
    assert array_module(y) is cp and array_module(gpu.A.grad) is cp
    assert_close(cp.asnumpy(y), y_ref, "y", 1e-10, 1e-12)
    assert_close(cp.asnumpy(dx), dx_ref, "dx", 1e-10, 1e-12)
    assert_close(cp.asnumpy(gpu.A.grad), ref.A.grad, "dA", 1e-10, 1e-12)
    assert_close(cp.asnumpy(gpu.B.grad), ref.B.grad, "dB", 1e-10, 1e-12)
    W0 = cp.asnumpy(gpu.base.weight.data).copy()
    gpu.merge()
    assert_close(cp.asnumpy(gpu.forward(cp.asarray(x))), y_ref, "merged y", 1e-10, 1e-12)
    gpu.unmerge()
    np.testing.assert_array_equal(cp.asnumpy(gpu.base.weight.data), W0)


@requires_cupy
def test_cupy_dropout_mask_stays_on_the_device():
    import cupy as cp

    layer = _layer(np.random.default_rng(1), dropout=0.5)
    layer.base.weight.data = cp.asarray(layer.base.weight.data)
    layer.base.bias.data = cp.asarray(layer.base.bias.data)
    layer.A.data, layer.B.data = cp.asarray(layer.A.data), cp.asarray(layer.B.data)
    y = layer.train().forward(cp.ones((8, 5)))
    layer.backward(cp.ones((8, 6)))
    assert array_module(y) is cp
