"""Chapter 02's fair rsLoRA comparison: matched s is the same run, and each rule's best learning
rate is picked correctly per rank."""

from __future__ import annotations

import json
import math

import pytest

from lowrank_ref.experiments import doc_tables as dt
from lowrank_ref.experiments import scaling_rules as sr


def test_the_rules_give_their_scalings():
    for r in (1, 4, 16, 64):
        assert sr.rule_config("alpha/r", r).scaling == pytest.approx(16 / r)
        assert sr.rule_config("alpha/sqrt(r)", r).scaling == pytest.approx(2 * math.sqrt(8) / math.sqrt(r))
        assert sr.rule_config("alpha=2r", r).scaling == pytest.approx(2.0)
    assert all(sr.rule_config(rule, 8).scaling == pytest.approx(2.0) for rule in sr.RULES)
    with pytest.raises(ValueError, match="rule must be one of"):
        sr.rule_config("alpha/r^2", 4)


def test_matched_s_trains_to_the_same_numbers():
    """rsLoRA at rank r and LoRA with alpha = alpha_rs sqrt(r): the same s, the same run to the bit."""
    res = sr.matched_s(r=4, cfg=sr.settings("quick"))
    assert res["rslora"]["scaling"] == pytest.approx(res["lora"]["scaling"])
    assert res["rslora"]["alpha"] != res["lora"]["alpha"]
    assert res["identical"], (res["rslora"], res["lora"])


def _rows(acc):
    """Synthetic sweep rows: acc[(rule, r, factor)] = dialect accuracy (one seed)."""
    return [{"rule": rule, "r": r, "scaling": sr.rule_config(rule, r).scaling, "lr": 0.01 * f, "lr_factor": f,
             "seed": 0, "target_after": a, "retained_after": 0.5 - a / 2, "trainable_params": 0}
            for (rule, r, f), a in acc.items()]


def test_best_by_rank_picks_the_best_lr_and_flags_the_edge():
    acc = {}
    for rule in sr.RULES:
        for r in (1, 16):
            for f, a in ((0.5, 0.30), (1.0, 0.32), (2.0, 0.31)):
                acc[(rule, r, f)] = a + (0.05 if (rule == "alpha/r" and r == 16 and f == 2.0) else 0.0)
    best = {(b["rule"], b["r"]): b for b in sr.best_by_rank(_rows(acc))}
    assert best[("alpha/sqrt(r)", 16)]["best_lr_factor"] == 1.0 and not best[("alpha/sqrt(r)", 16)]["on_edge"]
    b = best[("alpha/r", 16)]
    assert b["best_lr_factor"] == 2.0 and b["on_edge"] and b["best"]["target_after"] == pytest.approx(0.36)
    assert b["s_times_lr"] == pytest.approx(1.0 * 0.02)
    assert b["at_compare_lr"]["target_after"] == pytest.approx(0.32)
    data = {"best": sr.best_by_rank(_rows(acc)), "matched_s": {"identical": True}}
    c = sr.conclusions(data)
    assert c["best_lr_gap"] == pytest.approx(0.04) and c["fixed_lr_gain"] == pytest.approx(0.0)
    assert c["alpha2r_best_lr_factors"] == {"1": 1.0, "16": 1.0} and c["any_best_on_edge"]


def test_the_committed_sweep_and_its_table():
    data = json.loads((dt.DATA / "02-scaling-lr.json").read_text(encoding="utf-8"))
    assert data["settings"]["mode"] == "full" and data["matched_s"]["identical"]
    want = {(rule, r, f, s) for rule in sr.RULES for r in data["settings"]["ranks"]
            for f in data["settings"]["lr_factors"] for s in data["settings"]["seeds"]}
    assert {(x["rule"], x["r"], x["lr_factor"], x["seed"]) for x in data["runs"]} == want
    assert data["best"] == sr.best_by_rank(data["runs"]) and data["conclusions"] == sr.conclusions(data)
    assert dt.render("scaling-lr") == sr.table(data)
