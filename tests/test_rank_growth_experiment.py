"""Chapter 07 §8-10: the growth and sparse-factor tables are what ``rank_growth.format_tables``
prints from the committed JSON, the benchmark table what ``format_bench`` prints from the committed
bench runs, the numbers quoted in the text are those files', the experiment runs in quick mode,
and the benchmark module's quick rows follow the bench contract."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from lowrank_ref.experiments import rank_growth

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "chapters" / "07-rank.md"
DATA = ROOT / "chapters" / "data" / "07-growth-sparse.json"
BENCH_RUNS = sorted((ROOT / "bench" / "results" / "rank" / "history").glob("run*.json"))


def _table(text: str, name: str) -> str:
    return dict(re.findall(r"<!-- table: ([\w-]+) -->\n(.*?)<!-- /table -->", text, re.S))[name].strip()


def test_the_chapters_tables_come_from_the_committed_results():
    res = json.loads(DATA.read_text())
    assert not res["quick"] and res["steps"] == 300
    text = CHAPTER.read_text()
    growth, sparse = rank_growth.format_tables(res).split("\n\n")
    assert _table(text, "selora-growth") == growth.strip()
    assert _table(text, "sparse-factors") == sparse.strip()
    runs = [json.loads(p.read_text()) for p in BENCH_RUNS]
    assert len(runs) == 3 and not any(r["meta"]["quick"] for r in runs)
    assert _table(text, "rank-bench") == rank_growth.format_bench(runs).strip()


def test_the_numbers_quoted_in_the_text_are_the_results():
    res = json.loads(DATA.read_text())
    text = " ".join(CHAPTER.read_text().split())  # line breaks as spaces
    by_th = {s["threshold"]: s for s in res["selora"]["runs"]}
    assert by_th[2.0]["mean_final_rank"] == 1.0 and f"{rank_growth.largest_ratio(by_th[2.0]):.3f}" == "1.239"
    assert "largest ratio was 1.239" in text and "end at ranks 3, 5, 3 and 1" in text
    assert sum(v is not None for g in by_th[2.0]["growth"] for v in g["ratios"].values()) == 60
    assert [v for _, v in sorted(by_th[1.02]["final_ranks"].items())] == [3, 5, 3, 1]
    assert all(s["final_ranks"]["blocks.1.attn.v"] == 1 for s in by_th.values())  # "never grows"
    lo = res["lora_same_scale"]["target_at_rank"]
    assert [f"{x:.3f}" for x in (by_th[1.02]["target_after"], lo["1"], lo["8"])] == ["0.281", "0.249", "0.336"]
    sp = {s["density"]: s for s in res["sparse_factors"]["runs"]}
    assert f"{sp[1.0]['target_after'] - sp[0.5]['target_after']:.3f}" == "0.012"
    assert f"{sp[1.0]['target_after'] - sp[0.25]['target_after']:.3f}" == "0.059"
    assert f"{sp[0.05]['target_after']:.3f}" == "0.227" and sp[0.5]["nonzero_factor_entries"] == 2048
    assert [f"{sp[d]['retained_after']:.3f}" for d in (1.0, 0.05)] == ["0.177", "0.244"]
    for d, s in sp.items():
        assert abs(s["measured_density"] - d) < 0.005  # the masks reach the density asked for


def test_the_bench_goals_quoted_hold_in_every_committed_run():
    for p in BENCH_RUNS:
        rows = {r["impl"]: r for r in json.loads(p.read_text())["rows"] if r["name"] == "rank_methods_step_numpy"}
        lora = rows["lora"]["seconds"]
        assert rows["adalora"]["seconds"] / lora <= 1.15 and rows["selora_amortised"]["seconds"] / lora <= 1.1
        for impl in ("adalora_hooks_only", "selora_check_only"):
            assert rows[impl]["seconds"] / lora < 0.0035, (p.name, impl)  # "0.2-0.3% of a LoRA step"


def test_the_experiment_runs_in_quick_mode(tmp_path):
    res = json.loads(json.dumps(rank_growth.run(quick=True)))
    assert res["quick"] and [s["threshold"] for s in res["selora"]["runs"]] == [2.0, 1.0]
    assert set(res["selora"]["runs"][1]["final_ranks"].values()) == {3}  # threshold 1 grows at both checks
    assert len(rank_growth.format_tables(res).split("\n\n")) == 2
    assert pathlib.Path(rank_growth.plot_growth(res, tmp_path / "g.png")).stat().st_size > 0


def test_the_bench_module_quick_rows_follow_the_contract(monkeypatch):
    pytest.importorskip("threadpoolctl")
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_rank, run

    rows = run.check_rows(bench_rank.run(quick=True))
    impls = {r["impl"] for r in rows}
    assert {"lora", "adalora", "sora", "selora", "selora_check", "selora_amortised"} <= impls
    goals = {r["impl"]: r.get("goal") for r in rows}
    assert goals["adalora"] == 1.15 and goals["selora_amortised"] == 1.1
