r"""``inject`` for PyTorch models: the same targets, overrides and result as
:func:`lowrank_ref.inject.inject`, for any ``torch.nn.Module`` whose linear layers are
``torch.nn.Linear`` (a Hugging Face model included: ``targets=("q_proj", "v_proj")``).

Replaced layers keep their device and dtype; every parameter outside the adapters gets
``requires_grad = False``. If anything raises, the model is left as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_ref.inject import (
    TRAINABLE_MODES,
    InjectResult,
    _as_rng,
    _no_match,
    _under,
    layer_configs,
    resolve_spec,
    select_targets,
)
from lowrank_ref.registry import load_object

__all__ = ["inject", "InjectResult", "set_trainable", "adapter_layers", "build_adapters"]


def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    out: dict[str, nn.Linear] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(_under(name, p) for p in inside):
            continue
        if isinstance(mod, AdapterLinear):
            inside.append(name)
        elif isinstance(mod, nn.Linear) and name:
            out[name] = mod
    return out


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every adapter in ``model`` by dotted name (``""`` if ``model`` is itself an adapter)."""
    out: dict[str, AdapterLinear] = {}
    for name, mod in model.named_modules():
        if not any(_under(name, p) for p in out) and isinstance(mod, AdapterLinear):
            out[name] = mod
    return out


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for mod in adapter_layers(model).values():
        base_ids = {id(p) for p in mod.base.parameters()}
        ids.update(id(p) for p in mod.parameters() if id(p) not in base_ids)
    return ids


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


class _Snapshot:
    def __init__(self, model: nn.Module, names):
        self.model = model
        self.modules = {n: model.get_submodule(n) for n in names}
        self.flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.data = [(p, p.detach().clone()) for n in names for p in self.modules[n].parameters()]

    @torch.no_grad()
    def restore(self) -> None:
        for n, mod in self.modules.items():
            if self.model.get_submodule(n) is not mod:
                _set_module(self.model, n, mod)
        for p, flag, grad in self.flags:
            p.requires_grad_(flag)
            p.grad = grad
        for p, copy in self.data:
            p.copy_(copy)


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def inject(model: nn.Module, config=None, targets=("q", "v"), ranks=None, alphas=None, method=None,
           rng=None, **kwargs) -> InjectResult:
    """Replace the matching ``torch.nn.Linear`` layers of ``model`` in place; freeze the rest.

    Arguments as :func:`lowrank_ref.inject.inject`; ``rng`` seeds the adapters' init (an int seed
    or a numpy Generator gives one stream for all layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = resolve_spec(config, method)
    if not spec.is_layer and (ranks or alphas):
        raise ValueError(f"method {spec.name!r} is a whole-model mode: ranks/alphas do not apply")
    if not spec.is_layer:
        load_object(spec.model_fn.torch)(model)
        return InjectResult(spec.name, [], *_count(model))
    linears = _plain_linears(model)
    try:
        names = select_targets(list(linears), targets)
    except ValueError as e:
        done = [n for n in adapter_layers(model) if n]
        if done:  # say why a layer the user can see is not a target
            raise ValueError(f"{e} (already adapted, so not targets: {', '.join(done)})") from None
        raise
    kwargs = dict(kwargs)
    config = spec.coerce_config(config, kwargs)
    cfgs = layer_configs(config, names, ranks, alphas, overridable=spec.overridable)
    cls = load_object(spec.torch)
    build_adapters(model, {n: (cls, cfgs[n]) for n in names}, rng=rng, **kwargs)
    return InjectResult(spec.name, names, *_count(model), cfgs)


def build_adapters(model: nn.Module, plan: dict, rng=None, **kwargs) -> _Snapshot:
    """Replace each ``torch.nn.Linear`` named in ``plan = {name: (AdapterClass, config)}``;
    freeze everything outside the adapters. Restores the model on error; the returned snapshot
    can undo the change later (``.restore()``)."""
    linears = _plain_linears(model)
    for n in plan:
        if n not in linears:
            raise _no_match(n, "layer", list(linears))
    rng = rng if isinstance(rng, torch.Generator) else _as_rng(rng)
    snap = _Snapshot(model, list(plan))
    try:
        new = {}
        for n, (cls, cfg) in plan.items():
            base = linears[n]
            new[n] = cls(base, cfg, rng=rng, **kwargs).to(base.weight.device)
        for n, layer in new.items():
            _set_module(model, n, layer)
        keep = _adapter_param_ids(model)
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
                p.grad = None
    except BaseException:
        snap.restore()
        raise
    return snap


def set_trainable(model: nn.Module, mode: str) -> int:
    """``mode``: ``"all"``, ``"none"``, ``"bias"`` (BitFit) or ``"adapters"``; returns the trainable count."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"mode must be one of {TRAINABLE_MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    keep = _adapter_param_ids(model) if mode == "adapters" else set()
    for name, p in model.named_parameters():
        on = {"all": True, "none": False, "bias": name.rsplit(".", 1)[-1] == "bias",
              "adapters": id(p) in keep}[mode]
        p.requires_grad_(on)
        if not on:
            p.grad = None
    return _count(model)[0]


