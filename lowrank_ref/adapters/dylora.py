r"""DyLoRA: one LoRA trained for every rank at once (Valipour, Rezagholizadeh, Kobyzev, Ghodsi 2023,
"DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation", arXiv:2210.07558). Chapter 07 (``chapters/07-rank.md``, §7) derives it.

The layer holds a rank-``r`` LoRA, ``A (r, in)``, ``B (out, r)``, and a current rank ``b ∈ 1..r``
(``set_rank(b)``). At rank ``b`` only the first ``b`` rows of ``A`` and columns of ``B`` are used,
with the scale of a rank-``b`` LoRA::

    y = x W0ᵀ + b0 + s_b (x̃ A_{:b}ᵀ) B_{:,:b}ᵀ,     s_b = α / b   (α / √b with rsLoRA)

so DyLoRA at rank ``b`` *is* the rank-``b`` LoRA ``(A_{:b}, B_{:,:b}, α)`` (tested). Training samples
``b ~ U{1..r}`` before every step (:class:`DyLoRAHooks`, through the contract's ``before_step``;
one draw per step from a generator seeded by ``config.seed``, so the NumPy and torch loops draw
the same ranks) and puts the layer back at its own rank after the step; evaluation uses any rank
the user sets (``to_lora(b)`` exports the rank-``b`` LoRA; adapter files hold all ``r`` ranks and
load at rank ``r``). The reference code (huawei-noah/Efficient-NLP ``DyLoRA/loralib``, REFERENCES §6.1)
draws ``randint(0, r_max − 1) + 1`` and multiplies both slices by ``√(r_max / b)`` on top of
``α / r_max``: the same ``α / b``.

Backward at rank ``b``, for upstream ȳ (N, out), ``h = x̃ A_{:b}ᵀ`` (N, b): LoRA's, on the slices::

    B̄_{:,:b} = s_b ȳᵀ h      Ā_{:b} = (s_b ȳ B_{:,:b})ᵀ x̃      x̄ = ȳ W0 + (s_b ȳ B_{:,:b} A_{:b}) ⊙ M

and zero for the ranks ``b+1..r`` (they are not in the forward: that zero is the true gradient).
``frozen=True`` (the paper's "frozen" mode, §3) keeps ranks ``1..b−1`` fixed: only row ``b`` of
``A`` and column ``b`` of ``B`` get a gradient (the others get zeros: a training rule, not the
derivative, so gradcheck runs in normal mode). Init as LoRA: ``A`` Kaiming-uniform, ``B = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import init_lora_A, lora_backward, lora_forward, lora_shapes
from lowrank_ref.config import ScaledLowRankConfig, check_bool
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend
from lowrank_ref.train import TrainingHooks

__all__ = ["DyLoRAConfig", "DyLoRALinear", "DyLoRAHooks", "dylora_forward", "dylora_backward",
           "check_eval_rank", "SPEC"]


@dataclass(frozen=True)
class DyLoRAConfig(ScaledLowRankConfig):
    r"""DyLoRA (Valipour et al. 2023): a rank-``r`` LoRA trained at a random rank ``b ~ U{1..r}``
    per step, with scale ``α/b`` at rank ``b``; usable at any rank ``1..r`` afterwards.

    Args:
        r: the largest rank (the reference code's ``r_max``).
        alpha: ``s_b = alpha / b`` at rank ``b`` (``alpha / sqrt(b)`` with ``rslora``).
        dropout: inverted dropout on the adapter's input, in [0, 1).
        frozen: the paper's "frozen" mode: at a sampled rank ``b`` only the ``b``-th rank trains.
        seed: seeds the per-step rank draw (one generator per training run, the same in NumPy
            and torch).
    """

    frozen: bool = False
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "frozen", check_bool(self.frozen, "frozen"))
        if isinstance(self.seed, bool) or not hasattr(self.seed, "__index__") or int(self.seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    def scaling_at(self, b: int) -> float:
        """``s_b = alpha / b`` (``alpha / sqrt(b)`` with rsLoRA): a rank-``b`` LoRA's scale."""
        return self.alpha / (math.sqrt(b) if self.rslora else b)


def check_eval_rank(b, r: int) -> int:
    """``b`` as an int in ``1..r``; a ``TypeError``/``ValueError`` naming ``rank`` otherwise."""
    if isinstance(b, (bool, np.bool_)) or not hasattr(b, "__index__"):
        raise TypeError(f"rank must be an integer in 1..{r}, got {b!r} ({type(b).__name__})")
    b = int(b.__index__())
    if not 1 <= b <= r:
        raise ValueError(f"rank must be in 1..r = 1..{r}, got {b}")
    return b


class _Scale(NamedTuple):
    scaling: float  # what lora_forward reads from its config


class DyLoRACache(NamedTuple):
    lora: tuple  # lora_forward's cache, on the slices
    r: int
    b: int
    frozen: bool


def dylora_forward(x, params, cfg: DyLoRAConfig, b: int, mask=None):
    r"""y = x W0ᵀ + b0 + s_b (x̃ A_{:b}ᵀ) B_{:,:b}ᵀ with s_b = α/b.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "B": (out, r)}``.
        cfg: the :class:`DyLoRAConfig` (``scaling_at``, ``frozen``).
        b: the rank, in ``1..r``.
        mask: the inverted-dropout mask shaped like ``x``, or None.
    Returns:
        ``(y (..., out), cache)``.
    """
    A, B = params["A"], params["B"]
    r = A.shape[0]
    sliced = {**params, "A": A[:b], "B": B[:, :b]}  # A_{:b} (b, in), B_{:,:b} (out, b)
    y, cache = lora_forward(x, sliced, _Scale(cfg.scaling_at(b)), mask=mask)
    return y, DyLoRACache(cache, r, b, cfg.frozen)


def dylora_backward(dy, cache: DyLoRACache):
    r"""Return ``(x̄, grads)``: ``A`` (r, in) and ``B`` (out, r), zero beyond rank ``b`` (and, when
    frozen, below it); ``W``, ``b`` None (frozen base)."""
    dx, g = lora_backward(dy, cache.lora)  # Ā_{:b} (b, in), B̄_{:,:b} (out, b)
    r, b = cache.r, cache.b
    xp = array_module(g["A"])
    dA = xp.zeros((r, g["A"].shape[1]), dtype=g["A"].dtype)
    dB = xp.zeros((g["B"].shape[0], r), dtype=g["B"].dtype)
    lo = b - 1 if cache.frozen else 0  # frozen: only the b-th rank trains
    dA[lo:b] = g["A"][lo:b]
    dB[:, lo:b] = g["B"][:, lo:b]
    return dx, {"A": dA, "B": dB, "W": None, "b": None}


class DyLoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus a rank-``r`` LoRA used at rank ``b``
    (``set_rank(b)``, default ``r``) with scale ``α/b``. Trainable: ``A (r, in)``, ``B (out, r)``.

    Args:
        base: the pretrained layer (frozen by this constructor), float or 4-bit.
        config: a :class:`DyLoRAConfig`.
        rng: a ``numpy.random.Generator`` (or seed) for the init and the dropout masks.
    """

    CONFIG = DyLoRAConfig

    def __init__(self, base, config: DyLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        self.rng = rng
        r, dtype = config.r, self.weight_dtype
        self.A = Parameter(init_lora_A(r, self.in_features, "kaiming", rng, dtype))  # (r, in)
        self.B = Parameter(np.zeros((self.out_features, r), dtype=dtype))  # (out, r); B = 0
        self._rank = r

    @property
    def rank(self) -> int:
        """The rank ``b`` the layer computes at (``r`` unless :meth:`set_rank` changed it)."""
        return self._rank

    @property
    def active_rank(self) -> int:
        """The rank in use (what ``compare`` reports per layer): the current rank."""
        return self._rank

    def set_rank(self, b) -> None:
        """Compute at rank ``b ∈ 1..r`` from now on (training and evaluation); a ``ValueError``
        for a rank outside ``1..r`` or while merged (the merged weight holds one rank)."""
        b = check_eval_rank(b, self.r)
        if self.merged:
            raise ValueError(f"{type(self).__name__}.set_rank() while merged: the merged weight holds one rank; "
                             "unmerge() first")
        self._rank = b

    @property
    def scaling(self) -> float:
        """``s_b = α / b`` at the current rank."""
        return self.config.scaling_at(self._rank)

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s_b · B_{:,:b} A_{:b}, shape (out, in)."""
        b = self._rank
        return self.scaling * (self.B.data[:, :b] @ self.A.data[:b])

    def _delta_weight_f64(self) -> np.ndarray:
        b = self._rank
        return self.scaling * (self.B.data[:, :b].astype(np.float64) @ self.A.data[:b].astype(np.float64))

    def to_lora(self, b=None):
        """The rank-``b`` :class:`~lowrank_ref.adapters.lora.LoRALinear` (default: the current rank)
        over the same base: ``A[:b]``, ``B[:, :b]``, the same α (so the scale α/b), identical
        outputs. The rank a DyLoRA layer computes at is not stored in adapter files (a file holds
        all ``r`` ranks and loads at rank ``r``); to keep one rank, save this LoRA instead."""
        from lowrank_ref.adapters.lora import LoRAConfig, LoRALinear

        b = self._rank if b is None else check_eval_rank(b, self.r)
        if self.merged:
            raise ValueError(f"{type(self).__name__}.to_lora() while merged: unmerge() first")
        c = self.config
        lora = LoRALinear(self.base, LoRAConfig(r=b, alpha=c.alpha, dropout=c.dropout, rslora=c.rslora), rng=0)
        lora.load_adapter_state({"A": self.A.data[:b], "B": self.B.data[:, :b]})
        return lora

    def _forward(self, x):
        mask = None
        p = self.config.dropout
        if self.training and p > 0:
            xp = array_module(x)
            u = self.rng.random(x.shape) if xp is np else xp.random.random(x.shape)
            mask = (u >= p).astype(x.dtype) / (1.0 - p)
        b0 = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0_operand(), "b": b0, "A": self.A.data, "B": self.B.data}
        y, self._cache = dylora_forward(x, params, self.config, self._rank, mask=mask)
        return y

    def _backward(self, dy):
        dx, grads = dylora_backward(dy, self._pop_cache())
        self.A.accumulate(grads["A"])
        self.B.accumulate(grads["B"])
        return dx

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self._rank}"


class DyLoRAHooks(TrainingHooks):
    r"""DyLoRA's rank sampling, built once per model and training run (both backends: it only
    calls ``set_rank``). Before each step one ``u ~ U[0, 1)`` is drawn from
    ``numpy.random.default_rng(seed)`` (the seed of the first layer by name) and every layer is
    set to ``b = 1 + ⌊u r⌋``, i.e. ``b ~ U{1..r}`` (one shared draw, as in the reference code,
    also when layers have different ``r``); after the step each layer is back at the rank it had."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        names = sorted(self.layers)
        seed = self.layers[names[0]].config.seed if names else 0
        self.rng = np.random.default_rng(seed)
        self.ranks: list[int] = []  # the rank drawn at each step (of a layer with the largest r)
        self._saved: dict | None = None

    def before_step(self, step: int) -> None:
        u = float(self.rng.random())
        if any(layer.merged for layer in self.layers.values()):
            raise ValueError("DyLoRA cannot train a merged layer; unmerge() it first")
        self._saved = {n: layer.rank for n, layer in self.layers.items()}
        r_max = max((layer.r for layer in self.layers.values()), default=1)
        self.ranks.append(1 + int(u * r_max))
        for layer in self.layers.values():
            layer.set_rank(1 + int(u * layer.r))  # b ~ U{1..r}

    def after_step(self, step: int) -> None:
        if self._saved is not None:
            for n, b in self._saved.items():
                self.layers[n].set_rank(b)
            self._saved = None


def _metadata(cfg: DyLoRAConfig) -> dict:
    return {"scaling_rule": "alpha/sqrt(b)" if cfg.rslora else "alpha/b", "max_rank": cfg.r,
            "scaling": float(cfg.scaling_at(cfg.r)), "frozen_mode": cfg.frozen}


SPEC = MethodSpec(
    name="dylora",
    config=DyLoRAConfig,
    numpy="lowrank_ref.adapters.dylora:DyLoRALinear",
    torch="lowrank_gpu.adapters.dylora:DyLoRALinear",
    description="DyLoRA, Valipour et al. 2023: a rank-r LoRA trained at b ~ U{1..r} per step, ΔW = (α/b) B[:, :b] A[:b]",
    overridable=("r", "alpha"),
    file_metadata=_metadata,
    shapes=lora_shapes,
    hooks=PerBackend("lowrank_ref.adapters.dylora:DyLoRAHooks", "lowrank_ref.adapters.dylora:DyLoRAHooks"),
    example=lambda: Example(6, 5, DyLoRAConfig(r=3, alpha=6.0)),
    final_rank=lambda layer: int(layer.active_rank),  # the rank in use (r after training)
    compare={"dylora": CompareRow(DyLoRAConfig(r=8, alpha=16), targets=("q", "v"), lr=1e-2, order=50)},
)
