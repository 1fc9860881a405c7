r"""Chapter 08's HyperLoRA measurements on the multi-task data (the four dialects of
:mod:`lowrank_ref.data.multitask`), with the shipped GPT:

* **per-task accuracy** of HyperLoRA (task ids as the condition), one LoRA shared by all tasks
  (at r = 8, and at r = 32, which has as many parameters as four r = 8 LoRAs), and one LoRA per task (each trained on its own task for ``steps // n_tasks`` steps, so every
  method sees the same number of training windows); next-token accuracy on every position and on
  the positions a dialect's rules changed;
* **what the seed's table claims**: "highly dynamic" (how far apart the generated updates of two
  tasks are: ``‖ΔW(a) − ΔW(b)‖ / mean ‖ΔW‖`` per layer, averaged), "excellent" multi-task
  (the accuracies above), "slow" fine-tuning (a forward and backward pass against LoRA's, timed
  in turn on the same batch), "moderate" inference (a forward pass merged for one task, unmerged
  with one task, unmerged with a batch that mixes the four tasks row by row, against the base
  model and an unmerged LoRA, timed in turn; the merged pass with the base again, after merging);
* **unseen conditions**: the embedding of task ``a`` replaced by ``(1 − λ) T_a + λ T_b`` and the
  model evaluated on both tasks' held-out text along the path; and the learned task embeddings in
  a 2-D projection (their two principal directions), the figure's data.

``python -m lowrank_ref.experiments.hyperlora_experiments [--quick] [--out FILE]`` writes the JSON
that ``chapters/data/08-hyperlora.json`` holds; :func:`format_tables` prints the chapter's tables,
:func:`plot_embeddings` draws the figure.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["run", "tables", "format_tables", "plot_embeddings", "embedding_figure", "embedding_figure_data", "interpolate_tasks", "embedding_projection",
           "time_interleaved", "main", "PAIR"]

TARGETS = ("q", "v")
PAIR = ("hound", "relabel")  # the two tasks the unseen-condition path runs between
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _hyper_layers(model):
    return [m for _, m in model.named_modules() if getattr(m, "takes_condition", False)]


def interpolate_tasks(model, mt, a: str, b: str, lambdas=LAMBDAS, max_windows: int = 64) -> list[dict]:
    """Replace task ``a``'s embedding by ``(1 − λ) T_a + λ T_b`` (an embedding no task was trained
    with, for 0 < λ < 1), evaluate on ``a``'s and ``b``'s held-out text under condition ``a``;
    ``T`` is restored afterwards."""
    from lowrank_ref.data import evaluate_multitask

    T = model.lowrank_shared.hyperlora.T
    ia, ib = mt.task_id(a), mt.task_id(b)
    saved = T.data.copy()
    out = []
    try:
        for lam in lambdas:
            T.data = saved.copy()
            T.data[ia] = (1 - lam) * saved[ia] + lam * saved[ib]
            ev = evaluate_multitask(model, mt, max_windows=max_windows, cond_of={a: ia, b: ia})
            out.append({"lam": float(lam), a: ev["per_task"][a]["accuracy"], b: ev["per_task"][b]["accuracy"],
                        f"{a}_changed": ev["per_task"][a]["changed_accuracy"],
                        f"{b}_changed": ev["per_task"][b]["changed_accuracy"]})
    finally:
        T.data = saved
    return out


def embedding_projection(T: np.ndarray) -> dict:
    """The rows of ``T (n_tasks, d_t)`` in the plane of their two principal directions (centred
    SVD): ``{"coords": (n, 2), "explained": share of variance on each axis}``."""
    Tc = T - T.mean(axis=0)
    U, S, Vt = np.linalg.svd(Tc, full_matrices=False)
    coords = Tc @ Vt[:2].T
    var = S**2
    return {"coords": coords.tolist(), "explained": (var[:2] / var.sum()).tolist(), "axes": Vt[:2].tolist()}


def time_interleaved(fns: dict, repeats: int) -> dict:
    """``{name: median wall time of fn()}``, the functions called in turn ``repeats`` times (one
    warm-up round first), so a change in the machine's load hits all of them alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _train_step(model, x, y, cond):
    """One forward and backward pass (what a training step costs, without the optimizer)."""
    from lowrank_ref.nn.losses import cross_entropy

    logits = model.forward(x) if cond is None else model.forward(x, cond=cond)
    _, dlogits = cross_entropy(logits, y)
    model.backward(dlogits)
    model.zero_grad()


def _dynamics(model, n_tasks: int) -> dict:
    """How far apart the tasks' generated updates are, per layer, averaged over layers."""
    dists, cos = [], []
    for layer in _hyper_layers(model):
        dW = [layer.delta_weight(c).astype(np.float64).ravel() for c in range(n_tasks)]
        mean_norm = float(np.mean([np.linalg.norm(d) for d in dW]))
        for i in range(n_tasks):
            for j in range(i + 1, n_tasks):
                dists.append(float(np.linalg.norm(dW[i] - dW[j])) / mean_norm)
                cos.append(float(dW[i] @ dW[j] / (np.linalg.norm(dW[i]) * np.linalg.norm(dW[j]))))
    return {"relative_distance": float(np.mean(dists)), "cosine": float(np.mean(cos))}


def run(quick: bool | None = None, steps: int = 300, seed: int = 0, lr: float = 1e-2, batch_size: int = 16) -> dict:
    """All measurements; ``quick`` (default: :func:`quick_mode`) shrinks them to a smoke test."""
    from lowrank_ref.adapters.hyperlora import HyperLoRAConfig
    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.data import evaluate_multitask, get_multitask_batch, multitask_data
    from lowrank_ref.inject import inject
    from lowrank_ref.models import blas_threads, load_pretrained
    from lowrank_ref.train import train

    quick = quick_mode() if quick is None else quick
    steps, windows, repeats = (4, 2, 2) if quick else (steps, 64, 30)
    mt = multitask_data(0)
    hcfg = HyperLoRAConfig(r=4, alpha=8, n_tasks=mt.n_tasks)
    lcfg = LoRAConfig(r=8, alpha=16)
    wcfg = LoRAConfig(r=32, alpha=64)
    kw = dict(lr=lr, batch_size=batch_size, warmup=min(20, steps - 1), progress=False)

    def fresh(cfg):
        model = load_pretrained(progress=False)
        res = inject(model, cfg, targets=TARGETS, rng=np.random.default_rng(seed))
        return model, int(res.trainable_params)

    def summary(ev):
        return {"accuracy": ev["accuracy"], "changed_accuracy": ev["changed_accuracy"],
                "per_task": {t: {"accuracy": v["accuracy"], "changed_accuracy": v["changed_accuracy"]}
                             for t, v in ev["per_task"].items()}}

    with blas_threads(1):
        before = evaluate_multitask(load_pretrained(progress=False), mt, max_windows=windows)
        hyper, h_params = fresh(hcfg)
        h_train = train(hyper, mt, steps, rng=seed + 1, **kw)
        shared, l_params = fresh(lcfg)
        l_train = train(shared, mt, steps, rng=seed + 1, **kw)
        wide, w_params = fresh(wcfg)  # as many parameters as one LoRA per task, shared by all
        w_train = train(wide, mt, steps, rng=seed + 1, **kw)
        per_task, per_times = {}, []
        for t, tokens in zip(mt.tasks, mt.train):
            m, _ = fresh(lcfg)
            per_times.append(train(m, tokens, max(1, steps // mt.n_tasks), rng=seed + 1,
                                   **{**kw, "warmup": min(20, max(1, steps // mt.n_tasks) - 1)}).seconds_per_step)
            per_task[t] = m
        methods = {
            "hyperlora": {"trainable_params": h_params, "seconds_per_step": h_train.seconds_per_step,
                          **summary(evaluate_multitask(hyper, mt, max_windows=windows))},
            "lora_shared": {"trainable_params": l_params, "seconds_per_step": l_train.seconds_per_step,
                            **summary(evaluate_multitask(shared, mt, max_windows=windows))},
            "lora_shared_r32": {"trainable_params": w_params, "seconds_per_step": w_train.seconds_per_step,
                                **summary(evaluate_multitask(wide, mt, max_windows=windows))},
            "lora_per_task": {"trainable_params": l_params * mt.n_tasks, "seconds_per_step": float(np.mean(per_times)),
                              **summary(evaluate_multitask(None, mt, max_windows=windows, models=per_task))},
        }

        # inference and training steps: one batch of windows, the four tasks mixed row by row
        x, y, tid = get_multitask_batch(mt, batch_size, hyper.config.block_size, np.random.default_rng(seed + 7),
                                        split="heldout")
        base = load_pretrained(progress=False)
        one = np.zeros_like(tid)
        lora_one = per_task[mt.tasks[0]]
        step_seconds = time_interleaved({"hyperlora": lambda: _train_step(hyper, x, y, tid),
                                         "lora": lambda: _train_step(shared, x, y, None)}, repeats)
        timing = time_interleaved({"base": lambda: base.forward(x),
                                   "lora_unmerged": lambda: lora_one.forward(x),
                                   "hyperlora_unmerged_one_task": lambda: hyper.forward(x, cond=one),
                                   "hyperlora_unmerged_mixed": lambda: hyper.forward(x, cond=tid)}, repeats)
        y_unmerged = hyper.forward(x, cond=one)
        t0 = time.perf_counter()
        for m in _hyper_layers(hyper):
            m.merge(condition=0)
        merge_seconds = time.perf_counter() - t0
        timing.update({k.replace("base", "base_again"): v for k, v in time_interleaved(
            {"hyperlora_merged_one_task": lambda: hyper.forward(x, cond=one),
             "base": lambda: base.forward(x)}, repeats).items()})
        merged_gap = float(np.abs(hyper.forward(x, cond=one) - y_unmerged).max())
        for m in _hyper_layers(hyper):
            m.unmerge()
        for _, m in hyper.named_modules():
            object.__setattr__(m, "_cache", None)

        interp = interpolate_tasks(hyper, mt, *PAIR, max_windows=windows)
        projection = embedding_projection(hyper.lowrank_shared.hyperlora.T.data.astype(np.float64))
        dynamics = _dynamics(hyper, mt.n_tasks)

    return {"steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size, "targets": list(TARGETS),
            "quick": bool(quick), "tasks": list(mt.tasks), "eval_windows_per_task": windows,
            "config": {"hyperlora": repr(hcfg), "lora": repr(lcfg), "lora_shared_r32": repr(wcfg)},
            "before": summary(before), "methods": methods,
            "inference_seconds": timing, "step_seconds_interleaved": step_seconds, "inference_batch": [int(s) for s in x.shape], "merge_seconds": merge_seconds,
            "merged_max_abs_diff": merged_gap, "dynamics": dynamics,
            "interpolation": {"pair": list(PAIR), "path": interp},
            "embeddings": {"T": hyper.lowrank_shared.hyperlora.T.data.astype(np.float64).tolist(), **projection},
            "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}


def tables(res: dict) -> dict:
    """The chapter's Markdown tables from :func:`run`'s result (or the committed JSON):
    ``{"accuracy", "speed", "interpolation"}``."""
    tasks = res["tasks"]
    head = "| method | trainable | " + " | ".join(tasks) + " | mean | mean, changed positions |"
    rows = [head, "|---|---:|" + "---:|" * (len(tasks) + 2)]
    b = res["before"]
    rows.append("| shipped model (no training) | — | " + " | ".join(f"{b['per_task'][t]['accuracy']:.3f}"
                                                                       for t in tasks)
                + f" | {b['accuracy']:.3f} | {b['changed_accuracy']:.3f} |")
    for name, m in res["methods"].items():
        rows.append(f"| `{name}` | {m['trainable_params']:,} | "
                    + " | ".join(f"{m['per_task'][t]['accuracy']:.3f}" for t in tasks)
                    + f" | {m['accuracy']:.3f} | {m['changed_accuracy']:.3f} |")
    out = {"accuracy": "\n".join(rows)}
    t = res["inference_seconds"]
    rows = ["| forward pass, batch " + "×".join(map(str, res["inference_batch"])) + " | ms | × base |",
             "|---|---:|---:|"]
    labels = {"base": "base model", "lora_unmerged": "LoRA, unmerged",
              "hyperlora_merged_one_task": "HyperLoRA merged for one task",
              "hyperlora_unmerged_one_task": "HyperLoRA unmerged, one task",
              "hyperlora_unmerged_mixed": "HyperLoRA unmerged, four tasks mixed by row"}
    for k, label in labels.items():
        ref = t["base_again"] if k == "hyperlora_merged_one_task" else t["base"]  # timed in the same rounds
        rows.append(f"| {label} | {1000 * t[k]:.2f} | {t[k] / ref:.2f} |")
    st = res["step_seconds_interleaved"]
    rows += ["", "| forward + backward, same batch | ms | × LoRA |", "|---|---:|---:|",
             f"| LoRA (shared) | {1000 * st['lora']:.2f} | 1.00 |",
             f"| HyperLoRA, four tasks mixed by row | {1000 * st['hyperlora']:.2f} | {st['hyperlora'] / st['lora']:.2f} |"]
    out["speed"] = "\n".join(rows)
    a, bb = res["interpolation"]["pair"]
    rows = [f"| λ (embedding (1−λ)·T_{a} + λ·T_{bb}) | {a} | {bb} | {a}, changed | {bb}, changed |",
             "|---:|---:|---:|---:|---:|"]
    for p in res["interpolation"]["path"]:
        rows.append(f"| {p['lam']:.2f} | {p[a]:.3f} | {p[bb]:.3f} | {p[a + '_changed']:.3f} | {p[bb + '_changed']:.3f} |")
    out["interpolation"] = "\n".join(rows)
    return out


def format_tables(res: dict) -> str:
    """The chapter's tables (:func:`tables`), one after the other."""
    return "\n\n".join(tables(res).values())


def embedding_figure_data(res: dict) -> dict:
    """What the embedding figure is drawn from: the tasks, the learned ``T``, its projection, the pair."""
    emb = res["embeddings"]
    return {"tasks": res["tasks"], "pair": res["interpolation"]["pair"],
            **{k: emb[k] for k in ("T", "coords", "explained", "axes")}}


def embedding_figure(d: dict):
    """The learned task embeddings in the plane of their two principal directions, with the
    interpolation path between the pair (a matplotlib figure)."""
    import matplotlib.pyplot as plt

    T, axes = np.asarray(d["T"]), np.asarray(d["axes"])
    mean = T.mean(axis=0)
    xy = np.asarray(d["coords"])
    tasks = d["tasks"]
    a, b = (tasks.index(n) for n in d["pair"])
    fig, ax = plt.subplots(figsize=(5, 4))
    lams = np.linspace(0, 1, 11)
    line = np.array([((1 - s) * T[a] + s * T[b] - mean) @ axes.T for s in lams])
    ax.plot(line[:, 0], line[:, 1], ls="--", color="0.5", lw=1, label="interpolation path")
    ax.scatter(xy[:, 0], xy[:, 1], s=60, zorder=3)
    for (u, v), name in zip(xy, tasks):
        ax.annotate(name, (u, v), textcoords="offset points", xytext=(6, 4))
    ex = d["explained"]
    ax.set_xlabel(f"first principal direction ({100 * ex[0]:.0f}% of variance)")
    ax.set_ylabel(f"second ({100 * ex[1]:.0f}%)")
    ax.set_title("HyperLoRA's learned task embeddings")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_embeddings(res: dict, path) -> None:
    """:func:`embedding_figure` of a run's result, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = embedding_figure(embedding_figure_data(res))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from lowrank_ref.experiments.runner import experiment_main

    return experiment_main(lambda a: run(a.quick), argv, prog="python -m lowrank_ref.experiments.hyperlora_experiments",
                           description="Chapter 08: HyperLoRA against one LoRA per task and one shared LoRA",
                           default_out="chapters/data/08-hyperlora.json")


if __name__ == "__main__":
    raise SystemExit(main())
