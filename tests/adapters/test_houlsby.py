"""Houlsby adapters' own math: hand-computed forwards (ReLU, GELU); the exact identity at the
``zero_up`` init and the first step's gradients there; the truncated Gaussian of the init (bound and
std); gradcheck of every tensor with both activations, with and without a bias, and torch autograd
on the same numbers; a bottleneck wider than the layer and bad configs are named errors; merge()
says why it is refused; the compare row wraps o and proj. The generic life-cycle checks (state
errors, the non-mergeable contract, save/load, bad inputs) are the contract tests'."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import HoulsbyLinear
from lowrank_ref.adapters.houlsby import SPEC
from lowrank_ref.gradcheck import gradcheck

torch = pytest.importorskip("torch")
BACKENDS = ["numpy", "torch"]
NAMES = ("W_down", "b_down", "W_up", "b_up")


def _np(a):
    if hasattr(a, "detach"):
        return a.detach().numpy()
    return a.data if isinstance(a, lr.nn.module.Parameter) else np.asarray(a)


def _set(layer, name, value):
    p = getattr(layer, name)
    if hasattr(p, "detach"):
        with torch.no_grad():
            p.copy_(torch.as_tensor(np.asarray(value), dtype=p.dtype))
    else:
        p.data = np.asarray(value, dtype=p.data.dtype)


def _run(layer, x):
    if isinstance(layer, torch.nn.Module):
        return _np(layer(torch.from_numpy(x)))
    return layer.forward(x)


def _layer(backend, W, b, cfg, rng=0):
    return lr.adapt(lr.nn.Linear.from_arrays(W.copy(), None if b is None else b.copy()), cfg,
                    backend=backend, method="houlsby", rng=rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_hand_computed_forward(backend, activation):
    # W0 = I, b = 0, x = [1, -2]: h = [1, -2]. m = 1, W_down = [[1, 0]], b_down = 0.5: a = 1.5;
    # W_up = [[2], [1]], b_up = [0.1, 0]: y = h + f(1.5) [2, 1] + [0.1, 0]
    layer = _layer(backend, np.eye(2), np.zeros(2), lr.HoulsbyConfig(bottleneck=1, activation=activation))
    for n, v in (("W_down", [[1.0, 0.0]]), ("b_down", [0.5]), ("W_up", [[2.0], [1.0]]), ("b_up", [0.1, 0.0])):
        _set(layer, n, v)
    f = 1.5 if activation == "relu" else 1.5 * 0.5 * (1 + math.erf(1.5 / math.sqrt(2)))
    want = np.array([[1 + 2 * f + 0.1, -2 + f]])
    assert_close(_run(layer, np.array([[1.0, -2.0]])), want, "y")
    # a negative pre-activation: ReLU passes nothing, so y = h + b_up
    _set(layer, "b_down", [-1.5])  # a = -0.5
    if activation == "relu":
        assert_close(_run(layer, np.array([[1.0, -2.0]])), np.array([[1.1, -2.0]]), "y, ReLU off")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_up_init_is_the_base_exactly_and_the_first_step_trains_only_the_up_side(backend):
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((6, 4)), rng.standard_normal(6)
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 6))
    layer = _layer(backend, W, b, lr.HoulsbyConfig(bottleneck=3))
    assert np.all(_np(layer.W_up) == 0) and np.all(_np(layer.b_up) == 0) and np.all(_np(layer.b_down) == 0)
    assert np.all(_np(layer.W_down) != 0)
    if backend == "torch":
        xt = torch.from_numpy(x)
        np.testing.assert_array_equal(_np(layer(xt)), _np(layer.base(xt)))
        (layer(xt) * torch.from_numpy(dy)).sum().backward()
        grads = {n: _np(getattr(layer, n).grad) for n in NAMES}
    else:
        np.testing.assert_array_equal(layer.forward(x), layer.base.forward(x))
        layer.backward(dy)
        grads = {n: getattr(layer, n).grad for n in NAMES}
    # ḡ = ȳ W_up = 0, so W_down and b_down get exactly zero on the first step (as LoRA's A with B = 0)
    assert np.all(grads["W_down"] == 0) and np.all(grads["b_down"] == 0)
    assert np.all(grads["W_up"] != 0) and np.all(grads["b_up"] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_init_is_a_gaussian_truncated_at_two_std(backend):
    """Every draw within ±2·std; the sample std is the truncated normal's,
    std·sqrt(1 − 2·2φ(2)/(2Φ(2) − 1)) ≈ 0.8796·std, within 2%; ``paper`` draws W_up the same way."""
    std = 1e-2
    W = np.random.default_rng(3).standard_normal((200, 3))
    layer = _layer(backend, W, np.zeros(200), lr.HoulsbyConfig(bottleneck=100, init="paper",
                                                                              init_std=std), rng=4)
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    factor = math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    for n in ("W_down", "W_up"):
        v = _np(getattr(layer, n)).astype(np.float64)
        assert np.max(np.abs(v)) <= 2 * std * (1 + 1e-6), n
        assert abs(v.std() / (factor * std) - 1) < 0.02, n
        assert abs(v.mean()) < 5 * std / math.sqrt(v.size), n
    x = np.random.default_rng(1).standard_normal((4, 3))
    gap = np.max(np.abs(_run(layer, x) - x @ W.T))
    assert 0 < gap < 0.02 * np.max(np.abs(x @ W.T))  # near the base (within 2% here), not at it


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_every_tensor_and_torch_autograd(activation, bias):
    rng = np.random.default_rng(2)
    W, b = rng.standard_normal((5, 4)), (rng.standard_normal(5) if bias else None)
    layer = HoulsbyLinear(lr.nn.Linear.from_arrays(W, b), lr.HoulsbyConfig(bottleneck=3, activation=activation))
    values = {n: rng.standard_normal(getattr(layer, n).shape) for n in NAMES}
    for n, v in values.items():
        getattr(layer, n).data = v
    x = rng.standard_normal((2, 3, 4))
    report = gradcheck(layer, x, rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == set(NAMES) | {"input"}
    dy = rng.standard_normal((2, 3, 5))
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(dy)
    t = {n: torch.from_numpy(v.copy()).requires_grad_(True) for n, v in values.items()}
    xt = torch.from_numpy(x).requires_grad_(True)
    h = xt @ torch.from_numpy(W).T + (0 if b is None else torch.from_numpy(b))
    a = h @ t["W_down"].T + t["b_down"]
    g = torch.relu(a) if activation == "relu" else torch.nn.functional.gelu(a)
    ((h + g @ t["W_up"].T + t["b_up"]) * torch.from_numpy(dy)).sum().backward()
    assert_close(dx, xt.grad, "x̄")
    for n in NAMES:
        assert_close(getattr(layer, n).grad, t[n].grad, f"{n}̄")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bottleneck_wider_than_the_layer_is_an_error(backend):
    with pytest.raises(ValueError, match=r"bottleneck=7 is wider than the layer's output \(6\)"):
        _layer(backend, np.ones((6, 4)), None, lr.HoulsbyConfig(bottleneck=7))
    assert _layer(backend, np.ones((6, 4)), None, lr.HoulsbyConfig(bottleneck=6)).bottleneck == 6


@pytest.mark.parametrize("kw, err, match", [
    ({"bottleneck": 0}, ValueError, "bottleneck must be a positive integer"),
    ({"bottleneck": 2.5}, TypeError, "bottleneck must be a positive integer"),
    ({"activation": "tanh"}, ValueError, "activation must be one of 'gelu', 'relu'"),
    ({"init": "zeros"}, ValueError, "init must be one of 'zero_up', 'paper'"),
    ({"init_std": 0.0}, ValueError, "init_std must be > 0"),
    ({"init_std": "big"}, TypeError, "init_std must be a real number"),
])
def test_bad_config_is_named(kw, err, match):
    with pytest.raises(err, match=match):
        lr.HoulsbyConfig(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_says_it_is_the_non_linearity(backend):
    layer = _layer(backend, np.ones((3, 2)), np.ones(3), lr.HoulsbyConfig(bottleneck=2))
    with pytest.raises(ValueError, match="HoulsbyLinear is not mergeable: .*non-linearity between"):
        layer.merge()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_row_wraps_the_attention_output_and_the_mlp_projection(backend):
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained

    row = SPEC.compare["adapter"]
    model = load_pretrained(backend=backend, progress=False)
    res = inject(model, row.config, targets=row.targets, method="houlsby", **row.kwargs)
    c, m = model.config, row.config.bottleneck
    assert sorted(res.configs) == sorted(f"blocks.{i}.{p}" for i in range(c.n_layer) for p in ("attn.o", "mlp.proj"))
    # two adapters per block, plus every LayerNorm's γ and β (2 per block and ln_f), as the paper trains them
    assert res.trainable_params == c.n_layer * 2 * (2 * m * c.d_model + m + c.d_model) + (2 * c.n_layer + 1) * 2 * c.d_model
    assert res.also_trained == [n for n, _ in (model.named_parameters() if backend == "torch" else
                                               model.parameters().items()) if ".ln" in n or n.startswith("ln_f")]
