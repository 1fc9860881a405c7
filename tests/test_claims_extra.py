"""Chapter 90's rows 4, 17 and 19: the experiment runs (quick mode), and the committed full run
gives exactly the verdicts and numbers the rows state."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers import claims_row

from lowrank_ref.experiments import claims_extra

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "chapters" / "data" / "90-claims-extra.json"


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def test_quick_mode_runs_and_gives_a_verdict_per_row():
    res = claims_extra.run_all(quick=True)
    assert set(res["verdicts"]) == {"4", "17", "19"}
    assert res["verdicts"] == claims_extra.verdicts(res)
    rk = res["rank_sensitivity"]
    assert set(rk["curves"]) == {"lora", "dora"} and all(len(c) == len(rk["ranks"]) for c in rk["curves"].values())
    for m, c in rk["curves"].items():
        assert rk["spread"][m] == max(c) - min(c)
    assert all(0.0 <= r["target_after"] <= 1.0 for r in rk["rows"])
    # the multi-epoch slices really are smaller: more epochs over fewer tokens
    epochs = [c["epochs"] for c in res["multi_epoch"]["curve"]]
    assert epochs == sorted(epochs) and epochs[0] < epochs[-1]


def test_committed_run_is_the_full_grid_and_its_verdicts_follow_from_its_numbers(committed):
    assert committed["steps"] == 300
    assert committed["rank_sensitivity"]["ranks"] == [1, 2, 4, 8, 16, 32]
    assert len(committed["rank_sensitivity"]["seeds"]) == 2
    assert committed["verdicts"] == claims_extra.verdicts(committed)


@pytest.mark.parametrize("row", ["4", "17", "19"])
def test_chapter_row_states_the_committed_verdict(committed, row):
    cells = claims_row(int(row))
    assert f"**{committed['verdicts'][row]}**" in cells[4], (row, cells[4])
    assert "claims_extra" in cells[5] and "(data/90-claims-extra.json)" in cells[5]


def _f(x: float) -> str:
    return f"{x:.3f}"


def test_chapter_rows_state_the_committed_numbers(committed):
    rk, so, me = committed["rank_sensitivity"], committed["schedule_optimizer"], committed["multi_epoch"]
    row4 = claims_row(4)[3]
    for x in (rk["spread"]["lora"], rk["spread"]["dora"], rk["noise"], *rk["curves"]["lora"][::5],
              *rk["curves"]["dora"][::5]):
        assert _f(x) in row4, (_f(x), row4)
    row17 = claims_row(17)[3]
    for opt in ("sgd", "adamw"):
        b = so["best"][opt]
        for x in (b["cosine"], b["constant"]):
            assert _f(x) in row17, (opt, _f(x), row17)
    assert _f(so["noise"]) in row17
    row19 = claims_row(19)[3]
    for c in (me["curve"][0], me["curve"][-1]):
        for x in (c["target_after"], c["target_loss_after"]):
            assert _f(x) in row19 and f"{c['epochs']:.0f} epochs" in row19, (c, row19)
    for x in (me["noise"], me["loss_noise"]):
        assert _f(x) in row19, (_f(x), row19)
