"""bench/bench_serve.py in quick mode: well-formed rows, and every way of serving the mixed batch
(merging one adapter at a time, a loop over rows, PEFT's adapter_names= batch) gives bgmv's output.
Never timings."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quick_serving_bench_rows_agree_with_each_other(monkeypatch):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    pytest.importorskip("peft", reason="PEFT is not installed")
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.bench_serve
    import bench.run

    rows = bench.run.check_rows(bench.bench_serve.run(quick=True))
    impls = {r["impl"] for r in rows if r["name"].startswith("serve_mixed_")}
    assert impls == {"merged", "bgmv", "sgmv", "merge_switch", "row_loop", "peft"}
    diffs = [r["max_abs_diff_vs_bgmv"] for r in rows if "max_abs_diff_vs_bgmv" in r]
    assert len(diffs) == 5 * len(bench.bench_serve.QUICK["n_adapters"])
    assert max(diffs) < 1e-5  # float32
