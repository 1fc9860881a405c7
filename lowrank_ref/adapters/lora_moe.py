r"""A mixture of LoRA experts, routed per token (LoRAMoE, Dou et al. 2023, arXiv:2312.09979; the
reference code is Ablustrund/LoRAMoE ``peft/tuners/lora.py`` @a2470ef; top-k routing as in MixLoRA,
TUDB-Labs m-LoRA). Chapter 08, §LoRA MoE, derives the backward and says why it does not merge.

For each token (row) ``x`` (PyTorch layout, ``W0 (out, in)``), with ``E`` experts ``(A_e, B_e)``::

    z = x W_gᵀ              (E,)   the router's logits; W_g (E, in), no bias (LoRAMoE)
    g = softmax(z)                  dense (LoRAMoE), or with top_k = k: softmax over the k largest
                                    logits, 0 elsewhere (MixLoRA's top-k)
    y = x W0ᵀ + b + s Σ_e g_e (x A_eᵀ) B_eᵀ        A (E, r, in), B (E, out, r), s = α / r

Init (LoRAMoE): ``W_g`` and every ``A_e`` Kaiming-uniform (``U(±1/√in)``), every ``B_e = 0``, so the
layer starts as its base.

**The balancing loss.** Without it a router may send every token to one or two experts. The
term (LoRAMoE's coefficient of variation, without its split of the experts into two task-type
halves) is ``λ · cv²(I)``, ``I_e = Σ_n g_{n,e}`` the experts' importance over the batch's tokens
and ``cv² = var(I) / mean(I)²`` (population variance). It reaches the training loop through the
method's :class:`LoRAMoEHooks` (``SPEC.hooks``, ``loss_terms``), with its gradient derived by hand
(:func:`balance_loss`). It trains the router only: it is taken at the layer's input as a constant
(the NumPy loop calls the hooks after the model's backward pass, when the rest of the network's
gradients are already in place; the torch twin detaches the input the same way, so both backends
train the same objective).

**Not mergeable.** The weights ``g(x)`` depend on each token, so the layer's update
``Σ_e g_e(x) s B_e A_e`` is a different matrix for every token: no single ``W'`` reproduces it,
``merge()`` and the dense views refuse, and the experts run at every inference step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_alpha, check_rank
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend
from lowrank_ref.train import TrainingHooks

__all__ = ["LoRAMoEConfig", "LoRAMoELinear", "LoRAMoEHooks", "router_gates", "router_gates_backward",
           "lora_moe_forward", "lora_moe_backward", "balance_loss", "NOT_MERGEABLE_WHY", "SPEC"]

NOT_MERGEABLE_WHY = ("a mixture of LoRA experts weighs its experts by a router softmax of each token, "
                     "g(x) = softmax(x W_gᵀ), so its update Σ_e g_e(x) s B_e A_e is a different matrix for "
                     "every token and no single weight W' reproduces it; the experts run unmerged at inference")


def check_top_k(top_k, n_experts: int):
    """``None`` (dense routing) or an integer ``k`` with ``1 ≤ k ≤ n_experts``."""
    if top_k is None:
        return None
    if isinstance(top_k, (bool, np.bool_)) or not hasattr(top_k, "__index__"):
        raise TypeError(f"top_k must be None (dense routing) or a positive integer, got {top_k!r}")
    k = int(top_k.__index__())
    if not 1 <= k <= n_experts:
        raise ValueError(f"top_k must be between 1 and n_experts={n_experts} (or None for dense routing), got {k}")
    return k


@dataclass(frozen=True)
class LoRAMoEConfig:
    r"""A mixture of ``n_experts`` LoRA experts with a per-token router (LoRAMoE; top-k as MixLoRA).

    Args:
        r: each expert's rank.
        alpha: ``s = alpha / r``, the same for every expert.
        n_experts: ``E``.
        top_k: ``None``: dense, every expert weighed by the softmax of the router's logits
            (LoRAMoE); ``k``: only each token's ``k`` largest logits, softmax over those (MixLoRA
            uses ``k = 2``). ``k = E`` is dense. ``k = 1`` trains no router: a softmax over one
            logit is 1 whatever the logit, so the router's gradient is exactly 0 (from the task
            loss and from the balancing term alike); the first choice stays where the init put it.
        balance_weight: ``λ ≥ 0`` of the load-balancing term ``λ · cv²(I)`` (0: none).
    """

    r: int = 4
    alpha: float = 8.0
    n_experts: int = 4
    top_k: int | None = None
    balance_weight: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "n_experts", check_rank(self.n_experts, "n_experts"))
        object.__setattr__(self, "top_k", check_top_k(self.top_k, self.n_experts))
        lam = self.balance_weight
        if isinstance(lam, (bool, np.bool_)) or not isinstance(lam, numbers.Real):
            raise TypeError(f"balance_weight must be a non-negative real number, got {lam!r}")
        if not math.isfinite(float(lam)) or float(lam) < 0:
            raise ValueError(f"balance_weight must be finite and non-negative, got {lam}")
        object.__setattr__(self, "balance_weight", float(lam))

    @property
    def scaling(self) -> float:
        """``s = alpha / r``."""
        return self.alpha / self.r

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


# --- the router -------------------------------------------------------------------------------
def router_gates(z, top_k: int | None):
    r"""The gates ``g (N, E)`` of logits ``z (N, E)``: ``softmax(z)`` row by row (``top_k`` None or
    ``E``), or a softmax over each row's ``top_k`` largest logits with the others exactly 0."""
    xp = array_module(z)
    E = z.shape[-1]
    if top_k is not None and top_k < E:
        keep = xp.argpartition(-z, top_k - 1, axis=1)[:, :top_k]  # the k largest of each row
        mask = xp.zeros(z.shape, dtype=bool)
        xp.put_along_axis(mask, keep, True, axis=1)
        z = xp.where(mask, z, -xp.inf)  # exp(-inf) = 0: the others get no weight
    z = z - z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def router_gates_backward(dg, g):
    r"""z̄ = g ⊙ (ḡ − ⟨g, ḡ⟩) row by row: the softmax's backward. With top-k it is the same
    formula, because ``g = 0`` off the kept set: z̄ is 0 there (the gradient flows through the
    kept gates only) and on the kept set it is the softmax over those logits'."""
    return g * (dg - (g * dg).sum(axis=1, keepdims=True))


def balance_loss(g):
    r"""``(cv²(I), ∂cv²/∂g)`` for gates ``g (N, E)``, ``I = Σ_n g_n`` (E,).

    With ``μ = mean(I)`` and ``v = mean((I − μ)²)``, ``cv² = v / μ²`` and::

        ∂cv²/∂I_e = 2 / (E μ²) · ((I_e − μ) − v / μ),        ∂cv²/∂g_{n,e} = ∂cv²/∂I_e  (every n)

    Every row of ``g`` sums to 1, so ``μ = N / E`` is constant and the second term adds the same
    amount to every expert of a row, which the softmax's backward then removes; it is kept so the
    function is right for any ``g``."""
    xp = array_module(g)
    E = g.shape[1]
    imp = g.sum(axis=0)  # I (E,)
    mu = imp.mean()
    v = ((imp - mu) ** 2).mean()
    dimp = 2.0 / (E * mu**2) * ((imp - mu) - v / mu)  # (E,)
    return float(v / mu**2), xp.broadcast_to(dimp, g.shape)


# --- the layer's math -------------------------------------------------------------------------
class LoRAMoECache(NamedTuple):
    """What ``lora_moe_backward`` needs from the forward (leading axes flattened to ``N``)."""

    x2: np.ndarray  # x (N, in)
    h: np.ndarray  # h_{n,e} = A_e x_n (N, E, r)
    g: np.ndarray  # gates (N, E)
    W: np.ndarray  # W0 (out, in)
    A: np.ndarray  # (E, r, in)
    B: np.ndarray  # (E, out, r)
    Wg: np.ndarray  # (E, in)
    s: float
    lead: tuple


def lora_moe_forward(x, params, cfg: LoRAMoEConfig):
    r"""y = x W0ᵀ + b + s Σ_e g_e(x) (x A_eᵀ) B_eᵀ, g = router_gates(x W_gᵀ).

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (E, r, in), "B": (E, out, r),
            "Wg": (E, in)}``.
        cfg: gives ``s`` and ``top_k``.
    Returns:
        ``(y (..., out), cache)``.

    Backward, for upstream ȳ (N, out), with h_{n,e} = A_e x_n (r) and u_{n,e} = g_{n,e} h_{n,e}
    (derived in chapter 08, §LoRA MoE)::

        ū_{n,e} = s B_eᵀ ȳ_n          B̄_e = s Σ_n ȳ_n u_{n,e}ᵀ   (out, r)
        ḡ_{n,e} = ⟨ū_{n,e}, h_{n,e}⟩   h̄_{n,e} = g_{n,e} ū_{n,e}
        Ā_e = Σ_n h̄_{n,e} x_nᵀ        (r, in)
        z̄ = g ⊙ (ḡ − ⟨g, ḡ⟩)           W̄_g = z̄ᵀ x   (E, in)     (0 off the kept top-k)
        x̄ = ȳ W0 + Σ_e h̄_{·,e} A_e + z̄ W_g

    The experts are computed for every token and weighed (an expert a token does not keep has
    weight 0): the clear form, not the fast one that sends each token to its k experts only.
    """
    W, b, A, B, Wg = (params[k] for k in ("W", "b", "A", "B", "Wg"))
    s = cfg.scaling
    E, r, n_in = A.shape
    out = B.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)  # (N, in)
    N = x2.shape[0]
    g = router_gates(x2 @ Wg.T, cfg.top_k)  # g = softmax(x W_gᵀ)   (N, E)
    h = (x2 @ A.reshape(E * r, n_in).T).reshape(N, E, r)  # h_{n,e} = A_e x_n   (N, E, r)
    u = h * g[:, :, None]  # u_{n,e} = g_{n,e} h_{n,e}
    Bcat = B.transpose(1, 0, 2).reshape(out, E * r)  # [B_1 … B_E]   (out, E·r)
    y = x2 @ W.T  # (N, out)
    if b is not None:
        y += b
    y += (s * u.reshape(N, E * r)) @ Bcat.T  # + s Σ_e u_{n,e} B_eᵀ
    return y.reshape(*lead, out), LoRAMoECache(x2, h, g, W, A, B, Wg, s, lead)


def lora_moe_backward(dy, cache: LoRAMoECache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``B``, ``Wg`` arrays, ``W`` and ``b`` None (frozen)."""
    x2, h, g, W, A, B, Wg, s, lead = cache
    E, r, n_in = A.shape
    out = B.shape[1]
    N = x2.shape[0]
    dy2 = dy.reshape(-1, out)  # (N, out)
    u = (h * g[:, :, None]).reshape(N, E * r)
    Bcat = B.transpose(1, 0, 2).reshape(out, E * r)
    dBcat = s * (dy2.T @ u)  # B̄_e = s Σ_n ȳ_n u_{n,e}ᵀ   (out, E·r)
    dB = dBcat.reshape(out, E, r).transpose(1, 0, 2)  # (E, out, r)
    du = (s * (dy2 @ Bcat)).reshape(N, E, r)  # ū_{n,e} = s B_eᵀ ȳ_n
    dg = (du * h).sum(axis=2)  # ḡ_{n,e} = ⟨ū_{n,e}, h_{n,e}⟩   (N, E)
    dh = (du * g[:, :, None]).reshape(N, E * r)  # h̄_{n,e} = g_{n,e} ū_{n,e}
    dA = (dh.T @ x2).reshape(E, r, n_in)  # Ā_e = Σ_n h̄_{n,e} x_nᵀ
    dz = router_gates_backward(dg, g)  # (N, E)
    dWg = dz.T @ x2  # W̄_g = z̄ᵀ x   (E, in)
    dx = dy2 @ W + dh @ A.reshape(E * r, n_in) + dz @ Wg  # x̄ = ȳ W0 + Σ_e h̄ A_e + z̄ W_g
    return dx.reshape(*lead, n_in), {"A": dA, "B": dB, "Wg": dWg, "W": None, "b": None}


class LoRAMoELinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``E`` LoRA experts weighed per token by a
    router. Trainable: ``A (E, r, in)``, ``B (E, out, r)``, ``Wg (E, in)``. Not mergeable.

    In training mode each forward keeps its input and gates for the balancing term
    (:meth:`balance_loss`, called by :class:`LoRAMoEHooks`).

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`LoRAMoEConfig`.
        rng: a ``numpy.random.Generator`` (or a seed) for the init.
    """

    CONFIG = LoRAMoEConfig
    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, base, config: LoRAMoEConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        E, r, dtype = config.n_experts, config.r, self.weight_dtype
        bound = 1.0 / np.sqrt(self.in_features)  # kaiming_uniform(a=√5): U(±1/√in)
        self.A = Parameter(rng.uniform(-bound, bound, (E, r, self.in_features)).astype(dtype))
        self.B = Parameter(np.zeros((E, self.out_features, r), dtype=dtype))  # B_e = 0: the base at init
        self.Wg = Parameter(rng.uniform(-bound, bound, (E, self.in_features)).astype(dtype))
        self._balance = None  # (x (N, in), g (N, E)) of the last forward in training mode

    @property
    def n_experts(self) -> int:
        return self.config.n_experts

    def _forward(self, x):
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0(), "b": b, "A": self.A.data, "B": self.B.data, "Wg": self.Wg.data}
        y, self._cache = lora_moe_forward(x, params, self.config)
        self._balance = (self._cache.x2, self._cache.g) if self.training else None
        return y

    def _backward(self, dy):
        dx, grads = lora_moe_backward(dy, self._pop_cache())
        for name in ("A", "B", "Wg"):
            getattr(self, name).accumulate(grads[name])
        return dx

    def balance_loss(self):
        r"""``(cv²(I), W̄_g)`` of the last training-mode forward's gates, and its gradient with
        respect to the router's weight (the input taken as a constant: module docstring); ``None``
        when no training-mode forward ran since the last call. Reading it clears it."""
        if self._balance is None:
            return None
        x2, g = self._balance
        self._balance = None
        value, dg = balance_loss(g)
        return value, router_gates_backward(dg, g).T @ x2  # W̄_g = z̄ᵀ x


class LoRAMoEHooks(TrainingHooks):
    r"""Adds ``λ · cv²(I)`` of every LoRA-MoE layer's last forward to the loss (``loss_terms``):
    returns its value and accumulates ``λ W̄_g`` into each router's ``.grad`` (NumPy: after the
    backward pass). ``history`` keeps the summed ``cv²`` of each step."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.history: list[float] = []

    def loss_terms(self, step: int):
        total, cv2 = 0.0, 0.0
        for layer in self.layers.values():
            got = layer.balance_loss()
            if got is None:
                continue
            value, dWg = got
            lam = layer.config.balance_weight
            cv2 += value
            total += lam * value
            if lam > 0:
                layer.Wg.accumulate(lam * dWg)
        self.history.append(cv2)
        return total


SPEC = MethodSpec(
    name="lora_moe",
    config=LoRAMoEConfig,
    numpy="lowrank_ref.adapters.lora_moe:LoRAMoELinear",
    torch="lowrank_gpu.adapters.lora_moe:LoRAMoELinear",
    description="LoRA MoE (LoRAMoE, Dou et al. 2023): y = x W0ᵀ + s Σ_e softmax(x W_gᵀ)_e B_e A_e x, "
                "dense or top-k; a cv² balancing loss; not mergeable",
    overridable=("r", "alpha"),
    file_metadata=lambda cfg: {"scaling": float(cfg.scaling), "scaling_rule": "alpha/r",
                               "routing": "dense" if cfg.top_k is None else f"top-{cfg.top_k}"},
    shapes=lambda cfg, n_in, n_out: {"A": (cfg.n_experts, cfg.r, n_in), "B": (cfg.n_experts, n_out, cfg.r),
                                     "Wg": (cfg.n_experts, n_in)},
    hooks=PerBackend("lowrank_ref.adapters.lora_moe:LoRAMoEHooks", "lowrank_gpu.adapters.lora_moe:LoRAMoEHooks"),
    mergeable=False,
    # PEFT has no mixture of LoRA experts: no PEFT mapping. Top-2 of 3: the routing the contract
    # tests check is the sparse one (the dense one is in tests/adapters/test_lora_moe.py)
    example=lambda: Example(6, 5, LoRAMoEConfig(r=2, alpha=4.0, n_experts=3, top_k=2)),
    compare={
        # four experts of rank 2 (the rank budget of the r=8 rows), dense routing as LoRAMoE
        "lora_moe": CompareRow(LoRAMoEConfig(r=2, alpha=4.0, n_experts=4, top_k=None, balance_weight=0.01),
                               targets=("q", "v"), lr=1e-2, order=84, task="multitask"),
    },
)
