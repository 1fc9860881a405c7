r"""Put adapters into a model by target names, with per-layer ranks and alphas.

``inject(model, config, targets=("q", "v"))`` replaces the matching linear layers of ``model``
**in place** with the adapter that ``config`` describes (through the registry, as
:func:`lowrank_ref.adapt` does), freezes every parameter outside the adapters, and returns an
:class:`InjectResult` that says what changed.

Target matching, for a linear layer with dotted name ``N`` (``"blocks.0.attn.q"``):

* a target equal to N's last component matches (``"q"``, ``"fc"``, ``"head"``);
* a glob pattern matches with :func:`fnmatch.fnmatchcase` on the whole name
  (``"blocks.0.attn.*"``, ``"blocks.*.mlp.fc"``);
* ``"all"`` matches every linear layer except the output head (``head`` / ``lm_head``);
* the aliases ``"attn"`` (``q, k, v, o``) and ``"mlp"`` (``fc, proj``) match their members.

A target that matches nothing is an error that lists the linear layers there are. ``ranks`` and
``alphas`` are dicts ``{pattern: value}`` (same matching; a later pattern overrides an earlier
one) that replace ``config.r`` / ``config.alpha`` for the layers they match, the way PEFT's
``rank_pattern`` / ``alpha_pattern`` do. If anything raises, the model is left as it was.

The same call works for PyTorch models (any ``torch.nn.Module`` with ``torch.nn.Linear``
submodules): it is forwarded to :func:`lowrank_gpu.inject.inject`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.nn.linear import Linear
from lowrank_ref.nn.module import Module
from lowrank_ref.registry import MethodSpec, get_method, load_object, method_for_config

__all__ = ["inject", "InjectResult", "set_trainable", "select_targets", "resolve_overrides",
           "layer_configs", "resolve_spec", "build_adapters", "adapter_layers", "TARGET_ALIASES", "HEAD_NAMES", "TRAINABLE_MODES"]

TARGET_ALIASES = {"attn": ("q", "k", "v", "o"), "mlp": ("fc", "proj")}
HEAD_NAMES = ("head", "lm_head")
TRAINABLE_MODES = ("all", "none", "bias", "adapters")


# --- matching (pure functions on names; shared with lowrank_gpu.inject) --------------------
def _matches(name: str, pattern: str) -> bool:
    if pattern == "all":
        return name.rsplit(".", 1)[-1] not in HEAD_NAMES
    if pattern in TARGET_ALIASES:
        return any(_matches(name, p) for p in TARGET_ALIASES[pattern])
    return pattern == name.rsplit(".", 1)[-1] or fnmatch.fnmatchcase(name, pattern)


def _as_patterns(targets, what: str) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    try:
        targets = tuple(targets)
    except TypeError:
        raise TypeError(f"{what} must be a string or a sequence of strings, got {targets!r}") from None
    if not targets:
        raise ValueError(f"{what} is empty: name at least one layer (e.g. 'q', 'attn', 'all')")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"{what} must hold non-empty strings, got {t!r}")
    return targets


def _no_match(pattern: str, what: str, names) -> ValueError:
    listing = ", ".join(names) if names else "(none)"
    return ValueError(f"{what} {pattern!r} matches no linear layer; the linear layers are: {listing}")


def select_targets(names: list[str], targets) -> list[str]:
    """The names (in model order) that any target matches; a target matching none raises."""
    targets = _as_patterns(targets, "targets")
    chosen = set()
    for t in targets:
        hits = [n for n in names if _matches(n, t)]
        if not hits:
            raise _no_match(t, "target", names)
        chosen.update(hits)
    return [n for n in names if n in chosen]


def resolve_overrides(names: list[str], overrides, what: str) -> dict[str, object]:
    """``{name: value}`` from ``{pattern: value}``; later patterns win; an idle pattern raises."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"{what} must be a dict {{pattern: value}}, got {type(overrides).__name__}")
    from lowrank_ref.config import check_alpha, check_rank

    check = {"ranks": check_rank, "alphas": check_alpha}.get(what)
    out: dict[str, object] = {}
    for pattern, value in overrides.items():
        _as_patterns(pattern, f"{what} key")
        if check is not None:
            value = check(value, f"{what}[{pattern!r}]")  # the error names the entry
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise _no_match(pattern, f"{what} pattern", names)
        for n in hits:
            out[n] = value
    return out


def _replace(config, **changes):
    try:
        if hasattr(config, "replace"):
            return config.replace(**changes)
        return dataclasses.replace(config, **changes)
    except TypeError as e:
        if any(k not in {f.name for f in dataclasses.fields(config)} for k in changes):
            raise ValueError(f"{type(config).__name__} has no field {sorted(changes)}: "
                             "per-layer ranks/alphas need a config with r / alpha") from None
        raise e


def layer_configs(config, names: list[str], ranks=None, alphas=None,
                  overridable=("r", "alpha")) -> dict[str, object]:
    """One config per layer: ``config`` with the ``ranks`` / ``alphas`` overrides applied
    (only where the method's ``SPEC.overridable`` lets them change ``r`` / ``alpha``)."""
    for what, given, fld in (("ranks", ranks, "r"), ("alphas", alphas, "alpha")):
        if given and fld not in overridable:
            raise ValueError(f"{what}: {type(config).__name__} has no per-layer {fld!r}; this method's "
                             f"per-layer overrides may change: {', '.join(overridable) or 'nothing'}")
    r_over = resolve_overrides(names, ranks, "ranks")
    a_over = resolve_overrides(names, alphas, "alphas")
    out = {}
    for n in names:
        changes = {}
        if n in r_over:
            changes["r"] = r_over[n]
        if n in a_over:
            changes["alpha"] = a_over[n]
        out[n] = _replace(config, **changes) if changes else config
    return out


def resolve_spec(config, method: str | None) -> MethodSpec:
    """The registry entry for ``method`` (checked against ``config``) or for ``type(config)``."""
    if method is None:
        if config is None:
            raise TypeError("config is None: pass a config (e.g. LoRAConfig(r=8)) or method='full'/'bitfit'")
        return method_for_config(config)
    spec = get_method(method)
    if config is not None and not isinstance(config, type) and not issubclass(spec.config, type(config)):
        raise TypeError(f"config must be a {spec.config.__name__} for method {spec.name!r}, "
                        f"got {type(config).__name__}")
    return spec


# --- the result ----------------------------------------------------------------------------
@dataclass
class InjectResult:
    """What :func:`inject` did.

    Attributes:
        method: the registry name (``"lora"``, ``"qlora"``, ``"full"``, ...).
        replaced: dotted names of the layers that now hold an adapter (model order).
        configs: ``{name: config}``, the config each replaced layer got (after overrides).
        trainable_params: scalars the optimizer will update.
        total_params: every scalar in the model (adapters included).
    """

    method: str
    replaced: list[str]
    trainable_params: int
    total_params: int
    configs: dict = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [f"inject: method={self.method}, {len(self.replaced)} layer(s) adapted; "
                 f"trainable {self.trainable_params:,} of {self.total_params:,} parameters "
                 f"({100 * self.trainable_fraction:.3f}%)"]
        for n in self.replaced:
            lines.append(f"  {n}: {self.configs.get(n)}")
        return "\n".join(lines)


# --- the NumPy models ----------------------------------------------------------------------
def _is_torch_module(model) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _plain_linears(model: Module) -> dict[str, Linear]:
    """Every Linear outside an adapter (an adapter's ``base`` is not a target), by dotted name."""
    out: dict[str, Linear] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(_under(name, p) for p in inside):
            continue
        if isinstance(mod, AdapterLinear):
            inside.append(name)
        elif isinstance(mod, Linear) and name:
            out[name] = mod
    return out


def adapter_layers(model: Module) -> dict[str, AdapterLinear]:
    """Every adapter in ``model`` by dotted name (``""`` if ``model`` is itself an adapter)."""
    out: dict[str, AdapterLinear] = {}
    for name, mod in model.named_modules():
        if not any(_under(name, p) for p in out) and isinstance(mod, AdapterLinear):
            out[name] = mod
    return out


def _under(name: str, prefix: str) -> bool:
    """Is ``name`` strictly inside the module called ``prefix`` (``""`` is the root)?"""
    return prefix == "" or name.startswith(prefix + ".")


def _adapter_param_ids(model: Module) -> set[int]:
    ids: set[int] = set()
    for mod in adapter_layers(model).values():
        base_ids = {id(p) for p in mod.base.parameters().values()}
        ids.update(id(p) for p in mod.parameters().values() if id(p) not in base_ids)
    return ids


class _Snapshot:
    """What inject can change: the modules at the target names, the trainable flags and grads,
    and the target layers' weights (an init such as PiSSA rewrites the base)."""

    def __init__(self, model: Module, names):
        self.model = model
        self.modules = {n: model.get_submodule(n) for n in names}
        self.flags = [(p, p.trainable, p.grad) for p in model.parameters().values()]
        self.data = [(p, p.data, p.data.copy()) for n in names
                     for p in self.modules[n].parameters().values()]

    def restore(self) -> None:
        for n, mod in self.modules.items():
            if self.model.get_submodule(n) is not mod:
                self.model.set_submodule(n, mod)
        for p, trainable, grad in self.flags:
            p.trainable, p.grad = trainable, grad
        for p, ref, copy in self.data:
            if ref.flags.writeable:  # undo in-place edits, keep the array's identity
                ref[...] = copy
            p.data = ref


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (hasattr(rng, "__index__") and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def inject(model, config=None, targets=("q", "v"), ranks=None, alphas=None, method=None, rng=None,
           **kwargs) -> InjectResult:
    """Replace the matching linear layers of ``model`` in place with adapters; freeze the rest.

    Args:
        model: a :class:`lowrank_ref.nn.Module` (or a ``torch.nn.Module``: forwarded to
            :func:`lowrank_gpu.inject.inject`).
        config: the method's config (``LoRAConfig(r=8, alpha=16)``); ``None`` with
            ``method="full"`` or ``"bitfit"`` (whole-model baselines, which replace nothing).
        targets: a name, pattern, alias or ``"all"``, or a sequence of them.
        ranks, alphas: ``{pattern: value}`` per-layer overrides of ``config.r`` / ``config.alpha``.
        method: a registry name, to pick among methods sharing a config class (``"qlora"``).
        rng: ``None``, an int seed, or a ``numpy.random.Generator`` (one stream for all layers).
        **kwargs: extra constructor keywords for the adapter class (e.g. ``blocksize``).
    """
    if _is_torch_module(model):
        from lowrank_gpu.inject import inject as torch_inject

        return torch_inject(model, config, targets=targets, ranks=ranks, alphas=alphas,
                            method=method, rng=rng, **kwargs)
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank_ref.nn.Module or a torch.nn.Module, got {type(model).__name__}")
    spec = resolve_spec(config, method)
    if not spec.is_layer and (ranks or alphas):
        raise ValueError(f"method {spec.name!r} is a whole-model mode: ranks/alphas do not apply")
    if not spec.is_layer:
        load_object(spec.model_fn.numpy)(model)
        return InjectResult(spec.name, [], model.num_trainable_parameters(), model.num_parameters())
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
    cls = load_object(spec.numpy)
    build_adapters(model, {n: (cls, cfgs[n]) for n in names}, rng=rng, **kwargs)
    return InjectResult(spec.name, names, model.num_trainable_parameters(), model.num_parameters(), cfgs)


def build_adapters(model: Module, plan: dict, rng=None, **kwargs) -> _Snapshot:
    """Replace each linear layer ``name`` in ``plan = {name: (AdapterClass, config)}`` by
    ``AdapterClass(layer, config, rng=rng, **kwargs)`` and freeze everything outside the adapters.

    The engine under :func:`inject` (and :func:`lowrank_ref.io.load_adapter`, which names the
    layers exactly). On error the model is restored; on success the returned snapshot can still
    undo the change (``.restore()``), for callers that validate afterwards."""
    linears = _plain_linears(model)
    for n in plan:
        if n not in linears:
            raise _no_match(n, "layer", list(linears))
    rng = _as_rng(rng)
    snap = _Snapshot(model, list(plan))
    try:
        new = {n: cls(linears[n], cfg, rng=rng, **kwargs) for n, (cls, cfg) in plan.items()}
        for n, layer in new.items():
            model.set_submodule(n, layer)
        keep = _adapter_param_ids(model)
        for p in model.parameters().values():
            if id(p) not in keep:
                p.trainable, p.grad = False, None
    except BaseException:
        snap.restore()
        raise
    return snap


def set_trainable(model, mode: str) -> int:
    """Set which parameters train; return how many scalars do.

    ``mode``: ``"all"`` (full fine-tuning), ``"none"``, ``"bias"`` (every parameter whose name
    ends in ``bias``: BitFit), ``"adapters"`` (only the adapters' own tensors).
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"mode must be one of {TRAINABLE_MODES}, got {mode!r}")
    if _is_torch_module(model):
        from lowrank_gpu.inject import set_trainable as torch_set_trainable

        return torch_set_trainable(model, mode)
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank_ref.nn.Module or a torch.nn.Module, got {type(model).__name__}")
    keep = _adapter_param_ids(model) if mode == "adapters" else set()
    for name, p in model.parameters().items():
        on = {"all": True, "none": False, "bias": name.rsplit(".", 1)[-1] == "bias",
              "adapters": id(p) in keep}[mode]
        p.trainable = on
        if not on:
            p.grad = None
    return model.num_trainable_parameters()
