"""Chapter 09's long-context experiment: position interpolation by hand, the FLOP count by hand,
the quick run's shape, and the chapter's table is what ``format_table`` prints from the committed
JSON (with the claims its text makes about those numbers)."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.experiments.longlora import (
    format_table,
    forward_flops,
    interpolate_positions,
    long_context_model,
    run,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "chapters" / "data" / "09-longlora.json"
CHAPTER = ROOT / "chapters" / "09-baselines.md"


def test_interpolation_by_hand():
    table = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 40.0], [3.0, 80.0]])
    got = interpolate_positions(table, 8)  # u = j/2: 0, .5, 1, 1.5, 2, 2.5, 3, 3.5 (kept at row 3)
    np.testing.assert_allclose(got[:, 0], [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    np.testing.assert_allclose(got[:, 1], [10, 15, 20, 30, 40, 60, 80, 80])
    np.testing.assert_array_equal(interpolate_positions(table, 4), table)
    with pytest.raises(ValueError, match="new_length"):
        interpolate_positions(table, 3)


def test_long_context_model_keeps_the_weights_and_spreads_the_positions():
    cfg = lr.nn.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, d_model=4)
    short = lr.nn.GPT(cfg, rng=np.random.default_rng(0))
    long = long_context_model(short, factor=4, attention="s2")
    assert long.config.block_size == 16 and long.attention == "s2"
    pos, old = long.pos_emb.weight.data, short.pos_emb.weight.data
    np.testing.assert_array_equal(pos[0::4], old)  # positions 0, 4, 8, 12 are the old rows 0..3
    np.testing.assert_allclose(pos[2], (old[0] + old[1]) / 2, rtol=1e-6)
    for n, p in short.parameters().items():
        if n != "pos_emb.weight":
            np.testing.assert_array_equal(long.parameters()[n].data, p.data)


def test_flops_by_hand():
    cfg = lr.nn.GPTConfig(vocab_size=5, block_size=16, n_layer=1, n_head=2, d_model=8, mlp_ratio=4)
    full, s2 = forward_flops(cfg, 16, "full"), forward_flops(cfg, 16, "s2")
    # full: 2 heads x (QKᵀ and PV) x 2·T·T·hs = 2 x 2 x 2·16·16·4
    assert full["attention"] == 8192
    # S², G = 4, hs = 4: the plain head 4 groups of 4x4, the shifted head 3 groups of 4 and 2 of 2,
    # each group g costing 2 x 2·g·g·hs
    assert s2["attention"] == 4 * 16 * 4 * 4 + (3 * 16 * 16 + 2 * 4 * 16)
    assert full["linear"] == s2["linear"] == 24 * 16 * 8 * 8 and full["head"] == 2 * 16 * 8 * 5


def test_quick_run_has_every_field():
    res = run(quick=True)
    assert res["quick"] and res["context"] == 4 * res["shipped_context"]
    assert [r["attention"] for r in res["runs"]] == ["full", "s2"]
    for r in res["runs"]:
        assert len(r["loss_by_quarter"]) == 4 and 0 <= r["accuracy"] <= 1
    assert "s2_loss_by_quarter" in res["runs"][1] and "s2_loss_by_quarter" not in res["runs"][0]
    format_table(res)


def _table(text: str) -> str:
    m = re.search(r"<!-- table: longlora -->\n(.*?)\n<!-- end table -->", text, re.S)
    assert m, "chapter 09 lacks the longlora table block"
    return m.group(1)


def test_the_chapter_table_is_the_committed_json():
    res = json.loads(DATA.read_text())
    assert not res["quick"] and len(res["seeds"]) == 3
    text = CHAPTER.read_text()
    assert _table(text).strip() == format_table(res).strip()
    # the numbers §4.5's text quotes are the file's
    R = {r["name"]: r for r in res["runs"]}
    lora, plus, full = R["LoRA"], R["LoRA+ (embed, norm)"], R["full fine-tuning"]
    assert f"{full['accuracy'] - lora['accuracy']:.3f}" == "0.038" and f"{full['accuracy'] - plus['accuracy']:.3f}" == "0.006"
    assert f"{lora['loss'] - full['loss']:.2f}" == "0.47" and f"{plus['loss'] - full['loss']:.2f}" == "0.24"
    assert "gap to full fine-tuning\n  shrinks from 0.038 to 0.006, and the loss gap from 0.47 to 0.24 nats" in text
    assert plus["trainable_params"] == 16832 and plus["trainable_params"] - lora["trainable_params"] - 5 * 2 * 64 == 12096
    f = res["flops_forward"]
    assert f"{f['full']['attention'] / f['full']['total']:.0%}" == "24%"
    assert f"{f['s2']['total'] / f['full']['total']:.2f}" == "0.81"
    ratios = [R[f"{a} + S²-Attn"]["cpu_seconds_per_step"] / R[a if a != "LoRA+" else "LoRA+ (embed, norm)"]["cpu_seconds_per_step"]
              for a in ("LoRA", "LoRA+", "full fine-tuning")]
    assert f"{min(ratios):.2f}× to {max(ratios):.2f}×" in text
    s2_plus = R["LoRA+ + S²-Attn"]
    assert f"{np.mean(s2_plus['loss_by_quarter'][1:]):.2f}" == "2.42" and max(s2_plus["s2_loss_by_quarter"]) < 1.965


def test_the_chapter_bench_tables_are_the_committed_bench_rows():
    from lowrank_ref.experiments.longlora import format_bench_tables

    data = json.loads((ROOT / "chapters" / "data" / "09-baselines-bench.json").read_text())
    assert not data["meta"]["quick"]
    m = re.search(r"<!-- table: baselines-bench -->\n(.*?)\n<!-- end table -->", CHAPTER.read_text(), re.S)
    assert m, "chapter 09 lacks the baselines-bench table block"
    assert m.group(1).strip() == format_bench_tables(data).strip()
    rows = {(r["name"], r["impl"]): r["seconds"] for r in data["rows"]}

    def ratio(name, impl, ref):
        return f"{rows[(name, impl)] / rows[(name, ref)]:.2f}×"

    text = CHAPTER.read_text()
    for backend, b1 in (("numpy", "1.11×"), ("torch", "1.07×")):
        assert ratio(f"adapter_latency_b1_{backend}", "houlsby", "merged_lora") == b1
    assert ratio("adapter_latency_b32_numpy", "houlsby", "merged_lora") == "0.98×"
    assert "1.11× merged LoRA's time in NumPy and 1.07× in torch" in text
    assert (ratio("adapter_latency_b1_numpy", "lora_unmerged", "merged_lora"),
            ratio("adapter_latency_b1_torch", "lora_unmerged", "merged_lora")) == ("1.04×", "1.08×")
    for T, pair in ((128, ("0.68×", "0.74×")), (1024, ("0.30×", "0.21×"))):
        assert (ratio(f"s2_attn_fwd_bwd_T{T}_numpy", "s2", "full"), ratio(f"s2_attn_fwd_bwd_T{T}_torch", "s2", "full")) == pair
