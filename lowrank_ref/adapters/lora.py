r"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685).

Forward (PyTorch layout, ``W0 (out, in)``):

.. math::
    y = x W_0^\top + b + s\,(\tilde x A^\top) B^\top, \qquad \tilde x = x \odot M,\quad
    s = \alpha / r \;\;(\text{or } \alpha/\sqrt r \text{ with rsLoRA}),

with ``A (r, in)``, ``B (out, r)``, and ``M`` the inverted-dropout mask (``M = 1`` in eval or when
``dropout = 0``). Equivalently ``y = x (W_0 + ΔW)^\top + b`` with ``ΔW = s B A`` when there is no
dropout: the factorised forward never builds the ``(out, in)`` matrix ``ΔW``.

Backward, for upstream :math:`\bar y` (leading axes flattened to ``N`` rows) and
:math:`h = \tilde x A^\top` ``(N, r)``:

.. math::
    \bar B = s\, \bar y^\top h, \qquad
    \bar h = s\, \bar y B, \qquad
    \bar A = \bar h^\top \tilde x, \qquad
    \bar x = \bar y W_0 + (\bar h A) \odot M .

``W0`` and ``b`` are frozen: they get no gradient (``None``). Cost: the LoRA branch adds
``N r (in + out)`` multiply-adds forward (``2 N r (in + out)`` FLOPs), against ``N in out``
multiply-adds for the base.

Init: ``B = 0`` so the adapted layer starts equal to the base. ``A`` is Kaiming-uniform with
``a = sqrt(5)``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))`` (the reference code, microsoft/LoRA loralib,
and PEFT), or Gaussian ``N(0, 1/r²)`` (PEFT's ``init_lora_weights="gaussian"``; the paper's text
says "random Gaussian"). PiSSA (Meng et al. 2024, arXiv:2404.02948) is handled in
:mod:`lowrank_ref.adapters.pissa`.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import LoRAConfig
from lowrank_ref.nn.module import Parameter, array_module

__all__ = ["LoRALinear", "lora_forward", "lora_backward", "init_lora_A"]


def lora_forward(x, params, cfg: LoRAConfig, mask=None):
    r"""y = x W0ᵀ + b + s (x̃ Aᵀ) Bᵀ.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "B": (out, r)}``.
        cfg: gives ``s`` (``cfg.scaling``).
        mask: the inverted-dropout mask shaped like ``x`` (already divided by ``1-p``), or None.
    Returns:
        ``(y (..., out), cache)``.
    """
    W, b, A, B = params["W"], params["b"], params["A"], params["B"]
    s = cfg.scaling
    lead = x.shape[:-1]
    # Every product on 2-D rows (N, in): NumPy's stacked matmul of (B, T, in) with a transposed
    # 2-D view does not reach BLAS and is several times slower.
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    xd = x2 if mask is None else x2 * mask.reshape(x2.shape)  # x̃ = x ⊙ M
    h = xd @ A.T  # (N, r)
    y = x2 @ W.T  # (N, out)
    if b is not None:
        y += b  # in place: no second (N, out) array
    y += (s * h) @ B.T  # + s x̃ Aᵀ Bᵀ, scaled on the small (N, r) side
    return y.reshape(*lead, W.shape[0]), (x2, xd, h, W, A, B, s, mask, lead)


def lora_backward(dy, cache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``B`` arrays, ``W`` and ``b`` None (frozen)."""
    x2, xd, h, W, A, B, s, mask, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dB = dy2.T @ h  # (out, r)
    dB *= s  # B̄ = s ȳᵀ h
    dh = dy2 @ B  # (N, r)
    dh *= s  # h̄ = s ȳ B   (the scaling costs N·r, not N·out)
    dA = dh.T @ xd  # Ā = h̄ᵀ x̃   (r, in)
    dxd = dh @ A  # (N, in)
    if mask is not None:
        dxd *= mask.reshape(dxd.shape)
    dx = dy2 @ W  # (N, in)
    dx += dxd  # x̄ = ȳ W0 + (h̄ A) ⊙ M, summed in place
    return dx.reshape(*lead, W.shape[1]), {"A": dA, "B": dB, "W": None, "b": None}


def init_lora_A(r: int, in_features: int, init: str, rng, dtype) -> np.ndarray:
    """A's initial value (r, in) for the ``"kaiming"`` or ``"gaussian"`` schemes."""
    if init == "gaussian":
        return (rng.standard_normal((r, in_features)) / r).astype(dtype)
    # kaiming_uniform(a=sqrt(5)): gain² = 2/(1+a²) = 1/3, bound = sqrt(3·gain²/fan_in) = 1/sqrt(in)
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, (r, in_features)).astype(dtype)


class LoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s · B A``. Trainable: ``A``, ``B``.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`~lowrank_ref.config.LoRAConfig`.
        rng: a ``numpy.random.Generator`` for the init and the dropout masks.
    """

    CONFIG = LoRAConfig
    PEFT_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight"}  # PEFT's key suffixes

    def __init__(self, base, config: LoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)  # None / int seed
        self.rng = rng
        r, dtype = config.r, base.weight.data.dtype
        if config.init == "pissa":
            from lowrank_ref.adapters.pissa import pissa_init

            A, B = pissa_init(base, config)
        else:
            A = init_lora_A(r, self.in_features, config.init, rng, dtype)
            B = np.zeros((self.out_features, r), dtype=dtype)  # B = 0: starts as the base layer
        self.A = Parameter(A)  # (r, in)
        self.B = Parameter(B)  # (out, r)

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s · B A, shape (out, in)."""
        return self.scaling * (self.B.data @ self.A.data)

    def _delta_weight_f64(self) -> np.ndarray:
        return self.scaling * (self.B.data.astype(np.float64) @ self.A.data.astype(np.float64))

    def _params_dict(self):
        b = None if self.base.bias is None else self.base.bias.data
        return {"W": self.base.weight.data, "b": b, "A": self.A.data, "B": self.B.data}

    def _forward(self, x):
        mask = None
        p = self.config.dropout
        if self.training and p > 0:
            xp = array_module(x)  # on CuPy arrays the mask comes from CuPy's own generator
            u = self.rng.random(x.shape) if xp is np else xp.random.random(x.shape)
            mask = (u >= p).astype(x.dtype) / (1.0 - p)
        y, cache = lora_forward(x, self._params_dict(), self.config, mask=mask)
        self._cache = cache
        return y

    def _backward(self, dy):
        dx, grads = lora_backward(dy, self._pop_cache())
        self.A.accumulate(grads["A"])
        self.B.accumulate(grads["B"])
        return dx
