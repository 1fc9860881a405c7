"""Chapter 05's fitting experiment (``lowrank_ref.experiments.structure_fit``): the fitter reaches
an update its structure can represent, each structure's stated largest rank is what its layer
reaches with random factors, and the committed result obeys Eckart–Young (no structure whose
ΔW has rank ≤ k beats the truncated SVD at k) and holds LoRA's exact errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.experiments import structure_fit as sf
from lowrank_ref.experiments.doc_tables import DATA
from lowrank_ref.experiments.loha_experiments import lora_best_error


def test_fit_update_reaches_a_representable_target():
    rng = np.random.default_rng(0)
    T = np.kron(rng.standard_normal((2, 2)), rng.standard_normal((4, 4)))  # A ⊗ B, 8 x 8
    got = sf.fit_update(T, lr.KronAConfig(a_out=2, a_in=2), steps=600, lr=3e-2)
    assert got["params"] == 4 + 16
    assert got["error"] < 1e-3
    lora = sf.fit_update(T, lr.LoRAConfig(r=1, alpha=1), steps=50)
    assert lora["error"] > 0.1  # rank(A ⊗ B) = 4: a rank-1 LoRA cannot


@pytest.mark.parametrize("shape", [(16, 16), (16, 8)])
def test_stated_largest_rank_is_reached_with_random_factors(shape):
    out, n_in = shape
    rng = np.random.default_rng(1)
    for s in sf.structures(out, n_in):
        layer = lr.adapt(lr.nn.Linear.from_arrays(np.zeros((out, n_in))), s["config"], rng=2)
        for p in layer.trainable_parameters().values():
            p.data = rng.standard_normal(p.shape)
        assert np.linalg.matrix_rank(layer.delta_weight()) == s["max_rank"], (s["structure"], s["label"])


def test_committed_result_obeys_eckart_young_and_holds_lora_s_exact_errors():
    d = json.loads((DATA / "05-structure-fit.json").read_text(encoding="utf-8"))
    assert not d["quick"]
    assert {r["structure"] for r in d["rows"]} == {"lora", "loha", "lokr", "krona", "vera"}
    T = np.random.default_rng(0).standard_normal((32, 32))  # the random target, recomputed
    for r in d["rows"]:
        if r["target"] != "random":
            continue
        best = lora_best_error(T, r["max_rank"])
        if r["structure"] == "lora":
            assert r["error"] == pytest.approx(best, rel=1e-12)
        else:
            assert r["error"] >= best - 1e-9, (r["structure"], r["label"])


def test_fit_target_rows():
    rows = sf.fit_target("t", np.random.default_rng(3).standard_normal((8, 8)), steps=5)
    assert {r["structure"] for r in rows} == {"lora", "loha", "lokr", "krona", "vera"}
    assert all(0 <= r["error"] and r["params"] > 0 for r in rows)
