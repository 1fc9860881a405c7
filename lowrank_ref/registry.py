r"""The method contract: every method is one file, ``lowrank_ref/adapters/<m>.py``, that ends in a
module-level ``SPEC`` (a :class:`MethodSpec`, or a tuple of them for a file that holds a method and
its variants). The registry *discovers* those ``SPEC``\ s; nothing else in the package names a
method, and there is no hand-kept list anywhere.

What a ``SPEC`` tells the rest of the package, and who reads it:

=================  =====================================================================  ==============
field              what it says                                                           read by
=================  =====================================================================  ==============
``name``           the method's name (``"lora"``): ``--method``, file metadata, compare   everything
``config``         its config class (one per method, defined in the method's file)        api, inject, io
``numpy``          ``"module:Class"`` of the NumPy layer                                  api, inject, io
``torch``          ``"lowrank_gpu.adapters.<m>:Class"`` (a string: nothing imports torch) api, inject, io
``overridable``    config fields that per-layer overrides may change (``("r", "alpha")``) inject
                   via ``inject(overrides={field: {pattern: value}})``; others: error
``file_metadata``  ``config -> {str: JSON scalar}`` stored per layer in adapter files     io
``shapes``         ``(config, in, out) -> {name: shape}`` of the file's tensors (optional)   io
``peft``           a :class:`PeftMapping` where PEFT has the method                       io (PEFT)
``example``        ``() -> Example``: a small base shape + config for the contract tests  tests/contract
``shared``         :class:`PerBackend` builders of state shared across layers,            inject, io
                   ``(configs: {name: cfg}, shapes: {name: (out, in)}, rng) -> Module``,
                   built once per inject, held once as ``model.lowrank_shared.<m>``,
                   given to each layer as ``shared=`` (a SharedRef), saved once per file
``hooks``          :class:`PerBackend` training hooks (loss terms, before/after step)     train loops
``compare``        ``{row name: CompareRow}``: the method's rows in ``lowrank-ref compare``  compare
``final_rank``     ``layer -> int``: the rank a layer ends training with (methods whose rank   compare
                   changes: AdaLoRA, DyLoRA, SoRA, SeLoRA); compare's rows carry it per
                   layer as ``final_ranks``
``model_fn``       whole-model modes (full, BitFit, prompt and prefix tuning):            inject
                   :class:`PerBackend` functions ``(model, config, rng) -> trainable
                   count``; a mode may add modules to the model (``model.prompt``), and
                   checks everything before it changes anything; ``example`` (optional
                   for a mode) gives its config for the contract tests' small GPT
``mergeable``      ``False`` for a layer no plain Linear can compute (Houlsby adapters: a  tests/contract
                   non-linearity): ``merge()``/``delta_weight()`` refuse with a ValueError;
                   must equal the layer classes' ``MERGEABLE`` (checked at discovery).
                   A whole-model mode that adds modules no weight can absorb (a prompt)
                   says ``False`` too: each module it adds refuses ``merge()`` the same way
=================  =====================================================================  ==============

Discovery happens on the first lookup (``import lowrank_ref`` stays cheap) and checks every
``SPEC``: a missing field, a class path that names nothing, two methods claiming one name or one
config class are errors at that point, naming the file. Config -> method is a plain dictionary
lookup on ``type(config)``. A test can add a method of its own for a ``with`` block with
:func:`register_for_tests`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MethodSpec", "PerBackend", "PeftMapping", "Example", "CompareRow", "SpecError",
           "get_method", "method_names", "config_class", "method_for_config", "methods", "compare_rows", "COMPARE_TASKS",
           "spec_of_layer", "register_for_tests",
           "BACKENDS", "check_backend", "load_object", "discover", "check_spec"]

BACKENDS = ("numpy", "torch", "cuda", "cupy")


class SpecError(ValueError):
    """A method file's ``SPEC`` is incomplete or contradicts another's."""


@dataclass(frozen=True)
class PerBackend:
    """One ``"module:attr"`` path per backend family (NumPy/CuPy arrays and PyTorch)."""

    numpy: str | None = None
    torch: str | None = None

    def for_backend(self, backend: str) -> str | None:
        return self.numpy if backend in ("numpy", "cupy") else self.torch


@dataclass(frozen=True)
class PeftMapping:
    """How the method is called in PEFT (``peft.tuners.<m>``), for :mod:`lowrank_ref.io`'s
    ``load_peft`` / ``save_peft`` / ``peft_state_dict``.

    Attributes:
        peft_type: PEFT's ``PeftType`` value (``"LORA"``, ``"IA3"``, ...).
        tensors: math name -> PEFT key suffix (``{"A": "lora_A.weight"}``); PEFT's saved files drop
            the adapter name, which is how they are read and written here.
        to_peft: ``(configs: {layer path: config}) -> dict``, the method-specific fields of
            ``adapter_config.json`` for these layers (``r``, ``lora_alpha``, ``rank_pattern``...);
            a ``ValueError`` for what PEFT cannot express (io adds ``peft_type``,
            ``target_modules`` (the full layer names) and the informative fields). ``None``: the
            method is not saved as a PEFT folder.
        from_peft: ``(peft_config: dict, path: str) -> config``, the config of layer ``path``;
            the dict is untrusted (a ``ValueError``/``TypeError`` for a bad or unsupported value;
            io names the file and the layer). ``None``: PEFT folders do not load as this method.
            Helpers for both in :mod:`lowrank_ref.io`: ``peft_matches(path, modules)`` (PEFT's
            ``target_modules`` rule; IA³'s ``feedforward_modules`` has its own, a plain suffix), ``peft_pattern``
            (``rank_pattern``'s rule), ``peft_uniform``, ``peft_default_and_pattern``.
        claims: ``(peft_config: dict) -> bool``: does this method read that folder (LoRA and DoRA
            share ``peft_type = "LORA"``; ``use_dora`` decides). Default: every folder of its type.
        to_peft_tensor / from_peft_tensor: ``(math name, array, config) -> array`` for tensors whose
            shape differs in PEFT (IA³'s ``(out, 1)`` vector). Default: unchanged.
        options: ``adapter_config.json`` fields this mapping understands beyond the common ones
            (``io.PEFT_COMMON``: ``peft_type``, ``target_modules``, ``exclude_modules``, ``task_type``...);
            any other field whose value asks for something (not null, false, ``{}``, ``[]``, ``""``)
            is refused with a list of what is supported.
        shared: the method's shared state (``SPEC.shared``) in PEFT's files: ``{name in the
            shared module: full PEFT key}`` (VeRA: ``{"A": "base_model.vera_A"}``), stored once
            per folder. ``load_peft`` reads them into ``model.lowrank_shared.<method>``;
            ``peft_state_dict`` writes the shared module's state under them (not with
            ``grads=True``).
    """

    peft_type: str
    tensors: dict
    to_peft: Callable | None = None
    from_peft: Callable | None = None
    claims: Callable | None = None
    to_peft_tensor: Callable | None = None
    from_peft_tensor: Callable | None = None
    options: tuple = ()
    shared: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Example:
    """A small layer for the contract tests: a base of ``(out_features, in_features)`` (with a bias
    when ``bias``) and the method's ``config``; ``kwargs`` go to the constructor. ``condition``:
    for a conditional layer (``takes_condition = True``: a task id per batch row), the condition
    the tests set as ``layer.condition`` after building it, one integer (the same task for every
    row, whatever the batch shape); ``None`` for every other method."""

    in_features: int = 6
    out_features: int = 5
    config: object = None
    bias: bool = True
    kwargs: dict = field(default_factory=dict)
    condition: object = None


@dataclass(frozen=True)
class CompareRow:
    """One row of ``lowrank-ref compare``, as data: the method's config, where it goes, its lr.

    Attributes:
        config: the method's config (``None`` for whole-model modes).
        targets: which linear layers get adapters (names, aliases or ``"all"``).
        lr: the peak learning rate for this row.
        order: rows are sorted by it (then by name): the table's row order.
        kwargs: extra keywords for ``inject``.
        task: what the row trains and evaluates on, one of :data:`COMPARE_TASKS`: ``"dialect"``
            (the built-in fine-tuning task); ``"multitask"`` (one model trained on the four
            dialects of :mod:`lowrank_ref.data.multitask` at once, with the task ids as ``cond``
            when the method takes a condition, evaluated per task and averaged);
            ``"multitask_per_task"`` (one adapter per task, each trained on its task only with
            the same total number of steps, each evaluated on its own task).
    """

    config: object = None
    targets: tuple | str = ("q", "v")
    lr: float = 3e-3
    order: float = 100.0
    kwargs: dict = field(default_factory=dict)
    task: str = "dialect"

    def __post_init__(self):
        if self.task not in COMPARE_TASKS:
            raise ValueError(f"task must be one of {COMPARE_TASKS}, got {self.task!r}")


COMPARE_TASKS = ("dialect", "multitask", "multitask_per_task")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the package needs to know about one method (module docstring: who reads what)."""

    name: str
    config: type
    numpy: str | None = None
    torch: str | None = None
    description: str = ""
    overridable: tuple = ()
    file_metadata: Callable | None = None
    # (config, in_features, out_features) -> {math name: shape tuple} of the layer's adapter_state():
    # lets io check a file's tensors against the model before it builds (allocates) anything.
    # Optional: without it io bounds the config's integer fields by the file's and the base's sizes.
    shapes: Callable | None = None
    peft: PeftMapping | None = None
    example: Callable | None = None
    shared: PerBackend | None = None
    hooks: PerBackend | None = None
    compare: dict = field(default_factory=dict)
    # layer (either backend) -> int: the rank it ends training with, for methods whose rank changes
    final_rank: Callable | None = None
    model_fn: PerBackend | None = None
    # False: the layer cannot be folded into its base (a non-linearity inside); its classes say the
    # same with ``MERGEABLE = False``, and merge()/delta_weight()/merged_weight() refuse
    mergeable: bool = True
    source: str = ""  # the file the SPEC came from (filled in by discovery)

    @property
    def is_layer(self) -> bool:
        """A layer method (LoRA, DoRA...), as opposed to a whole-model mode (full, BitFit)."""
        return self.model_fn is None

    def layer_class(self, backend: str):
        """The layer class for ``backend`` (``"numpy"``/``"cupy"`` -> NumPy, else torch)."""
        path = self.numpy if backend in ("numpy", "cupy") else self.torch
        if path is None:
            raise ValueError(f"method {self.name!r} has no {backend} implementation")
        return load_object(path)

    @property
    def torch_model_fn(self) -> str | None:  # kept for callers of the earlier field
        return None if self.model_fn is None else self.model_fn.torch

    def coerce_config(self, config, kwargs: dict | None = None):
        """``config`` as this method's config class. A config of a parent class (a ``LoRAConfig``
        for ``qlora``, whose ``QLoRAConfig`` extends it) is extended with the fields that
        ``kwargs`` names (popped from it: ``blocksize=64``); any other type is a ``TypeError``."""
        if config is None:
            config = self.config()
        if type(config) is self.config:
            return config
        if isinstance(config, type) or not issubclass(self.config, type(config)):
            raise TypeError(f"config must be a {self.config.__name__} for method {self.name!r}, "
                            f"got {type(config).__name__}")
        kwargs = {} if kwargs is None else kwargs
        extra = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(self.config) if f.name in kwargs}
        return self.config(**dataclasses.asdict(config), **extra)

    def metadata_for(self, config) -> dict:
        """What adapter files store for a layer with ``config`` beyond the config itself."""
        return {} if self.file_metadata is None else dict(self.file_metadata(config))


# --- discovery -------------------------------------------------------------------------------
_METHODS: dict[str, MethodSpec] = {}
_BY_CONFIG: dict[type, MethodSpec] = {}
_DISCOVERED = False
ADAPTER_PACKAGE = "lowrank_ref.adapters"
_NOT_METHODS = ("base", "common")  # shared modules of the package, not methods


def load_object(path: str):
    """The object at ``"module:attr"`` (imports the module)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _module_file(module: str) -> str | None:
    """The ``.py`` file of ``module``, found without importing it or its parent packages
    (``find_spec("a.b")`` would import ``a``, and ``lowrank_gpu`` imports torch)."""
    import os

    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return spec.origin if spec.origin and spec.origin.endswith(".py") else None
    for folder in spec.submodule_search_locations or ():
        base = os.path.join(folder, *rest)
        for candidate in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(candidate):
                return candidate
    return None


def _check_path(path, what: str, where: str, import_it: bool) -> None:
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise SpecError(f"{where}: {what} must be a 'module:attr' string, got {path!r}")
    module, attr = path.split(":")
    if import_it:
        try:
            obj = load_object(path)
        except (ImportError, AttributeError) as e:
            raise SpecError(f"{where}: {what} {path!r} names nothing importable: {e}") from None
        if obj is None:
            raise SpecError(f"{where}: {what} {path!r} is None")
        return
    # torch paths: find the file and check that it defines ``attr``, without importing torch
    origin = _module_file(module)
    if origin is None:
        raise SpecError(f"{where}: {what} {path!r}: module {module!r} not found")
    with open(origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), origin)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if attr not in names:
        raise SpecError(f"{where}: {what} {path!r}: {origin} defines no {attr!r}")


def check_spec(spec, where: str = "SPEC") -> MethodSpec:
    """Check one ``SPEC`` (complete, paths that name something); returns it."""
    if not isinstance(spec, MethodSpec):
        raise SpecError(f"{where}: SPEC must be a lowrank_ref.registry.MethodSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name.isidentifier() or spec.name != spec.name.lower():
        raise SpecError(f"{where}: name must be a lower-case identifier, got {spec.name!r}")
    if not (isinstance(spec.config, type) and dataclasses.is_dataclass(spec.config)):
        raise SpecError(f"{where}: config of {spec.name!r} must be a dataclass type, got {spec.config!r}")
    if spec.model_fn is None:
        if spec.numpy is None or spec.torch is None:
            raise SpecError(f"{where}: layer method {spec.name!r} needs both numpy and torch classes")
        _check_path(spec.numpy, "numpy", where, import_it=True)
        _check_path(spec.torch, "torch", where, import_it=False)
        if not isinstance(spec.mergeable, bool):
            raise SpecError(f"{where}: mergeable of {spec.name!r} must be a bool, got {spec.mergeable!r}")
        cls_mergeable = getattr(load_object(spec.numpy), "MERGEABLE", True)
        if cls_mergeable != spec.mergeable:
            raise SpecError(f"{where}: SPEC.mergeable={spec.mergeable} of {spec.name!r} contradicts "
                            f"{spec.numpy}.MERGEABLE={cls_mergeable}")
        if spec.example is None or not callable(spec.example):
            raise SpecError(f"{where}: layer method {spec.name!r} needs an example (a callable -> Example)")
    else:
        if not isinstance(spec.model_fn, PerBackend) or spec.model_fn.numpy is None or spec.model_fn.torch is None:
            raise SpecError(f"{where}: model_fn of {spec.name!r} must be a PerBackend with numpy and torch")
        _check_path(spec.model_fn.numpy, "model_fn.numpy", where, import_it=True)
        _check_path(spec.model_fn.torch, "model_fn.torch", where, import_it=False)
        if spec.example is not None and not callable(spec.example):
            raise SpecError(f"{where}: example of {spec.name!r} must be a callable -> Example")
    fields_ = {f.name for f in dataclasses.fields(spec.config)}
    bad = [f for f in spec.overridable if f not in fields_]
    if bad:
        raise SpecError(f"{where}: overridable fields {bad} of {spec.name!r} are not fields of {spec.config.__name__}")
    for attr in ("shared", "hooks"):
        pb = getattr(spec, attr)
        if pb is None:
            continue
        if not isinstance(pb, PerBackend):
            raise SpecError(f"{where}: {attr} of {spec.name!r} must be a PerBackend")
        if pb.numpy is not None:
            _check_path(pb.numpy, f"{attr}.numpy", where, import_it=True)
        if pb.torch is not None:
            _check_path(pb.torch, f"{attr}.torch", where, import_it=False)
    if spec.final_rank is not None and not callable(spec.final_rank):
        raise SpecError(f"{where}: final_rank of {spec.name!r} must be a callable layer -> int")
    if spec.shapes is not None and not callable(spec.shapes):
        raise SpecError(f"{where}: shapes of {spec.name!r} must be a callable (config, in, out) -> {{name: shape}}")
    if spec.peft is not None and not isinstance(spec.peft, PeftMapping):
        raise SpecError(f"{where}: peft of {spec.name!r} must be a PeftMapping")
    if not isinstance(spec.compare, dict) or not all(isinstance(v, CompareRow) for v in spec.compare.values()):
        raise SpecError(f"{where}: compare of {spec.name!r} must be a dict of CompareRow")
    return spec


def _add(spec: MethodSpec, where: str) -> None:
    spec = dataclasses.replace(check_spec(spec, where), source=where)
    if spec.name in _METHODS:
        raise SpecError(f"{where}: method name {spec.name!r} is already claimed by {_METHODS[spec.name].source}")
    if spec.config in _BY_CONFIG:
        raise SpecError(f"{where}: config class {spec.config.__name__} of {spec.name!r} is already the "
                        f"config of {_BY_CONFIG[spec.config].name!r} ({_BY_CONFIG[spec.config].source}); "
                        "each method has its own config class")
    _METHODS[spec.name] = spec
    _BY_CONFIG[spec.config] = spec
    return spec


def discover(package: str = ADAPTER_PACKAGE) -> dict[str, MethodSpec]:
    """Import every module of ``package`` and collect its ``SPEC`` (once; later calls are free)."""
    global _DISCOVERED
    if _DISCOVERED and package == ADAPTER_PACKAGE:
        return _METHODS
    pkg = importlib.import_module(package)
    found: list[tuple[str, MethodSpec]] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _NOT_METHODS:
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        where = getattr(mod, "__file__", f"{package}.{info.name}")
        specs = getattr(mod, "SPEC", None)
        if specs is None:
            continue  # a helper module (pissa.py): it adds no method
        for spec in specs if isinstance(specs, (tuple, list)) else (specs,):
            found.append((where, spec))
    saved = dict(_METHODS), dict(_BY_CONFIG)
    _METHODS.clear()
    _BY_CONFIG.clear()
    try:
        for where, spec in found:
            _add(spec, where)
    except BaseException:
        _METHODS.clear(), _METHODS.update(saved[0])
        _BY_CONFIG.clear(), _BY_CONFIG.update(saved[1])
        raise
    if package == ADAPTER_PACKAGE:
        _DISCOVERED = True
    return _METHODS


@contextlib.contextmanager
def register_for_tests(*specs: MethodSpec):
    """Register ``specs`` for the length of a ``with`` block, then remove them.

    For tests only: a test module defines a method the package does not ship (a LoRA whose
    ``B`` is shared across layers, to exercise ``SPEC.shared`` before any shipped method uses
    it) and runs it through ``inject``, ``io`` and the rest exactly as a discovered ``SPEC``.
    Each spec is checked like a discovered one (its class paths must import, so the test module
    must be importable by name); a name or config class that is taken is a :class:`SpecError`.
    Yields the registered specs; on leaving the block the registry is as it was::

        with registry.register_for_tests(SPEC):
            inject(model, SharedBConfig(r=2), targets="q")
    """
    discover()
    added: list[MethodSpec] = []
    try:
        for spec in specs:
            added.append(_add(spec, f"register_for_tests({getattr(spec, 'name', spec)!r})"))
        yield tuple(added)
    finally:
        for spec in added:
            _METHODS.pop(spec.name, None)
            _BY_CONFIG.pop(spec.config, None)


def methods() -> dict[str, MethodSpec]:
    """Every registered method by name (discovery order: by file name)."""
    return discover()


def method_names() -> list[str]:
    return list(discover())


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    specs = discover()
    key = name.lower()
    if key not in specs:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(specs)}")
    return specs[key]


def config_class(name: str):
    """The config class called ``name`` (as stored in adapter-file metadata)."""
    for cls in _config_classes():
        if cls.__name__ == name:
            return cls
    known = sorted(c.__name__ for c in _config_classes())
    raise ValueError(f"unknown config class {name!r}; known: {', '.join(known)}")


def _config_classes():
    discover()
    return list(_BY_CONFIG)


def method_for_config(cfg) -> MethodSpec:
    """The method whose config class is exactly ``type(cfg)``."""
    discover()
    spec = _BY_CONFIG.get(type(cfg))
    if spec is None:
        known = ", ".join(sorted(c.__name__ for c in _BY_CONFIG))
        raise TypeError(f"no method takes a config of type {type(cfg).__name__}; known configs: {known}")
    return spec


def spec_of_layer(layer) -> MethodSpec:
    """The method whose NumPy or torch class is exactly ``type(layer)`` (a ``ValueError`` if none)."""
    import sys

    torch_loaded = "torch" in sys.modules
    for spec in discover().values():
        if not spec.is_layer:
            continue
        for path, needs_torch in ((spec.numpy, False), (spec.torch, True)):
            if needs_torch and not torch_loaded:
                continue
            module, _, attr = path.partition(":")
            mod = sys.modules.get(module)  # a layer's class is already imported
            if mod is not None and getattr(mod, attr, None) is type(layer):
                return spec
    raise ValueError(f"{type(layer).__name__} is not a registered method's layer; known methods: "
                     f"{', '.join(discover())}")


def compare_rows() -> dict[str, tuple[MethodSpec, CompareRow]]:
    """``{row name: (spec, row)}`` of every method's ``compare`` rows, in table order."""
    rows = []
    for spec in discover().values():
        for row_name, row in spec.compare.items():
            rows.append((row.order, row_name, spec, row))
    names = [r[1] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"compare row names claimed twice: {dup}")
    return {name: (spec, row) for _, name, spec, row in sorted(rows, key=lambda t: (t[0], t[1]))}


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    return backend.lower()
