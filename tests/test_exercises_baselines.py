"""Chapter 09's exercises check themselves, as ``tests/test_exercises.py`` does for ``CHECKS``:
every solution passes its check, every check fails on the notebook's unmodified stub (with the
other exercises solved), and notebook, solutions and ``BASELINE_CHECKS`` name the same exercises."""

from __future__ import annotations

import pytest
from test_exercises import _cells, _namespace, _solutions, _stubs

from lowrank_ref import exercises as ex

CASES = [(ch, name, chk) for ch, items in ex.BASELINE_CHECKS.items() for name, chk in items]
IDS = [f"{ch}:{name}" for ch, name, _ in CASES]


@pytest.mark.parametrize("chapter", list(ex.BASELINE_CHECKS))
def test_notebook_solutions_and_checks_name_the_same_exercises(chapter):
    names = [n for n, _ in ex.BASELINE_CHECKS[chapter]]
    assert list(_stubs(chapter)) == names
    sol = _solutions(chapter)
    assert all(callable(getattr(sol, n, None)) for n in names)
    cells = _cells(chapter)
    for n, chk in ex.BASELINE_CHECKS[chapter]:
        i = next(k for k, s in enumerate(cells) if s.startswith(f"# EXERCISE: {n}\n"))
        assert cells[i + 1].strip() == f"ex.{chk.__name__}({n});"


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_solution_passes_its_check(chapter, name, chk, capsys):
    res = chk(getattr(_solutions(chapter), name))
    assert res.ok, res.message
    assert capsys.readouterr().out.startswith(f"PASS {res.name}")


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_check_fails_on_the_unmodified_stub(chapter, name, chk):
    sol = _solutions(chapter)
    ns = _namespace(chapter)
    ns.update({n: getattr(sol, n) for n, _ in ex.BASELINE_CHECKS[chapter]})
    exec(compile(_stubs(chapter)[name], f"<{chapter} stub {name}>", "exec"), ns)
    assert not chk(ns[name], verbose=False).ok


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_check_fails_on_a_plausible_wrong_answer(chapter, name, chk):
    """Beyond the stub: the mistake each exercise invites (γ on the columns, the skip connection
    left out of dh, the biases forgotten) fails too."""
    sol = _solutions(chapter)
    wrong = {
        "ssf_merge": lambda W, b, g, be: (W * g[None, :] if W.shape[0] == W.shape[1] else W * 0, g * b + be),
        "adapter_backward": lambda dy, h, Wd, bd, Wu: (lambda r: (r[0] - dy,) + tuple(r[1:]))(
            sol.adapter_backward(dy, h, Wd, bd, Wu)),
        "adapter_params": lambda d, m: 2 * d * m,
    }[name]
    assert not chk(wrong, verbose=False).ok
