"""Chapter 07's exercise checks catch the typical mistakes, not only a stub: each near miss of a
solution (the squared regulariser's gradient, Ū from the old Ī, the sensitivity without the
absolute value, sums instead of means, the warm-up ending one step early; DyLoRA's scale α/r instead
of α/b; the reference code's masks or a hard threshold for SoRA's soft-threshold; a gate left out of
the pruned B; SeLoRA's ratio without Ā, or of norms rather than squared norms) FAILs its check,
while the solution PASSes. (``tests/test_exercises.py`` runs every chapter's solutions and stubs generically.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lowrank_ref import exercises as ex

SOL = Path(__file__).resolve().parents[1] / "notebooks" / "solutions" / "07-rank.py"
_spec = importlib.util.spec_from_file_location("solutions_07", SOL)
sol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sol)


def _squared_grad(P, Q):
    M, N = Q @ Q.T - np.eye(Q.shape[0]), P.T @ P - np.eye(P.shape[1])
    R, _, _ = sol.orth_reg_grad(P, Q)
    return R, 4 * P @ N, 4 * M @ Q


def _old_ibar(values, grads, Ibar, Ubar, b1, b2):
    s, I2, U2 = {}, {}, {}
    for n in "PEQ":
        sens = np.abs(values[n] * grads[n])
        U2[n] = b2 * Ubar[n] + (1 - b2) * np.abs(sens - Ibar[n])  # the old Ī
        I2[n] = b1 * Ibar[n] + (1 - b1) * sens
        s[n] = I2[n] * U2[n]
    return s["E"] + s["Q"].mean(1) + s["P"].mean(0), I2, U2


def _no_abs(values, grads, Ibar, Ubar, b1, b2):
    s, I2, U2 = {}, {}, {}
    for n in "PEQ":
        sens = values[n] * grads[n]  # the signed product
        I2[n] = b1 * Ibar[n] + (1 - b1) * sens
        U2[n] = b2 * Ubar[n] + (1 - b2) * np.abs(sens - I2[n])
        s[n] = I2[n] * U2[n]
    return s["E"] + s["Q"].mean(1) + s["P"].mean(0), I2, U2


def _sums(values, grads, Ibar, Ubar, b1, b2):
    S, I2, U2 = sol.triplet_scores(values, grads, Ibar, Ubar, b1, b2)
    s = {n: I2[n] * U2[n] for n in "PEQ"}
    return s["E"] + s["Q"].sum(1) + s["P"].sum(0), I2, U2


def _early_warmup(step, b0, bT, tinit, tfinal, deltaT, T):
    return sol.budget_schedule(step + (step == tinit), b0, bT, tinit, tfinal, deltaT, T)


def _dylora_alpha_over_r(x, W, b0, A, B, alpha, b):
    return x @ W.T + b0 + (alpha / A.shape[0]) * (x @ A[:b].T) @ B[:, :b].T


def _reference_masks(x, xi):
    from lowrank_ref.adapters.sora import reference_threshold

    return reference_threshold(x, xi)  # zeroes (ξ, 2ξ)


def _hard_threshold(x, xi):
    return np.where(np.abs(x) > xi, x, 0.0)


def _gate_left_out(A, g, B):
    return A[g != 0], B[:, g != 0]


def _ratio_without_dA(dy, x, A, B, a, s):
    dB = s * dy.T @ (x @ A.T)
    new = s * dy.T @ (x @ a)
    return (np.sum(dB**2) + np.sum(new**2)) / np.sum(dB**2)


def _ratio_of_norms(dy, x, A, B, a, s):
    return np.sqrt(sol.selora_growth_ratio(dy, x, A, B, a, s))  # ‖·‖ instead of ‖·‖², roughly


NEAR_MISSES = [("orth_reg_grad", _squared_grad), ("triplet_scores", _old_ibar), ("triplet_scores", _no_abs),
               ("triplet_scores", _sums), ("budget_schedule", _early_warmup),
               ("dylora_forward", _dylora_alpha_over_r), ("soft_threshold", _reference_masks),
               ("soft_threshold", _hard_threshold), ("sora_prune", _gate_left_out),
               ("selora_growth_ratio", _ratio_without_dA), ("selora_growth_ratio", _ratio_of_norms)]
CHECKS = dict(ex.CHECKS["07-rank"])


@pytest.mark.parametrize("name", list(CHECKS))
def test_solution_passes(name):
    assert CHECKS[name](getattr(sol, name), verbose=False).ok


@pytest.mark.parametrize("name, wrong", NEAR_MISSES, ids=[f"{n}-{f.__name__}" for n, f in NEAR_MISSES])
def test_near_miss_fails(name, wrong):
    res = CHECKS[name](wrong, verbose=False)
    assert not res.ok, res
