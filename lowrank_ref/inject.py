r"""Put adapters into a model by target names, with per-layer overrides and shared state.

``inject(model, config, targets=("q", "v"))`` replaces the matching linear layers of ``model``
**in place** with the adapter that ``config`` describes (the method is found through the
registry, from ``type(config)`` or ``method=``), freezes every parameter outside the adapters,
and returns an :class:`InjectResult` that says what changed.

Target matching, for a linear layer with dotted name ``N`` (``"blocks.0.attn.q"``):

* a target equal to N's last component matches (``"q"``, ``"fc"``, ``"head"``);
* a glob pattern matches with :func:`fnmatch.fnmatchcase` on the whole name
  (``"blocks.0.attn.*"``, ``"blocks.*.mlp.fc"``);
* ``"all"`` matches every linear layer except the output head (``head`` / ``lm_head``);
* the aliases ``"attn"`` (``q, k, v, o``) and ``"mlp"`` (``fc, proj``) match their members.

A target that matches nothing is an error that lists the linear layers there are.

**Training more than the adapters.** ``train_also=`` keeps other parameters trainable next to the
adapters: ``"embeddings"`` (the token and position tables), ``"norms"`` (every LayerNorm's ``γ``
and ``β``), or a glob over parameter names (``"ln_f.*"``). LongLoRA's "LoRA+" is LoRA with
``train_also=("embeddings", "norms")`` (its code selects the parameters whose names contain
"embed" or "norm", REFERENCES §11); Houlsby et al. train the layer norms next to their adapters.
A selector that matches nothing is an error. Adapter files hold the adapters only: the extra
tensors go in a file of their own (``lowrank-ref compare`` writes ``<name>.extra.safetensors``
beside the adapter, as LongLoRA keeps ``trainable_params.bin``).

**Per-layer overrides.** ``overrides={field: {pattern: value}}`` gives the layers that
``pattern`` matches (same matching; a later pattern wins) a config with ``field = value``, the
way PEFT's ``rank_pattern`` / ``alpha_pattern`` do. Only the fields in the method's
``SPEC.overridable`` may change; ``ranks=`` and ``alphas=`` are shorthands for the fields ``r``
and ``alpha``.

**Shared state.** A method whose ``SPEC.shared`` names a builder (VeRA's projections, a
hypernetwork) gets one module per model, built once per inject from the layers' configs and
shapes, attached to the model as ``model.lowrank_shared.<method>`` (so ``parameters()`` lists
its tensors once and the optimizer sees them once), and handed to every layer's constructor as
``shared=`` (a :class:`SharedRef`).

**A 4-bit base for any layer method.** ``quantize="nf4"`` (or ``"fp4"``, ``"int4"``) stores each
targeted layer's base weight in 4 bits before the adapter wraps it: the float ``Linear`` is
replaced by a frozen :class:`~lowrank_ref.quant.QuantizedLinear` (the one quantiser QLoRA uses,
``QuantizedLinear.from_linear``; ``blocksize`` (64) values per absmax block, ``double_quant``
(True) for the block scales), and the adapter is the method's own layer on it, reading
``W̃0 = dequant(Q(W0))`` through its ``w0()`` accessor. ``inject(model, DoRAConfig(...),
quantize="nf4")`` is QDoRA, ``AdaLoRAConfig`` gives AdaLoRA on an NF4 base; only the adapter
trains, and ``merge()`` keeps ``W̃0 + ΔW`` as a float weight beside the untouched 4-bit storage,
as QLoRA's layer does. Layers that are not targets stay float. Whole-model modes (no adapter
layer) and methods that quantise their base themselves (``qlora``, ``lora_int4``: the storage is
in their config) refuse ``quantize=`` with a ``ValueError``.

If anything raises, the model is left as it was: layers, trainable flags, weights, shared state.

**One engine, two backends.** :class:`Injector` holds all of the above once; it reaches the
model only through a small :class:`InjectOps` object per backend (list modules, get/set a
submodule, parameters and their trainable flags, snapshot values, move a layer). This module
holds the NumPy ops; :mod:`lowrank_gpu.inject` holds the torch ops, and the functions here
forward a ``torch.nn.Module`` there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.nn.linear import Linear
from lowrank_ref.nn.module import Module, array_module, as_rng
from lowrank_ref.registry import MethodSpec, get_method, load_object, method_for_config, methods

__all__ = ["inject", "InjectResult", "set_trainable", "select_targets", "resolve_overrides",
           "layer_configs", "per_layer_overrides", "resolve_spec", "build_adapters", "adapter_layers",
           "shared_modules", "shared_state", "check_shared_state", "load_shared_state",
           "Injector", "InjectOps", "NumpyOps", "NUMPY", "Snapshot", "SharedRef", "as_rng", "no_match_error",
           "check_trainable_mode", "SHARED_ATTR", "TARGET_ALIASES", "HEAD_NAMES", "TRAINABLE_MODES",
           "TRAIN_ALSO_ALIASES", "BaseQuant", "base_quant", "QUANTIZE_TYPES", "quantizes_itself"]

TARGET_ALIASES = {"attn": ("q", "k", "v", "o"), "mlp": ("fc", "proj")}
HEAD_NAMES = ("head", "lm_head")
TRAINABLE_MODES = ("all", "none", "bias", "adapters")
TRAIN_ALSO_ALIASES = ("embeddings", "norms")  # train_also=: the modules' kinds (InjectOps.layer_kind)
#: the attribute of a model that holds the shared-state modules, one per method: ``model.lowrank_shared.<method>``
SHARED_ATTR = "lowrank_shared"
_SHORTHANDS = (("ranks", "r"), ("alphas", "alpha"))  # inject(ranks=...) sets the field r, alphas= alpha
QUANTIZE_TYPES = ("nf4", "fp4", "int4")  # inject(quantize=...): the 4-bit data types of lowrank_ref.quant
_STORAGE_FIELDS = ("blocksize", "double_quant", "quant_type")  # a config that has them stores its own base


# --- a 4-bit base for the targeted layers (inject(quantize=...)) ---------------------------
@dataclass(frozen=True)
class BaseQuant:
    """How ``inject(quantize=...)`` stores the targeted layers' base weights.

    Attributes:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat), ``"fp4"`` or ``"int4"``.
        blocksize: values per absmax block (64, QLoRA's).
        double_quant: quantise the block scales again (QLoRA §3; 4.127 bits per weight at 64).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        from lowrank_ref.config import check_bool
        from lowrank_ref.quant.blockwise import check_blocksize

        if not isinstance(self.quant_type, str):
            raise TypeError(f"quantize must be None or one of {QUANTIZE_TYPES}, got {self.quant_type!r}")
        if self.quant_type not in QUANTIZE_TYPES:
            raise ValueError(f"quantize must be None or one of {QUANTIZE_TYPES}, got {self.quant_type!r}")
        object.__setattr__(self, "blocksize", check_blocksize(self.blocksize))
        object.__setattr__(self, "double_quant", check_bool(self.double_quant, "double_quant"))

    def to_dict(self) -> dict:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant}

    @classmethod
    def of(cls, qlinear) -> BaseQuant:
        """The storage of a ``QuantizedLinear`` (either backend)."""
        return cls(qlinear.quant_type, qlinear.blocksize, qlinear.double_quant)

    def __str__(self) -> str:
        return f"{self.quant_type} (blocksize {self.blocksize}, double_quant={self.double_quant})"


def base_quant(quantize, kwargs: dict | None = None) -> BaseQuant | None:
    """``inject``'s ``quantize`` as a :class:`BaseQuant` (``None``: the bases stay float).

    ``quantize`` is ``None``, a data type name (``"nf4"``) or a ``BaseQuant``; with a name,
    ``blocksize`` and ``double_quant`` are popped from ``kwargs`` (defaults 64 and True). Without
    ``quantize`` they stay in ``kwargs`` (QLoRA's config reads them there)."""
    kwargs = {} if kwargs is None else kwargs
    if quantize is None:
        return None
    if isinstance(quantize, BaseQuant):
        given = {k: kwargs.pop(k) for k in ("blocksize", "double_quant") if k in kwargs}
        for k, v in given.items():
            if v != getattr(quantize, k):
                raise ValueError(f"{k}={v!r} contradicts quantize's {k}={getattr(quantize, k)!r}")
        return quantize
    if not isinstance(quantize, str):
        raise TypeError(f"quantize must be None or one of {QUANTIZE_TYPES}, got {quantize!r}")
    return BaseQuant(quantize, kwargs.pop("blocksize", 64), kwargs.pop("double_quant", True))


def quantizes_itself(spec: MethodSpec) -> bool:
    """Does the method store its base in 4 bits by its own config (``qlora``, ``lora_int4``)?"""
    return spec.is_layer and bool(set(_STORAGE_FIELDS) & {f.name for f in dataclasses.fields(spec.config)})


def check_quantizable(spec: MethodSpec, quant: BaseQuant | None) -> None:
    """A ``ValueError`` (naming ``quantize``) for a method that cannot take ``quantize=``."""
    if quant is None:
        return
    if not spec.is_layer:
        raise ValueError(f"quantize={quant.quant_type!r}: method {spec.name!r} is a whole-model mode; it has no "
                         "adapter layers whose base could be stored in 4 bits")
    if quantizes_itself(spec):
        raise ValueError(f"quantize={quant.quant_type!r}: method {spec.name!r} stores its base in 4 bits itself "
                         f"(its config's {', '.join(_STORAGE_FIELDS)}): drop quantize=, or put the 4-bit base "
                         "under its float twin's config")


# --- matching (pure functions on names) ----------------------------------------------------
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


def no_match_error(pattern: str, what: str, names) -> ValueError:
    """The error for a ``pattern`` (described as ``what``: ``"target"``, ``"ranks pattern"``)
    that matches none of ``names``; it lists the names there are."""
    listing = ", ".join(names) if names else "(none)"
    return ValueError(f"{what} {pattern!r} matches no linear layer; the linear layers are: {listing}")


def select_targets(names: list[str], targets) -> list[str]:
    """The names (in model order) that any target matches; a target matching none raises."""
    targets = _as_patterns(targets, "targets")
    chosen = set()
    for t in targets:
        hits = [n for n in names if _matches(n, t)]
        if not hits:
            raise no_match_error(t, "target", names)
        chosen.update(hits)
    return [n for n in names if n in chosen]


def resolve_overrides(names: list[str], overrides, what: str) -> dict[str, object]:
    """``{name: value}`` from ``{pattern: value}``; later patterns win; an idle pattern raises."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"{what} must be a dict {{pattern: value}}, got {type(overrides).__name__}")
    out: dict[str, object] = {}
    for pattern, value in overrides.items():
        _as_patterns(pattern, f"{what} key")
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise no_match_error(pattern, f"{what} pattern", names)
        for n in hits:
            out[n] = value
    return out


def per_layer_overrides(overrides=None, ranks=None, alphas=None) -> dict[str, tuple[str, object]]:
    """``{field: (what, {pattern: value})}`` from ``inject``'s ``overrides``, ``ranks`` and
    ``alphas`` (``what`` names the argument in errors: ``"ranks"``, ``"overrides['dropout']"``)."""
    out: dict[str, tuple[str, object]] = {}
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise TypeError(f"overrides must be a dict {{field: {{pattern: value}}}}, got {type(overrides).__name__}")
        for fld, patterns in overrides.items():
            if not isinstance(fld, str):
                raise TypeError(f"overrides keys must be config field names (strings), got {fld!r}")
            out[fld] = (f"overrides[{fld!r}]", patterns)
    for what, fld in _SHORTHANDS:
        given = {"ranks": ranks, "alphas": alphas}[what]
        if given is None:
            continue
        if fld in out:
            raise ValueError(f"{what} and overrides[{fld!r}] both set the per-layer {fld!r}: give one of them")
        out[fld] = (what, given)
    return out


def _replace(config, **changes):
    if hasattr(config, "replace"):
        return config.replace(**changes)
    return dataclasses.replace(config, **changes)


def _checked_value(config, fld: str, value, where: str):
    """``value`` as the config's validation leaves it (``np.int64(3)`` -> ``3``); a bad value is
    the config's own error, named after the entry: ``ranks['q'] must be a positive integer``."""
    try:
        return getattr(_replace(config, **{fld: value}), fld)
    except (TypeError, ValueError) as e:
        msg = str(e)
        msg = where + msg[len(fld):] if msg.startswith(fld + " ") else f"{where}: {msg}"
        raise (TypeError if isinstance(e, TypeError) else ValueError)(msg) from None


def layer_configs(config, names: list[str], overrides=None, overridable=None, ranks=None,
                  alphas=None) -> dict[str, object]:
    """One config per layer: ``config`` with the per-layer ``overrides`` (``{field: {pattern:
    value}}``; ``ranks`` / ``alphas`` set ``r`` / ``alpha``) applied. ``overridable``: the fields
    that may change (the method's ``SPEC.overridable``; ``None``: every field of the config)."""
    given = per_layer_overrides(overrides, ranks, alphas)
    if overridable is None:
        overridable = [f.name for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config) else []
    per_name: dict[str, dict] = {n: {} for n in names}
    for fld, (what, patterns) in given.items():
        if patterns and fld not in overridable:
            raise ValueError(f"{what}: {fld!r} is not a per-layer field of {type(config).__name__}; "
                             f"per-layer overrides may change: {', '.join(overridable) or 'nothing'}")
        if isinstance(patterns, dict):
            patterns = {p: _checked_value(config, fld, v, f"{what}[{p!r}]") for p, v in patterns.items()}
        for n, v in resolve_overrides(names, patterns, what).items():
            per_name[n][fld] = v
    return {n: _replace(config, **changes) if changes else config for n, changes in per_name.items()}


def _whole_model_modes() -> str:
    return ", ".join(s.name for s in methods().values() if not s.is_layer)


def resolve_spec(config, method: str | None) -> MethodSpec:
    """The registry entry for ``method`` (checked against ``config``) or for ``type(config)``."""
    if method is None:
        if config is None:
            raise TypeError("config is None: pass the method's config, or method= one of the whole-model "
                            f"modes ({_whole_model_modes()})")
        return method_for_config(config)
    spec = get_method(method)
    if config is not None and not isinstance(config, type) and not issubclass(spec.config, type(config)):
        raise TypeError(f"config must be a {spec.config.__name__} for method {spec.name!r}, "
                        f"got {type(config).__name__}")
    return spec


def check_trainable_mode(mode) -> str:
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"mode must be one of {TRAINABLE_MODES}, got {mode!r}")
    return mode


# --- the result ----------------------------------------------------------------------------
@dataclass
class InjectResult:
    """What :func:`inject` did.

    Attributes:
        method: the registry name (``"lora"``, ``"qlora"``, ``"full"``, ...).
        replaced: dotted names of the layers that now hold an adapter (model order).
        configs: ``{name: config}``, the config each replaced layer got (after overrides).
        trainable_params: scalars the optimizer will update (a shared tensor counts once).
        total_params: every scalar in the model (adapters and shared state included).
        shared: dotted names of the shared-state modules this call attached
            (``["lowrank_shared.vera"]``), empty for methods without shared state.
        also_trained: the parameters ``train_also=`` kept trainable (dotted names).
        quantize: how the replaced layers' bases are stored when ``quantize=`` was given
            (a :class:`BaseQuant`), else ``None`` (float, or the method's own storage).
    """

    method: str
    replaced: list[str]
    trainable_params: int
    total_params: int
    configs: dict = field(default_factory=dict)
    shared: list = field(default_factory=list)
    also_trained: list = field(default_factory=list)
    quantize: BaseQuant | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [f"inject: method={self.method}, {len(self.replaced)} layer(s) adapted; "
                 f"trainable {self.trainable_params:,} of {self.total_params:,} parameters "
                 f"({100 * self.trainable_fraction:.3f}%)"]
        for n in self.replaced:
            lines.append(f"  {n}: {self.configs.get(n)}")
        for n in self.shared:
            lines.append(f"  {n}: shared by every layer of the method")
        if self.also_trained:
            lines.append(f"  also trained: {', '.join(self.also_trained)}")
        if self.quantize is not None:
            lines.append(f"  base weights of the adapted layers stored in {self.quantize}")
        return "\n".join(lines)


# --- shared state --------------------------------------------------------------------------
class SharedRef:
    """What a layer of a method with shared state receives as ``shared=``: a reference to the
    model's one shared module (``model.lowrank_shared.<method>``). Reading an attribute reads the
    module's (``self.shared.B`` is the shared ``B``, the same object in every layer).

    It is not a Module on purpose: a layer keeps it as a plain attribute (``self.shared =
    shared``) and so does not register the shared tensors a second time; they are listed once,
    under the model's ``lowrank_shared``, in NumPy's ``parameters()`` and torch's
    ``named_parameters()`` alike.

    ``layer`` is the dotted name of the layer it was handed to (``""`` for a lone layer), for
    methods whose layers share state by group (Tied-LoRA ties per projection type: ``q``, ``v``)."""

    __slots__ = ("module", "layer")

    def __init__(self, module, layer: str = ""):
        self.module = module
        self.layer = layer

    def __getattr__(self, name):
        if name.startswith("__"):  # copy / pickle probing an empty instance
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "module"), name)

    def __repr__(self) -> str:
        return f"SharedRef({type(self.module).__name__})"


# --- what the engine needs from a backend --------------------------------------------------
class InjectOps:
    """The per-backend operations the :class:`Injector` is written against (the NumPy ones are
    :class:`NumpyOps`; ``lowrank_gpu.inject.TorchOps`` the torch ones). A parameter ``p`` is
    the backend's own object (a :class:`~lowrank_ref.nn.Parameter`, a ``torch.nn.Parameter``)."""

    backend = ""  # "numpy" or "torch": picks SPEC's class and builders (PerBackend.for_backend)
    module_kind = ""  # for error messages: "a lowrank_ref.nn.Module"
    linear_kind = ""  # and "a lowrank_ref.nn.Linear"

    def is_module(self, obj) -> bool: ...
    def is_linear(self, obj) -> bool: ...  # a plain linear layer: a target
    def is_adapter(self, obj) -> bool: ...
    def layer_kind(self, obj) -> str | None: ...  # "embeddings" / "norms" (train_also's aliases) or None
    def named_modules(self, model): ...  # (dotted name, module), the model itself as ""
    def get(self, model, name: str): ...
    def set(self, model, name: str, module) -> None: ...  # replace the existing submodule ``name``
    def child(self, parent, attr: str): ...  # the direct child ``attr``, or None
    def children(self, parent) -> list[str]: ...
    def add_child(self, parent, attr: str, module) -> None: ...
    def remove_child(self, parent, attr: str) -> None: ...
    def new_container(self): ...  # an empty module
    def named_parameters(self, module) -> list: ...  # [(dotted name, p)], each p once
    def trainable(self, p) -> bool: ...
    def set_trainable(self, p, on: bool) -> None: ...  # off also drops p's gradient
    def numel(self, p) -> int: ...
    def save_flags(self, p): ...  # what restore_flags needs: trainable flag and gradient
    def restore_flags(self, p, saved) -> None: ...
    def save_data(self, p): ...  # a copy of p's values
    def restore_data(self, p, saved) -> None: ...
    def shape(self, linear) -> tuple[int, int]: ...  # (out_features, in_features)
    def place(self, layer, base): ...  # a new adapter layer, on its base's device
    def quantize(self, linear, quant: BaseQuant): ...  # a frozen 4-bit copy of a linear layer (QuantizedLinear)
    def compute_like(self, layer, linear): ...  # an adapter on a 4-bit base, computing in linear's float dtype
    def like(self, module, base): ...  # a new shared module, on the base's device, in its dtype
    def rng(self, rng): ...  # the generator handed to builders and constructors
    def state(self, module) -> dict: ...  # {name: array} a file holds for a shared module
    def load_state(self, module, state: dict) -> None: ...
    def state_shape(self, value) -> tuple: ...


class NumpyOps(InjectOps):
    """:class:`InjectOps` for ``lowrank_ref.nn`` models (NumPy or CuPy arrays)."""

    backend = "numpy"
    module_kind = "a lowrank_ref.nn.Module"
    linear_kind = "a lowrank_ref.nn.Linear"

    def is_module(self, obj):
        return isinstance(obj, Module)

    def is_linear(self, obj):
        return isinstance(obj, Linear)

    def is_adapter(self, obj):
        return isinstance(obj, AdapterLinear)

    def layer_kind(self, obj):
        from lowrank_ref.nn.embedding import Embedding
        from lowrank_ref.nn.layernorm import LayerNorm

        return "embeddings" if isinstance(obj, Embedding) else "norms" if isinstance(obj, LayerNorm) else None

    def named_modules(self, model):
        return model.named_modules()

    def get(self, model, name):
        return model.get_submodule(name)

    def set(self, model, name, module):
        model.set_submodule(name, module)

    def child(self, parent, attr):
        return parent.children().get(attr)

    def children(self, parent):
        return list(parent.children())

    def add_child(self, parent, attr, module):
        setattr(parent, attr, module)

    def remove_child(self, parent, attr):
        delattr(parent, attr)

    def new_container(self):
        return Module()

    def named_parameters(self, module):
        seen: set[int] = set()
        out = []
        for n, p in module.parameters().items():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
        return out

    def trainable(self, p):
        return p.trainable

    def set_trainable(self, p, on):
        p.trainable = bool(on)
        if not on:
            p.grad = None

    def numel(self, p):
        return p.size

    def save_flags(self, p):
        return p.trainable, p.grad

    def restore_flags(self, p, saved):
        p.trainable, p.grad = saved

    def save_data(self, p):
        return p.data, p.data.copy()

    def restore_data(self, p, saved):
        ref, copy = saved
        if ref.flags.writeable:  # undo in-place edits, keep the array's identity
            ref[...] = copy
        p.data = ref

    def shape(self, linear):
        return linear.out_features, linear.in_features

    def place(self, layer, base):
        return layer  # a NumPy layer is built from its base's arrays, where they are

    def quantize(self, linear, quant):
        from lowrank_ref.quant.linear import QuantizedLinear

        q = QuantizedLinear.from_linear(linear, quant.blocksize, quant.double_quant, quant.quant_type)
        if linear.bias is not None:  # the bias stays float in its own dtype (from_linear keeps float32, QLoRA's)
            q.bias.data = linear.bias.data.copy()
        return q

    def compute_like(self, layer, linear):
        dtype = linear.weight.data.dtype
        return layer if layer.weight_dtype == dtype else layer.astype(dtype)  # the 4-bit storage stays as it is

    def like(self, module, base):
        W = base.weight.data
        xp = array_module(W)
        for _, p in self.named_parameters(module):
            if xp is not np or p.data.dtype != W.dtype:
                p.data = xp.asarray(p.data, dtype=W.dtype)
        return module

    def rng(self, rng):
        return as_rng(rng)

    def state(self, module):
        if hasattr(module, "adapter_state"):
            return module.adapter_state()
        return {n: p.data for n, p in self.named_parameters(module)}

    def load_state(self, module, state):
        if hasattr(module, "load_adapter_state"):
            return module.load_adapter_state(state)
        params = dict(self.named_parameters(module))
        for n, v in state.items():
            params[n].data = np.array(v, dtype=params[n].data.dtype)
            params[n].grad = None

    def state_shape(self, value):
        return tuple(int(d) for d in np.shape(value))


# --- the engine ----------------------------------------------------------------------------
def _under(name: str, prefix: str) -> bool:
    """Is ``name`` strictly inside the module called ``prefix`` (``""`` is the root)?"""
    return prefix == "" or name.startswith(prefix + ".")


class Snapshot:
    """What building adapters can change, kept to undo it: the modules at the target names, every
    parameter's trainable flag and gradient, the target layers' values (an init such as PiSSA
    rewrites the base), and which shared-state modules the model holds."""

    def __init__(self, ops: InjectOps, model, names):
        self.ops, self.model = ops, model
        self.modules = {n: ops.get(model, n) for n in names}
        self.flags = [(p, ops.save_flags(p)) for _, p in ops.named_parameters(model)]
        self.data = [(p, ops.save_data(p)) for n in names for _, p in ops.named_parameters(self.modules[n])]
        self.container = ops.child(model, SHARED_ATTR)
        self.shared = set(ops.children(self.container)) if self.container is not None else set()

    def restore(self) -> None:
        ops, model = self.ops, self.model
        for n, mod in self.modules.items():
            if ops.get(model, n) is not mod:
                ops.set(model, n, mod)
        container = ops.child(model, SHARED_ATTR)
        if container is not None and self.container is None:
            ops.remove_child(model, SHARED_ATTR)
        elif container is not None:
            for attr in set(ops.children(container)) - self.shared:
                ops.remove_child(container, attr)
        for p, saved in self.flags:
            ops.restore_flags(p, saved)
        for p, saved in self.data:
            ops.restore_data(p, saved)


class Injector:
    """The injection engine, written once over a backend's :class:`InjectOps`."""

    def __init__(self, ops: InjectOps):
        self.ops = ops

    # -- what the model holds ---------------------------------------------------------------
    def plain_linears(self, model) -> dict:
        """Every linear layer outside an adapter and outside the shared state, by dotted name
        (an adapter's ``base`` is not a target)."""
        ops = self.ops
        out: dict = {}
        inside: list[str] = []
        for name, mod in ops.named_modules(model):
            if any(_under(name, p) for p in inside):
                continue
            if ops.is_adapter(mod) or name.rsplit(".", 1)[-1] == SHARED_ATTR:
                inside.append(name)
            elif ops.is_linear(mod) and name:
                out[name] = mod
        return out

    def adapter_layers(self, model) -> dict:
        """Every adapter in ``model`` by dotted name (``""`` if ``model`` is itself an adapter)."""
        out: dict = {}
        for name, mod in self.ops.named_modules(model):
            if not any(_under(name, p) for p in out) and self.ops.is_adapter(mod):
                out[name] = mod
        return out

    def shared_modules(self, model) -> dict:
        """``{method name: module}`` of the shared state ``model`` holds."""
        container = self.ops.child(model, SHARED_ATTR)
        if container is None:
            return {}
        return {attr: self.ops.child(container, attr) for attr in self.ops.children(container)}

    def adapter_param_ids(self, model) -> set[int]:
        """The adapters' own parameters (not their bases') and the shared state's."""
        ops = self.ops
        ids: set[int] = set()
        for mod in self.adapter_layers(model).values():
            base_ids = {id(p) for _, p in ops.named_parameters(mod.base)}
            ids.update(id(p) for _, p in ops.named_parameters(mod) if id(p) not in base_ids)
        for mod in self.shared_modules(model).values():
            ids.update(id(p) for _, p in ops.named_parameters(mod))
        return ids

    def count(self, model) -> tuple[int, int]:
        """(trainable scalars, all scalars), each parameter once."""
        params = [p for _, p in self.ops.named_parameters(model)]
        return (sum(self.ops.numel(p) for p in params if self.ops.trainable(p)),
                sum(self.ops.numel(p) for p in params))

    def train_also_params(self, model, selectors) -> dict:
        """``{dotted name: parameter}`` that ``train_also`` selects (module docstring); a selector
        that is not a string, or that matches nothing, is an error. Adapters and shared state are
        not searched (the adapters train anyway)."""
        ops = self.ops
        if selectors is None:
            return {}
        sel = (selectors,) if isinstance(selectors, str) else tuple(selectors)
        if not sel or not all(isinstance(x, str) and x for x in sel):
            raise TypeError(f"train_also must be a non-empty string or a sequence of them "
                            f"({', '.join(TRAIN_ALSO_ALIASES)} or parameter-name patterns), got {selectors!r}")
        inside = [n for n, m in ops.named_modules(model) if n and (ops.is_adapter(m) or n.rsplit(".", 1)[-1] == SHARED_ATTR)]
        params = {n: p for n, p in ops.named_parameters(model) if not any(_under(n, q) for q in inside)}
        kinds = {}
        for mname, mod in ops.named_modules(model):
            kind = ops.layer_kind(mod)
            if kind is not None and not any(_under(mname, q) or mname == q for q in inside):
                for pname, _ in ops.named_parameters(mod):
                    kinds[f"{mname}.{pname}" if mname else pname] = kind
        out: dict = {}
        for x in sel:
            hits = [n for n in params if (kinds.get(n) == x if x in TRAIN_ALSO_ALIASES else fnmatch.fnmatchcase(n, x))]
            if not hits:
                raise ValueError(f"train_also={x!r} matches no parameter of the model; use "
                                 f"{' or '.join(map(repr, TRAIN_ALSO_ALIASES))} or a pattern over: {', '.join(params)}")
            out.update((n, params[n]) for n in hits)
        return {n: out[n] for n in params if n in out}  # model order

    # -- inject -----------------------------------------------------------------------------
    def inject(self, model, config=None, targets=("q", "v"), ranks=None, alphas=None, method=None,
               rng=None, overrides=None, train_also=None, quantize=None, **kwargs) -> InjectResult:
        """:func:`inject` on a model of this backend (already checked to be one)."""
        ops = self.ops
        extra = self.train_also_params(model, train_also)  # checked before anything changes
        kwargs = dict(kwargs)
        quant = base_quant(quantize, kwargs)
        spec = resolve_spec(config, method)
        check_quantizable(spec, quant)
        given = per_layer_overrides(overrides, ranks, alphas)
        if not spec.is_layer:
            if any(patterns for _, patterns in given.values()):
                raise ValueError(f"method {spec.name!r} is a whole-model mode: per-layer overrides "
                                 f"({', '.join(w for w, _ in given.values())}) do not apply")
            if extra:
                raise ValueError(f"method {spec.name!r} is a whole-model mode and sets what trains "
                                 "itself: train_also does not apply")
            config = spec.coerce_config(config, dict(kwargs))
            # (model, config, rng): a mode with hyper-parameters (prompt tuning's k) reads them;
            # it checks everything before it changes the model, so an error leaves it as it was
            load_object(spec.model_fn.for_backend(ops.backend))(model, config, rng=ops.rng(rng))
            return InjectResult(spec.name, [], *self.count(model))
        linears = self.plain_linears(model)
        try:
            names = select_targets(list(linears), targets)
        except ValueError as e:
            done = [n for n in self.adapter_layers(model) if n]
            if done:  # say why a layer the user can see is not a target
                raise ValueError(f"{e} (already adapted, so not targets: {', '.join(done)})") from None
            raise
        config = spec.coerce_config(config, kwargs)
        cfgs = layer_configs(config, names, overrides, spec.overridable, ranks, alphas)
        before = set(self.shared_modules(model))
        snap = self.build_adapters(model, {n: (spec, cfgs[n]) for n in names}, rng=rng, quantize=quant, **kwargs)
        in_bases = {id(p) for m in self.adapter_layers(model).values() for _, p in ops.named_parameters(m.base)}
        clash = [n for n, p in extra.items() if id(p) in in_bases]
        if clash:
            snap.restore()
            raise ValueError(f"train_also selects {', '.join(clash)}, the frozen base of an adapter this call "
                             "makes: train the adapter, or leave that layer out of targets")
        for p in extra.values():
            ops.set_trainable(p, True)
        shared = [f"{SHARED_ATTR}.{m}" for m in self.shared_modules(model) if m not in before]
        return InjectResult(spec.name, names, *self.count(model), cfgs, shared, list(extra), quant)

    def build_shared(self, spec: MethodSpec, configs: dict, bases: dict, rng):
        """The method's shared-state module for the layers ``bases`` (``{name: base layer}``)
        with ``configs``: ``SPEC.shared``'s builder, called as ``builder(configs, shapes, rng)``
        with ``shapes = {name: (out, in)}``, then put on the first base's device, in its dtype."""
        ops = self.ops
        path = spec.shared.for_backend(ops.backend)
        if path is None:
            raise ValueError(f"method {spec.name!r} declares shared state but no {ops.backend} builder for it")
        shapes = {n: tuple(ops.shape(b)) for n, b in bases.items()}
        module = load_object(path)(dict(configs), shapes, rng)
        if not ops.is_module(module):
            raise TypeError(f"the shared-state builder {path} must return {ops.module_kind}, "
                            f"got {type(module).__name__}")
        return ops.like(module, next(iter(bases.values())))

    def attach_shared(self, owner, method: str, module) -> None:
        """Hang ``module`` on ``owner`` as ``owner.lowrank_shared.<method>`` (once per method)."""
        ops = self.ops
        container = ops.child(owner, SHARED_ATTR)
        if container is not None and ops.child(container, method) is not None:
            raise ValueError(f"the model already holds shared state for method {method!r} "
                             f"({SHARED_ATTR}.{method}): inject all of the method's layers in one call")
        if container is None:
            container = ops.new_container()
            ops.add_child(owner, SHARED_ATTR, container)
        ops.add_child(container, method, module)

    def build_layer(self, spec: MethodSpec, base, config, rng=None, quantize: BaseQuant | None = None, **kwargs):
        """One adapter layer of method ``spec`` on ``base`` (what :func:`lowrank_ref.adapt` makes).
        A method with shared state gets it built for this one layer and attached to the layer
        itself (``layer.lowrank_shared.<method>``), so a lone layer is complete as well.
        ``quantize``: the layer's base stored in 4 bits first, as :func:`inject` does (the shared
        state is built from the float base, as there)."""
        cls = spec.layer_class(self.ops.backend)
        check_quantizable(spec, quantize)
        if (spec.shared is not None or quantize is not None) and not self.ops.is_linear(base):
            raise TypeError(f"base must be {self.ops.linear_kind}, got {type(base).__name__}")
        lbase = base if quantize is None else self.ops.quantize(base, quantize)
        if spec.shared is None:
            layer = cls(lbase, config, rng=rng, **kwargs)
        else:
            rng = self.ops.rng(rng)
            module = self.build_shared(spec, {"": config}, {"": base}, rng)
            layer = cls(lbase, config, rng=rng, shared=SharedRef(module, ""), **kwargs)
            self.attach_shared(layer, spec.name, module)
        return layer if quantize is None else self.ops.compute_like(layer, base)

    def build_adapters(self, model, plan: dict, rng=None, quantize: BaseQuant | None = None, **kwargs) -> Snapshot:
        """Replace each linear layer ``name`` in ``plan = {name: (spec_or_class, config)}`` by the
        adapter, and freeze everything outside the adapters and their shared state.

        ``quantize`` (a :class:`BaseQuant`): each layer's base is first stored in 4 bits
        (:meth:`InjectOps.quantize`) and the adapter is built on that; shared state is still built
        from the float layers' shapes.

        With a :class:`~lowrank_ref.registry.MethodSpec` the layer is the spec's class for this
        backend, and a method with ``SPEC.shared`` gets its shared module (built once for all of
        its layers in ``plan``, attached to the model) as ``shared=``; a bare class is called as
        ``cls(base, config, rng=rng, **kwargs)``. On error the model is restored; on success the
        returned snapshot can still undo the change (``.restore()``), for callers that validate
        afterwards."""
        ops = self.ops
        if quantize is not None and not isinstance(quantize, BaseQuant):
            raise TypeError(f"quantize must be a BaseQuant or None, got {type(quantize).__name__}")
        linears = self.plain_linears(model)
        for n in plan:
            if n not in linears:
                raise no_match_error(n, "layer", list(linears))
        entries = {}
        for n, (what, cfg) in plan.items():
            if isinstance(what, MethodSpec):
                entries[n] = (what, what.layer_class(ops.backend), cfg)
            elif isinstance(what, type):
                entries[n] = (None, what, cfg)
            else:
                raise TypeError(f"plan[{n!r}] must be (MethodSpec or adapter class, config), got {what!r}")
        rng = ops.rng(rng)
        snap = Snapshot(ops, model, list(plan))
        try:
            groups: dict[str, tuple] = {}  # the methods with shared state, and their layers
            for n, (spec, _, cfg) in entries.items():
                if spec is not None and spec.shared is not None:
                    groups.setdefault(spec.name, (spec, {}))[1][n] = cfg
            shared = {}
            for m, (spec, cfgs) in groups.items():
                module = self.build_shared(spec, cfgs, {n: linears[n] for n in cfgs}, rng)
                self.attach_shared(model, m, module)
                shared[m] = module
            new = {}
            for n, (spec, cls, cfg) in entries.items():
                extra = ({"shared": SharedRef(shared[spec.name], n)}
                         if spec is not None and spec.name in shared else {})
                base = linears[n] if quantize is None else ops.quantize(linears[n], quantize)
                layer = cls(base, cfg, rng=rng, **kwargs, **extra)
                if quantize is not None:  # compute in the float model's dtype, as on a float base
                    layer = ops.compute_like(layer, linears[n])
                new[n] = ops.place(layer, linears[n])
            for n, layer in new.items():
                ops.set(model, n, layer)
            keep = self.adapter_param_ids(model)
            for _, p in ops.named_parameters(model):
                if id(p) not in keep:
                    ops.set_trainable(p, False)
        except BaseException:
            snap.restore()
            raise
        return snap

    def set_trainable(self, model, mode: str) -> int:
        """:func:`set_trainable` on a model of this backend."""
        check_trainable_mode(mode)
        keep = self.adapter_param_ids(model) if mode == "adapters" else set()
        for name, p in self.ops.named_parameters(model):
            on = {"all": True, "none": False, "bias": name.rsplit(".", 1)[-1] == "bias",
                  "adapters": id(p) in keep}[mode]
            self.ops.set_trainable(p, on)
        return self.count(model)[0]

    # -- shared state in files (lowrank_ref.io) ---------------------------------------------
    def shared_state(self, model) -> dict:
        """``{method: {name: array}}``: the tensors a file holds for the model's shared state."""
        return {m: dict(self.ops.state(mod)) for m, mod in self.shared_modules(model).items()}

    def check_shared_state(self, model, state: dict) -> None:
        """Raise ``ValueError`` unless ``state`` (``{method: {name: array}}``) has exactly the
        methods, names and shapes of the model's shared state; changes nothing."""
        own = self.shared_state(model)
        if set(own) != set(state):
            raise ValueError(f"shared state: the file holds it for methods {sorted(state)}, the model for "
                             f"{sorted(own)}")
        for m, tensors in state.items():
            if set(tensors) != set(own[m]):
                raise ValueError(f"shared state of {m!r}: the file holds {sorted(tensors)}, the model "
                                 f"needs {sorted(own[m])}")
            for n, v in tensors.items():
                have, want = self.ops.state_shape(v), self.ops.state_shape(own[m][n])
                if have != want:
                    raise ValueError(f"shared state {m}.{n}: shape {have} in the file, the model's is {want}")

    def load_shared_state(self, model, state: dict) -> None:
        """Check ``state`` (:meth:`check_shared_state`), then copy it into the shared modules."""
        self.check_shared_state(model, state)
        mods = self.shared_modules(model)
        for m, tensors in state.items():
            self.ops.load_state(mods[m], tensors)


NUMPY = Injector(NumpyOps())


# --- the public functions: NumPy models here, torch models forwarded -----------------------
def _is_torch_module(model) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _injector(model) -> Injector:
    if _is_torch_module(model):
        from lowrank_gpu.inject import TORCH

        return TORCH
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank_ref.nn.Module or a torch.nn.Module, got {type(model).__name__}")
    return NUMPY


def inject(model, config=None, targets=("q", "v"), ranks=None, alphas=None, method=None, rng=None,
           overrides=None, train_also=None, quantize=None, **kwargs) -> InjectResult:
    """Replace the matching linear layers of ``model`` in place with adapters; freeze the rest.

    Args:
        model: a :class:`lowrank_ref.nn.Module` or a ``torch.nn.Module`` (whose linear layers
            are ``torch.nn.Linear``; handled by :mod:`lowrank_gpu.inject`).
        config: the method's config (``LoRAConfig(r=8, alpha=16)``); ``None`` with ``method=``
            a whole-model mode (full fine-tuning, BitFit), which replaces nothing.
        targets: a name, pattern, alias or ``"all"``, or a sequence of them.
        ranks, alphas: ``{pattern: value}``: shorthands for ``overrides={"r": ...}`` and
            ``overrides={"alpha": ...}``.
        method: a registry name, to pick the method when ``config`` is of a parent class
            (``method="qlora"`` with a ``LoRAConfig``).
        rng: ``None``, an int seed, or a ``numpy.random.Generator`` (one stream for all layers
            and the shared state; torch models also take a ``torch.Generator``).
        overrides: ``{field: {pattern: value}}``, per-layer values of the config fields in the
            method's ``SPEC.overridable`` (later patterns win).
        train_also: parameters that train next to the adapters: ``"embeddings"``, ``"norms"``,
            glob patterns over parameter names, or a sequence of them (LongLoRA's LoRA+:
            ``("embeddings", "norms")``); ``None``: only the adapters.
        quantize: ``None`` (the bases stay as they are), or ``"nf4"``, ``"fp4"``, ``"int4"``:
            store each targeted layer's base weight in 4 bits before the adapter wraps it (module
            docstring), with ``blocksize=`` (64) and ``double_quant=`` (True) from ``kwargs``.
        **kwargs: extra constructor keywords for the adapter class, or config fields that a
            config of a parent class lacks (``blocksize=64`` for ``method="qlora"``).
    """
    return _injector(model).inject(model, config, targets=targets, ranks=ranks, alphas=alphas,
                                   overrides=overrides, method=method, rng=rng, train_also=train_also,
                                   quantize=quantize, **kwargs)


def build_adapters(model, plan: dict, rng=None, quantize: BaseQuant | None = None, **kwargs) -> Snapshot:
    """Replace each linear layer named in ``plan = {name: (spec_or_class, config)}`` by its adapter
    (:meth:`Injector.build_adapters`; ``quantize``: a :class:`BaseQuant` for a 4-bit base): the
    engine under :func:`inject` and :func:`lowrank_ref.io.load_adapter`, which names the layers
    exactly. Restores the model on error; the returned snapshot can undo the change later
    (``.restore()``)."""
    return _injector(model).build_adapters(model, plan, rng=rng, quantize=quantize, **kwargs)


def adapter_layers(model) -> dict:
    """Every adapter in ``model`` by dotted name (``""`` if ``model`` is itself an adapter)."""
    return _injector(model).adapter_layers(model)


def shared_modules(model) -> dict:
    """``{method name: module}``: the shared state ``model`` holds (``model.lowrank_shared``)."""
    return _injector(model).shared_modules(model)


def shared_state(model) -> dict:
    """``{method: {name: array}}``: the shared-state tensors an adapter file holds, once each."""
    return _injector(model).shared_state(model)


def check_shared_state(model, state: dict) -> None:
    """``ValueError`` unless ``state`` matches the model's shared state (methods, names, shapes)."""
    _injector(model).check_shared_state(model, state)


def load_shared_state(model, state: dict) -> None:
    """Check, then copy ``{method: {name: array}}`` into the model's shared state."""
    _injector(model).load_shared_state(model, state)


def set_trainable(model, mode: str) -> int:
    """Set which parameters train; return how many scalars do.

    ``mode``: ``"all"`` (full fine-tuning), ``"none"``, ``"bias"`` (every parameter whose name
    ends in ``bias``: BitFit), ``"adapters"`` (only the adapters' own tensors and their shared
    state's).
    """
    check_trainable_mode(mode)
    return _injector(model).set_trainable(model, mode)
