"""The benchmark harness (bench/run.py): well-formed rows, ratios, goals, files. Never timings."""

from __future__ import annotations

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a folder of the repository, not installed
    import bench.run

    return bench.run


def _row(**kw):
    return {"name": "n", "impl": "a", "seconds": 1.0, "ratio_to": None, **kw}


def test_check_rows_accepts_the_contract(bench_run):
    rows = [_row(), _row(impl="b", seconds=0.5, ratio_to="a", goal=1.0),
            _row(impl="c", seconds=None, skipped="not installed")]
    assert bench_run.check_rows(rows) is rows


@pytest.mark.parametrize("bad, match", [
    ({"seconds": None}, "skipped"),
    ({"seconds": -1.0}, "seconds"),
    ({"seconds": float("nan")}, "seconds"),
    ({"ratio_to": "nobody"}, "ratio_to"),
    ({"goal": 1.0}, "goal needs ratio_to"),
    ({"goal": 0}, "goal must be"),
])
def test_check_rows_rejects(bench_run, bad, match):
    with pytest.raises(ValueError, match=match):
        bench_run.check_rows([_row(**bad)])


def test_check_rows_rejects_missing_keys_and_duplicates(bench_run):
    with pytest.raises(ValueError, match="lacks"):
        bench_run.check_rows([{"name": "n", "impl": "a", "seconds": 1.0}])
    with pytest.raises(ValueError, match="twice"):
        bench_run.check_rows([_row(), _row()])
    with pytest.raises(ValueError, match="list"):
        bench_run.check_rows({"name": "n"})


def test_ratios_goals_and_markdown(bench_run):
    rows = bench_run.add_ratios([
        _row(impl="ref", seconds=2.0),
        _row(impl="fast", seconds=1.0, ratio_to="ref", goal=0.95),
        _row(impl="slow", seconds=3.0, ratio_to="ref", goal=1.0),
        _row(impl="gone", seconds=None, ratio_to="ref", goal=1.0, skipped="missing"),
    ])
    by = {r["impl"]: r for r in rows}
    assert by["fast"]["ratio"] == pytest.approx(0.5) and by["fast"]["met"] is True
    assert by["slow"]["ratio"] == pytest.approx(1.5) and by["slow"]["met"] is False
    assert by["gone"]["ratio"] is None and by["gone"]["met"] is None
    md = bench_run.render_markdown(rows, bench_run.machine_info(quick=True))
    assert "| n | fast |" in md and "0.50× ref" in md and "skipped: missing" in md and "**no**" in md


def test_time_interleaved_calls_each_function(bench_run):
    calls = {"a": 0, "b": 0}

    def make(k):
        def f():
            calls[k] += 1
        return f

    res = bench_run.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=1)
    assert calls == {"a": 4, "b": 4}
    assert set(res) == {"a", "b"} and all(v["seconds"] >= 0 and v["repeats"] == 3 for v in res.values())


def test_only_names_an_unknown_module(bench_run):
    with pytest.raises(ValueError, match="no benchmark module"):
        bench_run.discover(["no_such_bench"])


def test_quick_lora_run_writes_well_formed_results(bench_run, tmp_path):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    assert bench_run.main(["--quick", "--only", "lora", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = bench_run.check_rows(data["rows"])
    names = {r["name"] for r in rows}
    assert {"lora_layer_fwd_bwd", "lora_layer_infer_numpy", "gpt_lora_train_step", "gpt_infer_numpy"} <= names
    assert data["meta"]["quick"] is True
    for r in rows:
        if r.get("max_abs_diff_vs_numpy") is not None:  # the compared layers compute the same thing
            assert r["max_abs_diff_vs_numpy"] < 1e-4, r
    assert (tmp_path / "bench.md").read_text().startswith("Measured")
