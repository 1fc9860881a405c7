"""Wrong-state calls and failed constructors: clear errors, and nothing half-changed."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.nn.module import StateError

torch = pytest.importorskip("torch")


def _base(rng, out=5, inn=4):
    return lr.nn.Linear.from_arrays(rng.standard_normal((out, inn)), rng.standard_normal(out))


# a bad rng, a bad keyword, a late failure, for every registered method: tests/contract/
@pytest.mark.parametrize("make", [
    lambda b: lr.adapters.LoRALinear(b, lr.LoRAConfig(r=10, init="pissa")),  # r > min(in, out) for PiSSA
], ids=["pissa-rank-too-large"])
def test_a_failed_constructor_leaves_the_base_trainable_and_unchanged(make, rng):
    base = _base(rng)
    W = base.weight.data
    with pytest.raises((TypeError, ValueError)):
        make(base)
    assert base.weight.trainable and base.bias.trainable
    assert base.weight.data is W


def test_a_failed_torch_constructor_leaves_requires_grad(rng):
    import lowrank_gpu as lg

    tbase = torch.nn.Linear(4, 5)
    with pytest.raises((TypeError, ValueError)):
        lg.adapters.LoRALinear(tbase, lr.LoRAConfig(r=10, init="pissa"))
    assert tbase.weight.requires_grad and tbase.bias.requires_grad


def test_state_errors_are_value_errors_too(rng):
    layer = lr.adapters.LoRALinear(_base(rng), lr.LoRAConfig(r=2), rng=rng)
    with pytest.raises(ValueError, match="before forward"):
        layer.backward(np.ones((3, 5)))
    layer.merge()
    layer.forward(np.ones((3, 4)))
    with pytest.raises(StateError, match="merged"):
        layer.backward(np.ones((3, 5)))
    assert issubclass(StateError, ValueError) and issubclass(StateError, RuntimeError)


# the adapters, every registered method: tests/contract/test_layer_contract.py
@pytest.mark.parametrize("make", [
    lambda rng: _base(rng),
], ids=["linear"])
def test_dy_of_the_wrong_shape_is_named_and_keeps_the_cache(make, rng):
    layer = make(rng)
    x = rng.standard_normal((2, 3, 4))
    layer.forward(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 5\)"):
        layer.backward(np.ones((2, 3, 4)))
    dx = layer.backward(np.ones((2, 3, 5)))  # the cache survived the bad call
    assert dx.shape == x.shape
