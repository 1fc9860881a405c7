"""The main job on a tiny budget: the rows, their keys and ranges, the files it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_ref import LoRAConfig
from lowrank_ref.experiments import compare
from lowrank_ref.experiments.compare import COLUMNS, VARIANTS, Variant, run_compare
from lowrank_ref.models import load_pretrained

TINY = dict(steps=3, batch_size=2, eval_windows=4, progress=False)


@pytest.fixture(scope="module")
def rows_and_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rows = run_compare(methods=["full", "bitfit", "lora"], out=out, **TINY)
    return rows, out


def test_rows_have_exactly_the_columns_and_values_in_range(rows_and_dir):
    rows, _ = rows_and_dir
    assert [r["method"] for r in rows] == ["full", "bitfit", "lora"]
    for r in rows:
        assert tuple(r) == COLUMNS
        for k in ("target_before", "target_after", "retained_after"):
            assert 0.0 <= r[k] <= 1.0, (r["method"], k)
        assert r["seconds_per_step"] > 0
        assert r["adapter_bytes"] > 0
        assert r["peak_memory_bytes"] > 0
    # every method starts from the same model (LoRA's B = 0), so the "before" column agrees
    assert len({r["target_before"] for r in rows}) == 1


def test_trainable_counts_match_a_hand_count(rows_and_dir):
    rows, _ = rows_and_dir
    by = {r["method"]: r for r in rows}
    c = load_pretrained().config
    d, h, L = c.d_model, c.mlp_ratio * c.d_model, c.n_layer
    per_block = 4 * (d * d + d) + 2 * 2 * d + (d * h + h) + (h * d + d)  # attn, two LNs, MLP
    full = c.vocab_size * d + c.block_size * d + L * per_block + 2 * d + d * c.vocab_size
    bias = L * (4 * d + 2 * d + h + d) + d  # q,k,v,o; ln1, ln2; fc; proj; ln_f
    lora = L * 2 * 8 * (d + d)  # q and v in each block, r = 8: A (8, d) + B (d, 8)
    assert by["full"]["trainable_params"] == full
    assert by["bitfit"]["trainable_params"] == bias
    assert by["lora"]["trainable_params"] == lora


def test_files_sizes_and_memory_order(rows_and_dir):
    rows, out = rows_and_dir
    by = {r["method"]: r for r in rows}
    for name, r in by.items():
        f = out / "adapters" / f"{name}.safetensors"
        assert f.stat().st_size == r["adapter_bytes"]
        assert r["adapter_bytes"] >= 4 * r["trainable_params"]  # float32 tensors plus a header
    assert by["full"]["adapter_bytes"] > by["lora"]["adapter_bytes"] > by["bitfit"]["adapter_bytes"]
    # full fine-tuning keeps gradients and two Adam moments for every weight: 12 bytes a scalar more
    extra = 12 * (by["full"]["trainable_params"] - by["lora"]["trainable_params"])
    # (measured on the second step, when the state from the first is live under the activations)
    assert by["full"]["peak_memory_bytes"] > by["lora"]["peak_memory_bytes"] + 0.9 * extra


def test_json_and_png_are_written(rows_and_dir):
    rows, out = rows_and_dir
    with open(out / "compare.json") as f:
        assert json.load(f) == rows
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    hist = json.loads((out / "compare_history.json").read_text())
    assert [len(h["losses"]) for h in hist["histories"]] == [3, 3, 3]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="known methods: " + ", ".join(VARIANTS)):
        run_compare(methods=["lora", "nope"], **TINY)
    with pytest.raises(ValueError, match="at least one"):
        run_compare(methods=[], **TINY)
    with pytest.raises(ValueError, match="steps"):
        run_compare(methods="lora", steps=0, progress=False)
    with pytest.raises(ValueError, match="cupy"):
        run_compare(methods="lora", backend="cupy", progress=False)


def test_a_new_variant_is_one_line(monkeypatch):
    monkeypatch.setitem(compare.VARIANTS, "lora_r2_all",
                        Variant("lora", LoRAConfig(r=2, alpha=4), targets="all", lr=1e-2))
    (row,) = run_compare(methods="lora_r2_all", **TINY)
    c = load_pretrained().config
    d, h = c.d_model, c.mlp_ratio * c.d_model
    # "all" = every Linear but the output head: q, k, v, o (d -> d), fc (d -> h), proj (h -> d)
    per_block = 4 * 2 * (d + d) + 2 * (d + h) + 2 * (h + d)
    assert row["trainable_params"] == c.n_layer * per_block


def test_fine_tuning_helps_on_the_dialect():
    # a short but real run: every method must beat the untouched model on the dialect
    rows = run_compare(methods=["full", "lora"], steps=80, batch_size=8, eval_windows=64, progress=False)
    for r in rows:
        assert r["target_after"] > r["target_before"] + 0.05, r


def test_torch_backend_gives_the_same_rows_shape():
    pytest.importorskip("torch")
    (np_row,) = run_compare(methods="lora", **TINY)
    (t_row,) = run_compare(methods="lora", backend="torch", **TINY)
    assert tuple(t_row) == COLUMNS
    assert t_row["trainable_params"] == np_row["trainable_params"]
    assert t_row["target_before"] == pytest.approx(np_row["target_before"], abs=0.01)
    assert t_row["adapter_bytes"] == pytest.approx(np_row["adapter_bytes"], rel=0.05)
    assert np.isfinite(t_row["target_after"])
