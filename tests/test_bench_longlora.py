"""bench/bench_longlora.py in quick mode: well-formed rows for every implementation, and the merged
LoRA model computes what the unmerged one does (so the latency rows compare equal work). Never timings."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quick_longlora_bench_rows(monkeypatch):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.bench_longlora
    import bench.run

    rows = bench.run.check_rows(bench.bench_longlora.run(quick=True))
    latency = [r for r in rows if r["name"].startswith("adapter_latency_")]
    assert {r["impl"] for r in latency} == {"merged_lora", "lora_unmerged", "houlsby"}
    assert {r["name"] for r in latency} == {f"adapter_latency_b{b}_{k}" for b in (1, 2) for k in ("numpy", "torch")}
    assert max(r["max_abs_diff_merged_vs_unmerged"] for r in latency) < 1e-5  # float32
    attn = [r for r in rows if r["name"].startswith("s2_attn_")]
    assert {(r["impl"], r["ratio_to"]) for r in attn} == {("full", None), ("s2", "full")}
