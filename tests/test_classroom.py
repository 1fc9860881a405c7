"""Classroom mode's record (``make classroom``): every chapter notebook ran within the time limit in
classroom mode, the conclusions checked on its results hold, and the record is not stale."""

from __future__ import annotations

import json

import pytest

from lowrank_ref.experiments import classroom as cl


@pytest.fixture(scope="module")
def record():
    return json.loads(cl.DATA_FILE.read_text(encoding="utf-8"))


def test_every_chapter_notebook_is_recorded_within_the_limit(record):
    assert set(record["notebooks"]) == set(cl.notebooks()), "run: make classroom (new or removed notebooks)"
    slow = {n: r["cpu_seconds"] for n, r in record["notebooks"].items() if r["cpu_seconds"] > cl.LIMIT_SECONDS}
    assert not slow, f"over {cl.LIMIT_SECONDS} s in classroom mode: {slow}"


def test_the_recorded_sizes_are_the_current_ones(record):
    assert record["sizes"] == json.loads(json.dumps(cl.classroom_sizes())), "sizes changed: run make classroom"


def test_the_conclusions_hold_in_classroom_mode(record):
    checked = {n for n, r in record["notebooks"].items() if r["conclusions"] is not None}
    assert checked == set(cl._CONCLUSIONS)  # the notebooks whose classroom runs are smaller than the full ones
    failing = {n: [c["claim"] for c in r["conclusions"] if not c["holds"]]
               for n, r in record["notebooks"].items() if r["conclusions"]}
    assert not any(failing.values()), failing
    assert all(len(record["notebooks"][n]["conclusions"]) >= 3 for n in checked)


def _adalora(budget, final, revivals=0, alloc=0.001):
    return {"res": {"budget": [[i, b, 0] for i, b in enumerate(budget)], "final_ranks": final, "config": {"target_r": 4},
                    "revivals_in_final_phase": {"x": revivals},
                    "seconds_per_step": {"allocator": alloc, "adalora": 0.5}}}


def test_a_conclusion_can_fail():
    ok = cl.conclusions("07-rank", _adalora([48, 40, 24], {"a": 9, "b": 0, "c": 3}))
    assert all(c["holds"] for c in ok)
    bad = cl.conclusions("07-rank", _adalora([48, 50, 24], {"a": 4, "b": 4}, revivals=2, alloc=0.1))
    assert not any(c["holds"] for c in bad)
    assert cl.conclusions("00-toolkit", {}) is None  # runs at full size in classroom mode
