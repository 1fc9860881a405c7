"""Chapter 02's experiments: the quick run of ``main()`` writes every table with finite numbers,
the magnitude/direction run gives finite correlations, and the committed results file that the
chapter's §10 tables are read from has the full-size structure (3 seeds where the chapter says so)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowrank_ref.experiments import dora_experiments as dx

RESULTS = Path(__file__).resolve().parent.parent / "chapters" / "data" / "02-dora-results.json"
TABLES = ("rank_sweep", "double_lora", "layerwise", "dora_vs_lora_lr")
LOSSES = ("dialect_loss", "base_loss", "delta_norm")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_structure(res, steps, n_md_seeds):
    assert res["steps"] == steps
    for k in ("dialect_loss", "base_loss", "dialect_accuracy", "base_accuracy"):
        assert _finite(res["pretrained"][k]) and res["pretrained"][k] > 0, k
    for name in TABLES:
        assert res[name], name
        for row in res[name]:
            assert "train_losses" not in row and "model" not in row
            assert row["trainable_params"] > 0
            for k in LOSSES:
                assert _finite(row[k]) and row[k] >= 0, (name, k)
    rules = {row["rule"] for row in res["rank_sweep"]}
    assert rules == {"alpha/r", "alpha/sqrt(r)"}
    f64 = res["double_equals_lora_float64"]
    assert _finite(f64["max_abs_loss_diff"]) and f64["max_abs_loss_diff"] < 1e-10
    for method in ("lora", "dora"):
        md = res["magnitude_direction"][method]
        assert -1 <= md["corr"] <= 1 and -1 <= md["row_corr"] <= 1
        assert all(len(p) == 4 for p in md["points"])
        summ = res["magnitude_direction_seeds"][method]
        assert len(summ["corr"]) == len(summ["row_corr"]) == n_md_seeds
        for k in ("corr", "row_corr"):
            assert all(-1 <= v <= 1 for v in summ[k])
            assert _finite(summ[k + "_mean"]) and _finite(summ[k + "_std"]) and summ[k + "_std"] >= 0
    assert res["magnitude_direction_seeds"]["seeds"] == list(range(n_md_seeds))


def test_quick_main_writes_every_table(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_REF_QUICK", "1")
    out = tmp_path / "dora.json"
    assert dx.main(["--quick", "--steps", "2", "--out", str(out)]) == 0
    check_structure(json.loads(out.read_text()), steps=2, n_md_seeds=1)


def test_magnitude_direction_run_gives_finite_correlations(monkeypatch):
    monkeypatch.setenv("LOWRANK_REF_QUICK", "1")
    res = dx.magnitude_direction_run(dx.base_model(), r=2, alpha=4, steps=3, every=1)
    assert set(res) == {"lora", "dora"}
    for name, v in res.items():
        assert len(v["points"]) == 3 * 4  # checkpoints after steps 1, 2, 3; q and v in each of 2 blocks
        assert -1 <= v["corr"] <= 1 and -1 <= v["row_corr"] <= 1, name
        assert math.isfinite(v["dialect_loss"]) and math.isfinite(v["base_loss"])


def test_summary_over_seeds_is_mean_and_population_std():
    by_seed = {s: {"lora": {"corr": c, "row_corr": -c, "dialect_loss": 1.0, "base_loss": 2.0}}
               for s, c in ((0, 0.2), (1, 0.4), (2, 0.9))}
    summ = dx.magnitude_direction_summary(by_seed)
    assert summ["seeds"] == [0, 1, 2]
    assert summ["lora"]["corr"] == [0.2, 0.4, 0.9]
    assert summ["lora"]["corr_mean"] == pytest.approx(0.5)
    assert summ["lora"]["corr_std"] == pytest.approx(math.sqrt((0.09 + 0.01 + 0.16) / 3))
    assert summ["lora"]["row_corr_mean"] == pytest.approx(-0.5)


def test_the_committed_results_are_the_full_runs():
    res = json.loads(RESULTS.read_text(encoding="utf-8"))
    check_structure(res, steps=300, n_md_seeds=3)
    assert sorted({row["r"] for row in res["rank_sweep"]}) == [1, 2, 4, 8, 16, 32, 64]
    assert sorted({row["seed"] for row in res["double_lora"]}) == [0, 1, 2]
    assert sorted({row["lr"] for row in res["dora_vs_lora_lr"]}) == [3e-3, 1e-2, 3e-2, 1e-1]
