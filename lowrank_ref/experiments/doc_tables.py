r"""The measured tables in README and the chapters, rendered from the committed result files.

A table in a Markdown file sits between two markers::

    <!-- table: compare (generated from chapters/data/compare.json; edit that, then run
         python -m lowrank_ref.experiments.doc_tables --write) -->
    | method | ... |
    <!-- end table -->

``python -m lowrank_ref.experiments.doc_tables --write`` re-renders every block from its file;
``--check`` (and ``tests/test_doc_tables.py``) fails if any block differs from what its file
renders, so a table cannot be edited by hand or go stale after a new run. ``--record DIR``
copies a fresh ``lowrank-ref compare --out DIR`` into ``chapters/data/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["ROOT", "DOCS", "render", "blocks", "check", "write", "record_compare"]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "chapters" / "data"
DOCS = ["README.md", "chapters/01-lora.md", "chapters/02-dora.md", "chapters/03-qlora.md", "chapters/04-compare.md",
        "chapters/08-serving.md", "chapters/90-claims.md", "chapters/README.md"]
DOCS += ["chapters/05-products.md"]

# how README and chapter 04 name each compare row
LABELS = {
    "full": "`full` (every weight)",
    "bitfit": "`bitfit` (biases only)",
    "lora": "`lora` (q, v; r=8, α=16)",
    "lora_all": "`lora_all` (every linear layer)",
    "dora": "`dora` (q, v)",
    "qlora": "`qlora` (q, v on an NF4 base)",
    "lora_int4": "`lora_int4` (q, v on an int4 base)",
    "qdora": "`qdora` (DoRA, q, v on an NF4 base)",
    "qadalora": "`qadalora` (AdaLoRA, q, v on an NF4 base)",
    # rows on the four dialects (CompareRow.task): "target" is the mean over the tasks
    "lora_shared": "`lora_shared` (one LoRA for four dialects; mean over tasks)",
    "lora_per_task": "`lora_per_task` (a LoRA per dialect; mean over tasks)",
    "hyperlora": "`hyperlora` (task id as condition; mean over tasks)",
    "multitask_lora": "`multitask_lora` (MTL-LoRA, task id as condition; mean over tasks)",
    "lora_moe": "`lora_moe` (4 LoRA experts, a router per token; mean over tasks)",
}

SWEEP_METHODS = ("full", "lora_all", "lora", "bitfit")  # chapter 04 §7's seed and lr runs

_BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+)[^\n]*?-->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def _human_bytes(n: float) -> str:
    from lowrank_ref.experiments.compare import _human_bytes as hb  # the CLI's own formatting

    return hb(n)


def load_compare(path: Path | None = None) -> dict:
    return json.loads((path or DATA / "compare.json").read_text(encoding="utf-8"))


def _rows(data: dict, names=None) -> list[dict]:
    rows = {r["method"]: r for r in data["rows"]}
    return [rows[n] for n in (names or [r["method"] for r in data["rows"]])]


def _about(data: dict) -> str:
    run = data["run"]
    return (f"{run['backend']} backend, {run['steps']} steps per method, batch {run['batch_size']} windows "
            f"of 32 words, seed {run['seed']}; {run['wall_seconds']:.0f} s for all {len(data['rows'])} rows "
            f"on {run['machine']}, {run['date']}")


def _compare_full(data: dict) -> str:
    head = ("| method | trainable | adapter file | peak memory | ms/step | target before | target after "
            "| retained after |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {LABELS.get(r['method'], '`' + r['method'] + '`')} | {r['trainable_params']:,} | "
        f"{_human_bytes(r['adapter_bytes'])} | {_human_bytes(r['peak_memory_bytes'])} | "
        f"{1000 * r['seconds_per_step']:.1f} | {r['target_before']:.3f} | {r['target_after']:.3f} | "
        f"{r['retained_after']:.3f} |\n" for r in _rows(data))
    return f"*{_about(data)}; the shipped model scores {data['run']['retained_before']:.3f} on held-out base text before fine-tuning.*\n\n" + head + body


def _compare_dora(data: dict) -> str:
    head = ("| method | trainable | adapter file | peak memory | ms/step | dialect acc. before → after "
            "| base acc. retained |\n|---|---:|---:|---:|---:|---:|---:|\n")
    names = {"lora": "lora (`q, v`)", "lora_all": "lora_all", "dora": "dora (`q, v`)"}
    body = "".join(
        f"| {names[r['method']]} | {r['trainable_params']:,} | {_human_bytes(r['adapter_bytes'])} | "
        f"{_human_bytes(r['peak_memory_bytes'])} | {1000 * r['seconds_per_step']:.1f} | "
        f"{r['target_before']:.3f} → {r['target_after']:.3f} | {r['retained_after']:.3f} |\n"
        for r in _rows(data, list(names)))
    return f"*{_about(data)}.*\n\n" + head + body


def _compare_qlora(data: dict) -> str:
    head = ("| method | target before | target after | retained after | peak memory | ms/step |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['method']} | {r['target_before']:.3f} | {r['target_after']:.3f} | {r['retained_after']:.3f} | "
        f"{r['peak_memory_bytes'] / 1024:,.0f} KiB | {1000 * r['seconds_per_step']:.1f} |\n"
        for r in _rows(data, ["lora", "qlora", "lora_int4"] + [n for n in ("qdora", "qadalora")  # once recorded
                                                                 if n in {x["method"] for x in data["rows"]}]))
    return f"*{_about(data)}.*\n\n" + head + body


def _sweep_runs(data: dict) -> list[dict]:
    """Seed 0 at the table's learning rate (compare.json) plus the committed sweep runs."""
    sweeps = json.loads((DATA / "04-compare-sweeps.json").read_text(encoding="utf-8"))["runs"]
    base = [{"seed": 0, "lr_scale": 1.0, **r} for r in _rows(data, list(SWEEP_METHODS))]
    return base + sweeps


def _pair(r: dict) -> str:
    return f"{r['target_after']:.3f}/{r['retained_after']:.3f}"


def _compare_runs(data: dict) -> str:
    runs = _sweep_runs(data)
    out = "\n| method | runs (target after / retained after) |\n|---|---|\n"
    for m in ("full", "lora_all", "lora"):
        seeds = [r for r in runs if r["method"] == m and r["lr_scale"] == 1.0]
        lo = next(r for r in runs if r["method"] == m and r["lr_scale"] < 1)
        hi = next(r for r in runs if r["method"] == m and r["lr_scale"] > 1)
        out += (f"| `{m}` | seeds: {', '.join(_pair(r) for r in sorted(seeds, key=lambda r: r['seed']))}; "
                f"lr ÷3: {_pair(lo)}; lr ×3: {_pair(hi)} |\n")
    others = _rows(data, ["qlora", "lora_int4", "dora"])
    out += f"| `qlora`, `lora_int4`, `dora` | {', '.join(_pair(r) for r in others)} |\n"
    seeds = [r for r in runs if r["method"] == "bitfit" and r["lr_scale"] == 1.0]
    lo = next(r for r in runs if r["method"] == "bitfit" and r["lr_scale"] < 1)
    hi = next(r for r in runs if r["method"] == "bitfit" and r["lr_scale"] > 1)
    out += (f"| `bitfit` | seeds: {', '.join(_pair(r) for r in sorted(seeds, key=lambda r: r['seed']))}; "
            f"lr ÷3: {_pair(lo)}; lr ×3: {_pair(hi)} |\n")
    return out


def _compare_seeds(data: dict) -> str:
    runs = _sweep_runs(data)
    out = ("\n| method | target after: mean (min–max) | retained after: mean (min–max) |\n"
           "|---|---:|---:|\n")
    for m in SWEEP_METHODS:
        rs = [r for r in runs if r["method"] == m and r["lr_scale"] == 1.0]
        cells = []
        for k in ("target_after", "retained_after"):
            v = [r[k] for r in rs]
            cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}–{max(v):.3f})")
        out += f"| `{m}` | {cells[0]} | {cells[1]} |\n"
    return out


def _lr_label(lr: float) -> str:
    exp = int(np.floor(np.log10(lr) + 1e-9))
    mant = lr / 10**exp
    sup = str(exp).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"10{sup}" if abs(mant - 1) < 1e-9 else f"{mant:.2g}·10{sup}"


def _compare_lr(data: dict) -> str:
    from lowrank_ref.experiments.compare import VARIANTS

    runs = _sweep_runs(data)
    out = "\n| method | lr ÷ 3 | the table's lr | lr × 3 |\n|---|---:|---:|---:|\n"
    for m in SWEEP_METHODS:
        base_lr = VARIANTS[m].lr
        cells = []
        for cond in (lambda s: s < 1, lambda s: s == 1.0, lambda s: s > 1):
            r = next(r for r in runs if r["method"] == m and r["seed"] == 0 and cond(r["lr_scale"]))
            cells.append(f"{_lr_label(base_lr * r['lr_scale'])}: {r['target_after']:.3f} / {r['retained_after']:.3f}")
        out += f"| `{m}` | {' | '.join(cells)} |\n"
    return out


RENDERERS = {"compare": _compare_full, "compare-dora": _compare_dora, "compare-qlora": _compare_qlora,
             "compare-runs": _compare_runs, "compare-seeds": _compare_seeds, "compare-lr": _compare_lr}
SOURCES = {name: "compare.json" for name in RENDERERS}


def _lora_table(key: str):
    def render_lora(data: dict) -> str:
        from lowrank_ref.experiments.lora_experiments import tables

        return "\n" + tables(data)[key].rstrip("\n") + "\n"
    return render_lora


def _forgetting_runs(data: dict) -> str:
    pre = data["pretrained"]
    out = ("\n| run | lr | trainable | dialect (learned) | unchanged base text (kept) | all base text (kept) |\n"
           "|---|---:|---:|---:|---:|---:|\n"
           f"| before fine-tuning | | | {pre['learned']:.3f} | {pre['kept_unchanged']:.3f} | {pre['kept_all']:.3f} |\n")
    for r in data["runs"]:
        name = "full" if r["method"] == "full" else f"LoRA r = {r['r']}, α = {2 * r['r']}"
        out += (f"| {name} | {r['lr']:g} | {r['trainable_params']:,} | {r['learned']:.3f} | "
                f"{r['kept_unchanged']:.3f} | {r['kept_all']:.3f} |\n")
    return out


def _forgetting_spectrum(data: dict) -> str:
    out = ("\n| module | shape | ΔW (full fine-tuning) | W0 | W0 + noise as large as ΔW | Gaussian | ‖ΔW‖/‖W0‖ |\n"
           "|---|---|---:|---:|---:|---:|---:|\n")
    for r in data["spectrum"]:
        out += (f"| `{r['module']}` | {r['shape'][0]}×{r['shape'][1]} | {r['rank90_delta']} | {r['rank90_base']} | "
                f"{r['rank90_base_plus_noise']} | {r['rank90_gaussian']} | {r['rel_update']:.3f} |\n")
    return out


RENDERERS["forgetting-runs"], SOURCES["forgetting-runs"] = _forgetting_runs, "04-forgetting.json"
RENDERERS["forgetting-spectrum"], SOURCES["forgetting-spectrum"] = _forgetting_spectrum, "04-forgetting.json"

# chapter 01's tables: lora_experiments.tables() of the committed run_all() results
for _key in ("bert", "baselines", "rank_alpha", "rank_alpha_retained", "scaling_lr", "targets", "init"):
    RENDERERS[f"lora-{_key.replace('_', '-')}"] = _lora_table(_key)
    SOURCES[f"lora-{_key.replace('_', '-')}"] = "01-lora-results.json"


def _serving(data: dict) -> str:
    """Chapter 08: each implementation's median time as a multiple of ``merged``, per adapter count."""
    impls = [("bgmv", "bgmv (gather)"), ("sgmv", "sgmv (segments)"), ("merge_switch", "merge, switch"),
             ("row_loop", "row loop"), ("peft", "PEFT `adapter_names=`")]
    out = ("\n| adapters in the batch | merged (ms) | " + " | ".join(label for _, label in impls) + " |\n"
           "|---:|---:|" + "---:|" * len(impls) + "\n")
    rows = [r for r in data["rows"] if r["name"].startswith("serve_mixed_") and r.get("seconds") is not None]
    for n in sorted({r["n_adapters"] for r in rows}):
        by = {r["impl"]: r["seconds"] for r in rows if r["n_adapters"] == n}
        cells = [f"{by[k] / by['merged']:.2f}×" if k in by else "" for k, _ in impls]
        out += f"| {n} | {1e3 * by['merged']:.1f} | " + " | ".join(cells) + " |\n"
    m = data["meta"]
    return out + (f"\n{m['date']}, {m['cpu']}, {m['cpu_count']} cores (load average {m['loadavg'][0]:.1f} at the end), "
                  f"torch {m.get('torch')} on one thread, "
                  f"PEFT {m.get('peft')}; the median of {rows[0].get('repeats')} interleaved runs each.\n")


RENDERERS["serving"], SOURCES["serving"] = _serving, "08-serving.json"


def _lorahub(data: dict) -> str:
    """Chapter 08: the composition experiment, one column per target (accuracy on the changed
    positions of its held-out text), and the cross terms' relative size where two modes differ."""
    targets = list(data["targets"])
    names = list(data["targets"][targets[0]]["rows"])
    out = ("\n| model | " + " | ".join(f"`{t}`: changed acc. (cross terms)" for t in targets) + " |\n"
           "|---|" + "---:|" * len(targets) + "\n")
    for name in names:
        cells = []
        for t in targets:
            r = data["targets"][t]["rows"][name]
            c = f"{r['changed_accuracy']:.3f}"
            if r.get("cross_terms") is not None and name.startswith("lorahub"):
                c += f" ({r['cross_terms']:.2f})"
            cells.append(c)
        out += f"| {name} | " + " | ".join(cells) + " |\n"
    searched = {t: data["targets"][t]["rows"][f"{m}: searched"]["weights"] for t in targets for m in ("lorahub",)}
    pool = data["pool"]
    lines = "; ".join(f"`{t}`: " + ", ".join(f"{n} {w:+.2f}" for n, w in zip(pool, searched[t])) for t in targets)
    s = data["search"]
    return out + (f"\nPool: one LoRA per task (r = {data['pool_config']['r']}, α = {data['pool_config']['alpha']:g}, "
                  f"{data['pool_config']['steps']} steps each); search: {s['budget']} evaluations in "
                  f"[-{s['bound']}, {s['bound']}], L1 {s['l1']}; {data['targets'][targets[0]]['few_shot_sentences']} "
                  f"few-shot sentences per target. LoraHub's searched weights: {lines}.\n")


RENDERERS["lorahub"], SOURCES["lorahub"] = _lorahub, "lorahub.json"


def _hyperlora_table(key: str):
    def render_hyperlora(data: dict) -> str:
        from lowrank_ref.experiments.hyperlora_experiments import tables

        return "\n" + tables(data)[key] + "\n"
    return render_hyperlora


# chapter 08's HyperLoRA tables: hyperlora_experiments.tables() of the committed run
for _key in ("accuracy", "speed", "interpolation"):
    RENDERERS[f"hyperlora-{_key}"], SOURCES[f"hyperlora-{_key}"] = _hyperlora_table(_key), "08-hyperlora.json"


def _mtl_moe_table(key: str):
    def render_mtl_moe(data: dict) -> str:
        from lowrank_ref.experiments.mtl_moe_experiments import tables

        return "\n" + tables(data)[key]
    return render_mtl_moe


# chapter 08's MTL-LoRA / LoRA MoE tables: mtl_moe_experiments.tables() of the committed run
for _key in ("balancing", "mtl", "latency"):
    RENDERERS[f"mtl-moe-{_key}"], SOURCES[f"mtl-moe-{_key}"] = _mtl_moe_table(_key), "08-mtl-moe.json"
# -- the seed's comparison table (chapter 90): every cell from the committed results -----------------
SEED_METHODS = (("LoRA", "lora"), ("DoRA", "dora"), ("QLoRA", "qlora"), ("AdaLoRA", "adalora"),
                ("HyperLoRA", "hyperlora"))
SEED_COLUMNS = ("parameter efficiency", "memory", "overhead", "adaptability", "multi-task", "fine-tuning speed",
                "inference speed")
NOT_BUILT = "not yet built"


def _json_or_none(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _bench_ratio(bench, name: str, impl: str):
    for r in (bench or {}).get("rows", []):
        if r["name"] == name and r["impl"] == impl and r.get("ratio") is not None:
            return float(r["ratio"])
    return None


def _mergeable(method: str):
    from lowrank_ref import registry

    try:
        return registry.get_method(method).mergeable
    except (KeyError, ValueError):
        return None


def seed_cells(data: dict) -> dict:
    """``{method label: {column: (measurement, comparison with LoRA)}}`` for the seed's comparison
    table, from ``compare.json`` (``data``) and the committed experiment and benchmark files. A method
    without a compare row gets :data:`NOT_BUILT` in every cell; a cell with no measurement says what
    is missing."""
    rows = {r["method"]: r for r in data["rows"]}
    base_params = rows["full"]["trainable_params"] if "full" in rows else None
    lora = rows["lora"]
    bench = _json_or_none(ROOT / "bench" / "results" / "bench.json")
    ada = _json_or_none(DATA / "07-adalora.json")
    merged = _bench_ratio(bench, "lora_layer_infer_numpy", "merged")
    unmerged = _bench_ratio(bench, "lora_layer_infer_numpy", "unmerged")
    out = {}
    for label, m in SEED_METHODS:
        r = rows.get(m)
        if r is None:
            out[label] = {c: (NOT_BUILT, "") for c in SEED_COLUMNS}
            continue
        multi = r.get("task", "dialect") != "dialect"
        cells = {}
        share = f" ({100 * r['trainable_params'] / base_params:.1f}% of the base's {base_params:,})" if base_params else ""
        cells["parameter efficiency"] = (f"{r['trainable_params']:,} trainable{share}",
                                         f"{r['trainable_params'] / lora['trainable_params']:.2f}× LoRA's")
        d_mem = r["peak_memory_bytes"] - lora["peak_memory_bytes"]
        cells["memory"] = (f"{_human_bytes(r['peak_memory_bytes'])} peak in a step",
                           "LoRA's" if d_mem == 0 else f"{'+' if d_mem > 0 else '−'}{_human_bytes(abs(d_mem))} vs LoRA")
        extra = ""
        if m == "dora":
            ratio = _bench_ratio(bench, "dora_vs_lora_step_numpy", "dora")
            extra = "" if ratio is None else f"; a layer step {ratio:.2f}× LoRA's (bench)"
        elif m == "qlora":
            ratio = _bench_ratio(bench, "nf4_dequantize_4096x4096_vs_memcpy", "numpy")
            extra = "" if ratio is None else f"; dequantising every forward: {ratio:.1f}× a copy of the weight (bench)"
        elif m == "adalora" and ada is not None:
            sps = ada["seconds_per_step"]
            extra = f"; the allocator: {100 * sps['allocator'] / sps['adalora']:.1f}% of a step, no SVD (ch. 07)"
        cells["overhead"] = (f"{_human_bytes(r['adapter_bytes'])} adapter file{extra}",
                             f"{r['adapter_bytes'] / lora['adapter_bytes']:.2f}× LoRA's file")
        what = "4 dialects, mean" if multi else "dialect"
        cells["adaptability"] = (f"{what}: {r['target_before']:.3f} → {r['target_after']:.3f}",
                                 "" if multi else f"{r['target_after'] - lora['target_after']:+.3f} vs LoRA".replace("-", "−"))
        if multi:
            ref = {k: rows[k]["target_after"] for k in ("lora_per_task", "lora_shared") if k in rows}
            cells["multi-task"] = (f"4 dialects, mean after: {r['target_after']:.3f}",
                                   "; ".join(f"{v:.3f} for `{k}`" for k, v in ref.items()) or "no LoRA multi-task row recorded")
        elif m == "lora":
            ref = {k: rows[k]["target_after"] for k in ("lora_per_task", "lora_shared") if k in rows}
            cells["multi-task"] = (("; ".join(f"`{k}`: {v:.3f}" for k, v in ref.items()) + " (4 dialects, mean)")
                                   if ref else "not yet recorded (rows `lora_per_task`, `lora_shared`)",
                                   "one adapter per task, or one for all; many served in one batch (ch. 08)")
        else:
            cells["multi-task"] = ("not measured: no multi-task row", "one adapter per task, as LoRA's")
        cells["fine-tuning speed"] = (f"{1000 * r['seconds_per_step']:.1f} ms/step",
                                      f"{r['seconds_per_step'] / lora['seconds_per_step']:.2f}× LoRA's (one shared machine)")
        mg = _mergeable(r.get("method_name", m))
        if m == "qlora":
            inf = ("merges into a float weight (4 bytes a weight while merged); unmerged it dequantises every forward",
                   "merged: the base's cost; kept 4-bit: slower")
        elif mg is False:
            inf = ("cannot merge: the adapter runs at inference", "slower than a merged LoRA")
        elif mg is None:
            inf = ("not in the registry", "")
        else:
            cost = "" if merged is None else f" (LoRA merged: {merged:.2f}× the base layer, unmerged {unmerged:.2f}×, bench)"
            inf = (f"merges into the base weight: the base's cost{cost}", "as LoRA")
        cells["inference speed"] = inf
        out[label] = cells
    return out


def _seed_table(data: dict) -> str:
    cells = seed_cells(data)
    head = "| column | " + " | ".join(label for label, _ in SEED_METHODS) + " |\n"
    head += "|---|" + "---|" * len(SEED_METHODS) + "\n"
    body = ""
    for col in SEED_COLUMNS:
        row = []
        for label, _ in SEED_METHODS:
            meas, cmp_ = cells[label][col]
            row.append(meas if not cmp_ else f"{meas} — *{cmp_}*")
        body += f"| {col} | " + " | ".join(row) + " |\n"
    return f"\n*{_about(data)}.*\n\n" + head + body


def seed_verdicts(data: dict) -> list[dict]:
    """The seeds' quoted ratings of cells of their table, each with the verdict the cells give:
    ``{"method", "column", "seed", "measured", "verdict"}``."""
    rows = {r["method"]: r for r in data["rows"]}
    lora = rows["lora"]
    out = []

    def add(method, column, seed, measured, verdict):
        out.append({"method": method, "column": column, "seed": seed, "measured": measured, "verdict": verdict})

    q = rows.get("qlora")
    if q is not None:
        t = q["seconds_per_step"] / lora["seconds_per_step"]
        add("QLoRA", "fine-tuning speed", "“very fast fine-tuning”", f"{t:.2f}× LoRA's step time",
            "**wrong**: not faster than LoRA" if t >= 0.97 else "holds here")
        saved = 1 - q["peak_memory_bytes"] / lora["peak_memory_bytes"]
        add("QLoRA", "memory", "“memory reduction 87.5%”", f"peak of a step {100 * saved:.1f}% below LoRA's",
            "**holds, with a caveat**: 87.5% is the 4-bit codes against float32 weights (chapter 03 §7); "
            "on this small model the frozen weights are a small part of a step's peak")
    d = rows.get("dora")
    if d is not None:
        diff = d["target_after"] - lora["target_after"]
        add("DoRA", "adaptability", "“better at the same parameter count”",
            f"dialect {d['target_after']:.3f} against LoRA's {lora['target_after']:.3f} "
            f"({d['trainable_params']:,} against {lora['trainable_params']:,} parameters)",
            "**wrong here**" if diff < 0 else "holds here")
    a = rows.get("adalora")
    ada = _json_or_none(DATA / "07-adalora.json")
    if a is not None and ada is not None:
        share = ada["seconds_per_step"]["allocator"] / ada["seconds_per_step"]["adalora"]
        add("AdaLoRA", "overhead", "“SVD overhead”", f"no SVD; the allocator {100 * share:.1f}% of a step",
            "**wrong**" if share < 0.05 else "holds, with a caveat")
    h = rows.get("hyperlora")
    for col, seed in (("fine-tuning speed", "“slow”"), ("inference speed", "“moderate”"),
                      ("multi-task", "“excellent”"), ("adaptability", "“highly dynamic”")):
        if h is None:
            add("HyperLoRA", col, seed, NOT_BUILT, "not measured yet")
            continue
        per = rows.get("lora_per_task")
        if col == "fine-tuning speed":
            ref = per or lora
            t = h["seconds_per_step"] / ref["seconds_per_step"]
            add("HyperLoRA", col, seed, f"{t:.2f}× `{ref['method']}`'s step time",
                "holds" if t > 1.2 else "**wrong here**: about as fast")
        elif col == "inference speed":
            mg = _mergeable("hyperlora")
            add("HyperLoRA", col, seed, "generate once, merge: the base's cost for a fixed task" if mg
                else "cannot merge", "**wrong** for a fixed task (merged); per-row mixed batches pay the adapter"
                if mg else "holds")
        elif col == "multi-task":
            refs = {k: rows[k]["target_after"] for k in ("lora_per_task", "lora_shared") if k in rows}
            best = max(refs.values()) if refs else None
            add("HyperLoRA", col, seed, f"mean over 4 dialects {h['target_after']:.3f}"
                + "".join(f"; `{k}` {v:.3f}" for k, v in refs.items()),
                "not comparable: no LoRA multi-task row" if best is None else
                ("holds here" if h["target_after"] >= best - 0.005 else "**wrong here**: below a LoRA baseline"))
        else:
            add("HyperLoRA", col, seed, "unseen conditions: chapter 08's interpolation experiment",
                "see chapter 08")
    return out


def _seed_verdicts(data: dict) -> str:
    out = "\n| method | column | the seed says | measured | verdict |\n|---|---|---|---|---|\n"
    for v in seed_verdicts(data):
        out += f"| {v['method']} | {v['column']} | {v['seed']} | {v['measured']} | {v['verdict']} |\n"
    return out


RENDERERS["seed-table"], SOURCES["seed-table"] = _seed_table, "compare.json"
RENDERERS["seed-verdicts"], SOURCES["seed-verdicts"] = _seed_verdicts, "compare.json"
def _prompt_table(key: str):
    def render_prompt(data: dict) -> str:
        from lowrank_ref.experiments.prompt_experiments import format_tables

        return format_tables(data)[key]
    return render_prompt


# chapter 09's prompt-tuning tables (lowrank_ref.experiments.prompt_experiments)
for _key in ("context", "k_sweep", "lr"):
    RENDERERS[f"prompt-{_key.replace('_', '-')}"] = _prompt_table(_key)
    SOURCES[f"prompt-{_key.replace('_', '-')}"] = "09-prompt-tuning.json"
if "chapters/09-baselines.md" not in DOCS:
    DOCS.append("chapters/09-baselines.md")


def _longlora(kind: str):
    def render_longlora(data: dict) -> str:
        from lowrank_ref.experiments import longlora

        return (longlora.format_table(data) if kind == "run" else longlora.format_bench_tables(data)) + "\n"
    return render_longlora


# chapter 09's LongLoRA tables: the experiment's run and its two benchmark tables
RENDERERS["longlora"], SOURCES["longlora"] = _longlora("run"), "09-longlora.json"
RENDERERS["baselines-bench"], SOURCES["baselines-bench"] = _longlora("bench"), "09-baselines-bench.json"


def _classroom(data: dict) -> str:
    """The syllabus: each notebook's wall time in classroom mode and what was checked there."""
    out = ("\n| notebook | classroom mode: CPU time (wall time on the shared machine) | what classroom mode changes "
           "| conclusions checked |\n|---|---:|---|---|\n")
    sizes = data["sizes"]
    for name, r in data["notebooks"].items():
        concl = r["conclusions"]
        what = "smaller runs: " + ", ".join(f"{k} {v}" for k, v in _flat(sizes[name]).items()) if name in sizes \
            else "nothing: the full runs fit"
        checked = "the full runs'" if concl is None else f"{sum(c['holds'] for c in concl)} of {len(concl)} hold"
        out += f"| {name} | {r['cpu_seconds']:.0f} s ({r['seconds']:.0f} s) | {what} | {checked} |\n"
    out += (f"\nMeasured on {data['machine']} shared with other work (load average at the end of each notebook "
            f"{min(r['load_average'] for r in data['notebooks'].values()):.1f}–"
            f"{max(r['load_average'] for r in data['notebooks'].values()):.1f}). The training runs use one BLAS "
            "thread, so the kernel's CPU time is about what the notebook takes on a quiet machine of this "
            "speed; a laptop is usually faster. The conclusions checked:\n\n")
    for name, r in data["notebooks"].items():
        for c in r["conclusions"] or []:
            out += f"- {name}: {c['claim']} — **{'holds' if c['holds'] else 'fails'}**\n"
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    keep = ("steps", "seeds", "ranks", "lr_factors", "rank_sweep_ranks")
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif k in keep:
            out[prefix + k] = v
    return out


RENDERERS["classroom"], SOURCES["classroom"] = _classroom, "classroom.json"


def _scaling_lr(data: dict) -> str:
    from lowrank_ref.experiments.scaling_rules import table

    return table(data)


RENDERERS["scaling-lr"], SOURCES["scaling-lr"] = _scaling_lr, "02-scaling-lr.json"
def _structure_fit(data: dict) -> str:
    """Chapter 05: each structure's relative error on each target, by parameter count."""
    names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "krona": "KronA", "vera": "VeRA"}
    out = ""
    for target, info in data["targets"].items():
        out += (f"\n**{target}** ({info['source']}; stable rank {info['stable_rank']:.1f}, "
                f"{100 * info['energy_top8']:.0f} % of ‖T‖² in the top 8 singular values)\n\n"
                "| structure | configuration | parameters | largest rank | ‖ΔW − T‖ / ‖T‖ |\n|---|---|---:|---:|---:|\n")
        rows = [r for r in data["rows"] if r["target"] == target]
        for st in names:
            for r in sorted((r for r in rows if r["structure"] == st), key=lambda r: r["params"]):
                out += f"| {names[st]} | {r['label']} | {r['params']:,} | {r['max_rank']} | {r['error']:.3f} |\n"
    fits = sorted({r["fit"] for r in data["rows"]})
    return out + f"\nFits: {'; '.join(fits)}. {data['seconds']:.0f} s in all.\n"


RENDERERS["structure-fit"], SOURCES["structure-fit"] = _structure_fit, "05-structure-fit.json"


def _quant_combos(data: dict) -> str:
    """Chapter 03 §9: each adapter on a float and on an NF4 base (lowrank_ref.experiments.quant_combos)."""
    from lowrank_ref.experiments.quant_combos import format_table

    return format_table(data)


RENDERERS["quant-combos"], SOURCES["quant-combos"] = _quant_combos, "quant_combos.json"


# --- the three consecutive `make bench` runs (bench/results/history/run1..3.json) -------------
BENCH_HISTORY = ROOT / "bench" / "results" / "history"


def load_bench_runs() -> dict:
    """``{"runs": [bench.json of run 1, 2, 3]}``: the runs README's goal table is made from."""
    paths = sorted(BENCH_HISTORY.glob("run*.json"))
    if not paths:
        raise ValueError(f"no bench runs in {BENCH_HISTORY} (make bench, then copy its bench.json there)")
    return {"runs": [json.loads(p.read_text(encoding="utf-8")) for p in paths], "paths": [p.name for p in paths]}


def _ratios(data: dict, name: str, impl: str) -> str:
    cells = []
    for run in data["runs"]:
        row = next((r for r in run["rows"] if r["name"] == name and r["impl"] == impl), None)
        cells.append("—" if row is None or row.get("ratio") is None else f"{row['ratio']:.2f}×")
    return ", ".join(cells)


def _runs_caption(data: dict) -> str:
    dates = ", ".join(run["meta"]["date"] for run in data["runs"])
    loads = ", ".join(f"{run['meta']['loadavg'][0]:.1f}" for run in data["runs"])
    return (f"*{len(data['runs'])} consecutive `make bench` runs ({dates}; load average {loads} at their ends), "
            f"`bench/results/history/{data['paths'][0]}`–`{data['paths'][-1]}`; ratios within each run.*\n\n")


def _bench_dora_dropout(data: dict) -> str:
    """Chapter 02 §4: DoRA with dropout against LoRA with dropout, each form, both backends."""
    lines = [_runs_caption(data) + "| step, dropout 0.1 | NumPy: ratio to LoRA, runs 1, 2, 3 | torch (CPU, 1 thread): ratio |",
             "|---|---|---|"]
    for impl, label in (("dora", "DoRA, `\"shared\"` (the default)"), ("dora_exact", "DoRA exact gradient, `\"shared\"`"),
                        ("dora_dropped", "DoRA, `\"dropped\"` (PEFT's form)")):
        lines.append(f"| {label} | {_ratios(data, 'dora_vs_lora_step_numpy_dropout', impl)} | "
                     f"{_ratios(data, 'dora_vs_lora_step_torch_dropout', impl)} |")
    return "\n" + "\n".join(lines) + "\n"


def _bench_nf4(data: dict) -> str:
    """Chapter 03 §8: the NF4 rows, each a ratio to bitsandbytes' CPU kernel in the same run."""
    lines = [_runs_caption(data) + "| 4096 × 4096, one thread | ratio to bitsandbytes, runs 1, 2, 3 |", "|---|---|"]
    for name, impl, label in (
            ("nf4_dequantize_4096x4096", "torch", "torch mirror dequantise (its C kernel), memory kept"),
            ("nf4_dequantize_4096x4096", "numpy", "NumPy dequantise (into a buffer), memory kept"),
            ("nf4_dequantize_4096x4096", "memcpy", "copying a float32 array of the output's size (reads and writes it), memory kept"),
            ("nf4_dequantize_4096x4096_fresh_pages", "torch", "torch mirror dequantise, fresh pages"),
            ("nf4_dequantize_4096x4096_fresh_pages", "numpy_alloc", "NumPy dequantise, fresh pages"),
            ("nf4_quantize_4096x4096", "torch", "torch mirror quantise"),
            ("nf4_quantize_4096x4096", "numpy", "NumPy quantise")):
        if impl == "memcpy":  # a reference row: its time against bitsandbytes' in the same run
            cells = []
            for run in data["runs"]:
                t = {r["impl"]: r.get("seconds") for r in run["rows"] if r["name"] == name}
                cells.append(f"{t['memcpy'] / t['bitsandbytes']:.2f}×" if t.get("memcpy") and t.get("bitsandbytes") else "—")
            lines.append(f"| {label} | {', '.join(cells)} |")
        else:
            lines.append(f"| {label} | {_ratios(data, name, impl)} |")
    return "\n" + "\n".join(lines) + "\n"


LOADERS = {"bench-runs": load_bench_runs}
RENDERERS["bench-dora-dropout"], SOURCES["bench-dora-dropout"] = _bench_dora_dropout, "bench-runs"
RENDERERS["bench-nf4"], SOURCES["bench-nf4"] = _bench_nf4, "bench-runs"


def render(name: str) -> str:
    """The Markdown of block ``name``, from its committed result file."""
    if name not in RENDERERS:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(RENDERERS)}")
    src = SOURCES[name]
    return RENDERERS[name](LOADERS[src]() if src in LOADERS else load_compare(DATA / src))


def blocks(text: str) -> list[tuple[str, str]]:
    """``[(name, body)]`` of every generated block in a Markdown text."""
    return [(m.group("name"), m.group("body")) for m in _BLOCK.finditer(text)]


def _rewrite(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def check(docs=DOCS) -> list[str]:
    """The blocks (``file: name``) whose text differs from what their result file renders."""
    bad = []
    for doc in docs:
        text = (ROOT / doc).read_text(encoding="utf-8")
        bad += [f"{doc}: {name}" for name, body in blocks(text) if body != render(name)]
    return bad


def write(docs=DOCS) -> list[str]:
    """Re-render every block in place; return the files that changed."""
    changed = []
    for doc in docs:
        p = ROOT / doc
        text = p.read_text(encoding="utf-8")
        new = _rewrite(text)
        if new != text:
            p.write_text(new, encoding="utf-8")
            changed.append(doc)
    return changed


def record_compare(run_dir, out: Path | None = None) -> Path:
    """Store a ``lowrank-ref compare --out run_dir`` as the committed ``compare.json``: the rows,
    the run's settings (histories dropped), the machine and the date."""
    run_dir = Path(run_dir)
    rows = json.loads((run_dir / "compare.json").read_text(encoding="utf-8"))
    hist = json.loads((run_dir / "compare_history.json").read_text(encoding="utf-8"))
    run = {k: v for k, v in hist.items() if k != "histories"}

    run["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, NumPy {np.__version__}"
    run["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = out or DATA / "compare.json"
    out.write_text(json.dumps({"run": run, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return out


def record_sweeps(out: Path | None = None, seeds=(1, 2), lr_scales=(1 / 3, 3.0)) -> Path:
    """Chapter 04 §7's runs: the default rows at other seeds and at 3× lower and higher learning
    rates (seed 0 at the table's rate is the committed ``compare.json``). Minutes on 2 cores."""
    from lowrank_ref.experiments.compare import run_compare

    runs = []
    for seed in seeds:
        for r in run_compare(list(SWEEP_METHODS), seed=seed, progress=False, verbose=False):
            runs.append({"seed": seed, "lr_scale": 1.0, **r})
    for scale in lr_scales:
        for r in run_compare(list(SWEEP_METHODS), lr_scale=scale, progress=False, verbose=False):
            runs.append({"seed": 0, "lr_scale": scale, **r})
    out = out or DATA / "04-compare-sweeps.json"
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "runs": runs},
                              indent=1) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="fail if a table differs from its result file")
    g.add_argument("--write", action="store_true", help="re-render every table in place")
    g.add_argument("--record", metavar="DIR", help="store a `compare --out DIR` run as chapters/data/compare.json")
    g.add_argument("--record-sweeps", action="store_true", help="rerun chapter 04's seed and lr runs")
    args = ap.parse_args(argv)
    if args.record_sweeps:
        print(f"wrote {record_sweeps()}")
        return 0
    if args.record:
        print(f"wrote {record_compare(args.record)}")
        return 0
    if args.write:
        print("re-rendered:", ", ".join(write()) or "nothing changed")
        return 0
    bad = check()
    for b in bad:
        print(f"stale table: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
