"""SSF's own math: a hand-computed forward and merge; identity at the exact init, not at the
reference's Gaussian init (whose moments are checked); gradcheck of γ, β and x with and without
a bias, against torch autograd too; a bias-less base refuses merge() and stays unchanged; bad
configs; the compare row injects after every linear layer but the head. The generic life-cycle
checks (state errors, cycles, save/load, bad inputs) are the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import SSFLinear
from lowrank_ref.adapters.ssf import SPEC
from lowrank_ref.gradcheck import gradcheck

torch = pytest.importorskip("torch")
BACKENDS = ["numpy", "torch"]


def _np(a):
    if hasattr(a, "detach"):
        return a.detach().numpy()
    return a.data if isinstance(a, lr.nn.module.Parameter) else np.asarray(a)


def _set(layer, name, value):
    p = getattr(layer, name)
    if hasattr(p, "detach"):
        with torch.no_grad():
            p.copy_(torch.as_tensor(value, dtype=p.dtype))
    else:
        p.data = np.asarray(value, dtype=p.data.dtype)


def _run(layer, x):
    return _np(layer(torch.from_numpy(x)) if hasattr(layer, "gamma") and hasattr(layer.gamma, "detach")
               else layer.forward(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hand_computed_forward_and_merge(backend):
    # W0 = [[1, 2], [3, 4]], b = [1, -1], x = [1, 1]: z = [4, 6]; γ = [2, 0.5], β = [0.1, 0.2]:
    # y = [2·4 + 0.1, 0.5·6 + 0.2] = [8.1, 3.2]; W' = [[2, 4], [1.5, 2]], b' = [2·1 + 0.1, 0.5·(-1) + 0.2]
    base = lr.nn.Linear.from_arrays(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0]))
    layer = lr.adapt(base, lr.SSFConfig(), backend=backend, method="ssf")
    _set(layer, "gamma", [2.0, 0.5])
    _set(layer, "beta", [0.1, 0.2])
    x = np.array([[1.0, 1.0]])
    assert_close(_run(layer, x), np.array([[8.1, 3.2]]), "y")
    assert_close(_np(layer.merged_weight()), np.array([[2.0, 4.0], [1.5, 2.0]]), "W'")
    assert_close(_np(layer.merged_bias()), np.array([2.1, -0.3]), "b'")
    assert_close(_np(layer.delta_weight()), np.array([[1.0, 2.0], [-1.5, -2.0]]), "ΔW = diag(γ − 1) W0")
    layer.merge()
    assert_close(_run(layer, x), np.array([[8.1, 3.2]]), "merged y")
    layer.unmerge()
    np.testing.assert_array_equal(_np(layer.base.weight), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(_np(layer.base.bias), [1.0, -1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_init_is_the_base_bit_for_bit_and_normal_init_is_not(backend):
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((7, 5)), rng.standard_normal(7)
    x = rng.standard_normal((3, 5))
    ref = x @ W.T + b
    ident = lr.adapt(lr.nn.Linear.from_arrays(W.copy(), b.copy()), lr.SSFConfig(), backend=backend, method="ssf")
    np.testing.assert_array_equal(_np(ident.gamma), np.ones(7))
    np.testing.assert_array_equal(_np(ident.beta), np.zeros(7))
    base_y = _np(ident.base(torch.from_numpy(x))) if backend == "torch" else ident.base.forward(x)
    np.testing.assert_array_equal(_run(ident, x), base_y)  # γ·z + 0 with γ = 1: z exactly
    normal = lr.adapt(lr.nn.Linear.from_arrays(W.copy(), b.copy()), lr.SSFConfig(init="normal"),
                      backend=backend, method="ssf", rng=3)
    assert np.max(np.abs(_run(normal, x) - ref)) > 1e-3  # the reference init is not a no-op


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_normal_init_has_the_reference_moments(backend):
    """γ ~ N(1, 0.02²), β ~ N(0, 0.02²) (dongzelian/SSF init_ssf_scale_shift): over 20000 draws the
    sample mean is within 5 standard errors and the sample std within 5% of 0.02."""
    n = 20000
    base = lr.nn.Linear.from_arrays(np.zeros((n, 1)), np.zeros(n))
    layer = lr.adapt(base, lr.SSFConfig(init="normal"), backend=backend, method="ssf", rng=5)
    for name, mean in (("gamma", 1.0), ("beta", 0.0)):
        v = _np(getattr(layer, name)).astype(np.float64)
        assert abs(v.mean() - mean) < 5 * 0.02 / np.sqrt(n), name
        assert abs(v.std() / 0.02 - 1) < 0.05, name


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_gamma_beta_and_x_float64_and_torch_autograd(bias):
    rng = np.random.default_rng(1)
    W, b = rng.standard_normal((5, 4)), (rng.standard_normal(5) if bias else None)
    layer = SSFLinear(lr.nn.Linear.from_arrays(W, b), lr.SSFConfig(init="normal"), rng=2)
    layer.gamma.data = rng.uniform(-1.5, 1.5, 5)
    layer.beta.data = rng.standard_normal(5)
    x = rng.standard_normal((2, 3, 4))
    report = gradcheck(layer, x, rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"gamma", "beta", "input"}
    # the hand-derived backward against torch autograd on the same numbers
    dy = rng.standard_normal((2, 3, 5))
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(dy)
    Wt, xt = torch.from_numpy(W), torch.from_numpy(x).requires_grad_(True)
    gt = torch.from_numpy(layer.gamma.data.copy()).requires_grad_(True)
    bt = torch.from_numpy(layer.beta.data.copy()).requires_grad_(True)
    z = xt @ Wt.T + (0 if b is None else torch.from_numpy(b))
    ((gt * z + bt) * torch.from_numpy(dy)).sum().backward()
    assert_close(dx, xt.grad, "x̄")
    assert_close(layer.gamma.grad, gt.grad, "γ̄")
    assert_close(layer.beta.grad, bt.grad, "β̄")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_base_without_bias_refuses_merge_and_stays_unchanged(backend):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((4, 3))
    layer = lr.adapt(lr.nn.Linear.from_arrays(W.copy(), None), lr.SSFConfig(init="normal"),
                     backend=backend, method="ssf", rng=1)
    x = rng.standard_normal((2, 3))
    y = _run(layer, x)
    with pytest.raises(ValueError, match="base has no bias, so the shift β has nowhere to go"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(_np(layer.base.weight), W)
    np.testing.assert_array_equal(_run(layer, x), y)
    # the dense view still holds: x W'ᵀ + β
    assert_close(x @ _np(layer.merged_weight()).T + _np(layer.merged_bias()), y, "dense view", 1e-6, 1e-6)


@pytest.mark.parametrize("bad, err, match", [("zeros", ValueError, "init must be one of 'identity', 'normal'"),
                                             (1, TypeError, "init must be a string")])
def test_bad_init_is_named(bad, err, match):
    with pytest.raises(err, match=match):
        lr.SSFConfig(init=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_row_puts_ssf_after_every_linear_layer_but_the_head(backend):
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained

    row = SPEC.compare["ssf"]
    model = load_pretrained(backend=backend, progress=False)
    res = inject(model, row.config, targets=row.targets, method="ssf", **row.kwargs)
    c = model.config
    want = 2 * c.n_layer * (4 * c.d_model + c.d_model * c.mlp_ratio + c.d_model)  # γ and β of q k v o, fc, proj
    assert res.trainable_params == want
