r"""Chapter 07's measurements of rank growth in the style of SeLoRA and of sparse factors, on the
built-in task (the shipped GPT, the dialect, adapters on ``q`` and ``v``, 300 steps, as ``compare``):

* **Growth per layer**: SeLoRA-style layers from rank 1 (``α = 2``, so ``s = 2`` like the LoRA row
  of ``compare``; ``max_r = 8``, a check every 20 steps) at several thresholds, the default 2
  included; the rank of every layer and its latest ratio ``F_{r+1}/F_r`` after every check, the
  accuracy after training; and LoRAs at fixed ranks 1 and 8 with the same scale, for reference.
* **Sparse factors**: SoRA with ``λ = 0`` (no gate sparsity) and ``density`` in a few values, the
  masks fixed after 50 steps: the measured share of non-zero entries in ``A`` and ``B`` against the
  accuracy after training.

``python -m lowrank_ref.experiments.rank_growth [--quick] [--out FILE]`` writes the JSON that
``chapters/data/07-growth-sparse.json`` holds; :func:`format_tables` prints the chapter's tables and
:func:`plot_growth` draws the growth figure from it.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["run", "format_tables", "plot_growth", "largest_ratio", "format_bench", "main", "THRESHOLDS", "DENSITIES"]

TARGETS = ("q", "v")
THRESHOLDS = (2.0, 1.1, 1.05, 1.02)
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
INTERVAL = 20


def _selora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "SeLoRALinear"}


def run(quick: bool | None = None, steps: int = 300, seed: int = 0, lr: float = 1e-2) -> dict:
    """Run both measurements; ``quick`` (default: :func:`quick_mode`) shrinks them to a smoke test."""
    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.adapters.selora import SeLoRAConfig
    from lowrank_ref.adapters.sora import SoRAConfig
    from lowrank_ref.experiments.runner import finetune
    from lowrank_ref.models import load_pretrained

    quick = quick_mode() if quick is None else quick
    steps, windows, interval, warmup = (4, 4, 2, 2) if quick else (steps, 256, INTERVAL, 50)
    thresholds, densities = ((2.0, 1.0), (1.0, 0.25)) if quick else (THRESHOLDS, DENSITIES)
    base = load_pretrained(progress=False)
    common = dict(targets=TARGETS, steps=steps, lr=lr, seed=seed, eval_windows=windows)

    def growth(model, step):
        layers = _selora_layers(model)
        return {"step": int(step), "ranks": {n: int(m.r) for n, m in layers.items()},
                "ratios": {n: (None if m.last_ratio is None else float(m.last_ratio)) for n, m in layers.items()}}

    selora = []
    for th in thresholds:
        cfg = SeLoRAConfig(init_r=1, alpha=2.0, max_r=8, threshold=th, interval=interval)
        res = finetune(base, cfg, keep_model=True, record=growth, record_every=interval, **common)
        model = res.pop("model")
        ranks = {n: int(m.r) for n, m in _selora_layers(model).items()}
        selora.append({"threshold": th, "target_after": res["target_after"], "retained_after": res["retained_after"],
                       "final_ranks": ranks, "mean_final_rank": float(np.mean(list(ranks.values()))),
                       "trainable_params_after": int(model.num_trainable_parameters()),
                       "growth": res["records"]})
    lora = {r: finetune(base, LoRAConfig(r=r, alpha=2.0 * r), **common)["target_after"] for r in (1, 8)}

    sparse = []
    for d in densities:
        cfg = SoRAConfig(r=8, alpha=16, lam=0.0, density=d, density_warmup=min(warmup, steps - 1))
        res = finetune(base, cfg, keep_model=True, **common)
        model = res.pop("model")
        layers = [m for _, m in model.named_modules() if type(m).__name__ == "SoRALinear"]
        nonzero = sum(int((m.A.data != 0).sum() + (m.B.data != 0).sum()) for m in layers)
        total = sum(m.A.data.size + m.B.data.size for m in layers)
        sparse.append({"density": d, "measured_density": nonzero / total, "nonzero_factor_entries": nonzero,
                       "factor_entries": total, "target_after": res["target_after"],
                       "retained_after": res["retained_after"], "final_train_loss": res["final_train_loss"]})
    return {"steps": steps, "lr": lr, "seed": seed, "targets": list(TARGETS), "quick": bool(quick),
            "selora": {"init_r": 1, "alpha": 2.0, "max_r": 8, "interval": interval, "runs": selora},
            "lora_same_scale": {"alpha_over_r": 2.0, "target_at_rank": lora},
            "sparse_factors": {"method": "sora", "r": 8, "alpha": 16, "lam": 0.0, "density_warmup": warmup,
                               "runs": sparse}}


def _get(d: dict, k):
    return d[k] if k in d else d[str(k)]  # JSON keys are strings


def largest_ratio(run_: dict) -> float:
    """The largest ``F_{r+1}/F_r`` any layer showed at any check of one SeLoRA run."""
    return max(v for g in run_["growth"] for v in g["ratios"].values() if v is not None)


def format_tables(res: dict) -> str:
    """The chapter's two Markdown tables from :func:`run`'s result (or the committed JSON)."""
    lo = res["lora_same_scale"]["target_at_rank"]
    rows = ["| threshold | final rank per layer (of 8) | mean | largest ratio seen | accuracy after |",
            "|---:|---|---:|---:|---:|"]
    for s in res["selora"]["runs"]:
        ranks = ", ".join(str(v) for _, v in sorted(s["final_ranks"].items()))
        rows.append(f"| {s['threshold']:g} | {ranks} | {s['mean_final_rank']:.2f} | {largest_ratio(s):.3f} | "
                    f"{s['target_after']:.3f} |")
    for r in (1, 8):
        rows.append(f"| LoRA, fixed r = {r} | — | {r} | — | {_get(lo, r):.3f} |")
    rows += ["", "| density asked | density measured | non-zero entries of A, B | accuracy after | kept (base text) |",
             "|---:|---:|---:|---:|---:|"]
    for s in res["sparse_factors"]["runs"]:
        rows.append(f"| {s['density']:g} | {s['measured_density']:.3f} | {s['nonzero_factor_entries']:,} | "
                    f"{s['target_after']:.3f} | {s['retained_after']:.3f} |")
    return "\n".join(rows)


def format_bench(runs: list[dict]) -> str:
    """The chapter's benchmark table from ``bench/results/rank/history/run*.json`` (``python -m
    bench.run --only rank``, three runs): each row's median time as a ratio to LoRA's step, per run."""
    by_run = []
    for data in runs:
        rows = {r["impl"]: r for r in data["rows"] if r["name"] == "rank_methods_step_numpy"}
        by_run.append(rows)
    head = "| per step, against a LoRA step | " + " | ".join(f"run {i + 1}" for i in range(len(by_run))) + " | goal |"
    out = [head, "|---|" + "---:|" * len(by_run) + "---|"]
    for impl in by_run[0]:
        if impl == "lora":
            continue
        goal = by_run[0][impl].get("goal")
        digits = 3 if impl.endswith("_only") else 2  # the overheads alone are a few thousandths
        cells = " | ".join(f"{r[impl]['seconds'] / r['lora']['seconds']:.{digits}f}×" for r in by_run)
        out.append(f"| `{impl}` | {cells} | {'≤ ' + format(goal, 'g') + '×' if goal else ''} |")
    lora_ms = " | ".join(f"{r['lora']['seconds'] * 1e3:.0f} ms" for r in by_run)
    out.append(f"| (LoRA's step itself) | {lora_ms} | |")
    return "\n".join(out)


def plot_growth(res: dict, path=None):
    """The rank of every layer over training, one panel per threshold; saved to ``path`` (returns
    it), or, with ``path=None``, the figure is returned (a notebook shows it)."""
    import matplotlib.pyplot as plt

    runs = res["selora"]["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.8), sharey=True, squeeze=False)
    for ax, run_ in zip(axes[0], runs):
        steps = [g["step"] for g in run_["growth"]]
        for name in sorted(run_["final_ranks"]):
            ax.step(steps, [g["ranks"][name] for g in run_["growth"]], where="post", label=name.replace("blocks.", ""))
        ax.set_title(f"threshold {run_['threshold']:g}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("rank")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    from lowrank_ref.experiments.runner import experiment_main

    return experiment_main(lambda a: run(a.quick), argv, prog="python -m lowrank_ref.experiments.rank_growth",
                           description="Chapter 07: SeLoRA-style growth per layer; sparse factors' density and accuracy",
                           default_out="chapters/data/07-growth-sparse.json")


if __name__ == "__main__":
    raise SystemExit(main())
