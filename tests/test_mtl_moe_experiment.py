"""Chapter 08 §6–§7's recorded run (chapters/data/08-mtl-moe.json): what the chapter's prose says
about it holds in the file, and the experiment's functions run in quick mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_ref.experiments import mtl_moe_experiments as mx


@pytest.fixture(scope="module")
def recorded():
    return json.loads(mx.DATA_FILE.read_text(encoding="utf-8"))


def test_the_recorded_run_backs_the_chapters_statements(recorded):
    m = recorded["mtl_merge"]
    assert m["merged"] == m["unmerged"]  # merged for its task = unmerged, every task
    pi = np.array(m["pi"]["blocks.1.attn.v"])  # (tasks, n_up)
    assert np.allclose(pi.sum(axis=1), 1)
    top = [int(np.argmax(p)) for p in pi if p.max() >= 0.91]
    assert len(top) == 3 and len(set(top)) == 3  # three tasks, each on a different B_i
    runs = recorded["balancing"]["runs"]
    assert [r["balance_weight"] for r in runs] == [0.0, 0.01, 1.0]
    mean_cv2 = [np.mean(list(r["cv2"].values())) for r in runs]
    assert mean_cv2[0] > mean_cv2[1] > mean_cv2[2]  # the term balances the first choices
    assert all(np.isclose(sum(s), 1) for r in runs for s in r["shares"].values())
    assert set(mx.tables(recorded)) == {"balancing", "mtl", "latency"}


def test_the_latency_part_runs_in_quick_mode():
    lat = mx.latency(quick=True)
    assert {"base", "mtl_unmerged_mixed", "mtl_merged_one_task", "moe_unmerged"} <= set(lat)
    assert lat["repeats"] == 1 and all(lat[k]["median"] > 0 for k in ("base", "moe_unmerged"))
