"""The DyLoRA/SoRA exercises (chapter 07's draft) check themselves, as tests/test_exercises.py does
for the chapters with a notebook: every solution passes its check, and every check fails on the
stub (the cells below are the stubs the exercise notebook will ship, with the other exercises
solved), so no check can pass by default. Once the notebook exists the lead moves
``DRAFT_CHECKS`` into ``CHECKS`` and this file's stubs into the notebook."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref import exercises as ex

CHAPTER = "07-dylora-sora"
SOLUTIONS = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / f"{CHAPTER}.py"
CASES = ex.DRAFT_CHECKS[CHAPTER]

# the exercise cells as the notebook will ship them ("# EXERCISE: name", then the stub)
STUBS = {
    "dylora_forward": '''# EXERCISE: dylora_forward
def dylora_forward(x, W, b0, A, B, alpha, b):
    """y = x W0ᵀ + b0 + (α/b) (x A[:b]ᵀ) B[:, :b]ᵀ."""
    raise NotImplementedError
''',
    "soft_threshold": '''# EXERCISE: soft_threshold
def soft_threshold(x, xi):
    """T_ξ(x) = sign(x) max(|x| − ξ, 0)."""
    raise NotImplementedError
''',
    "sora_backward": '''# EXERCISE: sora_backward
def sora_backward(dy, x, W, A, g, B, s):
    """Return (dx, dA, dg, dB) for y = x W0ᵀ + b + s ((x Aᵀ) ⊙ g) Bᵀ."""
    raise NotImplementedError
''',
    "sora_prune": '''# EXERCISE: sora_prune
def sora_prune(A, g, B):
    """Return (A', B') of the ranks whose gate is non-zero, with B' A' = B diag(g) A."""
    raise NotImplementedError
''',
}


def _solutions():
    spec = importlib.util.spec_from_file_location("solutions_07_dylora_sora", SOLUTIONS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_stubs_solutions_and_checks_name_the_same_exercises():
    names = [n for n, _ in CASES]
    assert list(STUBS) == names
    assert all(callable(getattr(_solutions(), n, None)) for n in names)


@pytest.mark.parametrize("name,chk", CASES, ids=[n for n, _ in CASES])
def test_solution_passes_its_check(name, chk, capsys):
    res = chk(getattr(_solutions(), name))
    assert res.ok, res.message
    assert capsys.readouterr().out.startswith(f"PASS {res.name}")


@pytest.mark.parametrize("name,chk", CASES, ids=[n for n, _ in CASES])
def test_check_fails_on_the_unmodified_stub(name, chk):
    sol = _solutions()
    ns = {"np": np, "lr": lr, "ex": ex, **{n: getattr(sol, n) for n, _ in CASES}}
    exec(compile(STUBS[name], f"<{CHAPTER} stub {name}>", "exec"), ns)
    assert not chk(ns[name], verbose=False).ok


def _soft_threshold_as_the_reference_code(x, xi):
    from lowrank_ref.adapters.sora import reference_threshold

    return reference_threshold(x, xi)


@pytest.mark.parametrize("wrong", [
    _soft_threshold_as_the_reference_code,  # zeroes (ξ, 2ξ)
    lambda x, xi: np.where(np.abs(x) > xi, x, 0.0),  # hard threshold
])
def test_the_soft_threshold_check_catches_the_usual_mistakes(wrong):
    assert not ex.check_soft_threshold(wrong, verbose=False).ok


def test_the_dylora_check_catches_the_scale_alpha_over_r():
    def alpha_over_r(x, W, b0, A, B, alpha, b):
        return x @ W.T + b0 + (alpha / A.shape[0]) * (x @ A[:b].T) @ B[:, :b].T

    assert not ex.check_dylora_forward(alpha_over_r, verbose=False).ok


def test_the_prune_check_catches_a_gate_left_out_of_B():
    assert not ex.check_sora_prune(lambda A, g, B: (A[g != 0], B[:, g != 0]), verbose=False).ok
