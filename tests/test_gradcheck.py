"""The gradient checker itself: it passes right gradients, and it catches wrong and missing ones,
naming the tensor and the entry."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_ref.nn as nn
from lowrank_ref.gradcheck import check_gradients, gradcheck, numeric_gradient


def _linear(rng, n_in=3, n_out=4):
    return nn.Linear(n_in, n_out, rng=rng, dtype=np.float64)


class DropsBiasGrad(nn.Linear):
    """A planted bug: the bias gradient is never accumulated."""

    def backward(self, dy):
        x = self._pop_cache()
        self.weight.accumulate(dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1]))
        return dy @ self.weight.data


class ScalesInputGrad(nn.Linear):
    """A planted bug: dx is 1% too large."""

    def backward(self, dy):
        return 1.01 * super().backward(dy)


class OneWrongEntry(nn.Linear):
    """A planted bug in exactly one entry of the weight gradient: W̄[2, 1] is off by 1e-3."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.weight.grad[2, 1] += 1e-3
        return dx


def test_passes_on_correct_gradients(rng):
    layer = _linear(rng)
    report = gradcheck(layer, rng.standard_normal((5, 3)))
    assert report.ok and bool(report)
    assert [r.name for r in report.results] == ["weight", "bias", "input"]
    assert all(r.rel_err < 1e-5 and r.ratio <= 1 for r in report.results)


def test_fails_on_missing_bias_gradient_and_names_it(rng):
    layer = DropsBiasGrad(3, 4, rng=rng, dtype=np.float64)
    report = gradcheck(layer, rng.standard_normal((5, 3)))
    assert not report.ok
    failed = [r for r in report.results if not r.ok]
    assert [r.name for r in failed] == ["bias (no gradient)"]
    assert report.worst.name == "bias (no gradient)"
    with pytest.raises(AssertionError, match=r"FAIL bias \(no gradient\)"):
        report.raise_if_failed()


def test_fails_on_scaled_input_gradient(rng):
    layer = ScalesInputGrad(3, 4, rng=rng, dtype=np.float64)
    report = gradcheck(layer, rng.standard_normal((2, 3)))
    failed = {r.name: r for r in report.results if not r.ok}
    assert set(failed) == {"input"}
    r = failed["input"]
    assert r.analytic == pytest.approx(1.01 * r.numeric, rel=1e-6)  # the report shows mine vs numeric


def test_names_the_wrong_index(rng):
    layer = OneWrongEntry(3, 4, rng=rng, dtype=np.float64)
    report = gradcheck(layer, rng.standard_normal((2, 3)))
    (bad,) = [r for r in report.results if not r.ok]
    assert bad.name == "weight" and bad.index == (2, 1) and bad.shape == (4, 3)
    assert bad.abs_err == pytest.approx(1e-3, rel=1e-4)
    assert bad.ratio > 1 and report.worst is bad
    assert all(r.ratio <= 1 for r in report.results if r is not bad)
    assert "weight" in str(bad) and "(2, 1)" in str(bad) and str(bad).startswith("FAIL")


def test_check_gradients_missing_entry_fails():
    x = np.array([1.0, -2.0, 0.5])
    report = check_gradients(lambda: float(np.sum(x**2)), {"x": x}, {"x": None})
    assert not report.ok and report.results[0].name == "x (no gradient)"
    report = check_gradients(lambda: float(np.sum(x**2)), {"x": x}, {"x": 2 * x})
    assert report.ok


def test_numeric_gradient_matches_calculus_and_restores_x():
    x = np.array([[0.3, -1.2], [2.0, 0.7]]).T  # a transposed (non-contiguous) view
    before = x.copy()
    g = numeric_gradient(lambda: float(np.sum(np.sin(x) * x)), x)
    np.testing.assert_allclose(g, np.cos(before) * before + np.sin(before), rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(x, before)


def test_central_difference_error_shrinks_like_eps_squared():
    """Truncation error of (f(x+ε) - f(x-ε))/2ε is f'''(x) ε²/6: a tenfold smaller ε gives about
    a hundredfold smaller error (while ε is large enough that rounding does not dominate)."""
    x = np.array([0.4])
    errs = []
    for eps in (1e-2, 1e-3):
        g = numeric_gradient(lambda: float(np.exp(x[0])), x, eps=eps)
        errs.append(abs(g[0] - np.exp(0.4)))
    assert errs[0] == pytest.approx(np.exp(0.4) * 1e-4 / 6, rel=1e-2)
    assert 80 < errs[0] / errs[1] < 120


def test_gradcheck_refuses_float32(rng):
    with pytest.raises(TypeError, match="float64"):
        gradcheck(nn.Linear(2, 2, rng=rng), rng.standard_normal((1, 2)))
    with pytest.raises(TypeError, match="float64"):
        gradcheck(_linear(rng, 2, 2), rng.standard_normal((1, 2)).astype(np.float32))


def test_gradcheck_only_checks_trainable_parameters(rng):
    layer = _linear(rng)
    layer.bias.trainable = False
    report = gradcheck(layer, rng.standard_normal((2, 3)))
    assert report.ok and [r.name for r in report.results] == ["weight", "input"]


def test_reported_errors_are_the_worst_entrys_own(rng):
    """abs and rel describe the entry named, not a tensor-wide maximum: rel is |a - n| over
    max(|a|, |n|, atol/rtol) at that index."""
    layer = OneWrongEntry(3, 4, rng=rng, dtype=np.float64)
    report = gradcheck(layer, rng.standard_normal((2, 3)))
    for r in report.results:
        scale = max(abs(r.analytic), abs(r.numeric), 1e-8 / 1e-5)
        assert r.abs_err == pytest.approx(abs(r.analytic - r.numeric), rel=1e-12, abs=1e-300)
        assert r.rel_err == pytest.approx(r.abs_err / scale, rel=1e-12, abs=1e-300)


def test_exactly_zero_gradient_is_not_reported_as_rel_one():
    """A softmax cannot feel a shift of all its inputs: the derivative is exactly 0, the central
    difference is rounding noise. The report judges it by atol and does not claim rel = 1."""
    z, w, c = np.array([0.2, -1.0, 0.5]), np.array([1.0, 2.0, -0.5]), np.array([0.7])

    def loss():
        e = np.exp(z + c[0])
        return float(np.sum(e / e.sum() * w))

    (r,) = check_gradients(loss, {"c": c}, {"c": np.zeros(1)}).results
    assert r.ok and r.analytic == 0.0 and r.numeric != 0.0  # the noise is there
    assert r.rel_err == pytest.approx(abs(r.numeric) / 1e-3)  # floor atol/rtol = 1e-3
    assert r.rel_err < 1e-5


def test_key_bias_report_is_small(rng):
    """The attention's key bias gets exactly zero gradient (chapter 00); its report line must not
    claim a relative error of 1."""
    attn = nn.CausalSelfAttention(8, 2, rng=rng, dtype=np.float64)
    from lowrank_ref.gradcheck import perturb

    perturb(attn, rng)
    report = gradcheck(attn, rng.standard_normal((2, 3, 8)), params=["k.bias"], check_input=False)
    (r,) = report.results
    assert r.ok and abs(r.analytic) < 1e-12 and r.rel_err < 1e-3
