r"""Chapter 05's fitting experiment: the same target update ``T (out, in)``, fitted at equal
parameter budgets by each structure (LoRA, LoHa, LoKr, KronA, VeRA), error against parameters.

Two targets:

* ``random``: a Gaussian ``32 × 32`` matrix (full rank, a flat spectrum: no structure to find),
  the target of :func:`lowrank_ref.experiments.loha_experiments.fit_by_budget`;
* ``full_ft``: the update ``ΔW = W_after − W_before`` that full fine-tuning learned on the built-in
  task for one ``64 × 64`` layer (``blocks.0.attn.q`` of the shipped model, 300 steps of
  :func:`~lowrank_ref.experiments.runner.finetune` with ``method="full"`` at the compare row's lr).

LoRA's best error at rank ``k`` is exact (the truncated SVD, Eckart–Young:
:func:`~lowrank_ref.experiments.loha_experiments.lora_best_error`). Every other structure is fitted
by Adam on ``‖ΔW − T‖² / ‖T‖²`` through its own layer's hand-written backward (a zero base and
``x = I``, so the layer's output is ``ΔWᵀ``): a local optimum, so an upper bound on that structure's
best error. Each row also states the largest rank the structure can reach.

``python -m lowrank_ref.experiments.structure_fit [--quick] [--out FILE]`` writes the result file
(default ``chapters/data/05-structure-fit.json``); chapter 05's table and figure are drawn from it.
"""

from __future__ import annotations

import time

import numpy as np

from lowrank_ref.experiments.loha_experiments import lora_best_error
from lowrank_ref.experiments.modes import quick_mode

__all__ = ["fit_update", "structures", "full_ft_delta", "fit_target", "run", "main"]

FULL_FT_LAYER = "blocks.0.attn.q"


def fit_update(target: np.ndarray, config, steps: int = 3000, lr: float = 1e-2, seed: int = 0) -> dict:
    """Fit ``ΔW ≈ T`` with one adapter layer of ``config``'s method; return ``error`` (‖ΔW − T‖ / ‖T‖)
    and ``params`` (its trainable count).

    The layer wraps a zero ``(out, in)`` base; with ``x = I`` its output is ``ΔWᵀ``, so the loss
    ``‖y − Tᵀ‖² / ‖T‖²`` is the fit, and ``backward(2 (y − Tᵀ) / ‖T‖²)`` its gradient. A factor that
    starts at zero (LoRA's B, KronA's B, LoHa's A2, LoKr's C, VeRA's b) gets a gradient on the first
    step, the others from the second on.
    """
    import lowrank_ref as lr_
    from lowrank_ref.optim import Adam

    out, n_in = target.shape
    layer = lr_.adapt(lr_.nn.Linear.from_arrays(np.zeros((out, n_in))), config, rng=np.random.default_rng(seed))
    opt = Adam(layer.trainable_parameters(), lr=lr)
    x, norm2 = np.eye(n_in), float(np.sum(target ** 2))
    best = np.inf
    for _ in range(steps):
        layer.zero_grad()
        y = layer.forward(x)  # x ΔWᵀ = ΔWᵀ   (in, out)
        best = min(best, float(np.sum((y - target.T) ** 2)) / norm2)
        layer.backward(2 * (y - target.T) / norm2)  # ∂/∂y of ‖y − Tᵀ‖² / ‖T‖²
        opt.step()
    err2 = float(np.sum((layer.delta_weight() - target) ** 2)) / norm2
    return {"error": float(np.sqrt(min(best, err2))), "params": int(layer.num_trainable_parameters())}


def structures(out: int, n_in: int) -> list[dict]:
    """The configurations fitted for an ``(out, in)`` target: each structure at a few budgets from
    about ``2·(in + out)`` to ``8·(in + out)`` parameters (s = 1 throughout: ``alpha = r``).
    ``max_rank`` is the largest rank the structure's ΔW can have."""
    import lowrank_ref as lr_
    from lowrank_ref.adapters.krona import krona_sizes
    from lowrank_ref.adapters.lokr import lokr_layout

    d = min(out, n_in)
    rows = []
    for r in (1, 2, 3, 4):
        rows.append({"structure": "loha", "label": f"r={r}", "config": lr_.LoHaConfig(r=r, alpha=r),
                     "max_rank": min(r * r, d)})
    for r in (1, 2, 4, 8):  # f = 2: C (2, 2), D (out/2, in/2) = B A of rank r (full when r ≥ max/2)
        cfg = lr_.LoKrConfig(r=r, alpha=r, decompose_factor=2)
        L = lokr_layout(cfg, n_in, out)
        rows.append({"structure": "lokr", "label": f"f=2, r={r}", "config": cfg,
                     "max_rank": min(L.p, L.m) * (min(L.q, L.n) if L.full_d else min(r, L.q, L.n))})
    for a_out, a_in in ((8, 8), (4, 8), (4, 4), (2, 4), (2, 2)):
        cfg = lr_.KronAConfig(a_out=a_out, a_in=a_in, scale=1.0)
        ao, ai, bo, bi = krona_sizes(cfg, n_in, out)
        if ao * ai + bo * bi <= 10 * (out + n_in):
            rows.append({"structure": "krona", "label": f"A ({ao}, {ai})", "config": cfg,
                         "max_rank": min(ao, ai) * min(bo, bi)})
    for k in (1, 2, 4, 8):  # VeRA at LoRA's budgets: r + out = k (in + out)
        r = k * (n_in + out) - out
        rows.append({"structure": "vera", "label": f"r={r}", "config": lr_.VeRAConfig(r=r, projection_seed=0),
                     "max_rank": min(r, d)})
    return rows


def full_ft_delta(steps: int = 300, layer: str = FULL_FT_LAYER, seed: int = 0) -> np.ndarray:
    """``W_after − W_before`` (float64) of ``layer`` after full fine-tuning of the shipped model on
    the built-in task (``finetune(method="full")`` at the compare row's lr, 1e-3)."""
    from lowrank_ref.experiments.runner import finetune
    from lowrank_ref.models import load_pretrained

    base = load_pretrained(progress=False)
    before = base.get_submodule(layer).weight.data.astype(np.float64)
    res = finetune(base, None, method="full", targets=(), steps=steps, lr=1e-3, seed=seed, keep_model=True,
                   eval_windows=32)
    return res["model"].get_submodule(layer).weight.data.astype(np.float64) - before


def fit_target(name: str, target: np.ndarray, steps: int, lr: float = 1e-2) -> list[dict]:
    """One row per structure and budget: LoRA exact (SVD), the others by Adam (:func:`fit_update`)."""
    out, n_in = target.shape
    rows = [{"target": name, "structure": "lora", "label": f"r={k}", "params": k * (out + n_in),
             "max_rank": min(k, out, n_in), "error": lora_best_error(target, k), "fit": "svd (optimal)"}
            for k in (1, 2, 4, 8)]
    for s in structures(out, n_in):
        got = fit_update(target, s["config"], steps=steps, lr=lr)
        rows.append({"target": name, "structure": s["structure"], "label": s["label"], "params": got["params"],
                     "max_rank": s["max_rank"], "error": got["error"], "fit": f"adam ({steps} steps, lr {lr:g})"})
    return rows


def _target_info(T: np.ndarray, source: str) -> dict:
    sv = np.linalg.svd(T, compute_uv=False)
    return {"shape": list(T.shape), "source": source, "stable_rank": float(np.sum(sv ** 2) / sv[0] ** 2),
            "energy_top8": float(np.sum(sv[:8] ** 2) / np.sum(sv ** 2))}


def run(quick: bool | None = None) -> dict:
    """Both targets, every structure; ``quick``: fewer Adam and fine-tuning steps (a smoke test)."""
    quick = quick_mode() if quick is None else quick
    steps, ft_steps = (100, 20) if quick else (3000, 300)
    t0 = time.perf_counter()
    random_t = np.random.default_rng(0).standard_normal((32, 32))
    full_t = full_ft_delta(ft_steps)
    targets = {"random": (random_t, "Gaussian 32 × 32, seed 0"),
               "full_ft": (full_t, f"ΔW of {FULL_FT_LAYER} after {ft_steps} steps of full fine-tuning (lr 1e-3)")}
    rows = [r for name, (T, _) in targets.items() for r in fit_target(name, T, steps)]
    return {"quick": bool(quick), "targets": {n: _target_info(T, src) for n, (T, src) in targets.items()},
            "rows": rows, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    from lowrank_ref.experiments.runner import experiment_main

    return experiment_main(lambda a: run(a.quick), argv, prog="python -m lowrank_ref.experiments.structure_fit",
                           description=__doc__.split("\n\n")[0], default_out="chapters/data/05-structure-fit.json")


if __name__ == "__main__":
    raise SystemExit(main())
