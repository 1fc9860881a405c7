"""KronA's own math: the size rule and its errors (a side that does not divide names the
dimension and the divisors that would work), gradcheck of A, B and x, the hand-derived backward
against torch autograd through ``torch.kron``, the init (A Kaiming, B = 0, ΔW = 0; both factors
get gradients after one step), rank(A ⊗ B) = rank(A)·rank(B) reached by the layer (Hypothesis).
The generic life-cycle checks are the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters import KronALinear
from lowrank_ref.adapters.krona import krona_backward, krona_forward, krona_shapes
from lowrank_ref.gradcheck import gradcheck

RTOL, ATOL = TOL["float64"]


def make_layer(rng, out=8, inn=6, cfg=None):
    W = rng.standard_normal((out, inn))
    layer = KronALinear(lr.nn.Linear.from_arrays(W, rng.standard_normal(out)), cfg or lr.KronAConfig(scale=2.0), rng=0)
    for p in layer.trainable_parameters().values():
        p.data = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
    return layer


@pytest.mark.parametrize("cfg, inn, out, want", [
    (lr.KronAConfig(), 768, 768, {"A": (24, 24), "B": (32, 32)}),  # REFERENCES §1.1: 24·32 = 768
    (lr.KronAConfig(), 6, 8, {"A": (2, 2), "B": (4, 3)}),
    (lr.KronAConfig(), 7, 9, {"A": (3, 1), "B": (3, 7)}),  # 7 is prime: 1 · 7
    (lr.KronAConfig(a_out=4, a_in=3), 6, 8, {"A": (4, 3), "B": (2, 2)}),
])
def test_size_rule(cfg, inn, out, want):
    assert krona_shapes(cfg, inn, out) == want


def test_a_side_that_does_not_divide_names_the_dimension_and_the_divisors():
    base = lr.nn.Linear.from_arrays(np.ones((8, 6)))
    with pytest.raises(ValueError, match=r"a_out=3 does not divide out_features=8.*\[1, 2, 4, 8\]"):
        KronALinear(base, lr.KronAConfig(a_out=3))
    with pytest.raises(ValueError, match=r"a_in=4 does not divide in_features=6.*\[1, 2, 3, 6\]"):
        KronALinear(base, lr.KronAConfig(a_in=4))
    assert base.weight.trainable  # nothing half-built: the base is as it was
    for kw, kind in [({"a_out": 0}, ValueError), ({"a_in": 2.0}, TypeError), ({"scale": float("nan")}, ValueError)]:
        with pytest.raises(kind, match=next(iter(kw))):
            lr.KronAConfig(**kw)


@pytest.mark.parametrize("cfg", [lr.KronAConfig(scale=2.0), lr.KronAConfig(a_out=4, a_in=3, scale=0.5)])
def test_gradcheck_and_autograd(cfg):
    rng = np.random.default_rng(1)
    layer = make_layer(rng, cfg=cfg)
    report = gradcheck(layer, rng.standard_normal((2, 3, 6)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "A", "B"}
    x, w = rng.standard_normal((5, 6)), rng.standard_normal((5, 8))
    params = {"W": layer.base.weight.data, "b": layer.base.bias.data, "A": layer.A.data, "B": layer.B.data}
    y, cache = krona_forward(x, params, cfg)
    dx, grads = krona_backward(w, cache)
    At, Bt = (torch.tensor(params[n], requires_grad=True) for n in ("A", "B"))
    xt = torch.tensor(x, requires_grad=True)
    yt = xt @ (torch.tensor(params["W"]) + cfg.scale * torch.kron(At, Bt)).T + torch.tensor(params["b"])
    (yt * torch.tensor(w)).sum().backward()
    assert_close(y, yt, "y vs dense (torch.kron)", RTOL, ATOL)
    assert_close(dx, xt.grad, "x̄ vs autograd", RTOL, ATOL)
    assert_close(grads["A"], At.grad, "Ā vs autograd", RTOL, ATOL)
    assert_close(grads["B"], Bt.grad, "B̄ vs autograd", RTOL, ATOL)


def test_init_one_factor_zero_and_both_train_after_a_step():
    rng = np.random.default_rng(2)
    layer = KronALinear(lr.nn.Linear.from_arrays(rng.standard_normal((8, 6))), lr.KronAConfig(), rng=0)
    assert layer.A.data.any() and not layer.B.data.any()
    assert np.abs(layer.A.data).max() <= 1 / np.sqrt(layer.A.shape[1])  # U(±1/√a_in)
    np.testing.assert_array_equal(layer.delta_weight(), 0)
    x = rng.standard_normal((4, 6))
    layer.forward(x)
    layer.backward(rng.standard_normal((4, 8)))
    assert not layer.A.grad.any() and layer.B.grad.any()  # B = 0: Ā = 0 on the first step only
    layer.B.data -= 0.1 * layer.B.grad
    layer.A.grad = None
    layer.forward(x)
    layer.backward(rng.standard_normal((4, 8)))
    assert layer.A.grad.any()


@settings(max_examples=10, deadline=None)
@given(out=st.sampled_from([4, 6, 8, 12]), inn=st.sampled_from([4, 6, 9, 10]), seed=st.integers(0, 2**16))
def test_the_update_reaches_rank_a_times_rank_b(out, inn, seed):
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, out, inn, lr.KronAConfig())
    rank = np.linalg.matrix_rank
    assert rank(layer.delta_weight()) == rank(layer.A.data) * rank(layer.B.data) == layer.r
