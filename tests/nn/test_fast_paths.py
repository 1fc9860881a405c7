"""The nn core's optimised paths equal their plain forms.

Each fast path in ``lowrank_ref.nn`` (an in-place update, a fused expression, a float32 formula)
is compared here with the textbook expression written out in the test, so a speed-up that changes
a value fails a test. Plain forms are computed in float64 where the fast path is float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from scipy.special import ndtr

import lowrank_ref.nn as nn
from lowrank_ref.nn.activations import gelu_grad, normal_cdf, softmax, softmax_backward
from lowrank_ref.nn.attention import additive_causal_mask, causal_mask
from lowrank_ref.nn.layernorm import layernorm_backward, layernorm_forward
from lowrank_ref.nn.linear import linear_backward, linear_forward


def _grid32() -> np.ndarray:
    """float32 points over the whole range where Φ is a normal float32: tails, centre, ±0."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-13.0, 13.0, 20001), 3.0 * rng.standard_normal(20000),
                        [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8]])
    return x.astype(np.float32)


def test_float32_normal_cdf_matches_the_exact_cdf_to_float32_precision():
    x = _grid32()
    got = normal_cdf(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    exact = ndtr(x.astype(np.float64))  # Φ in float64 (SciPy's ndtr)
    err = np.abs(got.astype(np.float64) - exact)
    # absolute: a few float32 ulps of 1; relative: tails keep their precision (Φ(-13) ≈ 6e-39)
    assert err.max() <= 3e-7, f"abs error {err.max():.3g} at x={x[err.argmax()]}"
    rel = err / exact
    assert rel.max() <= 3e-5, f"rel error {rel.max():.3g} at x={x[rel.argmax()]}"
    # and where it matters most, |x| <= 6, to a few ulps relative
    core = np.abs(x) <= 6
    assert rel[core].max() <= 2e-6, f"rel error {rel[core].max():.3g} for |x| <= 6"


def test_float32_normal_cdf_agrees_with_the_plain_erf_form_and_beats_it_in_the_tails():
    from scipy.special import erf

    x = _grid32()
    plain = (0.5 * (1.0 + erf(x * np.float32(1 / math.sqrt(2))))).astype(np.float32)  # the old float32 form
    assert_close(normal_cdf(x), plain, "Φ float32 fast vs plain", rtol=0, atol=3e-7)
    exact = ndtr(-8.0)  # ≈ 6.2e-16: 1 + erf cancels to 0 in float32, the erfc fit keeps it
    assert plain[np.argmin(np.abs(x + 8))] == 0.0
    assert abs(normal_cdf(np.float32([-8.0]))[0] / exact - 1) < 1e-5


def test_float32_gelu_matches_torch():
    x = _grid32()
    ours = nn.GELU()
    y = ours.forward(x)
    g = ours.backward(np.ones_like(x))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = torch.nn.functional.gelu(tx)
    ty.backward(torch.ones_like(ty))
    x64 = x.astype(np.float64)
    exact = x64 * ndtr(x64)
    assert_close(y, exact, "GELU float32 forward vs exact", rtol=1e-5, atol=5e-7)
    # torch's float32 GELU goes through 1 + erf(x/√2), which cancels for x << 0 (errors ~1e-6)
    assert_close(y, ty, "GELU float32 forward vs torch", rtol=1e-6, atol=2e-6)
    assert_close(g, tx.grad, "GELU float32 grad vs torch", rtol=1e-6, atol=3e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_grad_equals_plain_formula(dtype):
    x = _grid32().astype(dtype)
    cdf = ndtr(x.astype(np.float64))
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    got = gelu_grad(x)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert_close(got, cdf + x * pdf, f"gelu_grad {np.dtype(dtype).name}", rtol=tol, atol=tol)


def test_gelu_backward_keeps_numpy_promotion():
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    layer = nn.GELU()
    layer.forward(x)
    dy = np.linspace(1, 2, 7)  # float64 upstream: the result is float64, as dy * g would be
    dx = layer.backward(dy)
    assert dx.dtype == np.float64
    assert_close(dx, dy * gelu_grad(x), "GELU backward with float64 dy", rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_backward_equal_plain_forms(dtype):
    rng = np.random.default_rng(1)
    z = (3 * rng.standard_normal((3, 4, 9))).astype(dtype)
    z[..., -3:] = -np.inf  # masked entries, as in attention
    z_before = z.copy()
    dp = rng.standard_normal(z.shape).astype(dtype)
    p = softmax(z)
    np.testing.assert_array_equal(z, z_before)  # the input is not overwritten
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    plain = e / e.sum(axis=-1, keepdims=True)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert_close(p, plain, "softmax", rtol=tol, atol=tol)
    assert np.all(p[..., -3:] == 0)
    ds = softmax_backward(dp, p)
    assert_close(ds, p * (dp - np.sum(dp * p, axis=-1, keepdims=True)), "softmax_backward", rtol=tol, atol=tol)


def test_additive_causal_mask_equals_the_boolean_mask():
    for T in (1, 2, 7):
        m = additive_causal_mask(T, np.dtype(np.float32))
        assert m.dtype == np.float32 and not m.flags.writeable
        np.testing.assert_array_equal(np.isneginf(m), causal_mask(T))
        np.testing.assert_array_equal(m[~causal_mask(T)], 0)
        s = np.random.default_rng(T).standard_normal((2, T, T)).astype(np.float32)
        np.testing.assert_array_equal(s + m, np.where(causal_mask(T), np.float32(-np.inf), s))


@pytest.mark.parametrize("bdtype", [np.float32, np.float64, None])
def test_linear_forward_and_backward_equal_plain_forms(bdtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    W = rng.standard_normal((4, 5)).astype(np.float32)
    b = None if bdtype is None else rng.standard_normal(4).astype(bdtype)
    y = linear_forward(x, W, b)
    plain = np.einsum("btk,ok->bto", x.astype(np.float64), W.astype(np.float64))
    if b is not None:
        plain = plain + b
    assert y.shape == (2, 3, 4)
    assert y.dtype == (np.result_type(x, W) if b is None else np.result_type(x, W, b))
    assert_close(y, plain, "linear_forward", rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dW, db = linear_backward(dy, x, W)
    assert dx.shape == x.shape
    assert_close(dx, np.einsum("bto,ok->btk", dy, W), "x̄", rtol=1e-5, atol=1e-5)
    assert_close(dW, np.einsum("bto,btk->ok", dy, x), "W̄", rtol=1e-5, atol=1e-5)
    assert_close(db, dy.sum(axis=(0, 1)), "b̄", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layernorm_equals_plain_form(dtype):
    rng = np.random.default_rng(3)
    x = (2 + 3 * rng.standard_normal((4, 6, 8))).astype(dtype)
    gamma = rng.standard_normal(8).astype(dtype)
    beta = rng.standard_normal(8).astype(dtype)
    x_before = x.copy()
    y, cache = layernorm_forward(x, gamma, beta)
    np.testing.assert_array_equal(x, x_before)  # the in-place steps work on owned arrays only
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = x64.var(-1, keepdims=True)
    xhat = (x64 - mu) / np.sqrt(var + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert y.dtype == dtype
    assert_close(y, xhat * gamma + beta, "LayerNorm forward", rtol=tol, atol=tol)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dgamma, dbeta = layernorm_backward(dy, cache)
    g = dy * gamma
    rho = 1 / np.sqrt(var + 1e-5)
    plain = rho * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    assert_close(dx, plain, "LayerNorm x̄", rtol=tol * 10, atol=tol * 10)
    assert_close(dgamma, (dy * xhat).sum(axis=(0, 1)), "γ̄", rtol=tol, atol=tol * 10)
    assert_close(dbeta, dy.sum(axis=(0, 1)), "β̄", rtol=tol, atol=tol)
