r"""Composing LoRAs trained apart: LoraHub's weighted mixing, the sum of updates, and a
derivative-free search for the weights (Huang et al. 2023, arXiv:2307.13269).

Given ``N`` LoRA adapters trained on different tasks, on the same base and the same layers, a
weight vector ``w ∈ ℝᴺ`` composes them in one of two ways, per adapted layer:

* **LoraHub** mixes the *factors*, as its reference code mixes every tensor of the state dict
  (``sail-sg/lorahub``, ``lorahub/algorithm.py``):

      A = Σᵢ wᵢ Aᵢ,   B = Σᵢ wᵢ Bᵢ    ⇒    ΔW = s B A = s Σᵢ Σⱼ wᵢ wⱼ Bᵢ Aⱼ

  which is *quadratic* in ``w``: the diagonal terms carry ``wᵢ²`` and the cross terms ``Bᵢ Aⱼ``
  (i ≠ j) pair the up-projection of one task with the down-projection of another. It keeps the
  rank r of one adapter (needs every adapter at the same rank and scale).
* **The sum of updates**, linear in ``w``:

      ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ

  exactly a LoRA of rank ``Σᵢ rᵢ`` (stack ``wᵢ sᵢ Aᵢ`` into the rows of A and the ``Bᵢ`` into the
  columns of B, with scale 1), so it merges and serves like any LoRA.

They agree when ``w`` is one-hot (one adapter) and differ everywhere else; the difference is the
cross terms plus ``(wᵢ² − wᵢ) sᵢ Bᵢ Aᵢ`` (:func:`cross_terms`). Chapter 08 measures both.

The weights for a few-shot target are found without gradients, as LoraHub does (it uses
Nevergrad's ``NGOpt`` within ``[-1.5, 1.5]ᴺ``, from ``w = 0``, minimising the few-shot loss plus
``0.05 · mean|wᵢ|``): :func:`search_weights` is a small seeded evolution strategy written here
(a (μ, λ) strategy with a step size that shrinks when no offspring improves), the same bounds,
start and penalty by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LoRAState", "lora_state", "compose", "cross_terms", "apply_composed", "search_weights",
           "SearchResult", "MODES", "L1_WEIGHT", "BOUND"]

MODES = ("lorahub", "sum")
#: LoraHub's defaults (its reference code): weights in [-BOUND, BOUND], penalty L1_WEIGHT·mean|w|
BOUND = 1.5
L1_WEIGHT = 0.05


@dataclass(frozen=True)
class LoRAState:
    """One adapter, layer by layer: ``{path: (A (r, in), B (out, r), s)}``, as float64 copies."""

    layers: dict = field(default_factory=dict)

    def delta(self, path: str) -> np.ndarray:
        A, B, s = self.layers[path]
        return s * (B @ A)


def lora_state(model) -> LoRAState:
    """The LoRA layers of a NumPy model (plain LoRA or rsLoRA; a merged layer is refused)."""
    from lowrank_ref.adapters.lora import LoRALinear
    from lowrank_ref.inject import adapter_layers

    layers = {}
    for p, layer in adapter_layers(model).items():
        if not isinstance(layer, LoRALinear) or type(layer).__name__ != "LoRALinear":
            raise TypeError(f"{p}: compose takes LoRA layers only, got {type(layer).__name__}")
        if layer.merged:
            raise ValueError(f"{p} is merged: unmerge() it before reading its adapter")
        layers[p] = (np.array(layer.A.data, dtype=np.float64), np.array(layer.B.data, dtype=np.float64),
                     float(layer.scaling))
    if not layers:
        raise ValueError("the model holds no LoRA layers")
    return LoRAState(layers)


def _check(states, weights, mode: str):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(states, (list, tuple)) or not states or not all(isinstance(s, LoRAState) for s in states):
        raise TypeError("states must be a non-empty list of LoRAState (lowrank_ref.compose.lora_state)")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(states),):
        raise ValueError(f"weights must have one entry per adapter, shape ({len(states)},), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    paths = list(states[0].layers)
    for k, st in enumerate(states[1:], start=1):
        if list(st.layers) != paths:
            raise ValueError(f"adapter {k} adapts other layers than adapter 0: {sorted(set(st.layers) ^ set(paths))[:3]}")
        for p in paths:
            (A0, B0, s0), (A, B, s) = states[0].layers[p], st.layers[p]
            if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0]:
                raise ValueError(f"{p}: adapter {k} is for a layer of another shape ({B.shape[0]}, {A.shape[1]}) "
                                 f"than adapter 0's ({B0.shape[0]}, {A0.shape[1]})")
            if mode == "lorahub" and (A.shape != A0.shape or not math.isclose(s, s0, rel_tol=1e-12)):
                raise ValueError(f"{p}: LoraHub mixes factors, so every adapter needs the same rank and scale; "
                                 f"adapter {k} has r={A.shape[0]}, s={s} against r={A0.shape[0]}, s={s0} "
                                 "(mode='sum' composes any ranks)")
    return w, paths


def compose(states, weights, mode: str = "lorahub") -> LoRAState:
    r"""One adapter from ``states`` and ``weights`` (see the module docstring for the two modes).

    ``"lorahub"``: ``A = Σ wᵢAᵢ``, ``B = Σ wᵢBᵢ``, the scale of the adapters (rank r).
    ``"sum"``: ``A = [w₁s₁A₁; …; w_N s_N A_N]``, ``B = [B₁ … B_N]``, scale 1 (rank Σrᵢ), so that
    ``B A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ`` exactly."""
    w, paths = _check(states, weights, mode)
    out = {}
    for p in paths:
        parts = [st.layers[p] for st in states]
        if mode == "lorahub":
            A = sum(wi * A for wi, (A, _, _) in zip(w, parts))
            B = sum(wi * B for wi, (_, B, _) in zip(w, parts))
            out[p] = (A, B, parts[0][2])
        else:
            A = np.concatenate([wi * s * A for wi, (A, _, s) in zip(w, parts)], axis=0)  # (Σr, in)
            B = np.concatenate([B for _, B, _ in parts], axis=1)  # (out, Σr)
            out[p] = (A, B, 1.0)
    return LoRAState(out)


def cross_terms(states, weights) -> dict:
    r"""``{path: ΔW_lorahub − ΔW_sum}`` written out term by term, for a check of :func:`compose`:
    ``s Σ_{i≠j} wᵢ wⱼ Bᵢ Aⱼ + s Σᵢ (wᵢ² − wᵢ) Bᵢ Aᵢ``."""
    w, paths = _check(states, weights, "lorahub")
    out = {}
    for p in paths:
        parts = [st.layers[p] for st in states]
        s = parts[0][2]
        d = np.zeros((parts[0][1].shape[0], parts[0][0].shape[1]))
        for i, (_, Bi, _) in enumerate(parts):
            for j, (Aj, _, _) in enumerate(parts):
                coef = w[i] * w[j] if i != j else w[i] * w[i] - w[i]
                d += s * coef * (Bi @ Aj)
        out[p] = d
    return out


def apply_composed(model, state: LoRAState, dtype=None):
    """A copy of the NumPy ``model`` (its adapters removed) with ``state`` injected as plain LoRA
    layers of ``state``'s ranks and scales (rsLoRA is folded into the scale). Returns the copy."""
    import copy

    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.inject import adapter_layers, inject

    base = copy.deepcopy(model)
    for p, layer in adapter_layers(base).items():
        if layer.merged:
            raise ValueError(f"{p} is merged: unmerge() it first")
        base.set_submodule(p, layer.base)
    paths = sorted(state.layers)
    ranks = {p: int(state.layers[p][0].shape[0]) for p in paths}
    alphas = {p: float(state.layers[p][2] * ranks[p]) for p in paths}  # s = α / r
    r0 = ranks[paths[0]]
    inject(base, LoRAConfig(r=r0, alpha=alphas[paths[0]]), targets=tuple(paths),
           ranks={p: r for p, r in ranks.items() if r != r0},
           alphas={p: a for p, a in alphas.items() if a != alphas[paths[0]]}, rng=0)
    layers = adapter_layers(base)
    for p in paths:
        A, B, _ = state.layers[p]
        layer = layers[p]
        dt = layer.A.data.dtype if dtype is None else dtype
        layer.A.data, layer.B.data = A.astype(dt), B.astype(dt)
    return base


@dataclass
class SearchResult:
    weights: np.ndarray
    value: float
    evaluations: int
    history: list  # best objective after each generation


def search_weights(objective, n: int, budget: int = 40, seed: int = 0, bound: float = BOUND,
                   l1: float = L1_WEIGHT, population: int = 6, sigma: float = 0.5) -> SearchResult:
    r"""Minimise ``objective(w) + l1 · mean|w|`` over ``w ∈ [-bound, bound]ⁿ`` from ``w = 0`` with
    ``budget`` evaluations, no gradients: each generation samples ``population`` points
    ``w + σ·N(0, I)`` (clipped to the box) around the best point so far, keeps the best, and halves
    σ when no sample improved on it (a (1, λ)-style strategy with a shrinking step; seeded, so a
    search is repeatable). ``objective`` gets a float64 array and returns a finite float."""
    for name, v in (("n", n), ("budget", budget), ("population", population)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not callable(objective):
        raise TypeError("objective must be callable(weights) -> float")
    for name, v in (("bound", bound), ("sigma", sigma)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise ValueError(f"l1 must be a non-negative number, got {l1!r}")
    rng = np.random.default_rng(seed)

    def f(w):
        v = float(objective(w.copy()))
        if not math.isfinite(v):
            raise ValueError(f"objective returned {v} at weights {np.round(w, 4).tolist()}")
        return v + l1 * float(np.mean(np.abs(w)))  # LoraHub's penalty: 0.05 · mean |w|

    best = np.zeros(int(n))
    best_v, used, history = f(best), 1, []
    step = float(sigma)
    while used < budget:
        k = min(population, budget - used)
        cands = np.clip(best + step * rng.standard_normal((k, int(n))), -bound, bound)
        vals = [f(c) for c in cands]
        used += k
        i = int(np.argmin(vals))
        if vals[i] < best_v:
            best, best_v = cands[i], vals[i]
        else:
            step *= 0.5
        history.append(best_v)
    return SearchResult(best, best_v, used, history)
