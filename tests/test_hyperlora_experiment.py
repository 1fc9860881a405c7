"""Chapter 08's HyperLoRA experiment in quick mode, and its helpers on inputs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_ref.experiments import hyperlora_experiments as hx


def test_projection_of_points_on_a_line_uses_one_axis():
    # four points on the line t·(1, 2, 2)/3 (a unit direction): all the variance on the first axis
    d = np.array([1.0, 2.0, 2.0]) / 3
    T = np.outer([-3.0, -1.0, 1.0, 3.0], d) + np.array([5.0, 0.0, -1.0])
    p = hx.embedding_projection(T)
    assert p["explained"][0] == pytest.approx(1.0) and p["explained"][1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(np.abs(np.asarray(p["coords"])[:, 0]), [3, 1, 1, 3], atol=1e-12)
    np.testing.assert_allclose(np.abs(np.asarray(p["axes"])[0]), d, atol=1e-12)


def test_quick_run_has_every_measurement(tmp_path):
    res = hx.run(quick=True)
    assert set(res["methods"]) == {"hyperlora", "lora_shared", "lora_shared_r32", "lora_per_task"}
    for m in res["methods"].values():
        assert set(m["per_task"]) == set(res["tasks"])
    assert res["methods"]["lora_per_task"]["trainable_params"] == 4 * res["methods"]["lora_shared"]["trainable_params"]
    assert res["methods"]["lora_shared_r32"]["trainable_params"] == res["methods"]["lora_per_task"]["trainable_params"]
    assert set(res["inference_seconds"]) == {"base", "base_again", "lora_unmerged", "hyperlora_merged_one_task",
                                             "hyperlora_unmerged_one_task", "hyperlora_unmerged_mixed"}
    assert set(res["step_seconds_interleaved"]) == {"hyperlora", "lora"}
    assert res["merged_max_abs_diff"] < 1e-4  # generate once, merge: the same outputs
    path = res["interpolation"]["path"]
    assert [p["lam"] for p in path] == list(hx.LAMBDAS)
    a = res["interpolation"]["pair"][0]
    # λ = 0 is task a's own embedding: the trained model's own accuracy on task a
    assert path[0][a] == pytest.approx(res["methods"]["hyperlora"]["per_task"][a]["accuracy"])
    assert np.asarray(res["embeddings"]["coords"]).shape == (4, 2)
    json.dumps(res)  # JSON-able
    assert "| `hyperlora` |" in hx.format_tables(res)
    hx.plot_embeddings(res, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_interpolation_restores_the_embeddings():
    from lowrank_ref.adapters.hyperlora import HyperLoRAConfig
    from lowrank_ref.data import multitask_data
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained

    mt = multitask_data(0)
    model = load_pretrained(progress=False)
    inject(model, HyperLoRAConfig(n_tasks=4), targets=("q",), rng=0)
    T = model.lowrank_shared.hyperlora.T
    T.data = T.data + 1.0
    before = T.data.copy()
    hx.interpolate_tasks(model, mt, "hound", "agreement", lambdas=(0.5,), max_windows=1)
    np.testing.assert_array_equal(T.data, before)
