r"""Chapter 08's composition experiment: LoRAs trained apart on the four dialects of the
multi-task data, composed for a few-shot target that combines two of them (LoraHub, Huang et al.
2023), both ways :mod:`lowrank_ref.compose` offers.

    python -m lowrank_ref.experiments.lorahub [--quick] [--out chapters/data/lorahub.json]

1. **The pool.** One LoRA per task of :func:`lowrank_ref.data.multitask_data` (``hound``,
   ``verb_final``, ``agreement``, ``relabel``), each trained on its own task only, r = 8, α = 16
   on ``q, v``, as ``compare``'s LoRA row.
2. **The targets.** Two dialects that none of the pool was trained on, each the union of two
   tasks' rules: ``relabel+agreement`` (nouns and adjectives swapped *and* agreement reversed) and
   ``relabel+verb_final`` (swapped words *and* the verb at the end). A target gives ``k`` few-shot
   sentences (the search's objective: their next-token loss) and held-out text (the measurement:
   accuracy on the changed positions, as :func:`lowrank_ref.data.evaluate_multitask` reports).
3. **What is compared** on each target: the base model; each pool LoRA alone; the uniform
   average (w = 1/N) in both modes; the weights found by :func:`lowrank_ref.compose.search_weights`
   (budget evaluations of the few-shot loss, LoraHub's bounds, start and L1 penalty) in both
   modes; the two "right" pairs by hand (w = 1 on the two tasks the target combines); and, as the
   gradient-based reference LoraHub compares with, a LoRA trained on the same ``k`` sentences.
   For each composition, the relative size of the cross terms at its weights,
   ``‖ΔW_lorahub − ΔW_sum‖_F / ‖ΔW_sum‖_F`` summed over layers.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from lowrank_ref.experiments.runner import experiment_main, quick_mode

__all__ = ["run", "TARGETS", "target_data", "main"]

#: each target: (name, the two pool tasks whose rules it combines)
TARGETS = (("relabel+agreement", ("relabel", "agreement")), ("relabel+verb_final", ("relabel", "verb_final")))


def _render(s, target: str):
    """A target sentence as ``(word, changed)`` pairs: the two tasks' rules applied together."""
    from lowrank_ref.data import multitask as mtmod

    rel = mtmod._np_relabel
    if target == "relabel+agreement":
        words = rel(s.subject) + [(mtmod._reversed_verb(s), True)] + (rel(s.obj) if s.obj else [])
    elif target == "relabel+verb_final":
        if s.obj is None:
            words = rel(s.subject) + [(s.verb_form, False)]
        else:  # subject, object, verb: the (relabelled) object and the verb move
            words = rel(s.subject) + [(w, True) for w, _ in rel(s.obj)] + [(s.verb_form, True)]
    else:
        raise ValueError(f"target must be one of {[t for t, _ in TARGETS]}, got {target!r}")
    return words + [(mtmod.END, False)]


def target_data(target: str, n_few: int, n_heldout: int, seed: int = 0):
    """The target as a one-task :class:`~lowrank_ref.data.multitask.MultiTaskData`: ``n_few``
    training (few-shot) sentences and ``n_heldout`` held-out ones, deterministic from ``seed``."""
    from lowrank_ref.data.grammar import draw_sentences
    from lowrank_ref.data.multitask import MultiTaskData
    from lowrank_ref.data.tokenizer import default_tokenizer

    tok = default_tokenizer()
    seeds = np.random.SeedSequence([int(seed), 20, [t for t, _ in TARGETS].index(target)]).generate_state(2)

    def encode(n, s):
        pairs = [wc for sent in draw_sentences(n, int(s)) for wc in _render(sent, target)]
        ids = tok.encode([w for w, _ in pairs])
        changed = np.fromiter((c for _, c in pairs), dtype=bool, count=len(pairs))
        return ids, changed

    tr, trc = encode(n_few, seeds[0])
    he, hec = encode(n_heldout, seeds[1])
    return MultiTaskData(tokenizer=tok, tasks=(target,), train=(tr,), heldout=(he,), train_changed=(trc,),
                         heldout_changed=(hec,), seed=int(seed))


def _few_shot_loss(model, mt, block: int) -> float:
    """Mean next-token loss over every window of the few-shot text (what the search minimises)."""
    from lowrank_ref.nn.losses import cross_entropy

    ids = mt.train[0]
    n = (ids.size - 1) // block
    x = ids[: n * block].reshape(n, block).astype(np.int64)
    y = ids[1 : n * block + 1].reshape(n, block).astype(np.int64)
    was = model.training
    model.eval()
    try:
        loss, _ = cross_entropy(model.forward(x), y)
    finally:
        model.train(was)
        for _, m in model.named_modules():
            object.__setattr__(m, "_cache", None)
    return float(loss)


def _score(model, mt, windows: int) -> dict:
    from lowrank_ref.data.multitask import evaluate_multitask

    ev = evaluate_multitask(model, mt, max_windows=windows)
    return {"accuracy": ev["accuracy"], "changed_accuracy": ev["changed_accuracy"], "loss": ev["loss"]}


def _cross_size(states, w) -> float:
    from lowrank_ref.compose import compose

    hub, total = compose(states, w, "lorahub"), compose(states, w, "sum")
    num = sum(np.linalg.norm(hub.delta(p) - total.delta(p)) ** 2 for p in hub.layers)
    den = sum(np.linalg.norm(total.delta(p)) ** 2 for p in hub.layers)
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def run(quick: bool | None = None, seed: int = 0) -> dict:
    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.compose import apply_composed, compose, lora_state, search_weights
    from lowrank_ref.data import multitask_data
    from lowrank_ref.inject import inject
    from lowrank_ref.models import blas_threads, load_pretrained
    from lowrank_ref.train import train

    quick = quick_mode() if quick is None else quick
    steps = 6 if quick else 300
    few_steps = 4 if quick else 100
    budget = 4 if quick else 40
    n_few = 8 if quick else 16
    windows = 4 if quick else 64
    block = 16  # few-shot windows (the text is short)
    t0 = time.perf_counter()
    base = load_pretrained(progress=False)
    mt = multitask_data(seed, n_train=200 if quick else None, n_heldout=40 if quick else None)
    cfg = LoRAConfig(r=8, alpha=16.0)
    pool, pool_models = {}, {}
    with blas_threads(1):
        for t, task in enumerate(mt.tasks):  # one LoRA per task, that task only
            m = copy.deepcopy(base)
            inject(m, cfg, targets=("q", "v"), rng=np.random.default_rng(seed + t))
            train(m, mt.train[t], steps, lr=1e-2, batch_size=16, warmup=min(20, steps - 1),
                  rng=np.random.default_rng(seed + 100 + t), progress=False)
            pool_models[task] = m
            pool[task] = lora_state(m)
        states = [pool[t] for t in mt.tasks]
        names = list(mt.tasks)
        results = {}
        for target, parts in TARGETS:
            tmt = target_data(target, n_few, 40 if quick else 300, seed)
            rows = {"base": {"weights": None, **_score(base, tmt, windows)}}
            for task in names:
                rows[f"only {task}"] = {"weights": [float(task == n) for n in names],
                                        **_score(pool_models[task], tmt, windows)}
            pair = np.array([float(n in parts) for n in names])
            uniform = np.full(len(names), 1.0 / len(names))
            for mode in ("lorahub", "sum"):
                for label, w in (("uniform", uniform), ("the two tasks, w = 1", pair)):
                    m = apply_composed(base, compose(states, w, mode))
                    rows[f"{mode}: {label}"] = {"weights": w.tolist(), "cross_terms": _cross_size(states, w),
                                                **_score(m, tmt, windows)}

                def objective(w, mode=mode, tmt=tmt):
                    return _few_shot_loss(apply_composed(base, compose(states, w, mode)), tmt, block)

                ts = time.perf_counter()
                found = search_weights(objective, len(names), budget=budget, seed=seed)
                m = apply_composed(base, compose(states, found.weights, mode))
                rows[f"{mode}: searched"] = {"weights": found.weights.tolist(), "objective": found.value,
                                             "evaluations": found.evaluations, "search_seconds": time.perf_counter() - ts,
                                             "cross_terms": _cross_size(states, found.weights), **_score(m, tmt, windows)}
            # the gradient-based reference: a LoRA trained on the same few-shot text
            m = copy.deepcopy(base)
            inject(m, cfg, targets=("q", "v"), rng=np.random.default_rng(seed + 50))
            train(m, tmt.train[0], few_steps, lr=1e-2, batch_size=8, warmup=min(10, few_steps - 1),
                  rng=np.random.default_rng(seed + 51), progress=False)
            rows["LoRA trained on the few-shot text"] = {"weights": None, "steps": few_steps, **_score(m, tmt, windows)}
            results[target] = {"combines": list(parts), "few_shot_sentences": n_few,
                               "few_shot_tokens": int(tmt.train[0].size), "rows": rows}
    return {"experiment": "lorahub", "quick": bool(quick), "seed": seed, "pool": names,
            "pool_config": {"r": cfg.r, "alpha": cfg.alpha, "targets": ["q", "v"], "steps": steps, "lr": 1e-2},
            "search": {"budget": budget, "bound": 1.5, "l1": 0.05}, "targets": results,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    return experiment_main(lambda a: run(a.quick), argv, prog="python -m lowrank_ref.experiments.lorahub",
                           description="LoRAs trained apart, composed for a few-shot target (chapter 08)",
                           default_out="chapters/data/lorahub.json")


if __name__ == "__main__":
    raise SystemExit(main())
