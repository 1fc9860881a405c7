"""The committed LoHa / LoKr / VeRA benchmark runs (``bench/results/products/``, issue 8): their
README is what ``bench.run`` renders from the three run files (no hand-edited table), and each run
holds the rows the goals are about."""

from __future__ import annotations

import json
import pathlib

from bench.run import goal_history, render_markdown

DIR = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results" / "products"
RUNS = [DIR / f"run{i}.json" for i in (1, 2, 3)]


def test_readme_is_rendered_from_the_three_runs():
    text = (DIR / "README.md").read_text()
    last = json.loads(RUNS[-1].read_text())
    assert goal_history(RUNS) in text
    assert text.endswith(render_markdown(last["rows"], last["meta"]))


def test_each_run_has_every_goal_row_timed():
    want = {("loha_r4_vs_lora_8_step_numpy", "loha_factorised"), ("loha_r8_vs_lora_16_step_numpy", "loha_factorised"),
            ("loha_r4_factorised_vs_peft_step_torch", "loha_factorised"),
            ("kronecker_vs_lora_step_numpy", "lokr"), ("vera_vs_lora_step_numpy", "vera")}
    for path in RUNS:
        rows = {(r["name"], r["impl"]): r for r in json.loads(path.read_text())["rows"]}
        assert want <= set(rows), path.name
        assert all(rows[k]["seconds"] is not None and rows[k].get("goal") for k in want), path.name
