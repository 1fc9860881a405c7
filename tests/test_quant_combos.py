"""Chapter 03 §9 and chapter 90's rows 24–25: each adapter on a float and on an NF4 base.

The experiment runs (quick mode); the committed full run is the full grid, its summary and
verdicts follow from its rows, and the chapters state its numbers."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
from helpers import claims_row

from lowrank_ref.experiments import quant_combos

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "chapters" / "data" / "quant_combos.json"


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def _f(x: float) -> str:
    return f"{x:.3f}"


def test_quick_mode_trains_each_pair_on_a_float_and_an_nf4_base():
    res = quant_combos.run_all(quick=True)
    assert [r["row"] for r in res["rows"]] == ["lora", "qlora", "dora", "qdora"]
    by = {r["row"]: r for r in res["rows"]}
    for fl, q in (("lora", "qlora"), ("dora", "qdora")):
        assert by[fl]["base_storage"] == "float32" and by[fl]["quantized_layers"] == 0
        assert by[q]["base_storage"] == "nf4"
        assert by[q]["quantized_layers"] == by[q]["adapted_layers"] == 4
        assert by[q]["trainable_params"] == by[fl]["trainable_params"]
        # 4 layers of 64 x 64: float32 bytes, and NF4 codes (half a byte each) plus the scales
        assert by[fl]["base_bytes"] == 4 * 64 * 64 * 4
        assert 4 * 64 * 64 // 2 < by[q]["base_bytes"] < 4 * 64 * 64 * 4.5 / 8 + 1
    assert by["qlora"]["base_bytes"] == by["qdora"]["base_bytes"]  # the same storage path
    assert res["verdicts"] == quant_combos.verdicts(res)
    assert "| DoRA: `qdora` | NF4 |" in quant_combos.format_table(res)


def test_summary_and_verdicts_follow_from_the_rows():
    rows = [{"row": n, "target_before": 0.1, "target_after": a, "retained_after": 0.2, "trainable_params": 10,
             "base_bytes": b} for n, a, b in (("lora", 0.30, 100), ("lora", 0.32, 100), ("qlora", 0.25, 14),
                                             ("qlora", 0.27, 14), ("dora", 0.30, 100), ("qdora", 0.31, 14))]
    res = {"pairs": [["lora", "qlora"], ["dora", "qdora"]], "rows": rows}
    s = quant_combos.summarise(res)
    assert s["noise"] == pytest.approx(0.02)
    assert s["pairs"]["lora"]["gap"] == pytest.approx(0.26 - 0.31)
    assert s["pairs"]["dora"]["gap"] == pytest.approx(0.01) and s["pairs"]["dora"]["base_ratio"] == 0.14
    assert quant_combos.verdicts(res) == {"lora": "below its float twin", "dora": "as its float twin (within noise)"}


def test_committed_run_is_the_full_grid(committed):
    assert committed["steps"] == 300 and committed["seeds"] == [0, 1, 2] and committed["eval_windows"] == 256
    assert committed["pairs"] == [list(p) for p in quant_combos.PAIRS]
    assert committed["quantize"] == quant_combos.QUANTIZE
    assert len(committed["rows"]) == 2 * len(quant_combos.PAIRS) * 3
    assert committed["summary"] == quant_combos.summarise(committed)
    assert committed["verdicts"] == quant_combos.verdicts(committed)
    by = {}
    for r in committed["rows"]:
        by.setdefault(r["row"], []).append(r)
    for fl, q in quant_combos.PAIRS:
        assert all(r["base_storage"] == "float32" for r in by[fl]) and all(r["base_storage"] == "nf4" for r in by[q])
        assert all(r["quantize"] == (None if q == "qlora" else "nf4") for r in by[q])  # qlora: its own config
        assert all(r["quantized_layers"] == r["adapted_layers"] == 4 for r in by[q])


def test_chapter_90_rows_state_the_committed_numbers_and_verdicts(committed):
    s = committed["summary"]
    p = s["pairs"]
    assert set(committed["verdicts"].values()) == {"as its float twin (within noise)"}
    row24 = claims_row(24)
    for fl in ("lora", "dora", "adalora"):
        for x in (p[fl]["float_target_after"], p[fl]["4bit_target_after"]):
            assert _f(x) in row24[3], (fl, _f(x), row24[3])
    assert _f(s["noise"]) in row24[3]
    assert f"{p['dora']['base_bytes']['qdora']:,} instead of {p['dora']['base_bytes']['dora']:,} bytes" in row24[3]
    assert "**wrong** for QLoRA with AdaLoRA" in row24[4] and "**not built**" in row24[4]
    assert "(data/quant_combos.json)" in row24[5]
    row25 = claims_row(25)
    hp = p["hyperlora"]
    assert f"{_f(hp['float_target_after'])} on float, {_f(hp['4bit_target_after'])} on NF4" in row25[3]
    assert _f(s["noise"]) in row25[3] and "**wrong** for QLoRA" in row25[4]
    # the summary of the flowchart section: the largest gap, rounded up, and the noise
    text = (ROOT / "chapters" / "90-claims.md").read_text(encoding="utf-8")
    worst = math.ceil(1000 * max(abs(v["gap"]) for k, v in p.items() if k != "lora")) / 1000
    assert f"each end within {worst:.3f} of their float twins (seed spread\n  {_f(s['noise'])})" in text


def test_chapter_03_states_the_committed_ratio(committed):
    text = (ROOT / "chapters" / "03-qlora.md").read_text(encoding="utf-8")
    ratio = min(v["base_ratio"] for v in committed["summary"]["pairs"].values())
    assert f"weights take {ratio:.3f}× their float32 bytes" in text
    assert "<!-- table: quant-combos" in text


def test_chapter_03s_compare_table_takes_the_4bit_rows_once_they_are_recorded():
    from lowrank_ref.experiments import doc_tables as dt

    data = json.loads((dt.DATA / "compare.json").read_text(encoding="utf-8"))
    data["rows"] = [r for r in data["rows"] if r["method"] not in ("qdora", "qadalora")]
    render = dt.RENDERERS["compare-qlora"]
    assert "| qdora |" not in render(data)  # not recorded: the table has the three rows it had
    qlora = next(r for r in data["rows"] if r["method"] == "qlora")
    data["rows"] += [{**qlora, "method": "qdora", "target_after": 0.25}, {**qlora, "method": "qadalora"}]
    table = render(data)
    assert f"| qdora | {qlora['target_before']:.3f} | 0.250 |" in table and "| qadalora |" in table
