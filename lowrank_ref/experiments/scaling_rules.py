r"""Chapter 02 §10: rsLoRA's $\alpha/\sqrt r$ against $\alpha/r$ and $\alpha = 2r$, each rank at its own
best learning rate.

At one learning rate, a scaling rule that gives a larger $s$ at some rank wins there (chapter 01 §6):
under Adam $s$ multiplies the step of $\Delta W = sBA$ much as the learning rate does. So a sweep at
one learning rate cannot tell "$\alpha/\sqrt r$ uses rank better" from "a larger step helps".
Two measurements separate them:

* :func:`matched_s`: rsLoRA at rank ``r`` against plain LoRA whose $\alpha$ gives the same $s$
  ($\alpha_{\text{LoRA}} = \alpha_{\text{rs}}\sqrt r$). The two layers compute the same function
  with the same parameters, so they train the same, to the last bit: at matched $s$ there is
  nothing left to compare, rsLoRA *is* a rule for choosing $\alpha$.
* :func:`lr_sweep`: LoRA on ``q, v`` at each rank under the three rules (constants as in chapter
  01: all give $s = 2$ at $r = 8$), each at a grid of learning rates around ``compare``'s, and
  :func:`best_by_rank` picks each (rule, rank)'s best learning rate by held-out dialect accuracy.
  If the rules differ only through $s$, their best accuracies agree and their best
  $s \cdot \eta$ is about the same; the same grid also says whether ``alpha = 2r`` (fixed $s$)
  keeps one best learning rate across ranks (chapter 01's claim).

Sizes follow :func:`lowrank_ref.experiments.modes.mode`. ``python -m
lowrank_ref.experiments.scaling_rules --out chapters/data/02-scaling-lr.json`` writes the JSON that
chapter 02's table (``doc_tables`` block ``scaling-lr``) is rendered from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from lowrank_ref.adapters.lora import LoRAConfig
from lowrank_ref.experiments.modes import mode as current_mode
from lowrank_ref.experiments.modes import sized

__all__ = ["RULES", "rule_config", "settings", "matched_s", "lr_sweep", "best_by_rank", "conclusions",
           "join", "run_all", "table", "main"]

RS_ALPHA = 2.0 * math.sqrt(8.0)  # s = 2 at r = 8, as chapter 01's sweep
RULES = ("alpha/r", "alpha/sqrt(r)", "alpha=2r")


def rule_config(rule: str, r: int) -> LoRAConfig:
    """The LoRA config of ``rule`` at rank ``r``: ``alpha = 16`` over r, ``alpha = 2√8`` over √r
    (rsLoRA), or ``alpha = 2r`` (s = 2). All three give s = 2 at r = 8."""
    if rule == "alpha/r":
        return LoRAConfig(r=r, alpha=16.0)
    if rule == "alpha/sqrt(r)":
        return LoRAConfig(r=r, alpha=RS_ALPHA, rslora=True)
    if rule == "alpha=2r":
        return LoRAConfig(r=r, alpha=2.0 * r)
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")


def settings(current: str | None = None) -> dict:
    """Ranks, learning-rate factors (times ``compare``'s lora lr), seeds and the run's size."""
    run = sized(quick={"steps": 12, "batch_size": 4, "warmup": 2, "eval_windows": 8},
                classroom={"steps": 300, "batch_size": 16, "warmup": 20, "eval_windows": 128},
                full={"steps": 300, "batch_size": 16, "warmup": 20, "eval_windows": 256}, current=current)
    grid = sized(quick={"ranks": [2, 8], "lr_factors": [1.0, 4.0], "seeds": [0]},
                 classroom={"ranks": [64], "lr_factors": [0.5, 1.0, 2.0], "seeds": [0]},
                 full={"ranks": [1, 4, 16, 64], "lr_factors": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                       "seeds": [0, 1]}, current=current)
    return {"mode": current or current_mode(), **run, **grid}


def _finetune(config: LoRAConfig, lr: float, seed: int, cfg: dict) -> dict:
    from lowrank_ref.experiments.lora_experiments import finetune

    return finetune(config, targets=("q", "v"), lr=lr, seed=seed,
                    **{k: cfg[k] for k in ("steps", "batch_size", "warmup", "eval_windows")})


def matched_s(r: int = 16, cfg: dict | None = None) -> dict:
    """rsLoRA at rank ``r`` and plain LoRA with ``alpha = RS_ALPHA √r`` (the same s), one run each
    at ``compare``'s lr: their results, and whether every recorded number is equal."""
    from lowrank_ref.experiments.lora_experiments import compare_lr

    cfg = settings() if cfg is None else cfg
    rs = LoRAConfig(r=r, alpha=RS_ALPHA, rslora=True)
    plain = LoRAConfig(r=r, alpha=RS_ALPHA * math.sqrt(r))
    a, b = (_finetune(c, compare_lr(), 0, cfg) for c in (rs, plain))
    keys = ("target_after", "retained_after", "target_loss_after", "retained_loss_after", "final_train_loss")
    return {"r": r, "rslora": {k: a[k] for k in ("alpha", "scaling", *keys)},
            "lora": {k: b[k] for k in ("alpha", "scaling", *keys)},
            "identical": all(a[k] == b[k] for k in keys)}


def lr_sweep(cfg: dict | None = None, progress: bool = False) -> list[dict]:
    """One row per (rule, rank, learning rate, seed). Runs whose (r, s, lr, seed) coincide (every
    rule at r = 8) are trained once: the same s is the same run (:func:`matched_s`)."""
    from lowrank_ref.experiments.lora_experiments import compare_lr

    cfg = settings() if cfg is None else cfg
    base_lr, memo, rows, t0 = compare_lr(), {}, [], time.perf_counter()
    for r in cfg["ranks"]:
        for rule in RULES:
            c = rule_config(rule, r)
            for f in cfg["lr_factors"]:
                for seed in cfg["seeds"]:
                    key = (r, round(c.scaling, 12), f, seed)
                    if key not in memo:
                        memo[key] = _finetune(c, base_lr * f, seed, cfg)
                        if progress:
                            print(f"[scaling_rules] r={r} s={c.scaling:.3g} lr={base_lr * f:.3g} seed={seed}: "
                                  f"{memo[key]['target_after']:.3f} ({len(memo)} runs, "
                                  f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                    m = memo[key]
                    rows.append({"rule": rule, "r": r, "alpha": c.alpha, "scaling": c.scaling, "lr": base_lr * f,
                                 "lr_factor": f, "seed": seed, "trainable_params": m["trainable_params"],
                                 **{k: m[k] for k in ("target_after", "retained_after", "target_loss_after",
                                                      "retained_loss_after")}})
    return rows


def best_by_rank(rows: list[dict]) -> list[dict]:
    """For each (rule, rank): the seed-mean accuracies at every learning rate, the best one (by held-out
    dialect accuracy), whether it lies on the grid's edge, and the value at ``compare``'s lr (factor 1)."""
    out = []
    for rule in dict.fromkeys(r["rule"] for r in rows):
        for rank in sorted({r["r"] for r in rows if r["rule"] == rule}):
            cell = [r for r in rows if r["rule"] == rule and r["r"] == rank]
            factors = sorted({r["lr_factor"] for r in cell})
            mean = {f: {k: float(np.mean([r[k] for r in cell if r["lr_factor"] == f]))
                        for k in ("target_after", "retained_after")} for f in factors}
            fb = max(factors, key=lambda f: mean[f]["target_after"])
            lr_b = next(r["lr"] for r in cell if r["lr_factor"] == fb)
            out.append({"rule": rule, "r": rank, "scaling": cell[0]["scaling"],
                        "n_seeds": len({r["seed"] for r in cell}),
                        "at_compare_lr": mean.get(1.0), "best_lr": lr_b, "best_lr_factor": fb,
                        "best": mean[fb], "s_times_lr": cell[0]["scaling"] * lr_b,
                        "on_edge": len(factors) > 1 and fb in (factors[0], factors[-1])})
    return out


def conclusions(data: dict) -> dict:
    """What chapter 02 says the sweep shows, computed from the data (accuracies as fractions).

    * ``fixed_lr_gain``: rsLoRA's mean lead over ``alpha/r`` at ``compare``'s lr, over ranks > 1;
    * ``best_lr_gap``: the largest |rsLoRA − alpha/r| over ranks once each has its best lr;
    * ``alpha2r_best_lr_factors``: the best lr factor of ``alpha = 2r`` at each rank;
    * ``matched_s_identical``: rsLoRA and LoRA at the same s trained to the same numbers."""
    best = {(b["rule"], b["r"]): b for b in data["best"]}
    ranks = sorted({b["r"] for b in data["best"]})
    big = [r for r in ranks if r > 1]
    fixed = [best[("alpha/sqrt(r)", r)]["at_compare_lr"]["target_after"]
             - best[("alpha/r", r)]["at_compare_lr"]["target_after"] for r in big]
    gap = [abs(best[("alpha/sqrt(r)", r)]["best"]["target_after"] - best[("alpha/r", r)]["best"]["target_after"])
           for r in big]
    return {"fixed_lr_gain": float(np.mean(fixed)) if fixed else 0.0,
            "best_lr_gap": float(max(gap)) if gap else 0.0,
            "alpha2r_best_lr_factors": {str(r): best[("alpha=2r", r)]["best_lr_factor"] for r in ranks},
            "any_best_on_edge": any(b["on_edge"] for b in data["best"]),
            "matched_s_identical": bool(data["matched_s"]["identical"])}


def join(parts: list[dict]) -> dict:
    """Join runs split by seed (``--seeds``) into one result: the runs of all, recomputed summaries."""
    out = dict(parts[0])
    out["settings"] = {**parts[0]["settings"], "seeds": sorted({s for p in parts for s in p["settings"]["seeds"]})}
    out["runs"] = [r for p in parts for r in p["runs"]]
    out["best"] = best_by_rank(out["runs"])
    out["conclusions"] = conclusions(out)
    out["wall_seconds"] = sum(p["wall_seconds"] for p in parts)
    return out


def run_all(cfg: dict | None = None, progress: bool = False) -> dict:
    """Both measurements as plain data (what :func:`main` writes)."""
    import os
    import platform

    cfg = settings() if cfg is None else cfg
    t0 = time.perf_counter()
    out = {"settings": cfg, "matched_s": matched_s(cfg=cfg), "runs": lr_sweep(cfg, progress=progress)}
    out["best"] = best_by_rank(out["runs"])
    out["conclusions"] = conclusions(out)
    out["wall_seconds"] = time.perf_counter() - t0
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, NumPy {np.__version__}"
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def table(data: dict) -> str:
    """Chapter 02's table: per rank, each rule's s, its accuracy at compare's lr, its best lr and the
    accuracy there (held-out dialect / base text, percent, the mean over seeds)."""
    best = {(b["rule"], b["r"]): b for b in data["best"]}
    ranks = sorted({b["r"] for b in data["best"]})
    names = {"alpha/r": "α/r (α = 16)", "alpha/sqrt(r)": "α/√r (α = 2√8)", "alpha=2r": "α = 2r"}
    head = ["r"] + [f"{names[rule]}: {h}" for rule in RULES for h in ("s", "at lr 10⁻²", "best lr: dialect / base")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in ranks:
        cells = [str(r)]
        for rule in RULES:
            b = best[(rule, r)]
            at = b["at_compare_lr"]
            cells += [f"{b['scaling']:.3g}", "—" if at is None else _pct(at["target_after"]),
                      f"{b['best_lr']:.3g}{' (edge)' if b['on_edge'] else ''}: {_pct(b['best']['target_after'])} / "
                      f"{_pct(b['best']['retained_after'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    s = data["settings"]
    ms = data["matched_s"]
    return ("\n" + "\n".join(lines) + "\n\n"
            f"*LoRA on `q, v`, {s['steps']} AdamW steps, batch {s['batch_size']}, learning rates "
            f"{', '.join(f'{f:g}' for f in s['lr_factors'])} × 10⁻², mean over seeds {s['seeds']}; "
            f"{data['wall_seconds'] / 60:.0f} min of runs on {data['machine']}. Matched s at r = {ms['r']} "
            f"(rsLoRA α = {ms['rslora']['alpha']:.3g} against LoRA α = {ms['lora']['alpha']:.3g}, s = "
            f"{ms['rslora']['scaling']:.3g} both): "
            f"{'identical to the last bit' if ms['identical'] else 'NOT identical'}.*\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_ref.experiments.scaling_rules",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/scaling_rules.json")
    ap.add_argument("--mode", choices=("quick", "classroom", "full"), default=None,
                    help="run size (default: LOWRANK_REF_MODE, or full)")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="only these seeds, comma-separated (to split a run over processes)")
    ap.add_argument("--join", nargs="+", metavar="JSON", help="join the given part files into --out instead")
    a = ap.parse_args(argv)
    from lowrank_ref.experiments.runner import write_json

    if a.join:
        res = join([json.loads(open(p, encoding="utf-8").read()) for p in a.join])
        print(f"wrote {write_json(res, a.out)}", file=sys.stderr)
        return 0
    cfg = settings(a.mode)
    if a.seeds is not None:
        cfg["seeds"] = a.seeds
    res = run_all(cfg, progress=True)
    print(f"wrote {write_json(res, a.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
