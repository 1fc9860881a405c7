r"""The torch twin of ``lowrank_ref.adapters.base``: a frozen ``torch.nn.Linear`` plus an update,
with an explicit, exact merge/unmerge (``W0``'s bits are kept while merged)."""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["AdapterLinear", "check_base"]


def check_base(base) -> nn.Linear:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
    if not torch.isfinite(base.weight).all():
        raise ValueError("base weight must be finite; it holds NaN or inf")
    if base.bias is not None and not torch.isfinite(base.bias).all():
        raise ValueError("base bias must be finite; it holds NaN or inf")
    return base


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


class AdapterLinear(nn.Module):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _keep_base_on_failure(cls.__dict__["__init__"])

    #: the config class the method takes (LoRAConfig, DoRAConfig, ...); set by each method
    CONFIG: type | None = None

    @classmethod
    def check_config(cls, config):
        """``config``, or the method's default config for ``None``; a ``TypeError`` for another kind."""
        if config is None:
            return cls.CONFIG()
        if not isinstance(config, cls.CONFIG):
            raise TypeError(f"config must be a {cls.CONFIG.__name__}, got {type(config).__name__}")
        return config

    def __init__(self, base: nn.Linear, config):
        super().__init__()
        self.base = check_base(base)
        self.base.requires_grad_(False)
        self.config = self.check_config(config)
        self._w0_backup: torch.Tensor | None = None
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

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        W0 = self.base.weight
        return (W0.double() + self._delta_weight_f64()).to(W0.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        """The bias of the plain Linear that reproduces the adapted layer (``None`` without one):
        the base bias unless the method overrides it (IA³'s output scaling: ``l ⊙ b``)."""
        return None if self.base.bias is None else self.base.bias.detach()

    def _delta_weight_f64(self) -> torch.Tensor:
        """``ΔW`` in float64 for merging; LoRA-style methods form ``s B A`` in float64 (from bf16
        factors too), so the merged weight is rounded once, into the base dtype."""
        return self.delta_weight().double()

    @property
    def merged(self) -> bool:
        return self._w0_backup is not None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError(f"{type(self).__name__} is already merged; call unmerge() first")
        W = self.merged_weight()
        if not torch.isfinite(W).all():
            raise ValueError("merged weight must be finite; it holds NaN or inf")
        b = None if self.base.bias is None else self.merged_bias()
        if b is not None and not torch.isfinite(b).all():
            raise ValueError("merged bias must be finite; it holds NaN or inf")
        self._w0_backup = self.base.weight.data.clone()
        self.base.weight.data.copy_(W)
        if b is not None:
            self._b0_backup = self.base.bias.data.clone()
            self.base.bias.data.copy_(b)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError(f"{type(self).__name__} is not merged; there is nothing to unmerge")
        self.base.weight.data.copy_(self._w0_backup)
        self._w0_backup = None
        if self._b0_backup is not None:
            self.base.bias.data.copy_(self._b0_backup)
            self._b0_backup = None

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), got shape {tuple(x.shape)}")
        if self.merged:
            return self.base(x)
        return self._forward(x)

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
            raise ValueError(f"{type(self).__name__} is merged: unmerge() before loading adapter weights")
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
