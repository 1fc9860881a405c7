r"""SoRA: a LoRA with a gate between its factors, made sparse by a proximal step (Ding et al. 2023,
"Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023, arXiv:2311.11696).
Chapter 07 (``chapters/07-rank.md``, §7) derives it.

Forward, with ``A (r, in)``, ``g (r,)``, ``B (out, r)``, ``s = α/r`` (``α/√r`` with rsLoRA)::

    h = x̃ Aᵀ  (N, r)      u = h ⊙ g  (N, r)      y = x W0ᵀ + b + s u Bᵀ
    ΔW = s · B diag(g) A

Backward, for upstream ȳ (N, out)::

    B̄ = s ȳᵀ u      ū = s ȳ B      ḡ = Σ_n ū_n ⊙ h_n      h̄ = ū ⊙ g
    Ā = h̄ᵀ x̃        x̄ = ȳ W0 + (h̄ A) ⊙ M

After every optimizer step (:class:`SoRAHooks`, the contract's ``after_step``) the gate takes the
proximal step of ``λ‖g‖₁``: ``g ← T_ξ(g)`` with ``ξ = η_t λ`` (``η_t`` the step's learning rate,
``TrainingHooks.lr``) and the soft-threshold ``T_ξ(x) = sign(x) max(|x| − ξ, 0)``
(:func:`soft_threshold`). The reference code (TsinghuaC3I/SoRA ``src/sparse_optimizer.py``,
REFERENCES §6.2) differs twice: its threshold is not scaled by the learning rate, and its three
in-place masks zero every gate with ``|g| < 2ξ`` (:func:`reference_threshold`, kept here to show the
difference). A gate at zero is a rank that can be cut: :meth:`SoRALinear.prune` returns the
LoRA of the surviving ranks, ``A' = A[keep]``, ``B' = B[:, keep] diag(g[keep])``, with the same
scale ``s``, and identical outputs.

Init as the reference code: ``A`` Kaiming-uniform, ``B = 0`` (the layer starts as the base),
``g ~ N(0, 1)``.

**Sparse factors** (``density < 1``; chapter 07, §9). The other reading of "sparse LoRA": sparsity
inside ``A`` and ``B`` themselves, not over ranks. After step ``density_warmup − 1`` the hooks keep,
in each of ``A`` and ``B``, the ``⌈density · size⌉`` entries of largest magnitude
(:func:`magnitude_mask`) and zero the rest; from then on the masks are fixed and re-applied after
every optimizer step (``A ← A ⊙ M_A``, ``B ← B ⊙ M_B``: a projected gradient step). It is an
option of SoRA rather than a method of its own because it is SoRA's hook that runs it, both
readings of "sparse LoRA" then sit in one file, and ``lam = 0`` turns the gate's sparsity off (the
gate then is ``r`` extra per-rank scales). The masks are not stored in files: the zeros are, and a
layer loaded past its warm-up gets its masks again from the magnitudes at the next step (which
keeps exactly the non-zeros).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import init_lora_A
from lowrank_ref.config import ScaledLowRankConfig, scaling_metadata
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.quant.linear import weight_array
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend
from lowrank_ref.train import TrainingHooks

__all__ = ["SoRAConfig", "SoRALinear", "SoRAHooks", "sora_forward", "sora_backward", "soft_threshold",
           "reference_threshold", "check_lam", "lambda_sweep", "prune_model", "magnitude_mask", "SPEC"]


def check_lam(lam, name: str = "lam") -> float:
    """``lam`` as a finite non-negative float; a ``TypeError``/``ValueError`` naming it otherwise."""
    if isinstance(lam, (bool, np.bool_)) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a non-negative real number, got {lam!r}")
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {lam}")
    return lam


@dataclass(frozen=True)
class SoRAConfig(ScaledLowRankConfig):
    r"""SoRA (Ding et al. 2023): ``ΔW = s · B diag(g) A`` with a gate ``g (r,)`` that the proximal
    step ``g ← T_{η_t λ}(g)`` after each optimizer step makes sparse.

    Args:
        r: the largest rank (the reference code's ``lora_r``, ``r_max`` in the paper).
        alpha: ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``), fixed: pruning keeps it.
        dropout: inverted dropout on the adapter's input, in [0, 1).
        lam: λ ≥ 0, the weight of ``λ‖g‖₁``; the threshold of a step is ``ξ = η_t λ``.
        density: the share of entries of each of ``A`` and ``B`` kept after the warm-up, in
            (0, 1]; 1 (default) keeps them dense (module docstring, "sparse factors").
        density_warmup: the steps trained dense before the magnitude masks are fixed (>= 1 when
            ``density < 1``: ``B`` starts at zero, so its magnitudes mean nothing before a step).
    """

    lam: float = 0.1
    density: float = 1.0
    density_warmup: int = 50

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "lam", check_lam(self.lam))
        d = self.density
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Real):
            raise TypeError(f"density must be a number in (0, 1], got {d!r}")
        if not (math.isfinite(float(d)) and 0.0 < float(d) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {d}")
        object.__setattr__(self, "density", float(d))
        w = self.density_warmup
        if isinstance(w, bool) or not hasattr(w, "__index__") or int(w) < 0:
            raise ValueError(f"density_warmup must be a non-negative integer, got {w!r}")
        if self.density < 1.0 and int(w) < 1:
            raise ValueError("density_warmup must be >= 1 when density < 1: B starts at zero, "
                             "so the magnitude masks need at least one step")
        object.__setattr__(self, "density_warmup", int(w))


def magnitude_mask(a, density: float):
    r"""A bool mask of ``a``'s shape keeping its ``⌈density · a.size⌉`` entries of largest
    ``|a|`` (ties: the first in C order); NumPy or CuPy like ``a``."""
    xp = array_module(a)
    k = max(1, int(math.ceil(density * a.size)))
    order = xp.argsort(-xp.abs(a).reshape(-1), kind="stable")
    keep = xp.zeros(a.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(a.shape)


def soft_threshold(x, xi: float):
    r"""T_ξ(x) = sign(x) · max(|x| − ξ, 0), elementwise: the proximal operator of ``ξ‖x‖₁``."""
    xp = array_module(x)
    return xp.sign(x) * xp.maximum(xp.abs(x) - xi, 0)


def reference_threshold(x, xi: float):
    r"""What the reference code's three in-place masks compute (TsinghuaC3I/SoRA
    ``src/sparse_optimizer.py``, REFERENCES §6.2), on a copy: ``p[p > ξ] −= ξ; p[p < −ξ] += ξ;
    p[|p| < ξ] = 0``. A value in (ξ, 2ξ) is shifted into (0, ξ) by the first mask and then zeroed
    by the third: the result is ``0`` for ``|x| < 2ξ`` and ``x ∓ ξ`` beyond (not ``T_ξ``), except at
    ``|x| = ξ`` exactly, which no mask touches (left as it is)."""
    p = np.array(x, dtype=np.result_type(x, np.float32), copy=True)
    p[p > xi] -= xi
    p[p < -xi] += xi
    p[np.abs(p) < xi] = 0
    return p


def lambda_sweep(lam_start: float, lam_end: float, stages: int, kind: str = "linear") -> np.ndarray:
    r"""The λ values of a sparsity–accuracy sweep (the reference code's Algorithm 1 steps ξ from
    ``sparse_lambda_2`` to ``max_lambda`` in ``lambda_num`` stages): ``stages`` values from
    ``lam_start`` to ``lam_end``, evenly (``"linear"``) or evenly in log space (``"log"``,
    both ends > 0). One training run per value (or one stage after another)."""
    lam_start, lam_end = check_lam(lam_start, "lam_start"), check_lam(lam_end, "lam_end")
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    if kind == "linear":
        return np.linspace(lam_start, lam_end, int(stages))
    if kind == "log":
        if lam_start <= 0 or lam_end <= 0:
            raise ValueError(f"a log sweep needs lam_start > 0 and lam_end > 0, got {lam_start}, {lam_end}")
        return np.geomspace(lam_start, lam_end, int(stages))
    raise ValueError(f"kind must be 'linear' or 'log', got {kind!r}")


class SoRACache(NamedTuple):
    xd: np.ndarray  # x̃ = x ⊙ M (N, in)
    h: np.ndarray  # x̃ Aᵀ (N, r)
    u: np.ndarray  # h ⊙ g (N, r)
    Wq: object  # W0 (or its 4-bit tensor)
    A: np.ndarray
    g: np.ndarray
    B: np.ndarray
    s: float
    mask: np.ndarray | None
    lead: tuple


def sora_forward(x, params, cfg: SoRAConfig, mask=None):
    r"""y = x W0ᵀ + b + s ((x̃ Aᵀ) ⊙ g) Bᵀ.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "g": (r,), "B": (out, r)}``.
        cfg: gives ``s`` (``cfg.scaling``).
        mask: the inverted-dropout mask shaped like ``x``, or None.
    Returns:
        ``(y (..., out), cache)``.
    """
    Wq, b, A, g, B = params["W"], params["b"], params["A"], params["g"], params["B"]
    W = weight_array(Wq, x.dtype)
    s = cfg.scaling
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    xd = x2 if mask is None else x2 * mask.reshape(x2.shape)  # x̃ = x ⊙ M
    h = xd @ A.T  # (N, r)
    u = h * g  # u = h ⊙ g   (N, r)
    y = x2 @ W.T  # (N, out)
    del W
    if b is not None:
        y += b
    y += (s * u) @ B.T  # + s u Bᵀ
    return y.reshape(*lead, y.shape[-1]), SoRACache(xd, h, u, Wq, A, g, B, s, mask, lead)


def sora_backward(dy, cache: SoRACache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``g``, ``B`` arrays, ``W`` and ``b`` None (frozen)."""
    xd, h, u, Wq, A, g, B, s, mask, lead = cache
    W = weight_array(Wq, dy.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dB = dy2.T @ u  # (out, r)
    dB *= s  # B̄ = s ȳᵀ u
    du = dy2 @ B  # (N, r)
    du *= s  # ū = s ȳ B
    dg = (du * h).sum(axis=0)  # ḡ = Σ_n ū_n ⊙ h_n   (r,)
    dh = du * g  # h̄ = ū ⊙ g
    dA = dh.T @ xd  # Ā = h̄ᵀ x̃   (r, in)
    dxd = dh @ A  # (N, in)
    if mask is not None:
        dxd *= mask.reshape(dxd.shape)
    dx = dy2 @ W
    dx += dxd  # x̄ = ȳ W0 + (h̄ A) ⊙ M
    return dx.reshape(*lead, W.shape[1]), {"A": dA, "g": dg, "B": dB, "W": None, "b": None}


def pruned_lora_config(cfg: SoRAConfig, k: int):
    """The config of the rank-``k`` LoRA with SoRA's scale ``s`` (``alpha' = s k``, or ``s √k``
    with rsLoRA), so pruning changes no output."""
    from lowrank_ref.adapters.lora import LoRAConfig

    s = cfg.scaling
    return LoRAConfig(r=k, alpha=s * (math.sqrt(k) if cfg.rslora else k), dropout=cfg.dropout, rslora=cfg.rslora)


def prune_plan(g) -> tuple[np.ndarray, int]:
    """``(kept rank indices, LoRA rank)``: the non-zero gates; rank 1 (a zero column) if none is."""
    keep = array_module(g).flatnonzero(g != 0)  # NumPy or CuPy indices, like g
    return keep, max(1, int(keep.size))


class SoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s · B diag(g) A``. Trainable: ``A (r, in)``,
    ``g (r,)``, ``B (out, r)``.

    Args:
        base: the pretrained layer (frozen by this constructor), float or 4-bit.
        config: a :class:`SoRAConfig`.
        rng: a ``numpy.random.Generator`` (or seed) for the init and the dropout masks.
    """

    CONFIG = SoRAConfig

    def __init__(self, base, config: SoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        self.rng = rng
        r, dtype = config.r, self.weight_dtype
        self.A = Parameter(init_lora_A(r, self.in_features, "kaiming", rng, dtype))  # (r, in)
        self.g = Parameter(rng.standard_normal(r).astype(dtype))  # (r,), the gate; N(0, 1) as the reference
        self.B = Parameter(np.zeros((self.out_features, r), dtype=dtype))  # (out, r); B = 0
        self.factor_masks: dict | None = None  # {"A": bool (r, in), "B": bool (out, r)} once fixed

    def fix_factor_masks(self) -> None:
        """Fix the magnitude masks of ``A`` and ``B`` at the config's density (module docstring)."""
        d = self.config.density
        self.factor_masks = {"A": magnitude_mask(self.A.data, d), "B": magnitude_mask(self.B.data, d)}
        self.apply_factor_masks()

    def apply_factor_masks(self) -> None:
        r"""``A ← A ⊙ M_A``, ``B ← B ⊙ M_B`` (nothing before the masks are fixed)."""
        if self.factor_masks is not None:
            for n, m in self.factor_masks.items():
                p = getattr(self, n)
                p.data = p.data * m.astype(p.data.dtype)

    def load_adapter_state(self, state: dict) -> None:
        super().load_adapter_state(state)
        self.factor_masks = None  # new tensors: the masks are found again from their magnitudes

    @property
    def factor_density(self) -> float:
        """The share of non-zero entries over ``A`` and ``B`` together."""
        nz = int((self.A.data != 0).sum()) + int((self.B.data != 0).sum())
        return nz / (self.A.data.size + self.B.data.size)

    @property
    def active_rank(self) -> int:
        """The number of non-zero gates: the rank left after :meth:`prune`."""
        return int((self.g.data != 0).sum())

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s · B diag(g) A, shape (out, in)."""
        return self.scaling * ((self.B.data * self.g.data) @ self.A.data)

    def _delta_weight_f64(self) -> np.ndarray:
        Bg = self.B.data.astype(np.float64) * self.g.data.astype(np.float64)
        return self.scaling * (Bg @ self.A.data.astype(np.float64))

    def _forward(self, x):
        mask = None
        p = self.config.dropout
        if self.training and p > 0:
            xp = array_module(x)
            u = self.rng.random(x.shape) if xp is np else xp.random.random(x.shape)
            mask = (u >= p).astype(x.dtype) / (1.0 - p)
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0_operand(), "b": b, "A": self.A.data, "g": self.g.data, "B": self.B.data}
        y, self._cache = sora_forward(x, params, self.config, mask=mask)
        return y

    def _backward(self, dy):
        dx, grads = sora_backward(dy, self._pop_cache())
        self.A.accumulate(grads["A"])
        self.g.accumulate(grads["g"])
        self.B.accumulate(grads["B"])
        return dx

    def proximal_step(self, lr: float) -> None:
        r"""g ← T_ξ(g) with ξ = lr · λ (what :class:`SoRAHooks` calls after each optimizer step)."""
        xi = float(lr) * self.config.lam
        self.g.data = soft_threshold(self.g.data, xi).astype(self.g.data.dtype)

    def prune(self):
        """The :class:`~lowrank_ref.adapters.lora.LoRALinear` of the non-zero gates over the same
        base: ``A' = A[keep]``, ``B' = B[:, keep] diag(g[keep])``, scale ``s`` unchanged, so its
        outputs equal this layer's (rank 1 with ``B' = 0`` when every gate is zero). The base is
        shared, not copied: put the result in this layer's place."""
        from lowrank_ref.adapters.lora import LoRALinear

        if self.merged:
            raise ValueError(f"{type(self).__name__}.prune() while merged: unmerge() first")
        g = self.g.data
        keep, k = prune_plan(g)
        lora = LoRALinear(self.base, pruned_lora_config(self.config, k), rng=0)
        if keep.size:
            A = self.A.data[keep]
            B = (self.B.data[:, keep].astype(np.float64) * g[keep].astype(np.float64)).astype(self.B.data.dtype)
        else:
            A, B = self.A.data[:1], array_module(self.B.data).zeros((self.out_features, 1), dtype=self.B.data.dtype)
        lora.load_adapter_state({"A": A, "B": B})
        return lora


def prune_model(model) -> dict:
    """Replace every SoRA layer of ``model`` (NumPy or torch), in place, by the LoRA that its
    :meth:`~SoRALinear.prune` returns; ``{layer name: rank kept}``. The outputs do not change."""
    from lowrank_ref import registry

    found = {}
    for name, m in list(model.named_modules()):
        try:
            is_sora = registry.spec_of_layer(m).name == "sora"
        except (ValueError, TypeError):
            is_sora = False
        if is_sora:
            found[name] = m
    for name, m in found.items():
        if m.merged:
            raise ValueError(f"{name}: prune() while merged: unmerge() first")
    kept = {}
    for name, m in found.items():
        lora = m.prune()
        model.set_submodule(name, lora)
        kept[name] = m.active_rank
    return kept


class SoRAHooks(TrainingHooks):
    r"""SoRA's proximal step after every optimizer step: ``g ← T_{η_t λ}(g)`` on every SoRA layer
    (``η_t``: ``self.lr``, the step's learning rate that the training loops set). ``gate_history``
    keeps the number of non-zero gates per layer after each step. Layers with ``density < 1``
    get their factor masks fixed after step ``density_warmup − 1`` and re-applied after every later
    step (:func:`sparse_factor_step`, shared with the torch twin)."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.gate_history: list[dict] = []

    def after_step(self, step: int) -> None:
        if self.lr is None:
            raise ValueError("SoRA's proximal step needs the step's learning rate (hooks.lr); "
                             "the training loops set it, a manual loop must set it too")
        for layer in self.layers.values():
            layer.proximal_step(self.lr)
        sparse_factor_step(self.layers, step)
        self.gate_history.append({n: layer.active_rank for n, layer in self.layers.items()})


def sparse_factor_step(layers: dict, step: int) -> None:
    """After optimizer step ``step``: fix the factor masks of the layers whose warm-up ends here
    (or has ended and that have none yet: a loaded layer), re-apply them on the others."""
    for layer in layers.values():
        c = layer.config
        if c.density >= 1.0 or step + 1 < c.density_warmup:
            continue
        if layer.factor_masks is None:
            layer.fix_factor_masks()
        else:
            layer.apply_factor_masks()


def _shapes(cfg: SoRAConfig, in_features: int, out_features: int) -> dict:
    return {"A": (cfg.r, in_features), "g": (cfg.r,), "B": (out_features, cfg.r)}


SPEC = MethodSpec(
    name="sora",
    config=SoRAConfig,
    numpy="lowrank_ref.adapters.sora:SoRALinear",
    torch="lowrank_gpu.adapters.sora:SoRALinear",
    description="SoRA, Ding et al. 2023: ΔW = (α/r) B diag(g) A, g ← T_{η_t λ}(g) after each step",
    overridable=("r", "alpha", "lam"),
    file_metadata=lambda cfg: {**scaling_metadata(cfg), "lam": float(cfg.lam)},
    shapes=_shapes,
    hooks=PerBackend("lowrank_ref.adapters.sora:SoRAHooks", "lowrank_gpu.adapters.sora:SoRAHooks"),
    example=lambda: Example(6, 5, SoRAConfig(r=3, alpha=6.0, lam=0.1)),
    final_rank=lambda layer: int(layer.active_rank),  # the non-zero gates
    compare={"sora": CompareRow(SoRAConfig(r=8, alpha=16, lam=0.5), targets=("q", "v"), lr=1e-2, order=51)},
)
