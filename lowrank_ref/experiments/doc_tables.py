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
        "chapters/08-serving.md"]
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
        for r in _rows(data, ["lora", "qlora", "lora_int4"]))
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


def render(name: str) -> str:
    """The Markdown of block ``name``, from its committed result file."""
    if name not in RENDERERS:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(RENDERERS)}")
    return RENDERERS[name](load_compare(DATA / SOURCES[name]))


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
