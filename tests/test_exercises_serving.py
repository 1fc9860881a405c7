"""Chapter 08's exercises (serving and LoraHub): as tests/test_exercises.py does for every chapter, and the
wrong answers a learner is likely to write fail their check too."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

from lowrank_ref import exercises as ex

CHAPTER = "08-serving"
NB = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [n for n, _ in ex.CHECKS[CHAPTER]]


def _solutions():
    spec = importlib.util.spec_from_file_location("solutions_08", NB / "solutions" / f"{CHAPTER}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stubs() -> dict[str, str]:
    nb = json.loads((NB / f"{CHAPTER}-exercises.ipynb").read_text())
    out = {}
    for c in nb["cells"]:
        m = re.match(r"# EXERCISE: (\w+)\n", "".join(c["source"]))
        if c["cell_type"] == "code" and m:
            out[m.group(1)] = "".join(c["source"])
    return out


def test_the_notebook_the_solutions_and_the_checks_name_the_same_exercises():
    assert NAMES == ["bgmv_rows", "dora_serving_scale", "lorahub_delta"]
    assert list(_stubs()) == NAMES
    assert all(callable(getattr(_solutions(), n, None)) for n in NAMES)


@pytest.mark.parametrize("name,chk", ex.CHECKS[CHAPTER])
def test_solution_passes_and_stub_fails(name, chk, capsys):
    assert chk(getattr(_solutions(), name)).ok
    ns = {"np": np}
    exec(compile(_stubs()[name], f"<stub {name}>", "exec"), ns)
    res = chk(ns[name])
    assert not res.ok and "not written yet" in res.message


def test_common_wrong_answers_fail(capsys):
    sol = _solutions()

    def no_scale(x, W0, b, A_all, B_all, s, g, slots):  # forgets s
        return sol.bgmv_rows(x, W0, b, A_all, B_all, np.ones_like(s), g, slots)

    def g_outside_bias(x, W0, b, A_all, B_all, s, g, slots):  # scales the bias too
        return g[slots][:, None, :] * (sol.bgmv_rows(x, W0, b, A_all, B_all, s, np.ones_like(g), slots))

    def one_adapter(x, W0, b, A_all, B_all, s, g, slots):  # every row through slot 1
        return sol.bgmv_rows(x, W0, b, A_all, B_all, s, g, np.ones_like(slots))

    for wrong in (no_scale, g_outside_bias, one_adapter):
        assert not ex.check_bgmv_rows(wrong).ok, wrong.__name__

    def norm_of_w0(W0, A, B, s, m):  # the norm of W0 instead of W0 + s B A (a CHECKLIST pitfall)
        return m / np.linalg.norm(W0, axis=1)

    def wrong_axis(W0, A, B, s, m):  # the norm over the output axis
        n = np.linalg.norm(W0 + s * B @ A, axis=0)
        return m / n[: len(m)]

    def divides_by_zero(W0, A, B, s, m):
        return m / np.linalg.norm(W0 + s * B @ A, axis=1)

    for wrong in (norm_of_w0, wrong_axis, divides_by_zero):
        with np.errstate(divide="ignore", invalid="ignore"):
            assert not ex.check_dora_serving_scale(wrong).ok, wrong.__name__

    def sum_of_updates(As, Bs, s, w):  # Σ wᵢ s Bᵢ Aᵢ: the composition without LoraHub's cross terms
        return s * sum(wi * (b @ a) for wi, a, b in zip(w, As, Bs))

    def weights_once(As, Bs, s, w):  # the weights applied to A only
        return s * (sum(Bs) @ sum(wi * a for wi, a in zip(w, As)))

    for wrong in (sum_of_updates, weights_once):
        res = ex.check_lorahub_delta(wrong)
        assert not res.ok, wrong.__name__
    assert "cross terms" in ex.check_lorahub_delta(sum_of_updates).message
