r"""``inject`` for PyTorch models: the same targets, overrides, shared state and result as
:func:`lowrank_ref.inject.inject`, for any ``torch.nn.Module`` whose linear layers are
``torch.nn.Linear`` (a Hugging Face model included: ``targets=("q_proj", "v_proj")``).

The engine is :class:`lowrank_ref.inject.Injector`, written once; this module holds only the
torch operations it runs on (:class:`TorchOps`). Replaced layers keep their device and dtype;
every parameter outside the adapters gets ``requires_grad = False``. If anything raises, the
model is left as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_ref.inject import (
    InjectOps,
    Injector,
    InjectResult,
    Snapshot,
    as_rng,
    check_trainable_mode,
)

__all__ = ["inject", "InjectResult", "set_trainable", "adapter_layers", "build_adapters", "shared_modules",
           "TorchOps", "TORCH"]


class TorchOps(InjectOps):
    """:class:`~lowrank_ref.inject.InjectOps` for ``torch.nn.Module`` models."""

    backend = "torch"
    module_kind = "a torch.nn.Module"
    linear_kind = "a torch.nn.Linear"

    def is_module(self, obj):
        return isinstance(obj, nn.Module)

    def is_linear(self, obj):
        return isinstance(obj, nn.Linear)

    def is_adapter(self, obj):
        return isinstance(obj, AdapterLinear)

    def layer_kind(self, obj):
        return "embeddings" if isinstance(obj, nn.Embedding) else "norms" if isinstance(obj, nn.LayerNorm) else None

    def named_modules(self, model):
        return model.named_modules()

    def get(self, model, name):
        return model.get_submodule(name)

    def set(self, model, name, module):
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)

    def child(self, parent, attr):
        return dict(parent.named_children()).get(attr)

    def children(self, parent):
        return [n for n, _ in parent.named_children()]

    def add_child(self, parent, attr, module):
        parent.add_module(attr, module)

    def remove_child(self, parent, attr):
        delattr(parent, attr)

    def new_container(self):
        return nn.Module()

    def named_parameters(self, module):
        return list(module.named_parameters())  # torch lists a parameter held twice once

    def trainable(self, p):
        return p.requires_grad

    def set_trainable(self, p, on):
        p.requires_grad_(bool(on))
        if not on:
            p.grad = None

    def numel(self, p):
        return p.numel()

    def save_flags(self, p):
        return p.requires_grad, p.grad

    def restore_flags(self, p, saved):
        p.requires_grad_(saved[0])
        p.grad = saved[1]

    def save_data(self, p):
        return p.detach().clone()

    @torch.no_grad()
    def restore_data(self, p, saved):
        p.copy_(saved)

    def shape(self, linear):
        return linear.out_features, linear.in_features

    def place(self, layer, base):
        return layer.to(base.weight.device)

    def quantize(self, linear, quant):
        from lowrank_gpu.quant.linear import QuantizedLinear

        q = QuantizedLinear.from_linear(linear, quant.blocksize, quant.double_quant, quant.quant_type)
        if linear.bias is not None:  # the bias stays float in its own dtype (from_linear keeps float32, QLoRA's)
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def compute_like(self, layer, linear):
        return layer.to(dtype=linear.weight.dtype)  # the 4-bit buffers keep their bytes under .to(dtype)

    def like(self, module, base):
        W = base.weight
        return module.to(device=W.device, dtype=W.dtype) if W.is_floating_point() else module.to(W.device)

    def rng(self, rng):
        return rng if isinstance(rng, torch.Generator) else as_rng(rng)

    def state(self, module):
        if hasattr(module, "adapter_state"):
            return module.adapter_state()
        return {n: t.detach() for n, t in module.state_dict().items()}

    @torch.no_grad()
    def load_state(self, module, state):
        if hasattr(module, "load_adapter_state"):
            return module.load_adapter_state(state)
        module.load_state_dict({n: torch.as_tensor(v) for n, v in state.items()}, strict=True)

    def state_shape(self, value):
        return tuple(int(d) for d in value.shape)


TORCH = Injector(TorchOps())


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def inject(model: nn.Module, config=None, targets=("q", "v"), ranks=None, alphas=None, method=None,
           rng=None, overrides=None, train_also=None, quantize=None, **kwargs) -> InjectResult:
    """Replace the matching ``torch.nn.Linear`` layers of ``model`` in place; freeze the rest.

    Arguments as :func:`lowrank_ref.inject.inject`; ``rng`` seeds the adapters' init (an int seed
    or a numpy Generator gives one stream for all layers; a ``torch.Generator`` is used as is);
    ``quantize="nf4"`` stores the targeted layers' bases in 4 bits
    (:class:`lowrank_gpu.quant.QuantizedLinear`) before the adapters wrap them."""
    _check_model(model)
    return TORCH.inject(model, config, targets=targets, ranks=ranks, alphas=alphas, method=method,
                        rng=rng, overrides=overrides, train_also=train_also, quantize=quantize, **kwargs)


def build_adapters(model: nn.Module, plan: dict, rng=None, quantize=None, **kwargs) -> Snapshot:
    """Replace each ``torch.nn.Linear`` named in ``plan = {name: (spec_or_class, config)}``;
    freeze everything outside the adapters (:meth:`lowrank_ref.inject.Injector.build_adapters`;
    ``quantize``: a :class:`lowrank_ref.inject.BaseQuant` for a 4-bit base)."""
    _check_model(model)
    return TORCH.build_adapters(model, plan, rng=rng, quantize=quantize, **kwargs)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every adapter in ``model`` by dotted name (``""`` if ``model`` is itself an adapter)."""
    return TORCH.adapter_layers(model)


def shared_modules(model: nn.Module) -> dict:
    """``{method name: module}``: the shared state ``model`` holds (``model.lowrank_shared``)."""
    return TORCH.shared_modules(model)


def set_trainable(model: nn.Module, mode: str) -> int:
    """``mode``: ``"all"``, ``"none"``, ``"bias"`` (BitFit) or ``"adapters"``; returns the trainable count."""
    check_trainable_mode(mode)
    _check_model(model)
    return TORCH.set_trainable(model, mode)
