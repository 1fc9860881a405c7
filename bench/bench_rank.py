r"""The rank-adapting methods' training step against LoRA's (NumPy, one BLAS thread).

A "step" here is what the training loop does for one adapted ``d × d`` layer on ``N`` tokens:
forward, backward, the method's loss terms, an AdamW step, and the method's hooks, at the same
rank ``r`` for every row:

* ``lora``: the reference (no hooks);
* ``adalora``: ``init_r = r``; the orthogonality regulariser's value and gradient, and the rank
  allocator after every step (sensitivity, its two moving averages, the triplet scores, the
  budget's threshold and the masking, ``deltaT = 1``: the most it ever runs). AdaLoRA computes no
  SVD: this row is its whole overhead. Goal (issue 9): at most 1.15× a LoRA step;
* ``sora``: the proximal step on the gate after the update;
* ``selora``: a step without a growth check; ``selora_check``: a step with one (the trial's
  gradient ``s ȳᵀ (x̃ a)`` in the backward, the ratio after the update; the threshold is set so
  that it never grows, to keep the rank fixed over the repeats);
* ``selora_amortised``: not timed but derived, ``((K − 1) · selora + selora_check) / K`` for the
  default check interval ``K = 20``: the cost per step over a run. Goal: at most 1.1× a LoRA step.

The base's two ``N × d × d`` products dominate such a step, and on a shared machine the noise
between rows is of the order of the overheads themselves. So the overheads are also timed
alone, in the same interleaved rounds, as rows against the same LoRA step (``*_only``): the
allocator with the regulariser (``adalora_hooks_only``), the proximal step (``sora_prox_only``),
and a growth check's extra work (``selora_check_only``: the trial gradient and the ratio).
"""

from __future__ import annotations

import numpy as np

import lowrank_ref as lr
from bench.run import time_interleaved

K = 20  # SeLoRAConfig's default interval


def _step_fns(d, N, r, rng):
    from lowrank_ref.adapters.adalora import AdaLoRAHooks
    from lowrank_ref.adapters.selora import SeLoRAHooks
    from lowrank_ref.adapters.sora import SoRAHooks

    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    x = rng.standard_normal((N, d)).astype(np.float32)
    dy = rng.standard_normal((N, d)).astype(np.float32)

    def base():
        return lr.nn.Linear.from_arrays(W.copy(), np.zeros(d, np.float32))

    configs = {
        "lora": (lr.LoRAConfig(r=r, alpha=2 * r), None),
        "adalora": (lr.AdaLoRAConfig(init_r=r, target_r=max(1, r * 2 // 3), alpha=2 * r, tinit=0, tfinal=0,
                                     deltaT=1, total_step=10**9), AdaLoRAHooks),
        "sora": (lr.SoRAConfig(r=r, alpha=2 * r, lam=0.1), SoRAHooks),
        "selora": (lr.SeLoRAConfig(init_r=1, r=r, alpha=2.0, max_r=r + 1, threshold=1e9, interval=10**9), SeLoRAHooks),
        "selora_check": (lr.SeLoRAConfig(init_r=1, r=r, alpha=2.0, max_r=r + 1, threshold=1e9, interval=1),
                         SeLoRAHooks),
    }
    def build(impl):
        cfg, hooks_cls = configs[impl]
        layer = lr.adapt(base(), cfg, rng=0)
        state_rng = np.random.default_rng(1)
        layer.load_adapter_state({n: (0.05 * state_rng.standard_normal(v.shape)).astype(np.float32)
                                  for n, v in layer.adapter_state().items()})
        opt = lr.optim.AdamW(layer.trainable_parameters(), lr=1e-4, weight_decay=0.0)
        hooks = None if hooks_cls is None else hooks_cls(None, {"layer": layer})
        if hooks is not None:
            hooks.lr = 1e-4
        return layer, opt, hooks

    fns = {impl: _one_step(*build(impl), x, dy) for impl in configs}
    # the overheads alone, each on a layer of its own (the full steps zero their gradients)
    fns["adalora_hooks_only"] = _hooks_only(*build("adalora"), x, dy, with_loss=True)
    fns["sora_prox_only"] = _hooks_only(*build("sora"), x, dy)
    fns["selora_check_only"] = _check_only(build("selora_check")[0], x, dy)
    return fns


def _hooks_only(layer, opt, hooks, x, dy, with_loss=False):
    """The hooks' work after a step, on gradients computed once (untimed) and put back each call."""
    layer.forward(x)
    layer.backward(dy)
    params = layer.trainable_parameters()
    grads = {n: p.grad.copy() for n, p in params.items()}
    count = [0]

    def fn():
        step = count[0]
        count[0] += 1
        for n, p in params.items():
            p.grad = grads[n]
        if with_loss:
            hooks.loss_terms(step)
        hooks.after_step(step)

    return fn


def _check_only(layer, x, dy):
    """A growth check's extra work: the trial gradient s ȳᵀ (x̃ a) and the ratio of the norms."""
    from lowrank_ref.adapters.selora import lora_backward, trial_gradient

    layer.forward(x)
    cache = layer._cache
    _, grads = lora_backward(dy, cache)

    def fn():
        new = trial_gradient(dy, cache, layer.a_trial)
        layer._probe = {"A": grads["A"], "B": grads["B"], "new": new}
        layer.growth_ratio()
        layer._probe = None

    return fn


def _one_step(layer, opt, hooks, x, dy):
    count = [0]

    def fn():
        step = count[0]
        count[0] += 1
        if hooks is not None:
            hooks.before_step(step)
        layer.forward(x)
        layer.backward(dy)
        if hooks is not None:
            hooks.loss_terms(step)
        opt.step()
        if hooks is not None:
            hooks.after_step(step)
        opt.zero_grad()

    return fn


def run(quick: bool) -> list[dict]:
    from lowrank_ref.models import blas_threads

    d, N, r = (128, 256, 12) if quick else (768, 2048, 12)
    repeats = 3 if quick else 10
    shape = f"N={N}, d_in=d_out={d}, r={r}, float32, BLAS 1 thread; fwd + bwd + loss terms + AdamW + hooks"
    with blas_threads(1):
        t = time_interleaved(_step_fns(d, N, r, np.random.default_rng(0)), repeats=repeats)
    rows = []
    goals = {"adalora": 1.15}
    for impl, res in t.items():
        row = {"name": "rank_methods_step_numpy", "impl": impl, "ratio_to": None if impl == "lora" else "lora",
               "shape": shape, **res}
        if impl in goals:
            row["goal"] = goals[impl]
        rows.append(row)
    plain, check = t["selora"]["seconds"], t["selora_check"]["seconds"]
    rows.append({"name": "rank_methods_step_numpy", "impl": "selora_amortised", "ratio_to": "lora",
                 "seconds": ((K - 1) * plain + check) / K, "goal": 1.1, "shape": shape,
                 "note": f"derived: ((K-1) * selora + selora_check) / K with K = {K}, not timed itself"})
    return rows
