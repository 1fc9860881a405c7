r"""Chapter 09's prompt- and prefix-tuning measurements on the built-in task (the shipped GPT, the
dialect):

* **The k sweep**: prompt tuning with ``k`` prompt vectors for several ``k`` (``64 k`` trainable
  numbers each), two inits (``random``, ``vocab``) and three seeds, 300 steps as in ``compare``:
  what it learned (held-out dialect) and kept (held-out base text). The seed's claim is that prompt
  tuning's quality "changes non-monotonically with the number of trainable parameters"; the sweep
  reports whether the mean over seeds rises with ``k`` at every step, and how large the seed
  spread is next to the steps.
* **The context it takes**: for each ``k``, the longest input the prompted model accepts
  (``max_input_length``, and that one more token is refused) and what the shorter windows alone
  cost the *shipped* model (next-token accuracy on held-out base text with windows of
  ``block_size - k`` tokens instead of ``block_size``); prefix tuning's ``max_input_length`` for
  the same ``k`` (it takes no positions; it adds ``k`` keys to every query instead).

``python -m lowrank_ref.experiments.prompt_experiments [--quick] [--out FILE]`` writes the JSON
that ``chapters/data/09-prompt-tuning.json`` holds; :func:`format_tables` renders the chapter's
tables from it, :func:`plot_k_sweep` its figure (``chapters/figures/09-prompt-k.png``).
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["run", "k_sweep", "lr_check", "context_cost", "summarise", "format_tables", "plot_k_sweep", "k_sweep_data", "main", "KS",
           "INITS", "SEEDS", "LR"]

KS = (1, 2, 4, 8, 16, 24)
INITS = ("random", "vocab")
SEEDS = (0, 1, 2)
LR = 0.3  # the compare row's (lr_check: chapter 09 §4.4)
LRS = (0.03, 0.3, 1.0)


def context_cost(ks=KS, windows: int = 256) -> list[dict]:
    """For each ``k``: the prompted model's ``max_input_length`` (checked by feeding one token
    more, which must be refused), the prefix-tuned model's, and the shipped model's held-out
    base-text accuracy with windows shortened to ``block_size - k``."""
    from lowrank_ref import data
    from lowrank_ref.adapters.prefix_tuning import PrefixTuningConfig
    from lowrank_ref.adapters.prompt_tuning import PromptTuningConfig
    from lowrank_ref.inject import inject
    from lowrank_ref.models import blas_threads, load_pretrained
    from lowrank_ref.train import evaluate

    task = data.builtin_task(0)
    rows = []
    with blas_threads(1):
        base = load_pretrained(progress=False)
        block = base.config.block_size
        full = evaluate(base, task.base_heldout, max_windows=windows)["accuracy"]
        for k in ks:
            prompted = load_pretrained(progress=False)
            inject(prompted, PromptTuningConfig(k=k), rng=0)
            n = prompted.max_input_length
            prompted.forward(np.zeros((1, n), dtype=np.int64))  # accepted
            try:
                prompted.forward(np.zeros((1, n + 1), dtype=np.int64))
                refused = False
            except ValueError:
                refused = True
            prefixed = load_pretrained(progress=False)
            inject(prefixed, PrefixTuningConfig(k=k), rng=0)
            short = evaluate(base, task.base_heldout, block_size=n, max_windows=windows)["accuracy"]
            rows.append({"k": int(k), "block_size": int(block), "prompt_max_input": int(n),
                         "one_more_refused": refused, "prefix_max_input": int(prefixed.max_input_length),
                         "prefix_keys_per_query": f"T + {k}",
                         "base_accuracy_full_window": float(full), "base_accuracy_short_window": float(short)})
    return rows


def k_sweep(ks=KS, inits=INITS, seeds=SEEDS, steps: int = 300, lr: float = LR, eval_windows: int = 256) -> list[dict]:
    """One prompt-tuning run per (init, k, seed): ``k``, ``init``, ``seed``, ``trainable_params``,
    ``target_after``, ``retained_after``, ``final_train_loss``, ``seconds``."""
    from lowrank_ref.adapters.prompt_tuning import PromptTuningConfig
    from lowrank_ref.experiments.runner import finetune
    from lowrank_ref.models import load_pretrained

    base = load_pretrained(progress=False)
    runs = []
    for init in inits:
        for k in ks:
            for seed in seeds:
                r = finetune(base, PromptTuningConfig(k=k, init=init), targets=(), steps=steps, lr=lr,
                             seed=seed, eval_windows=eval_windows)
                runs.append({"k": int(k), "init": init, "seed": int(seed), "trainable_params": r["trainable_params"],
                             "target_after": r["target_after"], "retained_after": r["retained_after"],
                             "final_train_loss": r["final_train_loss"], "seconds": r["seconds"]})
    return runs


def lr_check(lrs=LRS, k: int = 8, init: str = "vocab", seed: int = 0, steps: int = 300,
             eval_windows: int = 256) -> list[dict]:
    """The compare row's setting (``k = 8``, ``vocab``) at a few learning rates, one seed each."""
    runs = []
    for lr in lrs:
        r = k_sweep((k,), (init,), (seed,), steps=steps, lr=lr, eval_windows=eval_windows)[0]
        runs.append({"lr": float(lr), **r})
    return runs


def summarise(runs: list[dict]) -> dict:
    """Per init: the mean and spread (max - min) over seeds of the dialect accuracy at each ``k``,
    whether the mean rises at every step of ``k`` (``monotonic``), the steps where it falls, and
    the largest seed spread next to the largest step between neighbouring ``k``."""
    out = {}
    for init in sorted({r["init"] for r in runs}):
        ks = sorted({r["k"] for r in runs if r["init"] == init})
        acc = {k: [r["target_after"] for r in runs if r["init"] == init and r["k"] == k] for k in ks}
        mean = {k: float(np.mean(v)) for k, v in acc.items()}
        spread = {k: float(np.max(v) - np.min(v)) for k, v in acc.items()}
        steps = [mean[b] - mean[a] for a, b in zip(ks, ks[1:])]
        out[init] = {"k": ks, "mean": [mean[k] for k in ks], "spread": [spread[k] for k in ks],
                     "monotonic": bool(all(s > 0 for s in steps)),
                     "falls": [[a, b] for (a, b), s in zip(zip(ks, ks[1:]), steps) if s <= 0],
                     "largest_step": float(max(np.abs(steps))) if steps else 0.0,
                     "largest_spread": float(max(spread.values()))}
    return out


def run(quick: bool | None = None, steps: int = 300) -> dict:
    """Both measurements; ``quick`` (default: :func:`quick_mode`) shrinks them to a smoke test."""
    from lowrank_ref.models import blas_threads

    quick = quick_mode() if quick is None else quick
    if quick:
        ks, inits, seeds, steps, windows, lrs = (1, 4), ("vocab",), (0,), 2, 4, (LR,)
    else:
        ks, inits, seeds, windows, lrs = KS, INITS, SEEDS, 256, LRS
    with blas_threads(1):
        runs = k_sweep(ks, inits, seeds, steps=steps, eval_windows=windows)
        lrs_runs = lr_check(lrs, steps=steps, eval_windows=windows)
    return {"quick": bool(quick), "steps": int(steps), "lr": LR, "context": context_cost(ks, windows),
            "runs": runs, "summary": summarise(runs), "lr_check": lrs_runs}


def format_tables(res: dict) -> dict:
    """``{"context": ..., "k_sweep": ..., "lr": ...}``: the chapter's three Markdown tables."""
    ctx = ("\n| k | prompt tuning: longest input | one token more | prefix tuning: longest input | "
           "shipped model, base text, full windows | same, windows of block_size − k |\n"
           "|---:|---:|---|---:|---:|---:|\n")
    for r in res["context"]:
        ctx += (f"| {r['k']} | {r['prompt_max_input']} of {r['block_size']} | "
                f"{'refused' if r['one_more_refused'] else 'ACCEPTED'} | {r['prefix_max_input']} | "
                f"{r['base_accuracy_full_window']:.3f} | {r['base_accuracy_short_window']:.3f} |\n")
    summ = res["summary"]
    inits = sorted(summ)
    sweep = ("\n| k | trainable | " + " | ".join(f"dialect, init `{i}` (mean ± half-spread of "
                                                  f"{len({r['seed'] for r in res['runs']})} seeds)" for i in inits)
             + " |\n|---:|---:|" + "---:|" * len(inits) + "\n")
    for j, k in enumerate(summ[inits[0]]["k"]):
        cells = [f"{summ[i]['mean'][j]:.3f} ± {summ[i]['spread'][j] / 2:.3f}" for i in inits]
        sweep += f"| {k} | {64 * k:,} | " + " | ".join(cells) + " |\n"
    for i in inits:
        s = summ[i]
        falls = ", ".join(f"{a}→{b}" for a, b in s["falls"]) or "none"
        sweep += (f"\n`{i}`: the mean rises at every step of k: {'yes' if s['monotonic'] else 'no'} "
                  f"(falls: {falls}); largest step between neighbouring k {s['largest_step']:.3f}, "
                  f"largest seed spread {s['largest_spread']:.3f}.\n")
    lrs = ("\n| lr (k = 8, init `vocab`, seed 0) | dialect | base text kept |\n|---:|---:|---:|\n"
           + "".join(f"| {r['lr']:g} | {r['target_after']:.3f} | {r['retained_after']:.3f} |\n"
                     for r in res.get("lr_check", [])))
    return {"context": ctx, "k_sweep": sweep, "lr": lrs}


def k_sweep_data() -> dict:
    """The committed k sweep (``chapters/data/09-prompt-tuning.json``): its runs and summary."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "chapters" / "data" / "09-prompt-tuning.json"
    res = json.loads(path.read_text(encoding="utf-8"))
    keep = ("k", "init", "seed", "trainable_params", "target_after")
    return {"runs": [{f: r[f] for f in keep} for r in res["runs"]], "summary": res["summary"]}


def plot_k_sweep(res: dict):
    """Dialect accuracy against trainable parameters, one point per run, the mean per init."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for init, colour in zip(sorted(res["summary"]), ("tab:blue", "tab:orange")):
        runs = [r for r in res["runs"] if r["init"] == init]
        ax.scatter([r["trainable_params"] for r in runs], [r["target_after"] for r in runs], s=12, alpha=0.5,
                   color=colour)
        s = res["summary"][init]
        ax.plot([64 * k for k in s["k"]], s["mean"], "-o", color=colour, label=f"init {init} (mean)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (64 k)")
    ax.set_ylabel("held-out dialect accuracy")
    ax.set_title("prompt tuning over k")
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    from lowrank_ref.experiments.runner import experiment_main

    return experiment_main(lambda a: run(quick=a.quick), argv, prog="python -m lowrank_ref.experiments.prompt_experiments",
                           description=__doc__.splitlines()[0], default_out="chapters/data/09-prompt-tuning.json")


if __name__ == "__main__":
    raise SystemExit(main())
