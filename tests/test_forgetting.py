"""The learning-forgetting experiment's pieces: the uncontradicted retention text really is
uncontradicted, the energy rank is right on matrices of known spectrum, and a tiny run works."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ref.data.dialect import dialect_only_words, render_dialect
from lowrank_ref.data.grammar import render_base
from lowrank_ref.experiments import forgetting as fg


def test_unchanged_sentences_read_the_same_in_the_dialect():
    ss = fg.unchanged_sentences(300)
    assert len(ss) == 300
    assert all(render_base(s) == render_dialect(s) for s in ss)
    from lowrank_ref.data import default_tokenizer

    tok = default_tokenizer()
    ids = set(fg.unchanged_heldout(300).tolist())
    assert not ids & set(tok.encode(dialect_only_words()).tolist())


def test_rank_for_energy_on_known_spectra():
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    V, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    s = np.array([3.0, 2.0, 1.0] + [1e-3] * 7)  # energy 9, 4, 1, ...: 9/14 < 0.9 <= 13/14
    M = U[:, :10] @ np.diag(s) @ V.T
    assert fg.rank_for_energy(M, 0.9) == 2
    assert fg.rank_for_energy(M, 0.99) == 3
    assert fg.rank_for_energy(np.eye(10), 0.9) == 9  # flat spectrum: 90% needs 9 of 10
    d = rng.standard_normal((5, 7))
    assert np.linalg.norm(fg.noise_like(d, rng)) == pytest.approx(np.linalg.norm(d))


def test_a_tiny_run_reports_accuracies():
    row = fg.finetune_point("lora", 2, 1e-2, steps=2, eval_windows=2)
    assert row["trainable_params"] == 2 * 2 * sum(i + o for i, o in [(64, 64)] * 4 + [(64, 256), (256, 64)])
    for k in ("learned", "kept_all", "kept_unchanged"):
        assert 0.0 <= row[k] <= 1.0
