"""The ``dora`` and ``lora_all`` rows of the main job on a tiny budget: trainable counts from the
shipped model's shapes by hand, and the adapter files they write."""

from __future__ import annotations

import pytest
from safetensors.numpy import load_file

from lowrank_ref.experiments.compare import COLUMNS, run_compare
from lowrank_ref.models import load_pretrained

TINY = dict(steps=3, batch_size=2, eval_windows=4, progress=False)


@pytest.fixture(scope="module")
def rows_and_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_dora")
    rows = run_compare(methods=["dora", "lora_all"], out=out, **TINY)
    return {r["method"]: r for r in rows}, out


def test_the_shipped_model_is_the_one_the_counts_assume():
    c = load_pretrained().config
    assert (c.d_model, c.n_layer, c.mlp_ratio) == (64, 2, 4)


def test_trainable_counts_by_hand(rows_and_dir):
    by, _ = rows_and_dir
    assert list(by) == ["dora", "lora_all"]
    for r in by.values():
        assert tuple(r) == COLUMNS
    d, h, L, r = 64, 256, 2, 8
    # dora on q and v: A (r, d) + B (d, r) + m (d,) per layer
    assert by["dora"]["trainable_params"] == L * 2 * (r * d + d * r + d) == 4_352
    # lora on every linear layer but the head: q, k, v, o (d -> d), fc (d -> h), proj (h -> d)
    per_block = 4 * r * (d + d) + r * (d + h) + r * (h + d)
    assert by["lora_all"]["trainable_params"] == L * per_block == 18_432


def test_adapter_files_exist_and_hold_the_trainable_tensors(rows_and_dir):
    by, out = rows_and_dir
    for name, row in by.items():
        f = out / "adapters" / f"{name}.safetensors"
        assert f.is_file() and f.stat().st_size == row["adapter_bytes"]
        tensors = load_file(str(f))
        assert sum(t.size for t in tensors.values()) == row["trainable_params"], name
    dora = load_file(str(out / "adapters" / "dora.safetensors"))
    assert sum(k.endswith("lora_magnitude_vector") for k in dora) == 4  # one m per adapted layer
    lora_all = load_file(str(out / "adapters" / "lora_all.safetensors"))
    assert not any("head" in k for k in lora_all)
    assert sum(k.endswith("lora_A.weight") for k in lora_all) == 2 * 6


def test_rows_are_in_range(rows_and_dir):
    by, _ = rows_and_dir
    for r in by.values():
        for k in ("target_before", "target_after", "retained_after"):
            assert 0.0 <= r[k] <= 1.0, (r["method"], k)
        assert r["peak_memory_bytes"] > 0 and r["seconds_per_step"] > 0
    # both start from the unchanged model (B = 0, m = ‖W0‖): the same "before"
    assert by["dora"]["target_before"] == by["lora_all"]["target_before"]
