"""The exercises check themselves: every solution passes its check, and every check fails on the
notebook's unmodified stub (with the other exercises solved), so no check can pass by default.

The notebooks are read as JSON and their exercise cells executed in-process (no kernel): fast.
``tests/test_notebooks.py`` also runs each exercise notebook top to bottom, stubs and all."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref import exercises as ex

NB = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
CHAPTERS = list(ex.CHECKS)
CASES = [(ch, name, chk) for ch, items in ex.CHECKS.items() for name, chk in items]
IDS = [f"{ch}:{name}" for ch, name, _ in CASES]


def _cells(chapter: str) -> list[str]:
    nb = json.loads((NB / f"{chapter}-exercises.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _stubs(chapter: str) -> dict[str, str]:
    """{exercise name: the source of its stub cell}, from cells starting '# EXERCISE: name'."""
    out = {}
    for src in _cells(chapter):
        m = re.match(r"# EXERCISE: (\w+)\n", src)
        if m:
            out[m.group(1)] = src
    return out


def _solutions(chapter: str):
    spec = importlib.util.spec_from_file_location(f"solutions_{chapter[:2]}", NB / "solutions" / f"{chapter}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _namespace(chapter: str) -> dict:
    return {"np": np, "lr": lr, "ex": ex}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_solutions_and_checks_name_the_same_exercises(chapter):
    names = [n for n, _ in ex.CHECKS[chapter]]
    assert list(_stubs(chapter)) == names
    sol = _solutions(chapter)
    assert all(callable(getattr(sol, n, None)) for n in names)
    cells = _cells(chapter)
    for n, chk in ex.CHECKS[chapter]:
        # the stub's cell is followed by the cell that checks it
        i = next(k for k, s in enumerate(cells) if s.startswith(f"# EXERCISE: {n}\n"))
        assert cells[i + 1].strip() == f"ex.{chk.__name__}({n});"


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_solution_passes_its_check(chapter, name, chk, capsys):
    res = chk(getattr(_solutions(chapter), name))
    assert res.ok, res.message
    assert capsys.readouterr().out.startswith(f"PASS {res.name}")


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_check_fails_on_the_unmodified_stub(chapter, name, chk, capsys):
    """With every other exercise solved, the stub of this one as the notebook ships it fails."""
    sol = _solutions(chapter)
    ns = _namespace(chapter)
    ns.update({n: getattr(sol, n) for n, _ in ex.CHECKS[chapter]})
    exec(compile(_stubs(chapter)[name], f"<{chapter} stub {name}>", "exec"), ns)
    res = chk(ns[name])
    assert not res.ok
    assert capsys.readouterr().out.startswith(f"FAIL {res.name}")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_stub_fails_when_nothing_is_solved(chapter):
    ns = _namespace(chapter)
    for src in _stubs(chapter).values():
        exec(compile(src, "<stub>", "exec"), ns)
    for name, chk in ex.CHECKS[chapter]:
        assert not chk(ns[name], verbose=False).ok


# --- the checks' own behaviour: they say what is wrong, and never raise


def test_a_wrong_gradient_is_reported_with_its_worst_entry():
    def off_by_one_entry(dy, x, W):
        dx, dW, db = _solutions("00-toolkit").linear_backward(dy, x, W)
        dW = dW.copy()
        dW[3, 1] += 0.5
        return dx, dW, db

    res = ex.check_linear_backward(off_by_one_entry, verbose=False)
    assert not res.ok and "FAIL W" in res.message and "(3, 1)" in res.message


def test_a_wrong_value_names_mine_and_expected():
    res = ex.check_bits_per_param(lambda bs, dq, bs2=256: 4 + 16 / bs, verbose=False)
    assert not res.ok and "mine=+4.25" in res.message and "expected=+4.5" in res.message


def test_wrong_shape_none_and_crash_are_reported_not_raised():
    assert "None" in ex.check_lora_forward(lambda *a: None, verbose=False).message
    msg = ex.check_lora_merge(lambda W, A, B, s: W.T, verbose=False).message
    assert "shape" in msg
    msg = ex.check_softmax_backward(lambda p, dp: 1 / 0, verbose=False).message
    assert "ZeroDivisionError" in msg
    assert not ex.check_nf4_table("not a function", verbose=False).ok


def test_dora_norm_over_the_wrong_axis_fails():
    res = ex.check_dora_row_norm(lambda W0, A, B, s: np.linalg.norm(W0 + s * B @ A, axis=0),
                                 verbose=False)
    assert not res.ok and "shape" in res.message


def test_full_finetune_without_master_weights_fails():
    assert not ex.check_full_finetune_bytes(lambda n: 12 * n, verbose=False).ok


def test_broken_formula_exercise_needs_a_real_break():
    """The 'break a formula' check passes on broken backwards and fails on the correct one."""
    sol = _solutions("00-toolkit")
    assert not ex.check_broken_layernorm(sol.layernorm_backward, verbose=False).ok

    def wrong_dbeta(dy, xhat, rho, gamma):
        dx, dg, db = sol.layernorm_backward(dy, xhat, rho, gamma)
        return dx, dg, dy[0].sum(0)  # summed over one leading axis only

    assert ex.check_broken_layernorm(wrong_dbeta, verbose=False).ok
