"""Chapter 05's KronA and LoKr exercises check themselves: every solution in
``notebooks/solutions/05-kronecker.py`` passes its check, and every check fails on the stub the
notebook will ship (the stubs live here until chapter 05's exercise notebook takes them in), so no
check can pass by default. Same pattern as ``tests/test_exercises.py``."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref import exercises as ex

SOLUTIONS = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / "05-kronecker.py"
CASES = [(name, chk) for items in ex.KRONECKER_CHECKS.values() for name, chk in items]

# the exercise cells as the notebook will ship them
STUBS = {
    "kron_matvec": '''# EXERCISE: kron_matvec
def kron_matvec(x, C, D):
    """x (N, m·n) times (C ⊗ D)ᵀ, C (p, m), D (q, n), without forming C ⊗ D (no np.kron)."""
    raise NotImplementedError
''',
    "kron_backward": '''# EXERCISE: kron_backward
def kron_backward(dy, x, C, D):
    """(dx, dC, dD) for y = x (C ⊗ D)ᵀ and upstream gradient dy (N, p·q)."""
    raise NotImplementedError
''',
    "lokr_factorization": '''# EXERCISE: lokr_factorization
def lokr_factorization(dim, factor=-1):
    """PEFT's factorization(dim, factor) -> (m, n) with m·n = dim."""
    return 1, dim  # a valid split, but not PEFT's
''',
    "lokr_params": '''# EXERCISE: lokr_params
def lokr_params(n_in, n_out, r, decompose_both=False, factor=-1):
    """Trainable parameters of a LoKr layer (n_out, n_in)."""
    return r * (n_in + n_out)  # LoRA's count, not LoKr's
''',
}


def _solutions():
    spec = importlib.util.spec_from_file_location("solutions_05_kronecker", SOLUTIONS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_solutions_stubs_and_checks_name_the_same_exercises():
    names = [n for n, _ in CASES]
    assert list(STUBS) == names
    sol = _solutions()
    assert all(callable(getattr(sol, n, None)) for n in names)
    assert all(STUBS[n].startswith(f"# EXERCISE: {n}\n") for n in names)


@pytest.mark.parametrize("name,chk", CASES, ids=[n for n, _ in CASES])
def test_solution_passes_its_check(name, chk, capsys):
    res = chk(getattr(_solutions(), name))
    assert res.ok, res.message
    assert capsys.readouterr().out.startswith(f"PASS {res.name}")


@pytest.mark.parametrize("name,chk", CASES, ids=[n for n, _ in CASES])
def test_check_fails_on_the_unmodified_stub(name, chk):
    sol = _solutions()
    ns = {"np": np, "lr": lr, "ex": ex, **{n: getattr(sol, n) for n, _ in CASES}}
    exec(compile(STUBS[name], f"<05-kronecker stub {name}>", "exec"), ns)
    res = chk(ns[name], verbose=False)
    assert not res.ok


def test_kron_matvec_check_refuses_a_solution_that_builds_the_product():
    def dense(x, C, D):
        return x @ np.kron(C, D).T

    res = ex.check_kron_matvec(dense, verbose=False)
    assert not res.ok and "np.kron" in res.message
    assert np.kron(np.eye(2), np.ones((1, 1))).shape == (2, 2)  # np.kron is restored after the check
