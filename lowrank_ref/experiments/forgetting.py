r"""Does LoRA learn less and forget less (Biderman et al. 2024, arXiv:2405.09673)? Measured so that
it can come out either way.

The built-in dialect contradicts the base language in three rules (``data/dialect.py``), so on the
ordinary held-out base text every method's accuracy falls, and learning and forgetting cannot be
told apart. This module adds retention data the fine-tuning does **not** contradict: held-out
base-language sentences that the dialect writes word for word the same (no object, no adjective,
none of the swapped words), :func:`unchanged_heldout`. A model that learned the dialect and forgot
nothing keeps its accuracy there.

Then the paper's two analyses in miniature:

* :func:`learning_forgetting`: methods × ranks (``α = 2r``, as the paper) × learning rates, each
  run's dialect accuracy (learned) against its accuracy on the uncontradicted base text (kept);
* :func:`update_spectrum`: for full fine-tuning, the rank that explains 90% of each weight
  update's squared Frobenius norm, against LoRA's rank cap, with the base weight and a Gaussian
  matrix of the same shape as controls.

``python -m lowrank_ref.experiments.forgetting --out chapters/data/04-forgetting.json`` writes both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from lowrank_ref.config import LoRAConfig

__all__ = ["unchanged_sentences", "unchanged_heldout", "finetune_point", "learning_forgetting",
           "rank_for_energy", "update_spectrum", "run_all"]

UNCHANGED_SEED = 20_240_509  # its own seed: disjoint in practice from the four splits' sentences


def unchanged_sentences(n: int, seed: int = UNCHANGED_SEED) -> list:
    """``n`` sentence trees whose dialect rendering equals their base rendering."""
    from lowrank_ref.data.dialect import render_dialect
    from lowrank_ref.data.grammar import draw_sentences, render_base

    out, k = [], 0
    while len(out) < n:
        for s in draw_sentences(8 * n, seed + k):
            if render_base(s) == render_dialect(s):
                out.append(s)
                if len(out) == n:
                    break
        k += 1
    return out


def unchanged_heldout(n_sentences: int = 3000, seed: int = UNCHANGED_SEED) -> np.ndarray:
    """Token ids of ``n_sentences`` uncontradicted base sentences, one after another."""
    from lowrank_ref.data import default_tokenizer
    from lowrank_ref.data.grammar import render_base

    words: list[str] = []
    for s in unchanged_sentences(n_sentences, seed):
        words += render_base(s)
    return default_tokenizer().encode(words)


def finetune_point(method: str, r: int | None, lr: float, steps: int = 300, targets="all", seed: int = 0,
                   eval_windows: int = 256, keep_delta: bool = False) -> dict:
    """One fine-tuning run of the compare recipe; what it learned and what it kept, on both kinds
    of base text. ``method`` is ``"full"`` or ``"lora"`` (then ``α = 2r``)."""
    from lowrank_ref import data
    from lowrank_ref.inject import inject
    from lowrank_ref.models import blas_threads, load_pretrained
    from lowrank_ref.train import evaluate, train

    task = data.builtin_task(0)
    t0 = time.perf_counter()
    with blas_threads(1):
        model = load_pretrained(progress=False)
        w0 = {n: p.data.copy() for n, p in model.parameters().items() if n.endswith(".weight")} if keep_delta else {}
        cfg = None if method == "full" else LoRAConfig(r=r, alpha=2 * r)
        res = inject(model, cfg, targets=targets, method=method, rng=np.random.default_rng(seed))
        train(model, task.dialect_train, steps, lr=lr, batch_size=16, warmup=min(20, steps - 1),
              rng=np.random.default_rng(seed + 1), progress=False)
        unchanged = unchanged_heldout()
        row = {"method": method, "r": r, "lr": lr, "steps": steps, "trainable_params": int(res.trainable_params),
               "learned": float(evaluate(model, task.dialect_heldout, max_windows=eval_windows)["accuracy"]),
               "kept_all": float(evaluate(model, task.base_heldout, max_windows=eval_windows)["accuracy"]),
               "kept_unchanged": float(evaluate(model, unchanged, max_windows=eval_windows)["accuracy"]),
               "seconds": round(time.perf_counter() - t0, 1)}
    if keep_delta:
        params = model.parameters()
        row["_delta"] = {n: params[n].data.astype(np.float64) - w for n, w in w0.items()
                         if n in params and w.ndim == 2 and "emb" not in n}
        row["_w0"] = w0
    return row


def pretrained_scores(eval_windows: int = 256) -> dict:
    """The shipped model before any fine-tuning, on the three evaluation sets."""
    from lowrank_ref import data
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import evaluate

    task, model = data.builtin_task(0), load_pretrained(progress=False)
    return {"learned": float(evaluate(model, task.dialect_heldout, max_windows=eval_windows)["accuracy"]),
            "kept_all": float(evaluate(model, task.base_heldout, max_windows=eval_windows)["accuracy"]),
            "kept_unchanged": float(evaluate(model, unchanged_heldout(), max_windows=eval_windows)["accuracy"])}


def learning_forgetting(ranks=(1, 4, 16, 64), lora_lrs=(3e-3, 1e-2, 3e-2), full_lrs=(3e-4, 1e-3, 3e-3),
                        steps: int = 300, eval_windows: int = 256) -> list[dict]:
    """Full fine-tuning at each of ``full_lrs`` and LoRA on every linear layer at each rank
    (α = 2r) and each of ``lora_lrs``: one row per run."""
    rows = [finetune_point("full", None, lr, steps, eval_windows=eval_windows) for lr in full_lrs]
    rows += [finetune_point("lora", r, lr, steps, eval_windows=eval_windows) for r in ranks for lr in lora_lrs]
    return rows


def rank_for_energy(M: np.ndarray, fraction: float = 0.9) -> int:
    """The smallest k whose top-k singular values hold ``fraction`` of ``‖M‖_F²``."""
    s2 = np.linalg.svd(np.asarray(M, np.float64), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), fraction) + 1)


def noise_like(d: np.ndarray, rng) -> np.ndarray:
    """A Gaussian matrix shaped like ``d`` with the same Frobenius norm."""
    n = rng.standard_normal(d.shape)
    return n * (np.linalg.norm(d) / np.linalg.norm(n))


def update_spectrum(lr: float = 1e-3, steps: int = 300, fraction: float = 0.9, seed: int = 0) -> list[dict]:
    """Per weight matrix of the blocks and the head: the 90%-energy rank of full fine-tuning's
    update ΔW, of the base weight W0, of W0 plus Gaussian noise as large as ΔW, and of a Gaussian
    matrix of ΔW's shape (the full-rank control), next to the matrix's full rank."""
    run = finetune_point("full", None, lr, steps, keep_delta=True, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for name, d in run["_delta"].items():
        w0 = run["_w0"][name].astype(np.float64)
        out.append({"module": name[: -len(".weight")], "shape": list(d.shape), "full_rank": int(min(d.shape)),
                    "rank90_delta": rank_for_energy(d, fraction), "rank90_base": rank_for_energy(w0, fraction),
                    "rank90_gaussian": rank_for_energy(rng.standard_normal(d.shape), fraction),
                    # W0 plus a random update as large as ΔW: how much an unstructured change of
                    # the same size moves the base weight's spectrum
                    "rank90_base_plus_noise": rank_for_energy(w0 + noise_like(d, rng), fraction),
                    "rel_update": float(np.linalg.norm(d) / np.linalg.norm(w0))})
    return out


def run_all(quick: bool = False) -> dict:
    if quick:
        return {"quick": True, "pretrained": pretrained_scores(eval_windows=8),
                "runs": learning_forgetting(ranks=(2,), lora_lrs=(1e-2,), full_lrs=(1e-3,), steps=5, eval_windows=8),
                "spectrum": update_spectrum(steps=5)}
    return {"quick": False, "pretrained": pretrained_scores(), "runs": learning_forgetting(),
            "spectrum": update_spectrum()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_ref.experiments.forgetting", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/forgetting.json")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    res = run_all(quick=a.quick)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
