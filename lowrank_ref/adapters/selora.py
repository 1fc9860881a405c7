r"""Rank growth in the style of SeLoRA (Mao et al. 2024, "SeLoRA: Self-Expanding Low-Rank Adaptation
of Latent Diffusion Model for Medical Image Synthesis", arXiv:2408.07196). Chapter 07
(``chapters/07-rank.md``, §8) derives it. "In the style of": the paper's equations could not be
read; what is built here follows the code described in REFERENCES §6.3 (a derived copy of the
authors' code) and the reviews, and says where it departs.

The layer is a LoRA whose rank ``r`` starts small (``init_r``, default 1) and grows, one rank at a
time, up to ``max_r``. The scale stays the initial one, ``s = α / init_r``, whatever the rank (as the
reference code, which never updates it), so growing changes no output::

    y = x W0ᵀ + b + s (x̃ Aᵀ) Bᵀ,   A (r, in),  B (out, r),  s = α / init_r
    ΔW = s · B A

Backward: LoRA's (``B̄ = s ȳᵀ h``, ``Ā = (s ȳ B)ᵀ x̃``, ``x̄ = ȳ W0 + (s ȳ B A) ⊙ M``, ``h = x̃ Aᵀ``).

**The growth test.** Every ``interval`` steps, on that step's batch, compare the squared gradients
a rank-``(r+1)`` trial would receive with those of rank ``r``. The trial appends a row ``a`` to
``A`` (Kaiming-uniform, drawn in advance and kept: :attr:`SeLoRALinear.a_trial`) and a zero column
to ``B``. Because that column is zero, the trial computes the same output, so every upstream
gradient ``ȳ`` is the same, and its gradients are rank ``r``'s plus two more::

    ∂L/∂a     = s (ȳ b_new)ᵀ x̃ = 0                     (b_new = 0)
    ∂L/∂b_new = s ȳᵀ (x̃ a)                              (out,)

    F_r     = ‖Ā‖²_F + ‖B̄‖²_F
    F_{r+1} = F_r + ‖s ȳᵀ (x̃ a)‖²                      ratio = F_{r+1} / F_r ≥ 1

The reference code gets ``F_{r+1}`` by running the batch again through copies of the weights
(``A_temp``, ``B_temp``); the closed form above is the same number from the one backward pass
(tested against an explicit rank-``(r+1)`` LoRA). The layer grows when ``ratio ≥ threshold``
(default 2, the reference ``Trainer``'s): ``A ← [A; a]``, ``B ← [B, 0]``, ``r ← r + 1``, ``ΔW``
unchanged, and a new trial row is drawn. The gradients are the raw ones of the backward pass (before
any clipping). The optimizer's state for ``A`` and ``B`` grows with them: zeros for the new entries
(:meth:`lowrank_ref.optim.Optimizer.step` pads state to a grown parameter; the torch loop calls
``lowrank_gpu.optim.grow_state``) where the reference code rebuilds its optimizer.

:class:`SeLoRAHooks` runs the test through the contract's hooks: ``before_step`` asks the layers to
record the trial gradient on a check step, ``after_step`` grows them. Adapter files hold the grown
``A``, ``B`` and the config with the current rank ``r``, so a grown layer loads at its rank.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import init_lora_A, lora_backward, lora_forward
from lowrank_ref.config import check_alpha, check_dropout, check_rank
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend
from lowrank_ref.train import TrainingHooks

__all__ = ["SeLoRAConfig", "SeLoRALinear", "SeLoRAHooks", "selora_forward", "selora_backward",
           "trial_gradient", "growth_ratio", "SPEC"]


@dataclass(frozen=True)
class SeLoRAConfig:
    r"""Rank growth in the style of SeLoRA: a LoRA from rank ``init_r`` up to ``max_r``, grown by
    one rank when the trial's squared-gradient ratio reaches ``threshold``.

    Args:
        init_r: the starting rank (the reference code: 1); fixes the scale ``s = alpha / init_r``.
        alpha: the numerator of ``s`` (the reference code: ``scaling = 8 / r_init``, i.e. 8).
        max_r: the largest rank a layer may grow to (``>= init_r``).
        threshold: grow when ``F_{r+1} / F_r >= threshold`` (>= 1: the ratio is never below 1;
            1 grows at every check). The reference ``Trainer``'s default, 2.
        interval: test every ``interval`` steps (after steps ``interval − 1``, ``2·interval − 1``,
            ...; the reference script: 40, its default 20).
        dropout: inverted dropout on the adapter's input, in [0, 1).
        r: the current rank (``init_r..max_r``); ``None`` means ``init_r``. Growth sets it, so a
            saved file records the rank it was saved at.
    """

    init_r: int = 1
    alpha: float = 8.0
    max_r: int = 8
    threshold: float = 2.0
    interval: int = 20
    dropout: float = 0.0
    r: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "init_r", check_rank(self.init_r, "init_r"))
        set_(self, "alpha", check_alpha(self.alpha))
        set_(self, "max_r", check_rank(self.max_r, "max_r"))
        if self.max_r < self.init_r:
            raise ValueError(f"max_r={self.max_r} must be at least init_r={self.init_r}")
        th = self.threshold
        if isinstance(th, (bool, np.bool_)) or not isinstance(th, numbers.Real):
            raise TypeError(f"threshold must be a real number >= 1, got {th!r}")
        if not (math.isfinite(float(th)) and float(th) >= 1.0):
            raise ValueError(f"threshold must be finite and >= 1 (the ratio F_(r+1)/F_r is never below 1), got {th}")
        set_(self, "threshold", float(th))
        set_(self, "interval", check_rank(self.interval, "interval"))
        set_(self, "dropout", check_dropout(self.dropout))
        if self.r is not None:
            set_(self, "r", check_rank(self.r, "r"))
            if not self.init_r <= self.r <= self.max_r:
                raise ValueError(f"r={self.r} must be in init_r..max_r = {self.init_r}..{self.max_r}")

    @property
    def rank(self) -> int:
        """The current rank (``r``, or ``init_r`` when ``r`` is None)."""
        return self.init_r if self.r is None else self.r

    @property
    def scaling(self) -> float:
        """``s = alpha / init_r``, the same at every rank."""
        return self.alpha / self.init_r

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def selora_forward(x, params, cfg: SeLoRAConfig, mask=None):
    r"""y = x W0ᵀ + b + s (x̃ Aᵀ) Bᵀ with ``s = α / init_r`` (LoRA's forward at the current rank).

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "B": (out, r)}``.
        cfg: gives ``s`` (``cfg.scaling``).
        mask: the inverted-dropout mask shaped like ``x``, or None.
    Returns:
        ``(y (..., out), cache)`` (LoRA's cache).
    """
    return lora_forward(x, params, cfg, mask=mask)


def selora_backward(dy, cache):
    r"""Return ``(x̄, grads)``: ``A``, ``B`` (LoRA's), ``W`` and ``b`` None (frozen)."""
    return lora_backward(dy, cache)


def trial_gradient(dy, cache, a):
    r"""∂L/∂b_new = s ȳᵀ (x̃ a), shape (out,): the gradient the zero column a rank-(r+1) trial
    appends to ``B`` would receive on this batch (``a (in,)`` the trial's new row of ``A``)."""
    _, xd, _, _, _, _, s, _, _ = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    return s * (dy2.T @ (xd @ a))  # (N, in) @ (in,) -> (N,);  (out, N) @ (N,) -> (out,)


def growth_ratio(sq_rank: float, sq_new: float) -> float:
    r"""``F_{r+1} / F_r = (F_r + ‖∂L/∂b_new‖²) / F_r``; ``nan`` when both are zero (no signal:
    no growth), ``inf`` when only ``F_r`` is."""
    if sq_rank > 0:
        return (sq_rank + sq_new) / sq_rank
    return math.inf if sq_new > 0 else math.nan


def _sq(a) -> float:
    xp = array_module(a)
    return float(xp.sum(a.astype(np.float64) ** 2))


class SeLoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s · B A`` whose rank grows (:meth:`grow`).
    Trainable: ``A (r, in)``, ``B (out, r)``. Not trained: :attr:`a_trial` ``(in,)``, the row a
    growth test tries (and a growth appends).

    Args:
        base: the pretrained layer (frozen by this constructor), float or 4-bit.
        config: a :class:`SeLoRAConfig`; the layer starts at ``config.rank``.
        rng: a ``numpy.random.Generator`` (or seed) for the init, the trial rows and dropout.
    """

    CONFIG = SeLoRAConfig

    def __init__(self, base, config: SeLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        self.rng = rng
        r, dtype = config.rank, self.weight_dtype
        self.A = Parameter(init_lora_A(r, self.in_features, "kaiming", rng, dtype))  # (r, in)
        self.B = Parameter(np.zeros((self.out_features, r), dtype=dtype))  # (out, r); B = 0
        self.a_trial = self._draw_trial()  # (in,)
        self.probing = False  # set by SeLoRAHooks on a check step: backward records the trial
        self._probe: dict | None = None
        self.last_ratio: float | None = None  # the latest check's F_(r+1)/F_r (set by SeLoRAHooks)

    def _draw_trial(self):
        a = init_lora_A(1, self.in_features, "kaiming", self.rng, self.A.data.dtype)[0]  # (in,), U(±1/√in)
        return array_module(self.A.data).asarray(a)

    @property
    def r(self) -> int:
        return self.config.rank

    @property
    def active_rank(self) -> int:
        """The current rank (what ``compare`` reports per layer)."""
        return self.config.rank

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s · B A, shape (out, in)."""
        return self.scaling * (self.B.data @ self.A.data)

    def _delta_weight_f64(self) -> np.ndarray:
        return self.scaling * (self.B.data.astype(np.float64) @ self.A.data.astype(np.float64))

    def _forward(self, x):
        mask = None
        p = self.config.dropout
        if self.training and p > 0:
            xp = array_module(x)
            u = self.rng.random(x.shape) if xp is np else xp.random.random(x.shape)
            mask = (u >= p).astype(x.dtype) / (1.0 - p)
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0_operand(), "b": b, "A": self.A.data, "B": self.B.data}
        y, self._cache = selora_forward(x, params, self.config, mask=mask)
        return y

    def _backward(self, dy):
        cache = self._pop_cache()
        dx, grads = selora_backward(dy, cache)
        if self.probing:  # a check step: keep this pass's raw gradients and the trial's
            new = trial_gradient(dy, cache, self.a_trial.astype(dy.dtype, copy=False))
            p = self._probe or {"A": 0.0, "B": 0.0, "new": 0.0}
            self._probe = {"A": p["A"] + grads["A"], "B": p["B"] + grads["B"], "new": p["new"] + new}
        self.A.accumulate(grads["A"])
        self.B.accumulate(grads["B"])
        return dx

    # the growth test -----------------------------------------------------------------------
    def growth_ratio(self) -> float | None:
        r"""``F_{r+1} / F_r`` from the gradients recorded while :attr:`probing` (``None`` if no
        backward pass ran since probing was switched on)."""
        if self._probe is None:
            return None
        p = self._probe
        return growth_ratio(_sq(p["A"]) + _sq(p["B"]), _sq(p["new"]))

    def end_probe(self) -> None:
        self.probing, self._probe = False, None

    def grow(self) -> None:
        r"""``A ← [A; a_trial]``, ``B ← [B, 0]``, ``r ← r + 1`` (``ΔW`` unchanged); a new trial row
        is drawn. Gradients in ``.grad`` are padded with zeros. A ``ValueError`` at ``max_r`` or while
        merged, nothing changed."""
        if self.merged:
            raise ValueError(f"{type(self).__name__}.grow() while merged: unmerge() first")
        if self.r >= self.config.max_r:
            raise ValueError(f"{type(self).__name__}.grow(): already at max_r={self.config.max_r}")
        xp = array_module(self.A.data)
        A, B = self.A.data, self.B.data
        self.A.data = xp.concatenate([A, self.a_trial[None, :].astype(A.dtype)], axis=0)  # (r+1, in)
        self.B.data = xp.concatenate([B, xp.zeros((B.shape[0], 1), dtype=B.dtype)], axis=1)  # (out, r+1)
        if self.A.grad is not None:
            self.A.grad = xp.concatenate([self.A.grad, xp.zeros((1, A.shape[1]), dtype=self.A.grad.dtype)], axis=0)
        if self.B.grad is not None:
            self.B.grad = xp.concatenate([self.B.grad, xp.zeros((B.shape[0], 1), dtype=self.B.grad.dtype)], axis=1)
        self.config = self.config.replace(r=self.r + 1)
        self.a_trial = self._draw_trial()

    def load_adapter_state(self, state: dict) -> None:
        super().load_adapter_state(state)
        self.end_probe()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.r}"


class SeLoRAHooks(TrainingHooks):
    r"""The growth test through the contract's hooks (both backends: the layers do the arithmetic).

    ``before_step(step)``: on a check step of a layer (``(step + 1) % interval == 0``) below
    ``max_r``, switch on its recording. ``after_step(step)``: read each recording layer's ratio and
    grow it when ``ratio >= threshold``. ``history`` keeps, per check, ``{"step", "ratios",
    "ranks"}``; ``ranks`` (a property) is the current rank per layer; each layer's ``last_ratio``
    is the ratio of its latest check (for an experiment's recorder)."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.history: list[dict] = []

    def before_step(self, step: int) -> None:
        for layer in self.layers.values():
            c = layer.config
            if (step + 1) % c.interval == 0 and layer.r < c.max_r:
                if layer.merged:
                    raise ValueError("SeLoRA cannot test or grow a merged layer; unmerge() it first")
                layer.probing, layer._probe = True, None

    def after_step(self, step: int) -> None:
        ratios = {}
        for name, layer in self.layers.items():
            if not layer.probing:
                continue
            ratio = layer.growth_ratio()
            layer.end_probe()
            if ratio is None:
                continue
            ratios[name] = layer.last_ratio = ratio
            if ratio >= layer.config.threshold:  # nan (no signal) never grows
                layer.grow()
        if ratios:
            self.history.append({"step": int(step), "ratios": ratios, "ranks": self.ranks})

    @property
    def ranks(self) -> dict:
        return {n: int(layer.r) for n, layer in self.layers.items()}


def _shapes(cfg: SeLoRAConfig, in_features: int, out_features: int) -> dict:
    r = cfg.rank
    return {"A": (r, in_features), "B": (out_features, r)}


def _metadata(cfg: SeLoRAConfig) -> dict:
    return {"scaling": float(cfg.scaling), "scaling_rule": "alpha/init_r", "rank": int(cfg.rank)}


SPEC = MethodSpec(
    name="selora",
    config=SeLoRAConfig,
    numpy="lowrank_ref.adapters.selora:SeLoRALinear",
    torch="lowrank_gpu.adapters.selora:SeLoRALinear",
    description="rank growth in the style of SeLoRA (Mao et al. 2024): ΔW = (α/init_r) B A, "
                "grown by one rank when a trial's squared-gradient ratio reaches a threshold",
    overridable=("init_r", "alpha", "max_r", "threshold"),
    file_metadata=_metadata,
    shapes=_shapes,
    hooks=PerBackend("lowrank_ref.adapters.selora:SeLoRAHooks", "lowrank_ref.adapters.selora:SeLoRAHooks"),
    example=lambda: Example(6, 5, SeLoRAConfig(init_r=1, r=2, alpha=4.0, max_r=4)),
    final_rank=lambda layer: int(layer.active_rank),
    # threshold 1.02, not the default 2: on the built-in task no ratio comes near 2 (chapter 07, §8)
    compare={"selora": CompareRow(SeLoRAConfig(init_r=1, alpha=2.0, max_r=8, threshold=1.02, interval=20),
                                  targets=("q", "v"), lr=1e-2, order=52)},
)
