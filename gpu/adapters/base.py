r"""The torch twin of ``lowrank_ref.adapters.base``: a frozen base plus an update, with an
explicit, exact merge/unmerge and the same checks and messages as the NumPy reference.

The base is a ``torch.nn.Linear`` or a 4-bit :class:`~lowrank_gpu.quant.QuantizedLinear`
(QLoRA's; a DoRA adapter on it is QDoRA). ``W0`` is read through :meth:`AdapterLinear.w0` (the
float weight, or the 4-bit weight dequantised for that call). Merging a float base keeps
``W0``'s bits and writes the merged weight into the base; merging a 4-bit base keeps the merged
weight as a float (non-persistent) buffer beside the untouched storage.

Checks (messages from :mod:`lowrank_ref.nn.checks`, so both backends say the same): the
config's type; the base at construction (type, a real floating non-empty 2-D weight, a bias of
shape ``(out,)``, all finite: a complex, zero-size, 3-D or NaN base is refused here, not later by
a raw torch error); ``x`` in ``forward`` (a real floating tensor, last axis ``in``); merging twice
or unmerging an unmerged layer (``ValueError``).

**Training a merged layer is a** :class:`~lowrank_ref.nn.module.StateError`, as in NumPy, where
``backward`` refuses: while merged, a forward with autograd on and any adapter parameter that
requires grad threads the output through a function whose backward raises. The merged forward
itself works in any mode (to evaluate or compare), and a merged layer whose parameters do not
require grad (or under ``torch.no_grad()``) adds nothing to the graph. Autograd has no
"backward before forward" and checks ``dy``'s shape itself (a ``RuntimeError`` from
``tensor.backward``, before anything is consumed).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lowrank_gpu.nn.checks import check_finite, check_input, check_linear
from lowrank_gpu.quant.linear import QuantizedLinear
from lowrank_ref.nn.checks import state_message
from lowrank_ref.nn.module import StateError

__all__ = ["AdapterLinear", "check_base"]


def check_base(base) -> nn.Linear | QuantizedLinear:
    """``base`` if it is a valid ``torch.nn.Linear`` (:func:`~lowrank_gpu.nn.checks.check_linear`)
    or a 4-bit ``QuantizedLinear``; a ``TypeError``/``ValueError`` naming what is wrong."""
    if isinstance(base, QuantizedLinear):
        if base.bias is not None:
            check_finite("base bias", base.bias)
        return base
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear or a lowrank_gpu.quant.QuantizedLinear, "
                        f"got {type(base).__name__}")
    return check_linear(base, "base")


def _keep_base_on_failure(init):
    """A subclass constructor that raises leaves ``base``'s ``requires_grad`` flags as they were."""

    @functools.wraps(init)
    def wrapped(self, base, *args, **kwargs):
        saved = [(p, p.requires_grad) for p in base.parameters()] if isinstance(base, nn.Module) else []
        try:
            init(self, base, *args, **kwargs)
        except BaseException:
            for p, flag in saved:
                p.requires_grad_(flag)
            raise

    return wrapped


class _RefuseBackward(torch.autograd.Function):
    """Identity forward; a backward that raises: what a merged layer's output goes through while
    its adapter parameters could train (``forward(ctx, owner, y, *params)``)."""

    @staticmethod
    def forward(ctx, owner, y, *params):
        ctx.owner = owner
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        raise StateError(state_message("merged training", ctx.owner))


class AdapterLinear(nn.Module):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _keep_base_on_failure(cls.__dict__["__init__"])

    #: the config class the method takes (LoRAConfig, DoRAConfig, ...); set by each method
    CONFIG: type | None = None

    MERGEABLE: bool = True  # as in lowrank_ref.adapters.base.AdapterLinear
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

    def __init__(self, base: nn.Linear | QuantizedLinear, config):
        super().__init__()
        self.base = check_base(base)
        self.base.requires_grad_(False)
        self.config = self.check_config(config)
        self._w0_backup: torch.Tensor | None = None  # a float base, while merged: W0's own bits
        # a 4-bit base, while merged: the float merged weight, as a non-persistent buffer, so
        # .to(device/dtype) moves it with the layer and state_dict() does not save it
        self.register_buffer("_merged_W", None, persistent=False)
        self._b0_backup: torch.Tensor | None = None  # the base bias, kept while merged

    @property
    def r(self) -> int:
        """The rank of the update (the config's ``r``)."""
        return self.config.r

    @property
    def scaling(self) -> float:
        """``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (the config's)."""
        return self.config.scaling

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # the base weight ----------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether the base weight is stored in 4 bits (a ``QuantizedLinear``)."""
        return isinstance(self.base, QuantizedLinear)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype ``W0`` is computed in: the float base's, or for a 4-bit base the adapter's
        own parameters' (float32 unless cast)."""
        if not self.quantized:
            return self.base.weight.dtype
        return next((p.dtype for p in self._parameters.values() if p is not None), torch.float32)

    def _base_device(self) -> torch.device:
        return self.base.packed.device if self.quantized else self.base.weight.device

    def w0_operand(self):
        """``W0`` as stored: the float weight (its kept bits while merged), or the 4-bit tensor."""
        if self.quantized:
            return self.base.qweight
        return self.base.weight if self._w0_backup is None else self._w0_backup

    def w0(self) -> torch.Tensor:
        """``W0`` (out, in) as a float tensor: the base weight (the kept bits while merged), or the
        4-bit weight dequantised in :attr:`weight_dtype` (rebuilt on each call, never stored)."""
        if self.quantized:
            return self.base.dequantized_weight(self.weight_dtype)
        return self.w0_operand()

    # the update ---------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        self._refuse_if_not_mergeable()
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        self._refuse_if_not_mergeable()
        W0 = self.w0()
        return (W0.double() + self._delta_weight_f64()).to(W0.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        """The bias of the plain Linear that reproduces the adapted layer (``None`` without one):
        the base bias unless the method overrides it (IA³'s output scaling: ``l ⊙ b``)."""
        self._refuse_if_not_mergeable()
        return None if self.base.bias is None else self.base.bias.detach()

    def _delta_weight_f64(self) -> torch.Tensor:
        """``ΔW`` in float64 for merging; LoRA-style methods form ``s B A`` in float64 (from bf16
        factors too), so the merged weight is rounded once, into the base dtype."""
        return self.delta_weight().double()

    # merging ------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._w0_backup is not None or self._merged_W is not None

    @torch.no_grad()
    def merge(self) -> None:
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
            self._w0_backup = self.base.weight.data.clone()
            self.base.weight.data.copy_(W)
        if b is not None:
            self._b0_backup = self.base.bias.data.clone()
            self.base.bias.data.copy_(b)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError(state_message("not merged", type(self).__name__))
        if self.quantized:
            self._merged_W = None
        else:
            self.base.weight.data.copy_(self._w0_backup)
            self._w0_backup = None
        if self._b0_backup is not None:
            self.base.bias.data.copy_(self._b0_backup)
            self._b0_backup = None

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # the computation ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        if self.merged:
            return self._refuse_training(self._merged_forward(x))
        return self._forward(x)

    def _merged_forward(self, x):
        if not self.quantized:
            return self.base(x)
        y = x @ self._merged_W.to(device=x.device, dtype=x.dtype).T
        return y if self.base.bias is None else y + self.base.bias

    def _refuse_training(self, y):
        """``y``, threaded through :class:`_RefuseBackward` when a backward could train the merged
        layer (autograd on, an adapter parameter requiring grad)."""
        if not torch.is_grad_enabled():
            return y
        live = [p for p in self.adapter_parameters().values() if p.requires_grad]
        return _RefuseBackward.apply(type(self).__name__, y, *live) if live else y

    def _forward(self, x):
        raise NotImplementedError

    def adapter_parameters(self) -> dict:
        return dict(self.named_parameters(recurse=False))

    # adapter files (lowrank_ref.io) -----------------------------------------------------
    def adapter_state(self) -> dict:
        """Every tensor an adapter file must hold, by math name (default: the adapter's parameters)."""
        return {n: p.detach() for n, p in self.adapter_parameters().items()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict) -> None:
        """Copy ``state`` (numpy arrays or tensors; the names and shapes of :meth:`adapter_state`)
        into the layer, in each parameter's dtype and device; checks everything first."""
        if self.merged:
            raise ValueError(state_message("merged loading", type(self).__name__))
        own = self.adapter_parameters()
        if set(state) != set(own):
            raise ValueError(f"adapter state names {sorted(state)} do not match {sorted(own)}")
        for n, v in state.items():
            if tuple(v.shape) != tuple(own[n].shape):
                raise ValueError(f"adapter state {n!r} has shape {tuple(v.shape)}, expected {tuple(own[n].shape)}")
        for n, v in state.items():
            p = own[n]
            p.copy_(torch.as_tensor(v).to(device=p.device, dtype=p.dtype))
            p.grad = None
