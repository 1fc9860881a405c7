r"""Chapter 08's measurements of MTL-LoRA and the mixture of LoRA experts, on the four dialects of
:mod:`lowrank_ref.data.multitask` (the shipped model, NumPy, the compare rows' settings).

* :func:`balancing`: LoRA MoE with top-2 routing over 4 experts, trained with and without the
  balancing term; where the held-out tokens go (each expert's share, per layer, and the ``cv²``
  of the shares) and the accuracy averaged over the tasks.
* :func:`mtl_merge`: MTL-LoRA trained on all four tasks at once; the mixing weights ``π_t`` each
  task learned; each task's accuracy through the unmerged layers (the task as a condition) and
  through the layers merged for that task (plain linear layers), which must agree.
* :func:`latency`: one forward of the same batch through the base, MTL-LoRA unmerged (a batch of
  mixed tasks), MTL-LoRA merged for one task, and LoRA MoE (which cannot merge).

``python -m lowrank_ref.experiments.mtl_moe_experiments --out chapters/data/08-mtl-moe.json``
writes all three (a minute or two on 2 cores); ``LOWRANK_REF_QUICK=1`` shrinks every run to a
smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lowrank_ref.adapters.lora_moe import LoRAMoEConfig, LoRAMoELinear
from lowrank_ref.adapters.multitask_lora import (
    MultiTaskLoRAConfig,
    MultiTaskLoRALinear,
    mixing_weights,
)
from lowrank_ref.experiments.modes import quick_mode

__all__ = ["DATA_FILE", "MOE_CONFIG", "MTL_CONFIG", "expert_shares", "balancing", "mtl_merge", "latency", "run_all", "tables"]

DATA_FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "08-mtl-moe.json"
# top-2 of 4 (MixLoRA's k): with top-1, a softmax over the one kept logit is 1 whatever the logits
# are, so the router gets no gradient at all (chapter 08 §7) and no balancing term can move it
MOE_CONFIG = LoRAMoEConfig(r=2, alpha=4.0, n_experts=4, top_k=2, balance_weight=0.0)
MTL_CONFIG = MultiTaskLoRAConfig(r=8, alpha=16.0, n_tasks=4, n_up=3, temperature=0.1)  # the compare row's
TARGETS = ("q", "v")


def _sizes(quick: bool) -> dict:
    return {"steps": 4, "windows": 2, "repeats": 1} if quick else {"steps": 300, "windows": 16, "repeats": 31}


def _trained(config, mt, steps: int, seed: int):
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import train

    model = load_pretrained(progress=False)
    inject(model, config, targets=TARGETS, rng=np.random.default_rng(seed))
    result = train(model, mt, steps, lr=1e-2, batch_size=16, warmup=min(20, steps - 1),
                   rng=np.random.default_rng(seed + 1), progress=False)
    return model, result


def expert_shares(model, mt, windows: int) -> dict:
    """``{layer: [share of held-out tokens whose largest gate is expert e]}`` over every task's
    held-out windows (the model in eval mode; the gates read from each layer's forward cache)."""
    from lowrank_ref.data.multitask import multitask_eval_windows

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)}
    counts = {n: np.zeros(m.n_experts) for n, m in layers.items()}
    was = model.training
    model.eval()
    try:
        for t in range(mt.n_tasks):
            x, _, _ = multitask_eval_windows(mt, t, model.config.block_size, windows)
            model.forward(x)
            for n, m in layers.items():
                counts[n] += np.bincount(m._cache.g.argmax(axis=1), minlength=m.n_experts)
    finally:
        for _, m in model.named_modules():
            object.__setattr__(m, "_cache", None)
        model.train(was)
    return {n: (c / c.sum()).tolist() for n, c in counts.items()}


def _cv2(shares) -> float:
    s = np.asarray(shares)
    return float(s.var() / s.mean() ** 2)


def balancing(weights=(0.0, 0.01, 1.0), quick: bool | None = None, seed: int = 0) -> dict:
    """LoRA MoE (top-2 of 4) trained once per balancing weight ``λ``: each expert's share of the
    held-out tokens' first choices per layer, the ``cv²`` of the shares (0: every expert gets a
    quarter; 3: one expert gets everything), the accuracy averaged over tasks and the final
    training loss (which includes ``λ·cv²``)."""
    from lowrank_ref.data import evaluate_multitask, multitask_data

    quick = quick_mode() if quick is None else quick
    size = _sizes(quick)
    mt = multitask_data(0)
    runs = []
    for lam in weights:
        model, res = _trained(MOE_CONFIG.replace(balance_weight=float(lam)), mt, size["steps"], seed)
        shares = expert_shares(model, mt, size["windows"])
        acc = evaluate_multitask(model, mt, max_windows=size["windows"])
        runs.append({"balance_weight": float(lam), "shares": shares,
                     "cv2": {n: _cv2(s) for n, s in shares.items()},
                     "accuracy": acc["accuracy"], "changed_accuracy": acc["changed_accuracy"],
                     "final_loss": float(np.mean(res.losses[-10:]))})
    return {"config": {**MOE_CONFIG.__dict__, "balance_weight": None}, "steps": size["steps"],
            "windows_per_task": size["windows"], "runs": runs}


def mtl_merge(quick: bool | None = None, seed: int = 0) -> dict:
    """MTL-LoRA on the four dialects: the learned ``π_t`` (per layer), and each task's accuracy
    unmerged and merged for that task (``merge(task=t)`` on every layer, then ``unmerge()``)."""
    from lowrank_ref.data import evaluate_multitask, multitask_data

    quick = quick_mode() if quick is None else quick
    size = _sizes(quick)
    mt = multitask_data(0)
    model, res = _trained(MTL_CONFIG, mt, size["steps"], seed)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiTaskLoRALinear)}
    pi = {n: mixing_weights(m.w.data.astype(np.float64), MTL_CONFIG.temperature).tolist() for n, m in layers.items()}
    unmerged = evaluate_multitask(model, mt, max_windows=size["windows"])
    merged = {}
    for t, name in enumerate(mt.tasks):
        for m in layers.values():
            m.merge(task=t)
        only_t = dataclasses.replace(mt, tasks=(name,), train=(mt.train[t],), heldout=(mt.heldout[t],),
                                     train_changed=(mt.train_changed[t],), heldout_changed=(mt.heldout_changed[t],))
        one = evaluate_multitask(model, only_t, max_windows=size["windows"], cond_of={name: t})  # task t's rows only
        merged[name] = one["per_task"][name]["accuracy"]
        for m in layers.values():
            m.unmerge()
    return {"config": MTL_CONFIG.__dict__, "steps": size["steps"], "tasks": list(mt.tasks), "pi": pi,
            "unmerged": {k: v["accuracy"] for k, v in unmerged["per_task"].items()}, "merged": merged,
            "final_loss": float(np.mean(res.losses[-10:]))}


def _interleaved_times(fns: dict, repeats: int) -> dict:
    """``{name: {"median", "min"}}`` seconds of CPU time (``time.process_time``) per call, on one
    BLAS thread, the calls interleaved round by round after one warm-up call each. CPU time, not
    wall time: on a shared machine the wall clock mostly measures the other processes."""
    from threadpoolctl import threadpool_limits

    times = {k: [] for k in fns}
    with threadpool_limits(limits=1, user_api="blas"):
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.process_time()
                fn()
                times[k].append(time.process_time() - t0)
    return {k: {"median": float(np.median(v)), "min": float(np.min(v))} for k, v in times.items()}


def latency(quick: bool | None = None, seed: int = 0, batch: int = 16) -> dict:
    """CPU seconds (``{"median", "min"}``, one BLAS thread) of one eval-mode forward of ``batch`` windows: the base; MTL-LoRA unmerged
    with the rows spread over the four tasks; MTL-LoRA merged for task 0 (every row task 0); LoRA
    MoE (dense, 4 experts of rank 2: the compare row). Untrained adapters: the cost does not
    depend on the values."""
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained

    quick = quick_mode() if quick is None else quick
    size = _sizes(quick)
    rng = np.random.default_rng(seed)
    base = load_pretrained(progress=False).eval()
    idx = rng.integers(0, base.config.vocab_size, (batch, base.config.block_size))
    mixed = np.arange(batch) % MTL_CONFIG.n_tasks
    mtl = load_pretrained(progress=False)
    inject(mtl, MTL_CONFIG, targets=TARGETS, rng=np.random.default_rng(seed))
    mtl.eval()
    moe = load_pretrained(progress=False)
    inject(moe, LoRAMoEConfig(r=2, alpha=4.0, n_experts=4), targets=TARGETS, rng=np.random.default_rng(seed))
    moe.eval()
    merged = load_pretrained(progress=False)
    inject(merged, MTL_CONFIG, targets=TARGETS, rng=np.random.default_rng(seed))
    for _, m in merged.named_modules():
        if isinstance(m, MultiTaskLoRALinear):
            m.merge(task=0)
    merged.eval()
    zeros = np.zeros(batch, dtype=np.int64)
    out = {"batch": batch, "block_size": base.config.block_size, "repeats": size["repeats"]}
    out.update(_interleaved_times({
        "base": lambda: base.forward(idx),
        "mtl_unmerged_mixed": lambda: mtl.forward(idx, cond=mixed),
        "mtl_merged_one_task": lambda: merged.forward(idx, cond=zeros),
        "moe_unmerged": lambda: moe.forward(idx),
    }, size["repeats"]))
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return out


def run_all(quick: bool | None = None, seed: int = 0) -> dict:
    import os

    t0 = time.perf_counter()
    data = {"balancing": balancing(quick=quick, seed=seed), "mtl_merge": mtl_merge(quick=quick, seed=seed),
            "latency": latency(quick=quick, seed=seed)}
    data["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
                    "machine": platform.machine(), "python": platform.python_version(),
                    "numpy": np.__version__, "loadavg": list(os.getloadavg()), "seconds": round(time.perf_counter() - t0, 1),
                    "quick": bool(quick_mode() if quick is None else quick)}
    return data


def _pi_cell(row) -> str:
    return "(" + ", ".join(f"{p:.2f}" for p in row) + ")"


def tables(data: dict) -> dict:
    """Chapter 08's Markdown tables of a run (:func:`run_all`'s dict): ``balancing``, ``mtl``, ``latency``."""
    bal = data["balancing"]
    layers = list(bal["runs"][0]["cv2"])
    short = [n.replace("blocks.", "").replace(".attn", "") for n in layers]
    t_bal = ("| λ | " + " | ".join(f"cv² {n}" for n in short) + " | mean cv² | accuracy (mean over tasks) | changed-word accuracy |\n"
             "|---:|" + "---:|" * len(layers) + "---:|---:|---:|\n")
    for r in bal["runs"]:
        t_bal += (f"| {r['balance_weight']:g} | " + " | ".join(f"{r['cv2'][n]:.3f}" for n in layers)
                  + f" | {np.mean(list(r['cv2'].values())):.3f} | {r['accuracy']:.3f} | {r['changed_accuracy']:.3f} |\n")
    m = data["mtl_merge"]
    first, last = list(m["pi"])[0], list(m["pi"])[-1]
    t_mtl = (f"| task | accuracy, unmerged | accuracy, merged for the task | π_t at {first} | π_t at {last} |\n"
             "|---|---:|---:|---|---|\n")
    for t, name in enumerate(m["tasks"]):
        t_mtl += (f"| {name} | {m['unmerged'][name]:.3f} | {m['merged'][name]:.3f} | "
                  f"{_pi_cell(m['pi'][first][t])} | {_pi_cell(m['pi'][last][t])} |\n")
    lat = data["latency"]
    labels = [("base", "the base alone"), ("mtl_merged_one_task", "MTL-LoRA merged for one task"),
              ("mtl_unmerged_mixed", "MTL-LoRA unmerged, four tasks in the batch"),
              ("moe_unmerged", "LoRA MoE (cannot merge)")]
    t_lat = "| forward of one batch | CPU ms (median) | × the base | CPU ms (fastest) |\n|---|---:|---:|---:|\n"
    for k, label in labels:
        t_lat += (f"| {label} | {1e3 * lat[k]['median']:.1f} | {lat[k]['median'] / lat['base']['median']:.2f}× | "
                  f"{1e3 * lat[k]['min']:.1f} |\n")
    meta = data["meta"]
    about = (f"\n{meta['date']}, {meta['cpu_count']} cores (load average {meta['loadavg'][0]:.1f} at the end), "
             f"NumPy {meta['numpy']}; {bal['steps']} training steps per run, batch 16, lr 1e-2, "
             "next-token accuracy on the dialects' held-out text.\n")
    about_lat = (f"\n{lat['date']}, {meta['cpu_count']} cores, NumPy {meta['numpy']}; {lat['batch']} windows of "
                 f"{lat['block_size']} tokens per forward, CPU time on one BLAS thread, {lat['repeats']} "
                 "interleaved runs of each.\n")
    return {"balancing": t_bal + about, "mtl": t_mtl + about, "latency": t_lat + about_lat}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON here (default: print it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("latency",), help="rerun this part only, into the existing --out file")
    args = ap.parse_args(argv)
    if args.only:
        if not args.out:
            ap.error("--only needs --out (the file whose part it replaces)")
        with open(args.out, encoding="utf-8") as f:
            data = json.load(f)
        data["latency"] = latency(seed=args.seed)
    else:
        data = run_all(seed=args.seed)
    text = json.dumps(data, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
