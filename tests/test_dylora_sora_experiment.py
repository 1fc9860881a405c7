"""Chapter 07's DyLoRA/SoRA measurements: the experiment runs in quick mode, the draft's tables are
what ``format_tables`` prints from the committed JSON, the numbers quoted in its text are that
file's, and pruning a trained SoRA model changes no accuracy (as the table claims)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from lowrank_ref.experiments import dylora_sora

ROOT = pathlib.Path(__file__).resolve().parent.parent
DRAFT = ROOT / "chapters" / "07-rank.md"  # section 7: DyLoRA and SoRA
DATA = ROOT / "chapters" / "data" / "07-dylora-sora.json"


def _tables(text: str, names=("dylora-ranks", "sora-lambda")) -> list[str]:
    """The bodies of this section's tables (the chapter has others: tests/test_rank_growth_experiment.py)."""
    found = dict(re.findall(r"<!-- table: ([\w-]+) -->\n(.*?)<!-- /table -->", text, re.S))
    return [found[n].strip() for n in names]


def test_the_drafts_tables_and_numbers_come_from_the_committed_results():
    res = json.loads(DATA.read_text())
    assert not res["quick"] and res["steps"] == 300
    text = DRAFT.read_text()
    assert _tables(text) == format_tables_split(res)
    dy, lo = res["dylora"]["target_at_rank"], res["lora"]["target_at_rank"]
    gaps = {b: lo[b] - dy[b] for b in ("1", "2", "4", "8")}
    assert 0.013 <= min(gaps[b] for b in ("1", "4", "8")) and max(gaps[b] for b in ("1", "4", "8")) < 0.0165
    assert f"{gaps['2']:.3f}" == "0.059" and "by 0.059 at rank 2" in text
    assert f"{dy['4']:.3f}" == "0.323" and f"{dy['5']:.3f}" == "0.314"
    runs = {s["lam"]: s for s in res["sora"]["runs"]}
    half = runs[0.5]
    assert f"{half['mean_rank_kept']:.1f}" == "5.8" and half["trainable_params_after_pruning"] == 2944
    assert f"{runs[0.0]['target_after'] - half['target_after']:.3f}" == "0.010"
    assert list(half["ranks_kept"].values()) == [5, 5, 6, 7]
    for s in runs.values():  # pruning changes no output, so no accuracy
        assert s["target_after_pruned"] == pytest.approx(s["target_after"], abs=1e-12)


def format_tables_split(res):
    return [t.strip() for t in dylora_sora.format_tables(res).split("\n\n")]


def test_the_experiment_runs_in_quick_mode():
    res = dylora_sora.run(quick=True)
    assert res["quick"] and sorted(map(int, res["dylora"]["target_at_rank"])) == list(range(1, 9))
    assert [s["lam"] for s in res["sora"]["runs"]] == [0.0, 2.0]  # quick: two of the four
    assert len(format_tables_split(json.loads(json.dumps(res)))) == 2


def test_compare_reports_the_final_rank_per_layer_in_the_row_and_the_history(tmp_path):
    from lowrank_ref.experiments.compare import COLUMNS, EXTRA_COLUMNS, run_compare

    methods = ["lora", "sora", "adalora", "dylora", "selora"]
    rows = run_compare(methods, steps=2, eval_windows=4, progress=False, out=tmp_path)
    by = {r["method"]: r for r in rows}
    assert tuple(by["lora"]) == COLUMNS  # a fixed-rank method: exactly the columns
    layers = ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    for m in methods[1:]:  # SPEC.final_rank: the rank per layer after COLUMNS
        assert tuple(by[m]) == COLUMNS + EXTRA_COLUMNS, m
        assert sorted(by[m]["final_ranks"]) == layers, m
    assert all(0 <= k <= 8 for k in by["sora"]["final_ranks"].values())
    assert set(by["adalora"]["final_ranks"].values()) == {12}  # 2 steps: still in AdaLoRA's warm-up
    assert set(by["dylora"]["final_ranks"].values()) == {8}  # back at its full rank after each step
    assert set(by["selora"]["final_ranks"].values()) == {1}  # no check within 2 steps: the initial rank
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert {r["method"]: r.get("final_ranks") for r in saved} == {m: by[m].get("final_ranks") for m in methods}
    hist = {h["method"]: h for h in json.loads((tmp_path / "compare_history.json").read_text())["histories"]}
    assert "ranks" not in hist["lora"]
    assert hist["sora"]["ranks"] == by["sora"]["final_ranks"]
