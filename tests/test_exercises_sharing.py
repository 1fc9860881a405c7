"""Chapter 06's exercises (the sharing block of ``lowrank_ref.exercises``): beyond the generic
pattern of ``tests/test_exercises.py`` (every solution passes, every stub fails), the mistakes
the chapter warns about are caught by the checks."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from lowrank_ref import exercises as ex

SOL = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / "06-sharing.py"


def _sol():
    spec = importlib.util.spec_from_file_location("solutions_06", SOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_sharing_checks_are_listed_in_order():
    assert [n for n, _ in ex.CHECKS["06-sharing"]] == ["vera_backward", "tied_A_grad", "vera_params"]
    sol = _sol()
    for name, chk in ex.CHECKS["06-sharing"]:
        assert chk(getattr(sol, name), verbose=False).ok


def test_a_tied_gradient_that_keeps_only_the_last_layer_fails():
    sol = _sol()

    def last_only(dys, xs, A, B, us, vs):  # overwrites instead of accumulating
        return sol.tied_A_grad(dys[-1:], xs[-1:], A, B, us[-1:], vs[-1:])

    res = ex.check_tied_A_grad(last_only, verbose=False)
    assert not res.ok and "central differences" in res.message


def test_vera_backward_summed_over_one_leading_axis_only_fails():
    sol = _sol()

    def partial_sum(dy, x, W, A, B, d, b):
        dx, dd, db = sol.vera_backward(dy, x, W, A, B, d, b)
        h = x @ A.T
        return dx, (((dy * b) @ B) * h)[0].sum(axis=0), db  # forgets the second leading axis

    assert not ex.check_vera_backward(partial_sum, verbose=False).ok


def test_counting_lora_s_parameters_or_the_projections_fails():
    assert not ex.check_vera_params(lambda r, shapes: sum(r * (o + i) for o, i in shapes), verbose=False).ok
    assert not ex.check_vera_params(lambda r, shapes: sum(r + o + r * (o + i) for o, i in shapes), verbose=False).ok
    msg = ex.check_vera_params(lambda r, shapes: np.float64(0.5), verbose=False).message
    assert "expected" in msg
