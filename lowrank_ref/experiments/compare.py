r"""The main job: fine-tune the shipped model on the dialect with each method, and measure.

For every method in ``methods`` (names from :data:`VARIANTS`):

1. load the shipped pre-trained GPT (a fresh copy, in ``backend``);
2. inject the method (adapters on the variant's targets, or a whole-model mode for ``full`` and
   ``bitfit``); evaluate the dialect before any training (``target_before``);
3. train on the dialect (same batches, same seed, same schedule for every method);
4. evaluate the dialect again (``target_after``) and held-out base-language text
   (``retained_after``: what survived of the pre-training);
5. save what the method trained (adapter file; for ``full`` every weight, for ``bitfit`` the
   biases) and measure the file on disk (``adapter_bytes``).

One row per method, with exactly the keys in :data:`COLUMNS` (rows on the multi-task data add
:data:`MULTITASK_COLUMNS`, see below):

- ``trainable_params``: scalars the optimizer updates.
- ``adapter_bytes``: size of the saved file on disk, header included.
- ``peak_memory_bytes``: peak memory of a training step (the first), weights included; NumPy:
  :mod:`tracemalloc`; torch CPU: counted (weights, saved activations, gradients, optimizer
  state); CUDA: ``torch.cuda.max_memory_allocated`` (see :mod:`lowrank_ref.train` and
  :mod:`lowrank_gpu.train`).
- ``seconds_per_step``: mean wall time of a training step.
- ``target_before``, ``target_after``, ``retained_after``: next-token accuracies in [0, 1].

Rows whose ``CompareRow.task`` is ``"multitask"`` or ``"multitask_per_task"`` train on the four
dialects of :mod:`lowrank_ref.data.multitask` (same steps, same batch size; every row of a batch
from a random task; a conditional method gets the task ids as ``cond``) and report in
``target_before``/``target_after`` the next-token accuracy averaged over the tasks' held-out text;
they add ``task`` (the row's task) and ``per_task`` (``{task: {"before", "after",
"changed_before", "changed_after"}}``, the last two on the positions a dialect's rules changed).
A conditional model's ``retained_after`` is the base text read under each task id in turn
(``eval_windows // n_tasks`` windows each), averaged. ``"multitask_per_task"`` trains one adapter per task (``steps // n_tasks`` steps each, so the
total number of training windows is the same) and sums their trainable parameters and bytes.

The rows are the registry's: each method's ``SPEC.compare`` names its rows (config, targets,
lr) as data, and :data:`VARIANTS` is built from them. A new method's ``SPEC`` adds its rows.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowrank_ref.registry import check_backend, compare_rows

__all__ = ["Variant", "VARIANTS", "COLUMNS", "MULTITASK_COLUMNS", "DEFAULTS", "run_compare", "format_table", "plot_compare",
           "save_trained", "check_methods", "final_ranks", "EXTRA_COLUMNS"]

COLUMNS = ("method", "trainable_params", "adapter_bytes", "peak_memory_bytes", "seconds_per_step",
           "target_before", "target_after", "retained_after")
MULTITASK_COLUMNS = ("task", "per_task")  # added after COLUMNS by rows on the multi-task data
# keys a row carries after COLUMNS when its method has them: the final rank per layer of the
# methods whose rank changes in training (``SPEC.final_rank``)
EXTRA_COLUMNS = ("final_ranks",)


@dataclass(frozen=True)
class Variant:
    """One row of the comparison.

    Attributes:
        method: the registry name given to :func:`lowrank_ref.inject.inject` (``"lora"``, ...).
        config: the method's config (``LoRAConfig(r=8, alpha=16)``), or ``None`` for the
            whole-model baselines.
        targets: which linear layers get adapters (names, aliases or ``"all"``).
        lr: the peak learning rate for this method (full fine-tuning wants a smaller one than
            adapters, which start at zero).
        kwargs: extra keywords for ``inject`` (e.g. ``{"blocksize": 64}``).
        task: ``"dialect"``, ``"multitask"`` or ``"multitask_per_task"``
            (:class:`lowrank_ref.registry.CompareRow`).
    """

    method: str
    config: object = None
    targets: tuple | str = ("q", "v")
    lr: float = 3e-3
    kwargs: dict = field(default_factory=dict)
    task: str = "dialect"


def _variants() -> dict[str, Variant]:
    """name -> Variant, from every method's ``SPEC.compare`` rows, in their ``order``."""
    return {name: Variant(spec.name, row.config, targets=row.targets, lr=row.lr, kwargs=dict(row.kwargs),
                          task=row.task)
            for name, (spec, row) in compare_rows().items()}


VARIANTS: dict[str, Variant] = _variants()

# the default run (`lowrank-ref compare` with no flags): at most 3 minutes on 2 cores, NumPy.
DEFAULTS = {"steps": 300, "batch_size": 16, "warmup": 20, "eval_windows": 256, "seed": 0}


def check_methods(methods) -> list[str]:
    """The list of variant names, or a ValueError naming the known ones."""
    if methods is None:
        return list(VARIANTS)
    if isinstance(methods, str):
        methods = [m for m in methods.replace(",", " ").split() if m]
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods must name at least one method; known methods: {', '.join(VARIANTS)}")
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; known methods: {', '.join(VARIANTS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must not repeat, got {methods}")
    return methods


def _has_adapters(model) -> bool:
    from lowrank_ref.nn.module import Module

    if isinstance(model, Module):
        from lowrank_ref.inject import adapter_layers

        return bool(adapter_layers(model))
    from lowrank_gpu.adapters.base import AdapterLinear

    return any(isinstance(m, AdapterLinear) for m in model.modules())


def _trainable_outside_adapters(model) -> dict:
    """``{name: array}`` of the trainable tensors that are not the adapters' own or their shared
    state's: what ``inject(train_also=...)`` kept trainable (LoRA+'s embeddings and norms)."""
    from lowrank_ref.inject import SHARED_ATTR, adapter_layers

    inside = [n for n in adapter_layers(model) if n] + [SHARED_ATTR]
    if hasattr(model, "trainable_parameters"):  # NumPy
        named = [(n, p.data) for n, p in model.trainable_parameters().items()]
    else:  # torch
        named = [(n, p.detach().float().cpu().numpy()) for n, p in model.named_parameters() if p.requires_grad]
    return {n: np.ascontiguousarray(v) for n, v in named if not any(n.startswith(q + ".") for q in inside)}


def save_trained(model, path) -> int:
    """Save what fine-tuning changed and return the size on disk in bytes.

    A model with adapters: the adapter file (:func:`lowrank_ref.io.save_adapter`), plus, when
    other tensors trained next to the adapters (``inject(train_also=...)``), those tensors in a
    second file beside it (``<name>.extra.safetensors``; the size counts both). A whole-model
    mode: every trainable tensor by name, as safetensors (all weights for ``full``, the biases
    for ``bitfit``)."""
    path = os.fspath(path)
    if _has_adapters(model):
        from safetensors.numpy import save_file

        from lowrank_ref.io import save_adapter

        save_adapter(model, path)
        extra = _trainable_outside_adapters(model)
        if extra:
            extra_path = os.path.splitext(path)[0] + ".extra.safetensors"
            save_file(extra, extra_path, metadata={"format": "pt"})
            return os.path.getsize(path) + os.path.getsize(extra_path)
    else:
        from safetensors.numpy import save_file

        if hasattr(model, "trainable_parameters"):  # NumPy
            tensors = {n: np.ascontiguousarray(p.data) for n, p in model.trainable_parameters().items()}
        else:  # torch
            tensors = {n: p.detach().float().cpu().numpy() if p.dtype.is_floating_point and p.element_size() < 4
                       else p.detach().cpu().numpy() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, path, metadata={"format": "pt"})
    return os.path.getsize(path)


def _one_row(name: str, variant: Variant, task, backend: str, dtype, steps: int, batch_size: int,
             warmup: int, eval_windows: int, seed: int, progress: bool, folder: Path, lr_scale: float):
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import evaluate, train

    model = load_pretrained(backend=backend, dtype=dtype, progress=progress)
    res = inject(model, variant.config, targets=variant.targets, method=variant.method,
                 rng=np.random.default_rng(seed), **variant.kwargs)
    before = evaluate(model, task.dialect_heldout, max_windows=eval_windows)
    result = train(model, task.dialect_train, steps, lr=variant.lr * lr_scale, batch_size=batch_size,
                   warmup=min(warmup, steps - 1), rng=np.random.default_rng(seed + 1),
                   progress=progress, measure_memory=True, desc=f"{name:>8s}")
    after = evaluate(model, task.dialect_heldout, max_windows=eval_windows)
    kept = evaluate(model, task.base_heldout, max_windows=eval_windows)
    size = save_trained(model, folder / f"{name}.safetensors")
    row = {
        "method": name,
        "trainable_params": int(res.trainable_params),
        "adapter_bytes": int(size),
        "peak_memory_bytes": int(result.peak_memory_bytes),
        "seconds_per_step": float(result.seconds_per_step),
        "target_before": float(before["accuracy"]),
        "target_after": float(after["accuracy"]),
        "retained_after": float(kept["accuracy"]),
    }
    history = {"method": name, "losses": result.losses, "lrs": result.lrs,
               "optimizer_state_bytes": result.optimizer_state_bytes,
               "target_loss_before": before["loss"], "target_loss_after": after["loss"],
               "retained_loss_after": kept["loss"]}
    # methods whose rank changes in training (SPEC.final_rank) report it per layer: in the row,
    # after COLUMNS, as ``final_ranks``, and in the history as ``ranks``
    ranks = final_ranks(model)
    if ranks:
        row["final_ranks"] = ranks
        history["ranks"] = ranks
    return row, history


def _multitask_row(name: str, variant: Variant, task, backend: str, dtype, steps: int, batch_size: int,
                   warmup: int, eval_windows: int, seed: int, progress: bool, folder: Path, lr_scale: float):
    """A row on the multi-task data (module docstring): one model for all tasks, or one per task."""
    from lowrank_ref.data import evaluate_multitask, multitask_data
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import evaluate, train

    mt = multitask_data(0)
    windows = max(1, eval_windows // mt.n_tasks)  # the same number of windows as a dialect row reads
    per_task = variant.task == "multitask_per_task"
    groups = list(zip(mt.tasks, mt.train)) if per_task else [(None, mt)]
    n_steps = max(1, steps // len(groups))
    models, params, size, losses, peak, times = {}, 0, 0, [], 0, []
    for t, data in groups:
        model = load_pretrained(backend=backend, dtype=dtype, progress=progress)
        res = inject(model, variant.config, targets=variant.targets, method=variant.method,
                     rng=np.random.default_rng(seed), **variant.kwargs)
        if t is None:
            before = evaluate_multitask(model, mt, max_windows=windows)
        result = train(model, data, n_steps, lr=variant.lr * lr_scale, batch_size=batch_size,
                       warmup=min(warmup, n_steps - 1), rng=np.random.default_rng(seed + 1),
                       progress=progress, measure_memory=True, desc=f"{name:>8s}" + (f" {t}" if t else ""))
        params += int(res.trainable_params)
        size += save_trained(model, folder / (f"{name}-{t}.safetensors" if t else f"{name}.safetensors"))
        losses += result.losses
        peak = max(peak, int(result.peak_memory_bytes))
        times.append(result.seconds_per_step)
        models[t] = model
    if per_task:
        shipped = load_pretrained(backend=backend, dtype=dtype, progress=progress)  # every task starts here
        before = evaluate_multitask(shipped, mt, max_windows=windows)
        after = evaluate_multitask(None, mt, max_windows=windows, models=models)
        kept = float(np.mean([evaluate(m, task.base_heldout, max_windows=eval_windows)["accuracy"]
                              for m in models.values()]))
    else:
        after = evaluate_multitask(models[None], mt, max_windows=windows)
        m = models[None]
        mods = (mm for _, mm in m.named_modules()) if hasattr(m, "trainable_parameters") else m.modules()
        if any(getattr(mm, "takes_condition", False) for mm in mods):  # base text under each task's condition
            kept = float(np.mean([evaluate(m, task.base_heldout, max_windows=windows, cond=t)["accuracy"]
                                  for t in range(mt.n_tasks)]))
        else:
            kept = evaluate(m, task.base_heldout, max_windows=eval_windows)["accuracy"]
    row = {
        "method": name,
        "trainable_params": params,
        "adapter_bytes": int(size),
        "peak_memory_bytes": peak,
        "seconds_per_step": float(np.mean(times)),
        "target_before": float(before["accuracy"]),
        "target_after": float(after["accuracy"]),
        "retained_after": float(kept),
        "task": variant.task,
        "per_task": {t: {"before": before["per_task"][t]["accuracy"], "after": after["per_task"][t]["accuracy"],
                         "changed_before": before["per_task"][t]["changed_accuracy"],
                         "changed_after": after["per_task"][t]["changed_accuracy"]} for t in mt.tasks},
    }
    history = {"method": name, "losses": losses, "lrs": [], "optimizer_state_bytes": None,
               "target_loss_before": before["loss"], "target_loss_after": after["loss"],
               "retained_loss_after": None}
    return row, history


def final_ranks(model) -> dict:
    """``{layer name: rank}`` of the layers whose method names a ``SPEC.final_rank`` (the rank a
    layer ends training with: AdaLoRA's kept triplets, SoRA's non-zero gates, SeLoRA's grown
    rank, DyLoRA's rank in use); ``{}`` for a model without such layers. Either backend."""
    from lowrank_ref import registry
    from lowrank_ref.nn.module import Module

    if isinstance(model, Module):
        from lowrank_ref.inject import adapter_layers
    else:
        from lowrank_gpu.inject import adapter_layers
    out = {}
    for name, layer in adapter_layers(model).items():
        try:
            spec = registry.spec_of_layer(layer)
        except ValueError:
            continue
        if spec.final_rank is not None:
            out[name] = int(spec.final_rank(layer))
    return out


def run_compare(methods=None, backend: str = "numpy", steps: int | None = None, out=None,
                progress: bool = True, batch_size: int | None = None, lr_scale: float = 1.0,
                dtype=None, seed: int | None = None, eval_windows: int | None = None,
                threads: int | None = 1, verbose: bool = False) -> list[dict]:
    """Run the comparison; return one row (a dict with the keys :data:`COLUMNS`) per method.

    Args:
        methods: names from :data:`VARIANTS` (a list, or a comma/space separated string);
            ``None`` runs them all.
        backend: ``"numpy"`` (default), ``"torch"`` or ``"cuda"``.
        steps, batch_size: training length and windows per step (defaults in :data:`DEFAULTS`).
        out: a directory for ``compare.json``, ``compare.png``, ``compare_history.json`` and the
            saved adapters (``adapters/``); ``None`` writes nothing that lasts.
        progress: progress bars (stderr). verbose: also print the table (stdout).
        lr_scale: multiplies every variant's learning rate.
        dtype: model dtype (default float32). seed: adapters' init and the batch order.
        eval_windows: how many 32-token windows each evaluation reads (default 256).
        threads: CPU threads for NumPy's BLAS, and for torch with ``backend="torch"``
            (see :func:`lowrank_ref.models.blas_threads`); ``None`` leaves them alone.
    """
    from lowrank_ref import data
    from lowrank_ref.models import blas_threads

    names = check_methods(methods)
    backend = check_backend(backend)
    if backend == "cupy":
        raise ValueError("compare supports backends numpy, torch and cuda, got 'cupy'")
    steps = DEFAULTS["steps"] if steps is None else steps
    batch_size = DEFAULTS["batch_size"] if batch_size is None else batch_size
    seed = DEFAULTS["seed"] if seed is None else seed
    eval_windows = DEFAULTS["eval_windows"] if eval_windows is None else eval_windows
    for arg, v in (("steps", steps), ("batch_size", batch_size), ("eval_windows", eval_windows)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not (math.isfinite(lr_scale) and lr_scale > 0):
        raise ValueError(f"lr_scale must be a positive number, got {lr_scale!r}")

    task = data.builtin_task(0)
    out_dir = None if out is None else Path(out)
    base_before = None
    rows, histories = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowrank-compare-") as tmp:
        folder = Path(tmp) if out_dir is None else out_dir / "adapters"
        folder.mkdir(parents=True, exist_ok=True)
        with blas_threads(threads if backend != "cuda" else None, torch_too=backend == "torch"):
            if out_dir is not None:  # the reference line in the plot: the shipped model on base text
                from lowrank_ref.models import load_pretrained
                from lowrank_ref.train import evaluate

                shipped = load_pretrained(backend=backend, dtype=dtype, progress=progress)
                base_before = evaluate(shipped, task.base_heldout, max_windows=int(eval_windows))["accuracy"]
            for name in names:
                one = _one_row if VARIANTS[name].task == "dialect" else _multitask_row
                row, hist = one(name, VARIANTS[name], task, backend, dtype, int(steps), int(batch_size),
                                     DEFAULTS["warmup"], int(eval_windows), int(seed), progress, folder,
                                     float(lr_scale))
                rows.append(row)
                histories.append(hist)
                if progress:
                    from tqdm.auto import tqdm

                    tqdm.write(f"{name:>8s}: dialect {row['target_before']:.3f} -> {row['target_after']:.3f}, "
                               f"base text after {row['retained_after']:.3f}, "
                               f"{row['trainable_params']:,} trainable", file=sys.stderr)
    wall = time.perf_counter() - t0
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "compare.json", "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
        run = {"backend": backend, "steps": int(steps), "batch_size": int(batch_size), "seed": int(seed),
               "wall_seconds": round(wall, 2), "retained_before": base_before,
               "variants": {n: {"method": VARIANTS[n].method, "config": repr(VARIANTS[n].config),
                                "targets": VARIANTS[n].targets, "lr": VARIANTS[n].lr * lr_scale}
                            for n in names},
               "histories": histories}
        with open(out_dir / "compare_history.json", "w", encoding="utf-8") as f:
            json.dump(run, f, indent=1)
            f.write("\n")
        plot_compare(rows, histories, out_dir / "compare.png", retained_before=base_before)
    if verbose:
        print(format_table(rows))
    return rows


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (what ``lowrank-ref compare`` prints)."""
    head = ["method", "trainable", "adapter file", "peak memory", "ms/step",
            "target before", "target after", "retained after"]
    body = [[r["method"], f"{r['trainable_params']:,}", _human_bytes(r["adapter_bytes"]),
             _human_bytes(r["peak_memory_bytes"]), f"{1000 * r['seconds_per_step']:.1f}",
             f"{r['target_before']:.3f}", f"{r['target_after']:.3f}", f"{r['retained_after']:.3f}"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    return "\n".join(lines)


def plot_compare(rows: list[dict], histories: list[dict], path, retained_before: float | None = None) -> None:
    """Two panels: the three accuracies per method (a dashed line at ``retained_before``, the
    shipped model's accuracy on base text), and each method's training-loss curve."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.27
    for k, (key, label) in enumerate((("target_before", "dialect, before"), ("target_after", "dialect, after"),
                                      ("retained_after", "base language, after"))):
        ax1.bar(x + (k - 1) * w, [r[key] for r in rows], w, label=label)
    if retained_before is not None:
        ax1.axhline(retained_before, color="0.3", ls="--", lw=1, label="base language, before")
    ax1.set_xticks(x, names)
    ax1.set_ylabel("next-token accuracy")
    top = max([r[k] for r in rows for k in ("target_before", "target_after", "retained_after")]
              + [retained_before or 0.0])
    ax1.set_ylim(0, min(1.0, 1.3 * top + 0.02))  # accuracies in [0, 1]; zoomed to what is there
    ax1.legend(fontsize=8)
    ax1.set_title("what each method learned and kept")
    for r, h in zip(rows, histories):
        losses = np.asarray(h["losses"])
        k = max(1, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax2.plot(np.arange(len(smooth)) + k - 1, smooth,
                 label=f"{r['method']} ({r['trainable_params']:,} trainable)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (dialect)")
    ax2.legend(fontsize=8)
    ax2.set_title("fine-tuning on the dialect")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
