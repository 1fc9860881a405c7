r"""What every adapted linear layer shares: a frozen base, an explicit merge, a checked input.

An adapter wraps a frozen :class:`~lowrank_ref.nn.Linear` (``W0 (out, in)``, ``b (out,)``) and
adds a learned update. Subclasses give ``delta_weight()`` (or override ``merged_weight()`` when the
merged weight is not ``W0 + ΔW``, as in DoRA, and ``merged_bias()`` when merging changes the
bias, as in IA³) and the unmerged ``_forward``/``_backward``.

Merging is an explicit call, never a side effect of ``eval()``. ``merge()`` keeps the exact bits of
``W0`` and ``unmerge()`` puts them back, so any number of cycles returns ``W0`` bit for bit
(subtracting ``ΔW`` again would drift by a rounding error per cycle). The price: one copy of ``W0``
while merged. While merged the layer is for inference: ``backward`` refuses, so nothing trains a
weight that the next ``unmerge()`` would throw away.

**The base.** Either a float :class:`~lowrank_ref.nn.Linear` or a frozen 4-bit
:class:`~lowrank_ref.quant.QuantizedLinear` (QLoRA's base; a DoRA adapter on it is QDoRA). Every
method reads ``W0`` through one accessor, :meth:`AdapterLinear.w0` (the float weight, or the 4-bit
weight dequantised for that call), and hands its pure functions :meth:`AdapterLinear.w0_operand`
(the float array, or the 4-bit tensor itself, which they dequantise per pass with
:func:`~lowrank_ref.quant.linear.weight_array`, so a cache never holds a float copy). Merging
into a 4-bit base keeps the merged weight as a float array beside the untouched 4-bit storage;
``unmerge()`` drops it, so the storage is bit for bit what it was. The compute dtype of a 4-bit
base is the adapter's own parameters' dtype (float32; ``astype(np.float64)`` for gradcheck).

**What is checked, once for every method** (messages from :mod:`lowrank_ref.nn.checks`, the
same in the torch mirror): the config's type; the base (type, a real floating non-empty 2-D
weight, a bias of shape ``(out,)``, all finite); ``x`` (real floating, last axis ``in``);
``dy`` (the forward output's shape, before the cache is used, so a bad call leaves it usable);
the state: merging twice or unmerging an unmerged layer is a ``ValueError``, ``backward`` while
merged or before ``forward`` is a :class:`~lowrank_ref.nn.module.StateError` (a ``ValueError``).
"""

from __future__ import annotations

import functools

import numpy as np

from lowrank_ref.nn.checks import state_message
from lowrank_ref.nn.linear import Linear, check_dy, check_last_dim, check_linear, linear_forward
from lowrank_ref.nn.module import Module, StateError, check_finite
from lowrank_ref.quant.linear import QuantizedLinear, weight_array

__all__ = ["AdapterLinear", "check_base"]


def check_base(base) -> Linear | QuantizedLinear:
    """``base`` if it is a valid float ``Linear`` (:func:`~lowrank_ref.nn.linear.check_linear`)
    or a 4-bit ``QuantizedLinear``; a ``TypeError``/``ValueError`` naming what is wrong."""
    if isinstance(base, QuantizedLinear):
        if base.bias is not None:
            check_finite("base bias", base.bias.data)
        return base
    if not isinstance(base, Linear):
        raise TypeError(f"base must be a lowrank_ref.nn.Linear or a lowrank_ref.quant.QuantizedLinear, "
                        f"got {type(base).__name__}")
    return check_linear(base, "base")


def _keep_base_on_failure(init):
    """Wrap a subclass's ``__init__`` so that a constructor that raises leaves ``base`` as it was:
    its parameters' ``trainable`` flags and ``data`` arrays (a PiSSA init replaces ``W0``)."""

    @functools.wraps(init)
    def wrapped(self, base, *args, **kwargs):
        saved = [(p, p.trainable, p.data) for p in base.parameters().values()] if isinstance(base, Module) else []
        try:
            init(self, base, *args, **kwargs)
        except BaseException:
            for p, trainable, data in saved:
                p.trainable, p.data = trainable, data
            raise

    return wrapped


class AdapterLinear(Module):
    """Base class of the adapted linear layers (LoRA, DoRA, ...)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _keep_base_on_failure(cls.__dict__["__init__"])

    #: the config class the method takes (LoRAConfig, DoRAConfig, ...); set by each method
    CONFIG: type | None = None
    #: ``False`` for a layer no plain Linear computes (a non-linearity inside, as in Houlsby
    #: adapters): ``merge()``, ``delta_weight()``, ``merged_weight()`` and ``merged_bias()``
    #: refuse with a ``ValueError`` that gives :attr:`NOT_MERGEABLE_WHY`. Equals ``SPEC.mergeable``.
    MERGEABLE: bool = True
    NOT_MERGEABLE_WHY: str = ""

    def _refuse_if_not_mergeable(self) -> None:
        if not self.MERGEABLE:
            raise ValueError(f"{state_message('not mergeable', type(self).__name__)}: {self.NOT_MERGEABLE_WHY}")

    @classmethod
    def check_config(cls, config):
        """``config``, or the method's default config for ``None``; a ``TypeError`` for another kind."""
        if config is None:
            return cls.CONFIG()
        if not isinstance(config, cls.CONFIG):
            raise TypeError(f"config must be a {cls.CONFIG.__name__}, got {type(config).__name__}")
        return config

    def __init__(self, base: Linear | QuantizedLinear, config):
        super().__init__()
        self.base = check_base(base)
        base.requires_grad_(False)  # the pretrained weights are frozen
        self.config = self.check_config(config)
        self._w0_backup: np.ndarray | None = None  # a float base, while merged: W0's own bits
        self._merged_W: np.ndarray | None = None  # a 4-bit base, while merged: the float merged weight
        self._b0_backup: np.ndarray | None = None  # the base bias, kept while merged

    # the base weight ----------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether the base weight is stored in 4 bits (a ``QuantizedLinear``)."""
        return isinstance(self.base, QuantizedLinear)

    @property
    def weight_dtype(self):
        """The dtype ``W0`` is computed in: the float base's, or for a 4-bit base the adapter's
        own parameters' (float32 unless cast)."""
        if not self.quantized:
            return self.base.weight.data.dtype
        return next((p.data.dtype for p in self._params.values()), np.dtype(np.float32))

    def w0_operand(self):
        """``W0`` as the pure functions take it: the float array (its kept bits while merged),
        or the 4-bit tensor, which they dequantise per pass."""
        if self.quantized:
            return self.base.qweight
        return self.base.weight.data if self._w0_backup is None else self._w0_backup

    def w0(self) -> np.ndarray:
        """``W0`` (out, in) as a float array: the base weight (the kept bits while merged), or the
        4-bit weight dequantised in :attr:`weight_dtype` (rebuilt on each call, never stored)."""
        return weight_array(self.w0_operand(), self.weight_dtype)

    @property
    def r(self) -> int:
        """The rank of the update (the config's ``r``)."""
        return self.config.r

    @property
    def scaling(self) -> float:
        """``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (the config's)."""
        return self.config.scaling

    # shapes -------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # the update ---------------------------------------------------------------------------
    def delta_weight(self) -> np.ndarray:
        """The dense update ``ΔW`` (out, in) that merging adds to ``W0``."""
        self._refuse_if_not_mergeable()
        raise NotImplementedError

    def merged_weight(self) -> np.ndarray:
        """The weight that reproduces the adapted layer as a plain Linear: ``W0 + ΔW``.

        Summed in float64, rounded once to the base dtype."""
        self._refuse_if_not_mergeable()
        W0 = self.w0()
        return (W0.astype(np.float64) + self._delta_weight_f64()).astype(W0.dtype)

    def merged_bias(self) -> np.ndarray | None:
        """The bias of the plain Linear that reproduces the adapted layer (``None`` without one).

        Default: the base bias itself; a method whose update also changes the bias (IA³'s output
        scaling, ``l ⊙ b``) overrides it. ``merge()`` installs it, ``unmerge()`` restores ``b``."""
        self._refuse_if_not_mergeable()
        return None if self.base.bias is None else self.base.bias.data

    def _delta_weight_f64(self) -> np.ndarray:
        """``ΔW`` in float64 for merging. Methods whose factors are in a low precision override it
        to form the product in float64, so the merged weight is rounded once, not twice."""
        return self.delta_weight().astype(np.float64)

    # merging ------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._w0_backup is not None or self._merged_W is not None

    def merge(self) -> None:
        """Fold the update into the base weight: afterwards ``forward`` is one plain matmul.

        A float base keeps ``W0``'s bits aside and takes the merged weight; a 4-bit base is left
        as it is and the merged weight is kept as a float array beside it (4 bytes per weight
        while merged; re-quantising it is :func:`lowrank_ref.adapters.qlora.requantize_merged`).
        A non-mergeable layer (``MERGEABLE = False``) refuses with a ``ValueError``, unchanged."""
        self._refuse_if_not_mergeable()
        if self.merged:
            raise ValueError(state_message("already merged", type(self).__name__))
        W = self.merged_weight()
        check_finite("merged weight", W)
        b = None if self.base.bias is None else self.merged_bias()
        if b is not None:
            check_finite("merged bias", b)
        if self.quantized:
            self._merged_W = W
        else:
            self._w0_backup = self.base.weight.data
            self.base.weight.data = W
        if b is not None:
            self._b0_backup = self.base.bias.data
            self.base.bias.data = b

    def unmerge(self) -> None:
        """Restore ``W0`` (and ``b``) exactly (the bits kept at ``merge()``; a 4-bit base's storage
        was never changed)."""
        if not self.merged:
            raise ValueError(state_message("not merged", type(self).__name__))
        if self.quantized:
            self._merged_W = None
        else:
            self.base.weight.data = self._w0_backup
            self._w0_backup = None
        if self._b0_backup is not None:
            self.base.bias.data = self._b0_backup
            self._b0_backup = None

    # the computation ----------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_last_dim(x, self.in_features)
        self._out_shape = x.shape[:-1] + (self.out_features,)  # what backward's dy must match
        if self.merged:
            self._cache = ("merged",)
            b = None if self.base.bias is None else self.base.bias.data
            W = self._merged_W.astype(x.dtype, copy=False) if self.quantized else self.base.weight.data
            return linear_forward(x, W, b)
        return self._forward(x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._cache is not None:
            check_dy(dy, self._out_shape, type(self).__name__)
        if self.merged:
            self._pop_cache()
            raise StateError(state_message("merged training", type(self).__name__))
        return self._backward(dy)

    def _forward(self, x):
        raise NotImplementedError

    def _backward(self, dy):
        raise NotImplementedError

    def adapter_parameters(self) -> dict:
        """The method's own tensors by name (``{"A": ..., "B": ...}``): what an adapter file holds."""
        return {n: p for n, p in self._params.items()}

    # adapter files (lowrank_ref.io) -----------------------------------------------------
    def adapter_state(self) -> dict:
        """Every tensor an adapter file must hold to rebuild this layer, by math name.

        Default: the arrays of :meth:`adapter_parameters`. A method with tensors that are not
        parameters but are not recomputable from the base (VeRA's frozen random projections)
        overrides this and :meth:`load_adapter_state`."""
        return {n: p.data for n, p in self.adapter_parameters().items()}

    def load_adapter_state(self, state: dict) -> None:
        """Copy ``state`` (the names and shapes of :meth:`adapter_state`) into the layer, cast to
        each tensor's dtype; every name and shape is checked before anything changes."""
        if self.merged:
            raise ValueError(state_message("merged loading", type(self).__name__))
        own = self.adapter_parameters()
        if set(state) != set(own):
            raise ValueError(f"adapter state names {sorted(state)} do not match {sorted(own)}")
        for n, v in state.items():
            if np.shape(v) != own[n].shape:
                raise ValueError(f"adapter state {n!r} has shape {np.shape(v)}, expected {own[n].shape}")
        for n, v in state.items():
            own[n].data = np.array(v, dtype=own[n].data.dtype)  # a copy, in this layer's dtype
            own[n].grad = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config}, merged={self.merged}"
