r"""Chapter 07's AdaLoRA measurements, on the built-in task (the dialect of ``data.builtin_task``):

* the budget curve and every layer's rank at every step (the heat map);
* how often a pruned triplet comes back (only ``E`` is masked, so ``P``, ``Q`` keep training and a
  triplet's score can rise above the threshold again);
* the cost of a step against LoRA at the initial rank on the same layers, and the allocator's
  own share of it (it computes no SVD: element-wise products, EMAs and one partition).

``run()`` writes ``chapters/data/07-adalora.json``; quick mode (``LOWRANK_REF_QUICK=1``) shrinks the
run to a smoke test whose numbers mean nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

__all__ = ["run", "steps_for", "revivals", "DATA_FILE"]

DATA_FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "07-adalora.json"


class _Recorder:
    """An extra training hook: every layer's kept triplets after each step (after the allocator)."""

    def __init__(self, layers):
        self.layers = layers
        self.keep: list[dict] = []

    def after_step(self, step: int) -> None:
        self.keep.append({n: lay.keep.astype(int).tolist() for n, lay in self.layers.items()})


def revivals(keep_history: list[dict]) -> dict:
    """``{layer: times a triplet went from pruned to kept}`` over a list of per-step patterns."""
    out = {}
    for name in keep_history[0] if keep_history else []:
        k = np.array([h[name] for h in keep_history], dtype=int)  # (steps, r)
        out[name] = int(((k[1:] == 1) & (k[:-1] == 0)).sum())
    return out


def steps_for(mode: str | None = None) -> int:
    """Training steps of :func:`run` for a run size (default: the current mode): 20 in quick mode,
    100 in classroom mode (the allocation still settles: budget schedule over steps 10–80), 300 in full."""
    from lowrank_ref.experiments.modes import sized

    return sized(quick=20, classroom=100, full=300, current=mode)


def run(steps: int | None = None, targets="all", seed: int = 0, out: Path | None = DATA_FILE,
        progress: bool = False) -> dict:
    from lowrank_ref import data
    from lowrank_ref.adapters.adalora import AdaLoRAConfig, budget_schedule
    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.experiments.modes import quick_mode
    from lowrank_ref.inject import adapter_layers, inject
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import evaluate, train

    quick = quick_mode()
    steps = steps_for() if steps is None else int(steps)
    task = data.builtin_task(0)
    tinit, tfinal = steps // 10, steps // 5
    cfg = AdaLoRAConfig(init_r=12, target_r=4, alpha=16, tinit=tinit, tfinal=tfinal, deltaT=1, total_step=steps)
    lr_ = 1e-2
    model = load_pretrained(progress=False)
    inject(model, cfg, targets=targets, rng=np.random.default_rng(seed))
    layers = adapter_layers(model)
    rec = _Recorder(layers)
    res = train(model, task.dialect_train, steps, lr=lr_, batch_size=16, rng=np.random.default_rng(seed + 1),
                progress=progress, warmup=min(20, steps - 1), hooks=[rec])
    acc = evaluate(model, task.dialect_heldout, max_windows=64 if quick else 256)["accuracy"]
    lora = load_pretrained(progress=False)
    inject(lora, LoRAConfig(r=12, alpha=16), targets=targets, rng=np.random.default_rng(seed))
    res_lora = train(lora, task.dialect_train, steps, lr=lr_, batch_size=16, rng=np.random.default_rng(seed + 1),
                     progress=progress, warmup=min(20, steps - 1))
    acc_lora = evaluate(lora, task.dialect_heldout, max_windows=64 if quick else 256)["accuracy"]
    alloc_s = _allocator_seconds(layers, cfg, reps=3 if quick else 30)
    init_bgt, target_bgt = 12 * len(layers), cfg.target_r * len(layers)
    hist = [(t, *budget_schedule(t, init_bgt, target_bgt, cfg)) for t in range(steps)]
    result = {
        "quick": quick, "steps": steps, "targets": targets, "seed": seed, "lr": lr_,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "budget": [[s, b, int(m)] for s, b, m in hist],
        "ranks": {n: [int(sum(h[n])) for h in rec.keep] for n in layers},
        "final_ranks": {n: int(lay.config.rank) for n, lay in layers.items()},
        "revivals": revivals(rec.keep),
        "revivals_in_final_phase": revivals(rec.keep[steps - tfinal:]),
        "seconds_per_step": {"adalora": res.seconds_per_step, "lora_r12": res_lora.seconds_per_step,
                             "allocator": alloc_s},
        "accuracy": {"adalora": acc, "lora_r12": acc_lora},
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def _allocator_seconds(layers, cfg, reps: int) -> float:
    """Seconds of one allocator step (scores, threshold, masks) over ``layers``, measured on its
    own: a fresh allocator over copies of the layers' tensors with random gradients, at a step in
    the budget's decrease (the allocator's cost does not depend on the values)."""
    import copy

    from lowrank_ref.adapters.adalora import RankAllocator

    twins = {n: copy.deepcopy(lay) for n, lay in layers.items()}
    rng = np.random.default_rng(0)
    for lay in twins.values():
        for p in (lay.P, lay.E, lay.Q):
            p.grad = rng.standard_normal(p.data.shape).astype(p.data.dtype)
    alloc = RankAllocator(twins, cfg)
    step = cfg.tinit + 1
    alloc.update_and_mask(step)  # warm: the EMA arrays exist
    t0 = time.perf_counter()
    for _ in range(reps):
        alloc.update_and_mask(step)
    return (time.perf_counter() - t0) / reps


if __name__ == "__main__":
    r = run(progress=True)
    print(json.dumps({k: r[k] for k in ("final_ranks", "revivals", "seconds_per_step", "accuracy")}, indent=1))
