r"""AdaLoRA: an SVD-shaped update whose rank budget is reallocated across layers during training
(Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512; the reference code is PEFT's ``tuners/adalora``). Chapter 07 derives all of it.

Forward (PyTorch layout, ``W0 (out, in)``), with ``P (out, r)``, ``E (r,)``, ``Q (r, in)``:

.. math::
    y = x W_0^\top + b + s\,\big((x Q^\top) \odot E\big) P^\top,
    \qquad \Delta W = s\, P \operatorname{diag}(E)\, Q, \qquad s = \alpha / r_0 ,

where ``r0 = init_r`` is fixed for the whole run (pruning a triplet does not rescale the rest).
PEFT divides by ``ranknum + 1e-5`` (its ``ranknum`` is ``init_r``): a relative difference of
``1e-5 / init_r`` in ``s``; this package uses ``α / r0`` exactly. ``E = 0`` at init (so the layer
starts as the base); ``P``, ``Q`` ~ N(0, 0.02²) as in PEFT.

Backward, for upstream ȳ (N, out), ``h = x Qᵀ`` (N, r) and ``g = h ⊙ E``::

    P̄ = s ȳᵀ g        ḡ = s ȳ P        Ē = Σ_n ḡ_n ⊙ h_n        h̄ = ḡ ⊙ E
    Q̄ = h̄ᵀ x          x̄ = ȳ W0 + h̄ Q

The training side (what makes it *adaptive*) runs through the contract's hooks (``SPEC.hooks``),
so ``lowrank_ref.train.train`` cannot forget it: :class:`AdaLoRAHooks` adds the orthogonality
regulariser (:func:`orth_reg`) to the loss and runs :class:`RankAllocator` after every optimizer
step. AdaLoRA computes no SVD: the "singular values" ``E`` are ordinary parameters, and the
regulariser only pushes ``P`` and ``Q`` towards orthonormal columns and rows.

Ranks and files. ``config.r`` is the number of live triplets (``None``: ``init_r``). The
allocator masks ``E_i := 0`` and records which triplets are kept (:attr:`AdaLoRALinear.keep`);
the layer's config then says ``r = kept count`` and :meth:`AdaLoRALinear.adapter_state` holds only
the kept triplets, as PEFT's saved files do, so a file rebuilds a layer of that rank (rank 0
included). The PEFT folder carries ``rank_pattern``.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_alpha, check_bool, check_rank
from lowrank_ref.nn.module import Parameter, array_module, as_rng, to_host, where_is
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping, PerBackend
from lowrank_ref.train import TrainingHooks

__all__ = ["AdaLoRAConfig", "AdaLoRALinear", "adalora_forward", "adalora_backward", "orth_reg",
           "budget_schedule", "RankAllocator", "AdaLoRAHooks", "AllocatorNotRunWarning", "SPEC"]

INIT_STD = 0.02  # P, Q ~ N(0, 0.02²): PEFT's reset_lora_parameters


class AllocatorNotRunWarning(UserWarning):
    """An AdaLoRA layer was trained but the rank allocator never ran: it was plain LoRA."""


def _check_int(v, name: str, low: int) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    v = int(v.__index__())
    if v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v}")
    return v


def _check_beta(v, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1), got {v!r}")
    v = float(v)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (an exponential moving average's factor), got {v}")
    return v


@dataclass(frozen=True)
class AdaLoRAConfig:
    r"""AdaLoRA (Zhang et al. 2023): ``ΔW = (α / init_r) P diag(E) Q`` plus a rank allocator.

    Args:
        init_r: triplets per layer at the start (the paper's initial rank), a positive integer.
        target_r: the average rank per layer at the end; the total budget is
            ``target_r × number of layers``, distributed by importance. ``<= init_r``.
        alpha: the numerator of ``s = alpha / init_r`` (fixed: pruning does not rescale).
        tinit: warm-up steps at the full budget (no masking while ``step <= tinit``).
        tfinal: final steps with the rank pattern fixed.
        deltaT: mask every ``deltaT`` steps during the budget's decrease (>= 1).
        beta1, beta2: the EMA factors of the sensitivity ``Ī`` and its uncertainty ``Ū``, in (0, 1).
        orth_reg_weight: the weight ``γ`` of the orthogonality regulariser (>= 0).
        total_step: the length of the run the schedule is laid out over (a positive integer;
            the allocator refuses steps past it).
        orth_squared: ``False`` (default): ``‖QQᵀ − I‖_F + ‖PᵀP − I‖_F`` as PEFT and the
            reference code compute it; ``True``: the squared norms of the paper's eq. (4).
        r: the live triplets of this layer (``0..init_r``); ``None`` means ``init_r``. Set by the
            allocator (the layer's config follows its rank pattern) and by loading a pruned file.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = 1000
    orth_squared: bool = False
    r: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "init_r", check_rank(self.init_r, "init_r"))
        set_(self, "target_r", _check_int(self.target_r, "target_r", 0))
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} must not exceed init_r={self.init_r} "
                             "(AdaLoRA only prunes)")
        set_(self, "alpha", check_alpha(self.alpha))
        set_(self, "tinit", _check_int(self.tinit, "tinit", 0))
        set_(self, "tfinal", _check_int(self.tfinal, "tfinal", 0))
        set_(self, "deltaT", _check_int(self.deltaT, "deltaT", 1))
        set_(self, "beta1", _check_beta(self.beta1, "beta1"))
        set_(self, "beta2", _check_beta(self.beta2, "beta2"))
        set_(self, "orth_reg_weight", check_alpha(self.orth_reg_weight, "orth_reg_weight"))
        if self.total_step is None:
            raise ValueError("total_step must be given (a positive integer): AdaLoRA's budget schedule "
                             "is laid out over the run's length")
        set_(self, "total_step", _check_int(self.total_step, "total_step", 1))
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"tinit={self.tinit} + tfinal={self.tfinal} must be less than total_step="
                             f"{self.total_step}: the schedule has no budgeting phase")
        set_(self, "orth_squared", check_bool(self.orth_squared, "orth_squared"))
        if self.r is not None:
            set_(self, "r", _check_int(self.r, "r", 0))
            if self.r > self.init_r:
                raise ValueError(f"r={self.r} (live triplets) must not exceed init_r={self.init_r}")

    @property
    def rank(self) -> int:
        """The live triplets (``r``, or ``init_r`` when ``r`` is None)."""
        return self.init_r if self.r is None else self.r

    @property
    def scaling(self) -> float:
        """``s = alpha / init_r`` (PEFT: ``alpha / (init_r + 1e-5)``)."""
        return self.alpha / self.init_r

    def allocator_fields(self) -> dict:
        """The fields one allocator needs the same in every layer."""
        d = asdict(self)
        d.pop("r")
        return d

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def adalora_forward(x, params, cfg: AdaLoRAConfig):
    r"""y = x W0ᵀ + b + s ((x Qᵀ) ⊙ E) Pᵀ.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "P": (out, r), "E": (r,), "Q": (r, in)}``.
        cfg: gives ``s = alpha / init_r``.
    Returns:
        ``(y (..., out), cache)``. Backward in the module docstring (chapter 07 derives it).
    """
    W, b, P, E, Q = params["W"], params["b"], params["P"], params["E"], params["Q"]
    s = cfg.scaling
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    h = x2 @ Q.T  # (N, r)
    g = h * E  # g = h ⊙ E
    y = x2 @ W.T  # (N, out)
    if b is not None:
        y += b
    y += (s * g) @ P.T  # + s g Pᵀ
    return y.reshape(*lead, y.shape[-1]), (x2, h, g, W, P, E, Q, s, lead)


def adalora_backward(dy, cache):
    r"""Return ``(x̄, grads)``; grads: ``P``, ``E``, ``Q`` arrays, ``W`` and ``b`` None (frozen)."""
    x2, h, g, W, P, E, Q, s, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dP = s * (dy2.T @ g)  # P̄ = s ȳᵀ g   (out, r)
    dg = s * (dy2 @ P)  # ḡ = s ȳ P   (N, r)
    dE = (dg * h).sum(axis=0)  # Ē = Σ_n ḡ_n ⊙ h_n   (r,)
    dh = dg * E  # h̄ = ḡ ⊙ E
    dQ = dh.T @ x2  # Q̄ = h̄ᵀ x   (r, in)
    dx = dy2 @ W
    dx += dh @ Q  # x̄ = ȳ W0 + h̄ Q
    return dx.reshape(*lead, W.shape[1]), {"P": dP, "E": dE, "Q": dQ, "W": None, "b": None}


def orth_reg(P, Q, squared: bool = False):
    r"""The orthogonality regulariser of one layer and its gradients: ``(R, P̄, Q̄)``.

    ``R = ‖Q Qᵀ − I‖_F + ‖Pᵀ P − I‖_F`` (PEFT, the reference code), or with ``squared`` the
    paper's ``‖Q Qᵀ − I‖²_F + ‖Pᵀ P − I‖²_F``. With ``M = Q Qᵀ − I`` and ``N = Pᵀ P − I``
    (both symmetric, r × r)::

        ∂‖M‖_F/∂Q = 2 M Q / ‖M‖_F        ∂‖M‖²_F/∂Q = 4 M Q
        ∂‖N‖_F/∂P = 2 P N / ‖N‖_F        ∂‖N‖²_F/∂P = 4 P N

    At ``‖M‖ = 0`` the plain norm has no derivative; 0 is returned (a subgradient).
    """
    xp = array_module(Q)
    M = Q @ Q.T - xp.eye(Q.shape[0], dtype=Q.dtype)
    N = P.T @ P - xp.eye(P.shape[1], dtype=P.dtype)
    nm, nn_ = float(np.sqrt((M * M).sum())), float(np.sqrt((N * N).sum()))
    if squared:
        return nm * nm + nn_ * nn_, 4.0 * (P @ N), 4.0 * (M @ Q)
    dQ = (2.0 / nm) * (M @ Q) if nm > 0 else np.zeros_like(Q)
    dP = (2.0 / nn_) * (P @ N) if nn_ > 0 else np.zeros_like(P)
    return nm + nn_, dP, dQ


class AdaLoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s · P diag(E) Q``. Trainable: ``P``,
    ``E``, ``Q``. :attr:`keep` is the rank pattern (which triplets the allocator kept).

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: an :class:`AdaLoRAConfig`; the layer holds ``config.rank`` triplets.
        rng: a ``numpy.random.Generator`` (or seed) for ``P``, ``Q``.
    """

    CONFIG = AdaLoRAConfig

    def __init__(self, base, config: AdaLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        self.rng = rng
        r, dtype = config.rank, self.weight_dtype
        self.P = Parameter((rng.standard_normal((self.out_features, r)) * INIT_STD).astype(dtype))  # (out, r)
        self.E = Parameter(np.zeros(r, dtype=dtype))  # (r,): 0 at init, the layer starts as the base
        self.Q = Parameter((rng.standard_normal((r, self.in_features)) * INIT_STD).astype(dtype))  # (r, in)
        self.keep = np.ones(r, dtype=bool)  # the rank pattern over this layer's triplets
        self.allocated = False  # set by the allocator (and by loading a file): see adapter_state
        self.trained = False

    @property
    def r(self) -> int:
        return self.config.rank

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def set_keep(self, keep) -> None:
        """Record the rank pattern (bool, one per held triplet); the config's ``r`` follows it."""
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if keep.shape != (self.E.data.shape[0],):
            raise ValueError(f"keep must have {self.E.data.shape[0]} entries, got {keep.shape[0]}")
        self.keep = keep.copy()
        self.config = self.config.replace(r=int(keep.sum()))
        self.allocated = True

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s P diag(E) Q, shape (out, in)."""
        return self.scaling * ((self.P.data * self.E.data) @ self.Q.data)

    def _delta_weight_f64(self) -> np.ndarray:
        P, E, Q = (a.astype(np.float64) for a in (self.P.data, self.E.data, self.Q.data))
        return self.scaling * ((P * E) @ Q)

    def _forward(self, x):
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0(), "b": b, "P": self.P.data, "E": self.E.data, "Q": self.Q.data}
        y, self._cache = adalora_forward(x, params, self.config)
        return y

    def _backward(self, dy):
        dx, grads = adalora_backward(dy, self._pop_cache())
        self.trained = True
        for n in ("P", "E", "Q"):
            getattr(self, n).accumulate(grads[n])
        return dx

    # files: only the kept triplets, as PEFT saves them ------------------------------------
    def adapter_state(self) -> dict:
        """``P``, ``E``, ``Q`` of the kept triplets (``config.r`` of them). Warns
        (:class:`AllocatorNotRunWarning`) if the layer was trained but no allocator ever ran:
        the result would be a plain LoRA in AdaLoRA's clothes."""
        warn_if_not_allocated(self)
        k = self.keep
        return {"P": self.P.data[:, k], "E": self.E.data[k], "Q": self.Q.data[k]}

    def load_adapter_state(self, state: dict) -> None:
        """Copy the kept triplets of ``state`` in (the names and shapes of :meth:`adapter_state`);
        the pruned ones, if this layer holds any, get ``E = 0``."""
        from lowrank_ref.nn.checks import state_message

        if self.merged:
            raise ValueError(state_message("merged loading", type(self).__name__))
        k = int(self.keep.sum())
        want = {"P": (self.out_features, k), "E": (k,), "Q": (k, self.in_features)}
        if set(state) != set(want):
            raise ValueError(f"adapter state names {sorted(state)} do not match {sorted(want)}")
        for n, v in state.items():
            if tuple(np.shape(v)) != want[n]:
                raise ValueError(f"adapter state {n!r} has shape {np.shape(v)}, expected {want[n]}")
        keep = self.keep
        self.P.data[:, keep] = np.asarray(state["P"], dtype=self.P.data.dtype)
        self.Q.data[keep] = np.asarray(state["Q"], dtype=self.Q.data.dtype)
        self.E.data[:] = 0
        self.E.data[keep] = np.asarray(state["E"], dtype=self.E.data.dtype)
        for p in (self.P, self.E, self.Q):
            p.grad = None
        self.allocated, self.trained = True, False


def warn_if_not_allocated(layer) -> None:
    if layer.trained and not layer.allocated:
        warnings.warn(
            f"an AdaLoRA layer ({type(layer).__name__}) was trained but the rank allocator never ran: "
            "without it AdaLoRA is plain LoRA with a fixed rank. lowrank_ref.train.train runs it "
            "(SPEC.hooks); a loop of your own must call AdaLoRAHooks.loss_terms and .after_step "
            "(or RankAllocator.update_and_mask) every step", AllocatorNotRunWarning, stacklevel=3)


# --- the budget schedule and the rank allocator ------------------------------------------------
def budget_schedule(step: int, init_bgt: int, target_bgt: int, cfg: AdaLoRAConfig) -> tuple[int, bool]:
    r"""``(budget, mask_now)`` of ``step``, PEFT's schedule (the paper's eq. (12)):

    * ``step <= tinit``: the initial budget, no masking (warm-up);
    * ``step > T − tfinal``: the target budget, masking (the pattern is fixed);
    * otherwise ``b = ⌊(b0 − bT)(1 − (step − tinit)/(T − tfinal − tinit))³ + bT⌋``, masking when
      ``step % deltaT == 0``.
    """
    tinit, tfinal, T = cfg.tinit, cfg.tfinal, cfg.total_step
    if step <= tinit:
        return init_bgt, False
    if step > T - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (T - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % cfg.deltaT == 0


class RankAllocator:
    r"""AdaLoRA's rank allocator over the AdaLoRA layers of a model, step for step PEFT's.

    Called as ``update_and_mask(step)`` after each optimizer step, with the parameters' values
    and gradients in place (before they are zeroed). Per element ``p`` of ``P``, ``E``, ``Q``:

    .. code-block:: text

        I  = |p ⊙ ∇p|                    sensitivity
        Ī ← β1 Ī + (1 − β1) I            smoothed sensitivity
        Ū ← β2 Ū + (1 − β2) |I − Ī|      its uncertainty (Ī already updated, as PEFT does)
        s  = Ī · Ū                       element score
        S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)     triplet score

    then one global threshold over every layer's triplets keeps the ``budget`` best
    (:func:`budget_schedule`): the ``b0 − budget`` lowest scores (ties at the threshold too) get
    ``E_i := 0``. At ``step = T − tfinal`` the pattern is fixed (a last mask at the target budget,
    the scores reset) and from then on only re-applied.

    Args:
        model: a model holding AdaLoRA layers (or a dict ``{name: layer}``).
        config: the :class:`AdaLoRAConfig` (its schedule fields); default: the layers'.
    """

    def __init__(self, model, config: AdaLoRAConfig | None = None):
        layers = _adalora_layers(model)
        if not layers:
            raise ValueError("model holds no AdaLoRA layers: inject AdaLoRAConfig adapters first")
        if config is None:
            config = _uniform_config(layers)
        elif not isinstance(config, AdaLoRAConfig):
            raise TypeError(f"config must be an AdaLoRAConfig, got {type(config).__name__}")
        self.config = config
        self.layers = dict(sorted(layers.items()))
        self.init_bgt = sum(int(lay.E.shape[0]) for lay in self.layers.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.rank_pattern: dict | None = None
        self.history: list[tuple[int, int, bool]] = []  # (step, budget, masked)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict = {}
        self.exp_avg_ipt: dict = {}
        self.exp_avg_unc: dict = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        return budget_schedule(step, self.init_bgt, self.target_bgt, self.config)

    # the only two places that touch the layers' tensors (NumPy arrays or torch tensors)
    def _value_grad(self, layer, name):
        p = getattr(layer, name)
        if p.grad is None:
            raise ValueError(f"update_and_mask needs the gradients: {name} of an AdaLoRA layer has none "
                             "(call it after the optimizer step, before zeroing the gradients)")
        if hasattr(p, "detach"):  # a torch parameter: read as float64 on the CPU
            return tuple(t.detach().to("cpu").double().numpy() for t in (p, p.grad))
        return to_host(p.data).astype(np.float64), to_host(p.grad).astype(np.float64)  # CuPy: to the host

    def _zero_E(self, layer, mask) -> None:
        mask = np.asarray(mask, dtype=bool)
        if hasattr(layer.E, "detach"):
            import torch

            with torch.no_grad():
                layer.E[torch.as_tensor(mask, device=layer.E.device)] = 0
        else:
            layer.E.data[where_is(layer.E.data, mask)] = 0

    def update_ipt(self) -> None:
        for lname, layer in self.layers.items():
            for n in ("P", "E", "Q"):
                key = (lname, n)
                val, grad = self._value_grad(layer, n)
                ipt = np.abs(val * grad)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = np.zeros_like(ipt)
                    self.exp_avg_unc[key] = np.zeros_like(ipt)
                self.ipt[key] = ipt
                self.exp_avg_ipt[key] = self.config.beta1 * self.exp_avg_ipt[key] + (1 - self.config.beta1) * ipt
                self.exp_avg_unc[key] = (self.config.beta2 * self.exp_avg_unc[key]
                                         + (1 - self.config.beta2) * np.abs(ipt - self.exp_avg_ipt[key]))

    def triplet_scores(self) -> dict:
        """``{layer: S (r,)}`` from the current ``Ī`` and ``Ū``."""
        out = {}
        for lname in self.layers:
            s = {n: self.exp_avg_ipt[(lname, n)] * self.exp_avg_unc[(lname, n)] for n in ("P", "E", "Q")}
            out[lname] = s["E"] + s["Q"].mean(axis=1) + s["P"].mean(axis=0)
        return out

    def mask_to_budget(self, budget: int) -> dict:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        allsc = np.concatenate([scores[n] for n in self.layers]) if scores else np.zeros(0)
        # PEFT: torch.kthvalue(scores, k) (k = 0 is an error there); here k = 0 masks nothing
        threshold = -np.inf if k <= 0 else float(np.partition(allsc, k - 1)[k - 1])
        pattern = {}
        for lname, layer in self.layers.items():
            masked = scores[lname] <= threshold
            self._zero_E(layer, masked)
            layer.set_keep(~masked)
            pattern[lname] = (~masked).tolist()
        return pattern

    def mask_using_rank_pattern(self) -> None:
        for lname, layer in self.layers.items():
            keep = np.asarray(self.rank_pattern[lname], dtype=bool)
            self._zero_E(layer, ~keep)
            layer.set_keep(keep)

    def update_and_mask(self, step: int) -> tuple[int, dict | None]:
        """One allocator step (PEFT's ``AdaLoraModel.update_and_allocate``); returns
        ``(budget, rank pattern or None)``. ``step`` in ``0..total_step``."""
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise TypeError(f"step must be an integer, got {step!r}")
        step = int(step)
        T, tfinal = self.config.total_step, self.config.tfinal
        if not 0 <= step <= T:
            raise ValueError(f"step={step} is outside the schedule 0..total_step={T}: AdaLoRA's budget is laid "
                             "out over total_step steps (build the config with the run's length)")
        budget, mask_now = self.budget_schedule(step)
        pattern = None
        if step < T - tfinal:
            self.update_ipt()
            if mask_now:
                pattern = self.rank_pattern = self.mask_to_budget(budget)
        elif step == T - tfinal:
            if not self.exp_avg_ipt:  # no earlier call (PEFT would fail here): score this step
                self.update_ipt()
            pattern = self.rank_pattern = self.mask_to_budget(budget)
            self.reset_ipt()
            mask_now = True
        else:
            if self.rank_pattern is None:
                self.rank_pattern = {n: lay.keep.tolist() for n, lay in self.layers.items()}
            self.mask_using_rank_pattern()
            pattern = self.rank_pattern
        for layer in self.layers.values():
            layer.allocated = True
        self.history.append((step, budget, bool(mask_now)))
        return budget, pattern

    def ranks(self) -> dict:
        """``{layer: live triplets}``."""
        return {n: int(lay.keep.sum()) for n, lay in self.layers.items()}


def _adalora_layers(model) -> dict:
    if isinstance(model, dict):
        layers = model
    else:
        from lowrank_ref.train import model_backend

        if model_backend(model) == "numpy":
            from lowrank_ref.inject import adapter_layers
        else:
            from lowrank_gpu.inject import adapter_layers
        layers = adapter_layers(model)
    return {n: lay for n, lay in layers.items() if isinstance(getattr(lay, "config", None), AdaLoRAConfig)}


def _uniform_config(layers: dict) -> AdaLoRAConfig:
    cfgs = {n: lay.config for n, lay in layers.items()}
    first = next(iter(cfgs.values()))
    for n, c in cfgs.items():
        if c.allocator_fields() != first.allocator_fields():
            raise ValueError(f"one allocator needs one schedule: layer {n!r} has {c}, another {first} "
                             "(only r may differ between layers)")
    return first.replace(r=None)


class AdaLoRAHooks(TrainingHooks):
    """The training loop's AdaLoRA steps: the orthogonality regulariser in the loss
    (``γ · mean over matrices of R``, gradients added by hand), and the allocator after the step."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.allocator = RankAllocator(self.layers)

    def loss_terms(self, step: int) -> float:
        cfg = self.allocator.config
        if cfg.orth_reg_weight == 0:
            return 0.0
        n_mat = 2 * len(self.layers)
        total = 0.0
        for layer in self.layers.values():
            R, dP, dQ = orth_reg(layer.P.data.astype(np.float64), layer.Q.data.astype(np.float64), cfg.orth_squared)
            c = cfg.orth_reg_weight / n_mat
            total += c * R
            layer.P.accumulate((c * dP).astype(layer.P.data.dtype))
            layer.Q.accumulate((c * dQ).astype(layer.Q.data.dtype))
        return total

    def after_step(self, step: int) -> None:
        self.allocator.update_and_mask(step)


# --- PEFT (peft.tuners.adalora) ---------------------------------------------------------------
_PEFT_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step")


def _to_peft(configs: dict) -> dict:
    from lowrank_ref.io import peft_uniform

    out = {f: peft_uniform(configs, f) for f in _PEFT_FIELDS}
    if peft_uniform(configs, "orth_squared"):
        raise ValueError("orth_squared=True has no PEFT field (PEFT's regulariser is the plain norm)")
    out["lora_alpha"] = peft_uniform(configs, "alpha")
    # positions of the kept triplets are not kept in files (only the kept triplets are): the pattern
    # lists the live ones first, which is all PEFT's loading reads (their count)
    out["rank_pattern"] = {f"{p}.lora_E": [True] * c.rank + [False] * (c.init_r - c.rank)
                           for p, c in sorted(configs.items())}
    out.update({"lora_dropout": 0.0, "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False,
                "use_dora": False})
    return out


def _from_peft(c: dict, path: str) -> AdaLoRAConfig:
    if c.get("bias", "none") != "none":
        raise ValueError(f"bias={c['bias']!r} is not supported; supported: 'none'")
    if c.get("lora_dropout", 0.0) not in (0, 0.0, None):
        raise ValueError(f"lora_dropout={c['lora_dropout']!r} is not supported for AdaLoRA here; supported: 0")
    kw = {f: c[f] for f in _PEFT_FIELDS if c.get(f) is not None}
    kw["alpha"] = c.get("lora_alpha", 8)
    init_r = c.get("init_r", 12)
    pattern = c.get("rank_pattern")
    r = None
    if pattern:
        if not isinstance(pattern, dict):
            raise ValueError(f"rank_pattern must be an object, got {type(pattern).__name__}")
        entry = pattern.get(f"{path}.lora_E", pattern.get(f"{path}.lora_E.default"))
        if entry is None:
            raise ValueError(f"rank_pattern has no entry for {path}.lora_E")
        if not isinstance(entry, list) or not all(isinstance(v, bool) for v in entry):
            raise ValueError(f"rank_pattern[{path}.lora_E] must be a list of true/false, got {entry!r}")
        if len(entry) != init_r:
            raise ValueError(f"rank_pattern[{path}.lora_E] has {len(entry)} entries, init_r is {init_r}")
        r = sum(entry)
    return AdaLoRAConfig(**kw, r=r)


def _to_peft_tensor(name: str, array, config):
    return array.reshape(-1, 1) if name == "E" else array  # PEFT's lora_E is (r, 1)


def _from_peft_tensor(name: str, array, config):
    if name != "E":
        return array
    if array.ndim != 2 or array.shape[1] != 1:
        raise ValueError(f"PEFT's lora_E is (r, 1), got shape {tuple(array.shape)}")
    return array.reshape(-1)


def _shapes(cfg: AdaLoRAConfig, in_features: int, out_features: int) -> dict:
    r = cfg.rank
    return {"P": (out_features, r), "E": (r,), "Q": (r, in_features)}


SPEC = MethodSpec(
    name="adalora",
    config=AdaLoRAConfig,
    numpy="lowrank_ref.adapters.adalora:AdaLoRALinear",
    torch="lowrank_gpu.adapters.adalora:AdaLoRALinear",
    description="AdaLoRA, Zhang et al. 2023: ΔW = (α/r0) P diag(E) Q, triplets pruned by importance to a budget",
    overridable=("r",),
    file_metadata=lambda cfg: {"scaling": float(cfg.scaling), "scaling_rule": "alpha/init_r"},
    shapes=_shapes,
    peft=PeftMapping("ADALORA", {"P": "lora_B", "E": "lora_E", "Q": "lora_A"},
                     to_peft=_to_peft, from_peft=_from_peft,
                     to_peft_tensor=_to_peft_tensor, from_peft_tensor=_from_peft_tensor,
                     options=_PEFT_FIELDS + ("lora_alpha", "rank_pattern", "r", "lora_dropout",
                                             "init_lora_weights", "bias", "fan_in_fan_out", "use_dora",
                                             "alpha_pattern", "megatron_core", "qalora_group_size",
                                             "use_qalora", "lora_bias", "use_rslora")),
    example=lambda: Example(6, 5, AdaLoRAConfig(init_r=3, target_r=2, alpha=6.0, total_step=100)),
    hooks=PerBackend("lowrank_ref.adapters.adalora:AdaLoRAHooks", "lowrank_gpu.adapters.adalora:AdaLoRAHooks"),
    final_rank=lambda layer: int(layer.r),  # the kept triplets (the rank pattern)
    compare={
        # init_r 12 -> an average of 8 (the paper starts at 1.5x its target); total_step = the default run's 300 steps
        "adalora": CompareRow(AdaLoRAConfig(init_r=12, target_r=8, alpha=16, tinit=30, tfinal=60, total_step=300),
                              targets=("q", "v"), lr=1e-2, order=22),
        # the same adapter and allocator on the targeted layers' weights stored in NF4 (qlora's base)
        "qadalora": CompareRow(AdaLoRAConfig(init_r=12, target_r=8, alpha=16, tinit=30, tfinal=60, total_step=300),
                               targets=("q", "v"), lr=1e-2, order=43,
                               kwargs={"quantize": "nf4", "blocksize": 64, "double_quant": True}),
    },
)
