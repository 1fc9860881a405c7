"""Chapter 09's prompt-tuning experiment: the summary says "monotonic" only when the mean over
seeds rises at every step of k, names the steps where it falls, and the tables and the committed
result file agree (the chapter's tables are rendered from it)."""

from __future__ import annotations

import json
import pathlib

import pytest

from lowrank_ref.experiments.prompt_experiments import format_tables, summarise

DATA = pathlib.Path(__file__).resolve().parent.parent / "chapters" / "data" / "09-prompt-tuning.json"


def _runs(accs: dict) -> list[dict]:
    return [{"k": k, "init": "vocab", "seed": s, "target_after": a} for k, per_seed in accs.items()
            for s, a in enumerate(per_seed)]


def test_a_rising_mean_is_monotonic_and_a_dip_is_named():
    up = summarise(_runs({1: [0.1, 0.2], 2: [0.3, 0.3], 4: [0.5, 0.4]}))["vocab"]
    assert up["monotonic"] and up["falls"] == []
    assert up["mean"] == pytest.approx([0.15, 0.3, 0.45]) and up["spread"] == pytest.approx([0.1, 0.0, 0.1])
    dip = summarise(_runs({1: [0.2, 0.2], 2: [0.1, 0.1], 4: [0.3, 0.3]}))["vocab"]
    assert not dip["monotonic"] and dip["falls"] == [[1, 2]]
    assert dip["largest_step"] == pytest.approx(0.2)


def test_the_committed_result_renders():
    res = json.loads(DATA.read_text(encoding="utf-8"))
    assert not res["quick"]
    assert summarise(res["runs"]) == res["summary"]  # the stored summary is the runs' own
    tables = format_tables(res)
    assert all(f"| {r['k']} |" in tables["context"] for r in res["context"])
    assert all(r["one_more_refused"] for r in res["context"])
    assert all(r["prompt_max_input"] == r["block_size"] - r["k"] for r in res["context"])
