"""The run-size switch: one variable, three modes, the old quick flag still working."""

from __future__ import annotations

import pytest

from lowrank_ref.experiments import modes


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("LOWRANK_REF_QUICK", raising=False)
    monkeypatch.delenv("LOWRANK_REF_MODE", raising=False)
    monkeypatch.delenv("LOWRANK_REF_RERUN", raising=False)
    return monkeypatch


def test_default_is_full(env):
    assert modes.mode() == "full" and not modes.quick_mode() and not modes.classroom_mode()
    assert not modes.rerun_mode()
    assert modes.sized(quick=1, classroom=2, full=3) == 3


@pytest.mark.parametrize("raw, want", [("classroom", "classroom"), (" Classroom ", "classroom"),
                                       ("quick", "quick"), ("full", "full"), ("", "full")])
def test_mode_variable(env, raw, want):
    env.setenv("LOWRANK_REF_MODE", raw)
    assert modes.mode() == want
    assert modes.sized(quick="q", classroom="c", full="f") == want[0]
    assert modes.classroom_mode() == (want == "classroom") and modes.quick_mode() == (want == "quick")
    assert modes.rerun_mode() == (want != "full")  # classroom and quick recompute at their own size


def test_the_quick_flag_still_works_and_wins(env):
    env.setenv("LOWRANK_REF_QUICK", "1")
    assert modes.mode() == "quick" and modes.quick_mode() and modes.rerun_mode()
    env.setenv("LOWRANK_REF_MODE", "classroom")
    assert modes.mode() == "quick"  # the test suite sets the flag: it must not be overridden
    env.setenv("LOWRANK_REF_QUICK", "0")
    assert modes.mode() == "classroom"


def test_a_bad_mode_names_the_variable(env):
    env.setenv("LOWRANK_REF_MODE", "classrom")
    with pytest.raises(ValueError, match="LOWRANK_REF_MODE must be one of quick, classroom, full"):
        modes.mode()
    with pytest.raises(ValueError, match="mode must be one of"):
        modes.sized(quick=1, classroom=2, full=3, current="fast")


def test_rerun_flag(env):
    env.setenv("LOWRANK_REF_RERUN", "1")
    assert modes.rerun_mode() and modes.mode() == "full"
