"""Every measured table in README and the chapters equals what its committed result file renders,
and the accuracies those files hold are bit-reproducible from run to run."""

from __future__ import annotations

import json

from lowrank_ref.experiments import doc_tables as dt


def test_every_generated_table_matches_its_result_file():
    assert dt.check() == [], "run: python -m lowrank_ref.experiments.doc_tables --write"


def test_the_docs_hold_the_generated_tables():
    names = {doc: [n for n, _ in dt.blocks((dt.ROOT / doc).read_text(encoding="utf-8"))] for doc in dt.DOCS}
    assert names["README.md"] == ["compare"]
    assert names["chapters/01-lora.md"] == ["lora-bert", "lora-rank-alpha", "lora-rank-alpha-retained",
                                           "lora-scaling-lr", "lora-targets", "lora-init", "lora-baselines"]
    assert names["chapters/04-compare.md"] == ["compare", "compare-runs", "forgetting-runs", "forgetting-spectrum",
                                              "compare-seeds", "compare-lr"]
    assert names["chapters/02-dora.md"] == ["scaling-lr", "compare-dora", "bench-dora-dropout"]
    assert names["chapters/03-qlora.md"] == ["compare-qlora", "bench-nf4", "quant-combos"]
    assert names["chapters/90-claims.md"] == ["seed-table", "seed-verdicts"]
    assert names["chapters/README.md"] == ["classroom"]


def test_the_bench_tables_come_from_the_three_runs():
    """Each cell of the chapters' benchmark tables is a run's own ratio (median over median), in order."""
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(dt.BENCH_HISTORY.glob("run*.json"))]
    assert len(runs) == 3

    def med(run, name, impl):
        return next(r["seconds"] for r in run["rows"] if r["name"] == name and r["impl"] == impl)

    nf4 = dt.render("bench-nf4")
    cells = ", ".join(f"{med(r, 'nf4_dequantize_4096x4096', 'torch') / med(r, 'nf4_dequantize_4096x4096', 'bitsandbytes'):.2f}×"
                      for r in runs)
    assert f"| torch mirror dequantise (its C kernel), memory kept | {cells} |" in nf4
    dora = dt.render("bench-dora-dropout")
    name = "dora_vs_lora_step_torch_dropout"
    cells = ", ".join(f"{med(r, name, 'dora_dropped') / med(r, name, 'lora'):.2f}×" for r in runs)
    assert dora.rstrip("\n").splitlines()[-1].endswith(f"| {cells} |")
    assert all(r["meta"]["date"] in nf4 for r in runs)


def test_a_hand_edit_is_caught(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    body = dt.render("compare-qlora")
    doc.write_text(f"<!-- table: compare-qlora -->\n{body}<!-- end table -->\n", encoding="utf-8")
    monkeypatch.setattr(dt, "ROOT", tmp_path)
    assert dt.check(["x.md"]) == []
    doc.write_text(doc.read_text(encoding="utf-8").replace("0.336", "0.337"), encoding="utf-8")
    assert dt.check(["x.md"]) == ["x.md: compare-qlora"]
    assert dt.write(["x.md"]) == ["x.md"] and dt.check(["x.md"]) == []


def test_the_committed_rows_are_complete():
    data = json.loads((dt.DATA / "compare.json").read_text(encoding="utf-8"))
    from lowrank_ref.experiments.compare import VARIANTS

    # every row the registry's SPECs declare, in their order (a new method's row must be recorded);
    # rows on the multi-task data (CompareRow.task != "dialect") land when the tables are next
    # re-recorded: until then the recorded ones must be registered rows, in the registry's order
    recorded = [r["method"] for r in data["rows"]]
    # rows registered after the last recording, waiting for the next one (strict: a row listed here
    # that is recorded fails, so the list empties when compare.json is re-recorded)
    pending: set[str] = set()
    assert not pending & set(recorded), f"recorded now, drop from pending: {sorted(pending & set(recorded))}"
    assert [n for n in recorded if VARIANTS[n].task == "dialect"] == \
        [n for n, v in VARIANTS.items() if v.task == "dialect" and n not in pending]
    assert recorded == [n for n in VARIANTS if n in recorded]
    assert set(dt.LABELS) <= set(VARIANTS)  # labels are optional, but none for a row that is gone
    assert {"backend", "steps", "batch_size", "seed", "retained_before", "machine", "date"} <= set(data["run"])


def test_accuracies_are_bit_reproducible_run_to_run():
    from lowrank_ref.experiments import run_compare

    kw = dict(steps=12, batch_size=4, eval_windows=4, progress=False, verbose=False)
    a = run_compare(["lora", "bitfit"], **kw)
    b = run_compare(["lora", "bitfit"], **kw)
    for ra, rb in zip(a, b):
        for k in ("target_before", "target_after", "retained_after", "trainable_params", "adapter_bytes"):
            assert ra[k] == rb[k], (ra["method"], k)


def _with_rows(extra: list[dict]) -> dict:
    data = json.loads((dt.DATA / "compare.json").read_text(encoding="utf-8"))
    data["rows"] = [r for r in data["rows"] if r["method"] not in {e["method"] for e in extra}] + extra
    return data


def test_the_seed_table_has_every_cell_and_waits_for_missing_methods():
    data = _with_rows([])
    data["rows"] = [r for r in data["rows"] if r["method"] != "hyperlora"]
    cells = dt.seed_cells(data)
    assert list(cells) == [label for label, _ in dt.SEED_METHODS]
    for label, cols in cells.items():
        assert list(cols) == list(dt.SEED_COLUMNS)
        assert all(meas for meas, _ in cols.values()), label
    assert all(meas == dt.NOT_BUILT for meas, _ in cells["HyperLoRA"].values())
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    assert cells["LoRA"]["parameter efficiency"][0].startswith(f"{lora['trainable_params']:,} trainable")
    assert f"{1000 * lora['seconds_per_step']:.1f} ms/step" == cells["LoRA"]["fine-tuning speed"][0]


def test_the_seed_table_fills_in_from_a_recorded_row():
    """When the lead re-records compare.json with a hyperlora row, its cells and verdicts come from it."""
    lora = next(r for r in _with_rows([])["rows"] if r["method"] == "lora")
    hyper = {**lora, "method": "hyperlora", "trainable_params": 12_345, "seconds_per_step": 3 * lora["seconds_per_step"],
             "target_before": 0.2, "target_after": 0.41, "task": "multitask", "per_task": {}}
    per_task = {**lora, "method": "lora_per_task", "target_after": 0.40, "task": "multitask_per_task", "per_task": {}}
    data = _with_rows([hyper, per_task])
    cells = dt.seed_cells(data)["HyperLoRA"]
    assert cells["parameter efficiency"][0].startswith("12,345 trainable")
    assert cells["multi-task"][0] == "4 dialects, mean after: 0.410" and "0.400 for `lora_per_task`" in cells["multi-task"][1]
    assert cells["fine-tuning speed"][1].startswith("3.00× LoRA's")
    v = {x["column"]: x for x in dt.seed_verdicts(data) if x["method"] == "HyperLoRA"}
    assert v["fine-tuning speed"]["verdict"] == "holds"  # 3× the per-task LoRA's step time is slow
    assert v["multi-task"]["verdict"] == "holds here"
    slow_learner = _with_rows([{**hyper, "target_after": 0.30}, per_task])
    v = {x["column"]: x for x in dt.seed_verdicts(slow_learner) if x["method"] == "HyperLoRA"}
    assert v["multi-task"]["verdict"].startswith("**wrong here**")
    assert "not yet built" not in dt._seed_table(data).split("| inference speed |")[0].split("HyperLoRA")[-1]
