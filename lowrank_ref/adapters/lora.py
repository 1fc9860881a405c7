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

from dataclasses import dataclass

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import ScaledLowRankConfig, scaling_metadata
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.quant.linear import weight_array
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping

__all__ = ["LoRAConfig", "LoRALinear", "lora_forward", "lora_backward", "init_lora_A", "SPEC"]

LORA_INITS = ("kaiming", "gaussian", "pissa")


@dataclass(frozen=True)
class LoRAConfig(ScaledLowRankConfig):
    r"""LoRA (Hu et al. 2021): ``ΔW = s · B A`` with ``A (r, in)``, ``B (out, r)``.

    Args:
        r: the rank, a positive integer. ``ΔW = s B A`` has rank at most ``min(r, in, out)``: an
            ``r`` above ``min(in, out)`` is allowed (as in PEFT) but only adds parameters.
        alpha: the numerator of the scaling ``s``; ``s = alpha / r`` (the paper, §4.1), or
            ``alpha / sqrt(r)`` with ``rslora=True`` (Kalajdzievski 2023).
        dropout: inverted dropout on the LoRA branch's input only, in [0, 1).
        rslora: use the rank-stabilised scaling.
        init: ``"kaiming"`` (A Kaiming-uniform, B = 0: the reference code's default, loralib and
            PEFT), ``"gaussian"`` (A ~ N(0, 1/r²), B = 0: PEFT's reading of the paper's "random
            Gaussian initialization", §4.1), or ``"pissa"`` (principal singular vectors of W0 in
            A and B, the residual in the base; Meng et al. 2024).
    """

    init: str = "kaiming"

    INITS = LORA_INITS


def lora_forward(x, params, cfg: LoRAConfig, mask=None):
    r"""y = x W0ᵀ + b + s (x̃ Aᵀ) Bᵀ.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "B": (out, r)}``; ``W0``
            may be a 4-bit tensor (a ``Quant4Tensor``: QLoRA), dequantised here for this call
            and again in the backward, so the cache holds the 4-bit tensor, not a float copy.
        cfg: gives ``s`` (``cfg.scaling``).
        mask: the inverted-dropout mask shaped like ``x`` (already divided by ``1-p``), or None.
    Returns:
        ``(y (..., out), cache)``.
    """
    Wq, b, A, B = params["W"], params["b"], params["A"], params["B"]
    W = weight_array(Wq, x.dtype)  # W0, or W̃0 rebuilt from 4 bits (transient)
    s = cfg.scaling
    lead = x.shape[:-1]
    # Every product on 2-D rows (N, in): NumPy's stacked matmul of (B, T, in) with a transposed
    # 2-D view does not reach BLAS and is several times slower.
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    xd = x2 if mask is None else x2 * mask.reshape(x2.shape)  # x̃ = x ⊙ M
    h = xd @ A.T  # (N, r)
    y = x2 @ W.T  # (N, out)
    del W  # a dequantised W̃0 is freed here, before the adapter branch
    if b is not None:
        y += b  # in place: no second (N, out) array
    y += (s * h) @ B.T  # + s x̃ Aᵀ Bᵀ, scaled on the small (N, r) side
    return y.reshape(*lead, y.shape[-1]), (x2, xd, h, Wq, A, B, s, mask, lead)


def lora_backward(dy, cache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``B`` arrays, ``W`` and ``b`` None (frozen)."""
    x2, xd, h, Wq, A, B, s, mask, lead = cache
    W = weight_array(Wq, dy.dtype)  # W̃0 is rebuilt again for x̄ (4-bit base)
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
        base: the pretrained layer (frozen by this constructor): a float ``Linear``, or a 4-bit
            :class:`~lowrank_ref.quant.QuantizedLinear` (that is QLoRA; ``A`` and ``B`` are then
            float32, the compute dtype).
        config: a :class:`~lowrank_ref.config.LoRAConfig`.
        rng: a ``numpy.random.Generator`` for the init and the dropout masks.
    """

    CONFIG = LoRAConfig

    def __init__(self, base, config: LoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)  # None / int seed
        self.rng = rng
        r, dtype = config.r, self.weight_dtype
        if config.init == "pissa" and self.quantized:
            raise ValueError("LoRA on a quantised base supports init 'kaiming' or 'gaussian'; PiSSA on a "
                             "quantised base needs its residual quantised after the split (not provided)")
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
        return {"W": self.w0_operand(), "b": b, "A": self.A.data, "B": self.B.data}

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


# --- PEFT's LoRA folders (adapter_config.json; peft.tuners.lora.LoraConfig's field names) ---------
# PEFT's defaults where a field is absent: r = 8, lora_alpha = 8, lora_dropout = 0, use_rslora False.
PEFT_OPTIONS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "init_lora_weights", "use_dora", "rank_pattern",
                "alpha_pattern", "fan_in_fan_out", "bias", "lora_bias", "use_qalora", "qalora_group_size",
                "megatron_core")


def lora_to_peft(configs: dict) -> dict:
    """The LoRA fields of ``adapter_config.json`` for layers ``{path: LoRAConfig}``: the most
    common ``r`` and ``alpha``, the other layers' in ``rank_pattern`` / ``alpha_pattern``."""
    from lowrank_ref.io import peft_default_and_pattern, peft_uniform

    init = peft_uniform(configs, "init")
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"init={init!r} has no PEFT folder here (PEFT's own {init} init rewrites the base "
                         "weight); supported: 'kaiming', 'gaussian'")
    r, rank_pattern = peft_default_and_pattern(configs, "r")
    alpha, alpha_pattern = peft_default_and_pattern(configs, "alpha")
    return {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "use_rslora": peft_uniform(configs, "rslora"), "lora_dropout": peft_uniform(configs, "dropout"),
            "init_lora_weights": True if init == "kaiming" else "gaussian", "use_dora": False,
            "bias": "none", "fan_in_fan_out": False}


def lora_from_peft(c: dict, path: str, config_class=LoRAConfig, **extra):
    """The config of layer ``path`` from PEFT's LoRA fields ``c`` (``fan_in_fan_out`` changes
    nothing here: PEFT keeps ``lora_A`` (r, in) and ``lora_B`` (out, r) either way, and every
    layer here is a ``(out, in)`` linear layer, for which PEFT turns the flag off itself)."""
    from lowrank_ref.io import peft_pattern

    if c.get("bias", "none") != "none":
        raise ValueError(f"bias={c['bias']!r} is not supported (the base biases stay frozen); supported: 'none'")
    for flag in ("lora_bias", "use_qalora", "use_dora", "use_rslora", "fan_in_fan_out"):
        if not isinstance(c.get(flag, False), bool):
            raise ValueError(f"{flag} must be true or false, got {c[flag]!r}")
    for flag in ("lora_bias", "use_qalora"):
        if c.get(flag):
            raise ValueError(f"{flag}=true is not supported; supported: false")
    init = c.get("init_lora_weights", True)
    if not isinstance(init, bool) and init != "gaussian":
        raise ValueError(f"init_lora_weights={init!r} is not supported; supported: true, false, 'gaussian'")
    return config_class(r=peft_pattern(c.get("rank_pattern"), path, c.get("r", 8), "rank_pattern"),
                        alpha=peft_pattern(c.get("alpha_pattern"), path, c.get("lora_alpha", 8), "alpha_pattern"),
                        dropout=c.get("lora_dropout", 0.0), rslora=c.get("use_rslora", False),
                        init="gaussian" if init == "gaussian" else "kaiming", **extra)


def lora_shapes(cfg, in_features: int, out_features: int) -> dict:
    """A (r, in), B (out, r): what a LoRA layer's file holds."""
    return {"A": (cfg.r, in_features), "B": (out_features, cfg.r)}


SPEC = MethodSpec(
    name="lora",
    config=LoRAConfig,
    numpy="lowrank_ref.adapters.lora:LoRALinear",
    torch="lowrank_gpu.adapters.lora:LoRALinear",
    description="LoRA, Hu et al. 2021: ΔW = (α/r) B A",
    overridable=("r", "alpha"),
    file_metadata=scaling_metadata,
    shapes=lora_shapes,
    peft=PeftMapping("LORA", {"A": "lora_A.weight", "B": "lora_B.weight"},
                     to_peft=lora_to_peft, from_peft=lora_from_peft, options=PEFT_OPTIONS,
                     claims=lambda c: not c.get("use_dora", False)),
    example=lambda: Example(6, 5, LoRAConfig(r=3, alpha=6.0)),
    compare={
        "lora": CompareRow(LoRAConfig(r=8, alpha=16), targets=("q", "v"), lr=1e-2, order=20),
        # LoRA on every linear layer but the head (chapter 02 §10: more layers, same rank)
        "lora_all": CompareRow(LoRAConfig(r=8, alpha=16), targets="all", lr=1e-2, order=21),
        # the multi-task baselines (chapter 08): one LoRA for all four dialects, one LoRA per dialect
        "lora_shared": CompareRow(LoRAConfig(r=8, alpha=16), targets=("q", "v"), lr=1e-2, order=80,
                                  task="multitask"),
        "lora_per_task": CompareRow(LoRAConfig(r=8, alpha=16), targets=("q", "v"), lr=1e-2, order=81,
                                    task="multitask_per_task"),
    },
)
