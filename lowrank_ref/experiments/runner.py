r"""One runner for the chapters' experiments: fine-tune, evaluate, quick mode, JSON, a command line.

Every measured experiment in the chapters is the same recipe as ``lowrank-ref compare``: copy the
shipped model, inject a method, train on the built-in dialect with :func:`lowrank_ref.train.train`
(AdamW, cosine schedule with warmup, clip 1.0, one BLAS thread), evaluate what it learned (the
held-out dialect) and what it kept (held-out base-language text). :func:`finetune` is that recipe
once; the chapters' modules (``lora_experiments``, ``dora_experiments``, and later methods') call
it with their own grids, and record values during training through a training hook
(``record(model, step)`` every ``record_every`` steps), never through a loop of their own.

``LOWRANK_REF_QUICK=1`` (:func:`quick_mode`, from :mod:`lowrank_ref.experiments.modes`) shrinks every experiment
to a smoke test; :func:`experiment_main` is the shared ``--quick`` / ``--out FILE`` command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["quick_mode", "finetune", "write_json", "experiment_main", "Recorder"]


class Recorder:
    """A training hook that calls ``record(model, step)`` before training (step 0) and after every
    ``every``-th optimizer step (steps ``every``, ``2 every``, ...), keeping what it returns."""

    def __init__(self, model, record, every: int):
        if not callable(record):
            raise TypeError(f"record must be callable as record(model, step), got {type(record).__name__}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every <= 0:
            raise ValueError(f"record_every must be a positive integer, got {every!r}")
        self.model, self.record, self.every = model, record, int(every)
        self.records = [record(model, 0)]

    def after_step(self, step: int) -> None:
        if (step + 1) % self.every == 0:
            self.records.append(self.record(self.model, step + 1))


def finetune(base=None, config=None, *, method: str | None = None, targets=("q", "v"), steps: int = 300,
             lr: float = 1e-2, batch_size: int = 16, warmup: int = 20, seed: int = 0, ranks=None, alphas=None,
             eval_windows: int = 256, prepare=None, record=None, record_every: int = 0, threads: int | None = 1,
             keep_model: bool = False, task=None, optimizer: str = "adamw", schedule: str = "cosine",
             **inject_kwargs) -> dict:
    """Fine-tune a copy of ``base`` (default: the shipped model) with ``config`` on the dialect.

    Args:
        base: a NumPy GPT to copy (it is not changed), or ``None`` for the shipped pre-trained one.
        config, method, targets, ranks, alphas, inject_kwargs: what :func:`lowrank_ref.inject.inject`
            takes (``method="full"`` / ``"bitfit"`` with ``config=None`` for the whole-model modes).
        steps, lr, batch_size, warmup: the schedule (warmup is capped at ``steps - 1``).
        seed: the adapters' init uses ``seed``, the batch order ``seed + 1`` (as ``compare``).
        eval_windows: windows per evaluation.
        prepare: ``prepare(model, inject_result, rng)`` after injecting, before training (chapter
            02 swaps LoRA layers for its double LoRA there).
        record, record_every: a :class:`Recorder` hook during training; its list is ``"records"``.
        threads: BLAS threads (``None`` leaves them alone). keep_model: return it as ``"model"``.
        task: the :func:`lowrank_ref.data.builtin_task` to use (default: task 0).
        optimizer, schedule: what :func:`lowrank_ref.train.train` takes (``"sgd"`` has momentum 0.9).
    Returns:
        ``method``, ``targets`` (the adapted layers), ``trainable_params``, ``steps``, ``lr``,
        ``seed``, ``train_losses``, ``final_train_loss`` (mean of the last 10), ``target_after`` /
        ``target_loss_after`` (held-out dialect accuracy / loss), ``retained_after`` /
        ``retained_loss_after`` (held-out base text), ``seconds``; ``records`` and ``model`` if asked.
    """
    from lowrank_ref import data
    from lowrank_ref.inject import inject
    from lowrank_ref.models import blas_threads, load_pretrained
    from lowrank_ref.train import evaluate, train

    task = data.builtin_task(0) if task is None else task
    model = load_pretrained(progress=False) if base is None else copy.deepcopy(base)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with blas_threads(threads):
        res = inject(model, config, targets=targets, ranks=ranks, alphas=alphas, method=method, rng=rng,
                     **inject_kwargs)
        if prepare is not None:
            prepare(model, res, rng)
        hooks = [] if record is None else [Recorder(model, record, record_every)]
        tr = train(model, task.dialect_train, steps, lr=lr, batch_size=batch_size, warmup=min(warmup, steps - 1),
                   optimizer=optimizer, schedule=schedule, rng=np.random.default_rng(seed + 1), progress=False, hooks=hooks)
        after = evaluate(model, task.dialect_heldout, max_windows=eval_windows)
        kept = evaluate(model, task.base_heldout, max_windows=eval_windows)
    out = {
        "method": res.method, "targets": list(res.replaced), "trainable_params": int(model.num_trainable_parameters()),
        "steps": int(steps), "lr": float(lr), "seed": int(seed),
        "train_losses": [float(v) for v in tr.losses], "final_train_loss": float(np.mean(tr.losses[-10:])),
        "target_after": after["accuracy"], "target_loss_after": after["loss"],
        "retained_after": kept["accuracy"], "retained_loss_after": kept["loss"],
        "seconds": time.perf_counter() - t0,
    }
    if hooks:
        out["records"] = hooks[0].records
    if keep_model:
        out["model"] = model
    return out


def write_json(result, path) -> str:
    """Write ``result`` as indented JSON (NumPy scalars as floats), creating the folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=float)
        f.write("\n")
    return path


def experiment_main(run, argv=None, *, prog: str, description: str, default_out: str, add_arguments=None,
                    finish=None) -> int:
    """The shared command line: ``[--quick] [--out FILE]`` plus what ``add_arguments(parser)``
    adds; calls ``run(args)`` (``args.quick`` is True, or None to defer to :func:`quick_mode`),
    then ``finish(result)`` if given (to drop bulky fields), and writes the JSON."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help="a smoke test (what the notebook runs under test)")
    p.add_argument("--out", default=default_out, help=f"where the JSON goes (default {default_out})")
    if add_arguments is not None:
        add_arguments(p)
    a = p.parse_args(argv)
    a.quick = True if a.quick else None
    res = run(a)
    if finish is not None:
        res = finish(res)
    print(f"wrote {write_json(res, a.out)}", file=sys.stderr)
    return 0
