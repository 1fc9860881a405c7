"""Statements of chapter 02 with a number in them: the digits the factored norm loses under
cancellation, and the rank bound of DoRA's update."""

from __future__ import annotations

import numpy as np
import pytest


def _cancelling_row():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((3, 20)).astype(np.float32)
    A = W[:1].copy()  # row 0 of s B A undoes W0_0 up to 0.1%: its norm shrinks 1000-fold
    B = np.array([[-0.999], [0.3], [0.0]], dtype=np.float32)
    return W, A, B


def test_the_factored_square_loses_about_six_digits_the_dense_row_about_three():
    W, A, B = _cancelling_row()
    W64, A64, B64 = (t.astype(np.float64) for t in (W, A, B))
    exact = np.linalg.norm(W64[0] + B64[0] @ A64)
    assert exact / np.linalg.norm(W64[0]) == pytest.approx(1e-3, rel=1e-3)  # shrank 1000-fold
    # the bare expansion in float32
    sq = (W * W).sum(1) + 2 * ((W @ A.T) * B).sum(1) + ((B @ (A @ A.T)) * B).sum(1)
    rel_sq = abs(float(sq[0]) - exact**2) / exact**2
    rel_n = abs(np.sqrt(float(sq[0])) - exact) / exact
    u32 = np.finfo(np.float32).eps / 2
    # n² is 10⁶ below its terms: its error is ~10⁶ u (six of float32's seven digits gone)
    assert 1e5 * u32 < rel_sq < 1e7 * u32
    assert 0.003 < rel_n < 0.03  # "off by about 1%": half the relative error of the square
    assert rel_n == pytest.approx(rel_sq / 2, rel=0.05)
    # forming V_j itself loses only ~3 digits (one cancellation at 1000×)
    V0 = W[0] + B[0] @ A
    rel_dense = abs(float(np.linalg.norm(V0.astype(np.float64))) - exact) / exact
    assert rel_dense < 1e4 * u32


@pytest.mark.parametrize("k", range(0, 9))
def test_dora_update_rank_is_at_most_r_plus_rows_whose_g_moved(k):
    rng = np.random.default_rng(k)
    out, inp, r, s = 8, 10, 1, 2.0
    W0 = rng.standard_normal((out, inp))
    A, B = rng.standard_normal((r, inp)), rng.standard_normal((out, r))
    g = np.ones(out)
    g[:k] = 1 + rng.uniform(0.1, 0.5, k)  # k rows with g_j ≠ 1
    delta = np.diag(g - 1) @ W0 + s * np.diag(g) @ B @ A  # W' − W0
    rank = np.linalg.matrix_rank(delta)
    assert rank <= r + k
    assert rank == min(r + k, out, inp)  # attained for generic weights
