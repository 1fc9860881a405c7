r"""Any adapter on a 4-bit base, trained on the task: chapter 03 §9 and chapter 90's rows 24–25.

Each pair is a float row of ``lowrank-ref compare`` and its twin with the targeted layers' base
weights stored in NF4 (``inject(..., quantize="nf4", blocksize=64, double_quant=True)``, the
storage of the ``qlora`` row): ``lora``/``qlora``, ``dora``/``qdora``, ``adalora``/``qadalora``
(registered compare rows) and ``hyperlora``/``qhyperlora`` (the hyperlora row, trained on the four
dialects, with the same ``quantize=``; not a compare row). Every row is trained exactly as
compare trains it (same steps, batches, schedule, learning rate; :func:`compare._one_row`), for
each seed. Per row it records the held-out target accuracy before and after, the base text
retained, the trainable parameters, and the bytes the adapted layers' base weights take
(float32, or the 4-bit codes with their block scales).

Per pair, ``gap`` is the seed-mean target accuracy of the 4-bit row minus its float twin's, and
``noise`` the largest spread between two seeds of one row in the whole run. :func:`verdicts`
turns them into the chapter's words; ``tests/test_quant_combos.py`` checks that the committed
JSON gives the numbers and verdicts the chapters state.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from lowrank_ref.experiments.runner import experiment_main, quick_mode

__all__ = ["PAIRS", "QUANTIZE", "variants", "base_bytes", "run", "summarise", "verdicts", "format_table", "main"]

#: how the 4-bit twins store their base (the qlora row's storage)
QUANTIZE = {"quantize": "nf4", "blocksize": 64, "double_quant": True}
#: (float row, 4-bit row): compare rows, except qhyperlora, made here from hyperlora's row
PAIRS = (("lora", "qlora"), ("dora", "qdora"), ("adalora", "qadalora"), ("hyperlora", "qhyperlora"))
LABELS = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "hyperlora": "HyperLoRA (4 dialects, mean)"}


def variants() -> dict:
    """``{row: Variant}`` for every row of :data:`PAIRS`."""
    from lowrank_ref.experiments.compare import VARIANTS

    out = {}
    for fl, q in PAIRS:
        out[fl] = VARIANTS[fl]
        out[q] = VARIANTS[q] if q in VARIANTS else dataclasses.replace(VARIANTS[fl], kwargs={**VARIANTS[fl].kwargs,
                                                                                             **QUANTIZE})
    return out


def base_bytes(model) -> dict:
    """Bytes of the adapted layers' base weights (4-bit codes and scales, or float), how they
    are stored (``"nf4"``, ``"float32"``), and how many of those layers have a 4-bit base."""
    from lowrank_ref.inject import adapter_layers

    layers = adapter_layers(model)
    q = [m for m in layers.values() if m.quantized]
    kinds = sorted({m.base.qweight.quant_type if m.quantized else str(m.base.weight.data.dtype) for m in layers.values()})
    return {"base_bytes": int(sum(m.base.qweight.nbytes if m.quantized else m.base.weight.data.nbytes
                                  for m in layers.values())),
            "weights": int(sum(m.in_features * m.out_features for m in layers.values())),
            "base_storage": "+".join(kinds), "quantized_layers": len(q), "adapted_layers": len(layers)}


def _storage(name, variant, seed) -> dict:
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained

    model = load_pretrained(progress=False)
    inject(model, variant.config, targets=variant.targets, method=variant.method,
           rng=np.random.default_rng(seed), **variant.kwargs)
    return base_bytes(model)


def run(seeds=(0, 1, 2), steps: int = 300, eval_windows: int = 256, pairs=PAIRS) -> dict:
    """Train every row of ``pairs`` for each seed, as compare does; the rows and a summary."""
    import tempfile
    from pathlib import Path

    from lowrank_ref import data
    from lowrank_ref.experiments import compare
    from lowrank_ref.models import blas_threads

    task = data.builtin_task(0)
    vs = variants()
    names = [n for pair in pairs for n in pair]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowrank-quant-combos-") as tmp, blas_threads(1):
        for name in names:
            v = vs[name]
            one = compare._one_row if v.task == "dialect" else compare._multitask_row
            for seed in seeds:
                t = time.perf_counter()
                row, _ = one(name, v, task, "numpy", None, int(steps), compare.DEFAULTS["batch_size"],
                             compare.DEFAULTS["warmup"], int(eval_windows), int(seed), False, Path(tmp), 1.0)
                keep = {k: row[k] for k in ("trainable_params", "adapter_bytes", "target_before", "target_after",
                                            "retained_after")}
                rows.append({"row": name, "method": v.method, "task": v.task, "seed": int(seed),
                             "quantize": v.kwargs.get("quantize"), **keep, **_storage(name, v, seed),
                             "seconds": round(time.perf_counter() - t, 2)})
    res = {"steps": int(steps), "seeds": [int(s) for s in seeds], "eval_windows": int(eval_windows),
           "batch_size": compare.DEFAULTS["batch_size"], "quantize": dict(QUANTIZE),
           "pairs": [list(p) for p in pairs], "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    res["summary"] = summarise(res)
    res["verdicts"] = verdicts(res)
    return res


def _mean(rows, name, key) -> float:
    return float(np.mean([r[key] for r in rows if r["row"] == name]))


def summarise(res: dict) -> dict:
    """Per pair: seed means of each row, the 4-bit row minus its float twin, and the run's noise."""
    rows = res["rows"]
    spread = {n: max(r["target_after"] for r in rows if r["row"] == n) - min(r["target_after"] for r in rows
                                                                             if r["row"] == n)
              for n in {r["row"] for r in rows}}
    out = {"noise": float(max(spread.values())), "pairs": {}}
    for fl, q in res["pairs"]:
        one = {n: {k: _mean(rows, n, k) for k in ("target_before", "target_after", "retained_after")}
               for n in (fl, q)}
        first = {n: next(r for r in rows if r["row"] == n) for n in (fl, q)}
        out["pairs"][fl] = {
            "float": fl, "4bit": q, **{f"{n}_{k}": v for n, d in (("float", one[fl]), ("4bit", one[q]))
                                       for k, v in d.items()},
            "gap": one[q]["target_after"] - one[fl]["target_after"],
            "retained_gap": one[q]["retained_after"] - one[fl]["retained_after"],
            "trainable_params": {n: first[n]["trainable_params"] for n in (fl, q)},
            "base_bytes": {n: first[n]["base_bytes"] for n in (fl, q)},
            "base_ratio": first[q]["base_bytes"] / first[fl]["base_bytes"],
        }
    return out


def verdicts(res: dict) -> dict:
    """``{float row: "as its float twin (within noise)" | "below its float twin" | "above its float twin"}``."""
    s = summarise(res)
    out = {}
    for fl, p in s["pairs"].items():
        if abs(p["gap"]) <= s["noise"]:
            out[fl] = "as its float twin (within noise)"
        else:
            out[fl] = "below its float twin" if p["gap"] < 0 else "above its float twin"
    return out


def format_table(res: dict) -> str:
    """Chapter 03 §9's table (Markdown), from a result of :func:`run`."""
    s = summarise(res)
    out = (f"\n*numpy backend, {res['steps']} steps, batch {res['batch_size']} windows of 32 words, seeds "
           f"{', '.join(map(str, res['seeds']))} (means); the 4-bit rows: quantize={res['quantize']['quantize']!r}, "
           f"blocksize {res['quantize']['blocksize']}, double_quant={res['quantize']['double_quant']}; "
           f"{res['seconds']:.0f} s in all.*\n\n"
           "| adapter | base of the adapted layers | trainable | base bytes | target before → after "
           "| retained after | 4-bit − float (target) |\n|---|---|---:|---:|---:|---:|---:|\n")
    for fl, p in s["pairs"].items():
        for kind, name in (("float", fl), ("4bit", p["4bit"])):
            base = "float32" if kind == "float" else res["quantize"]["quantize"].upper()
            gap = "" if kind == "float" else f"{p['gap']:+.3f}"
            out += (f"| {LABELS.get(fl, fl)}: `{name}` | {base} | {p['trainable_params'][name]:,} | "
                    f"{p['base_bytes'][name]:,} | {p[kind + '_target_before']:.3f} → {p[kind + '_target_after']:.3f} "
                    f"| {p[kind + '_retained_after']:.3f} | {gap} |\n")
    return out + (f"\nThe largest spread between two seeds of one row: {s['noise']:.3f}. The 4-bit bases take "
                  f"{min(p['base_ratio'] for p in s['pairs'].values()):.3f}× the float32 bytes of the same "
                  "weights (codes and double-quantised block scales).\n")


def run_all(quick: bool | None = None) -> dict:
    quick = quick_mode() if quick is None else quick
    if quick:
        return run(seeds=(0,), steps=4, eval_windows=4, pairs=(("lora", "qlora"), ("dora", "qdora")))
    return run()


def main(argv=None) -> int:
    return experiment_main(lambda a: run_all(quick=a.quick), argv, prog="python -m lowrank_ref.experiments.quant_combos",
                           description="LoRA, DoRA, AdaLoRA and HyperLoRA on a float and on an NF4 base, trained "
                                       "as compare trains them",
                           default_out="runs/quant_combos.json")


if __name__ == "__main__":
    raise SystemExit(main())
