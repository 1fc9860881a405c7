r"""Chapter 05's LoHa measurements: the Hadamard rank bound at equal parameter budgets, and how well
each structure fits a full-rank target update with those parameters.

* :func:`rank_by_budget`: for r = 1, 2, ...: LoHa at rank r and LoRA at rank 2r have the same
  ``2 r (in + out)`` parameters; the measured rank of ``(B1 A1) ⊙ (B2 A2)`` (Gaussian factors)
  against ``r²`` and ``min(in, out)``, and of a rank-2r LoRA product against ``2r``.
* :func:`fit_by_budget`: a random Gaussian target ``T (out, in)`` (full rank) fitted at each budget:
  LoRA's best rank-2r fit is the truncated SVD (Eckart–Young), computed exactly; LoHa's is found
  by Adam on ``‖ΔW − T‖²`` through :class:`~lowrank_ref.adapters.LoHaLinear`'s own backward
  (a zero base and ``x = I``, so the layer's output is ``ΔWᵀ``). A local optimum, so an upper bound
  on LoHa's best error: the chapter says so where it reads the numbers.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["rank_by_budget", "fit_loha", "lora_best_error", "fit_by_budget", "hadamard_rank_data"]


def rank_by_budget(out: int = 48, n_in: int = 64, ranks=range(1, 9), seed: int = 0) -> list[dict]:
    """One row per r: the parameter count and the measured ranks of LoHa (r) and LoRA (2r)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in ranks:
        B1, B2 = rng.standard_normal((out, r)), rng.standard_normal((out, r))
        A1, A2 = rng.standard_normal((r, n_in)), rng.standard_normal((r, n_in))
        loha = np.linalg.matrix_rank((B1 @ A1) * (B2 @ A2))
        lora = np.linalg.matrix_rank(rng.standard_normal((out, 2 * r)) @ rng.standard_normal((2 * r, n_in)))
        rows.append({"r": r, "params": 2 * r * (n_in + out), "loha_rank": int(loha), "loha_bound": min(r * r, out, n_in),
                     "lora_2r_rank": int(lora), "lora_2r_bound": min(2 * r, out, n_in)})
    return rows


def lora_best_error(target: np.ndarray, rank: int) -> float:
    """‖T − T_k‖ / ‖T‖ for the best rank-k approximation T_k (the truncated SVD; Eckart–Young)."""
    sv = np.linalg.svd(target, compute_uv=False)
    return float(np.sqrt(np.sum(sv[rank:] ** 2) / np.sum(sv ** 2)))


def fit_loha(target: np.ndarray, r: int, steps: int = 3000, lr: float = 1e-2, seed: int = 0) -> float:
    """‖ΔW − T‖ / ‖T‖ after Adam on ``‖ΔW − T‖² / ‖T‖²`` over LoHa's four factors (s = 1)."""
    import lowrank_ref as lr_
    from lowrank_ref.adapters import LoHaLinear
    from lowrank_ref.optim import Adam

    out, n_in = target.shape
    layer = LoHaLinear(lr_.nn.Linear.from_arrays(np.zeros((out, n_in))), lr_.LoHaConfig(r=r, alpha=r),
                       rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    layer.A2.data = 0.1 * rng.standard_normal(layer.A2.shape)  # off PEFT's A2 = 0, so all four factors move at once
    opt = Adam(layer.trainable_parameters(), lr=lr)
    x, norm2 = np.eye(n_in), float(np.sum(target ** 2))
    for _ in range(steps):
        layer.zero_grad()
        y = layer.forward(x)  # x ΔWᵀ = ΔWᵀ   (in, out)
        layer.backward(2 * (y - target.T) / norm2)  # ∂/∂y of ‖y − Tᵀ‖² / ‖T‖²
        opt.step()
    return float(np.linalg.norm(layer.delta_weight() - target) / np.sqrt(norm2))


def fit_by_budget(out: int = 32, n_in: int = 32, ranks=(1, 2, 3, 4, 5, 6), steps: int | None = None,
                  seed: int = 0) -> list[dict]:
    """One row per r: the relative error of LoHa (r) and of the best LoRA (2r) on one Gaussian target."""
    steps = (300 if quick_mode() else 3000) if steps is None else steps
    target = np.random.default_rng(seed).standard_normal((out, n_in))
    return [{"r": r, "params": 2 * r * (n_in + out), "loha_error": fit_loha(target, r, steps, seed=seed),
             "lora_2r_error": lora_best_error(target, 2 * r), "loha_rank_bound": min(r * r, out, n_in)}
            for r in ranks]


def hadamard_rank_data() -> dict:
    """What chapter 05's figure draws (``make figures``): both tables above."""
    # a fixed step count (not quick mode's): the committed figure's data must be reproducible
    return {"rank": rank_by_budget(), "fit": fit_by_budget(steps=2000), "shape_rank": [48, 64], "shape_fit": [32, 32]}
