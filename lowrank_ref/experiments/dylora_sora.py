r"""Chapter 07's DyLoRA and SoRA measurements on the built-in task (the shipped GPT, the dialect):

* **DyLoRA, one run, every rank**: one DyLoRA (r = 8, α = 16) trained once, evaluated at every rank
  ``b = 1..8``, against a LoRA trained separately at ``r ∈ {1, 2, 4, 8}`` with the same α (so the
  same scale α/b at each rank);
* **SoRA, sparsity against accuracy**: SoRA (r = 8, α = 16) at a few λ, the number of non-zero
  gates per layer over training, the accuracy after training and after pruning to the LoRA of the
  surviving ranks (the same, by construction; measured here on the whole model).

``python -m lowrank_ref.experiments.dylora_sora [--quick] [--out FILE]`` writes the JSON that
``chapters/data/07-dylora-sora.json`` holds; :func:`format_tables` prints the chapter's tables from it.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["run", "format_tables", "main"]

TARGETS = ("q", "v")
LORA_RANKS = (1, 2, 4, 8)
LAMBDAS = (0.0, 0.5, 1.0, 2.0)


def run(quick: bool | None = None, steps: int = 300, seed: int = 0, lr: float = 1e-2) -> dict:
    """Run both measurements; ``quick`` (default: :func:`quick_mode`) shrinks them to a smoke test."""
    from lowrank_ref import data
    from lowrank_ref.adapters.dylora import DyLoRAConfig
    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.adapters.sora import SoRAConfig, prune_model
    from lowrank_ref.experiments.runner import finetune
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import evaluate

    quick = quick_mode() if quick is None else quick
    steps, windows = (2, 4) if quick else (steps, 256)
    lora_ranks, lambdas = ((1, 8), (0.0, 2.0)) if quick else (LORA_RANKS, LAMBDAS)
    task = data.builtin_task(0)
    base = load_pretrained(progress=False)
    common = dict(targets=TARGETS, steps=steps, lr=lr, seed=seed, eval_windows=windows)

    def acc(model):
        return evaluate(model, task.dialect_heldout, max_windows=windows)["accuracy"]

    # DyLoRA: one run, every rank
    dy = finetune(base, DyLoRAConfig(r=8, alpha=16, seed=seed), keep_model=True, **common)
    model = dy.pop("model")
    layers = [m for _, m in model.named_modules() if type(m).__name__ == "DyLoRALinear"]
    dylora_at = {}
    for b in range(1, 9):
        for m in layers:
            m.set_rank(b)
        dylora_at[b] = acc(model)
    lora_at = {r: finetune(base, LoRAConfig(r=r, alpha=16), **common)["target_after"] for r in lora_ranks}

    # SoRA: gates over training, accuracy, pruning
    def gates(model, step):
        return {n: int((m.g.data != 0).sum()) for n, m in model.named_modules() if type(m).__name__ == "SoRALinear"}

    sora = []
    for lam in lambdas:
        res = finetune(base, SoRAConfig(r=8, alpha=16, lam=lam), keep_model=True, record=gates,
                       record_every=max(1, steps // 10), **common)
        model = res.pop("model")
        kept = prune_model(model)
        sora.append({"lam": lam, "target_after": res["target_after"], "target_after_pruned": acc(model),
                     "ranks_kept": kept, "mean_rank_kept": float(np.mean(list(kept.values()))),
                     "trainable_params_after_pruning": int(sum(m.A.size + m.B.size for _, m in model.named_modules()
                                                               if type(m).__name__ == "LoRALinear")),
                     "gates_over_training": res["records"], "record_every": max(1, steps // 10)})
    return {"steps": steps, "lr": lr, "seed": seed, "targets": list(TARGETS), "quick": bool(quick),
            "dylora": {"r": 8, "alpha": 16, "target_at_rank": dylora_at, "final_train_loss": dy["final_train_loss"]},
            "lora": {"alpha": 16, "target_at_rank": lora_at},
            "sora": {"r": 8, "alpha": 16, "runs": sora}}


def _get(d: dict, k):
    return d[k] if k in d else d[str(k)]  # JSON keys are strings


def format_tables(res: dict) -> str:
    """The chapter's two Markdown tables from :func:`run`'s result (or the committed JSON)."""
    dy, lo = res["dylora"]["target_at_rank"], res["lora"]["target_at_rank"]
    rows = ["| rank b | DyLoRA (one run), at rank b | LoRA trained at rank b |", "|---:|---:|---:|"]
    for b in range(1, 9):
        lora = f"{_get(lo, b):.3f}" if (b in lo or str(b) in lo) else "—"
        rows.append(f"| {b} | {_get(dy, b):.3f} | {lora} |")
    rows += ["", "| λ | gates kept (mean over layers, of 8) | accuracy | accuracy after pruning |",
             "|---:|---:|---:|---:|"]
    for s in res["sora"]["runs"]:
        rows.append(f"| {s['lam']:g} | {s['mean_rank_kept']:.1f} | {s['target_after']:.3f} | "
                    f"{s['target_after_pruned']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from lowrank_ref.experiments.runner import experiment_main

    return experiment_main(lambda a: run(a.quick), argv, prog="python -m lowrank_ref.experiments.dylora_sora",
                           description="Chapter 07: DyLoRA at every rank after one run; SoRA's sparsity and accuracy",
                           default_out="chapters/data/07-dylora-sora.json")


if __name__ == "__main__":
    raise SystemExit(main())
