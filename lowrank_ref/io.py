r"""Adapter files: save and load only the adapters' tensors, as safetensors, in PEFT's layout.

A file holds, for every adapted layer at dotted path ``P``, its tensors under PEFT's key names::

    base_model.model.P.lora_A.weight     A  (r, in)
    base_model.model.P.lora_B.weight     B  (out, r)

(the layout of PEFT's ``adapter_model.safetensors``; the ``base_model.model.`` prefix is PEFT's
wrapper path). The mapping from the math names to those keys is the method's
``SPEC.peft.tensors`` (``{"A": "lora_A.weight", "B": "lora_B.weight"}``); a tensor PEFT has no
name for is stored under its math name (``base_model.model.P.<name>``).

The safetensors header metadata (strings only) carries everything needed to rebuild the
adapters without the code that made them:

* ``format = "pt"`` (what Hugging Face tools expect), ``adapter_format = "lowrank-ref-adapter"``,
  ``adapter_format_version = "1"``;
* ``layers``: JSON ``{P: {"method", "config", "scaling", "scaling_rule", "tensors"}}``, the
  *full* config of each layer (so per-layer ranks and alphas survive) and, per tensor, its key,
  shape and dtype;
* ``user_metadata``: JSON of the ``metadata`` argument;
* ``shared`` (only for methods with ``SPEC.shared``): JSON ``{method: {"tensors": ...}}`` of the
  state the layers share, stored once under ``base_model.model.lowrank_shared.<method>.<name>``;
* ``method``, ``r``, ``alpha``, ``scaling``, ``scaling_rule`` at the top level too, for a reader
  with any safetensors tool: the common value when every layer has the same one, else
  ``"per-layer"`` (then ``layers`` has each). Loading reads ``layers``, never these.

Safetensors only, never pickle: a file is data and cannot run code when it is opened.
Loading checks everything (the file parses, the format, the methods, every key, shape, dtype,
NaN/inf) *before* it changes the model, and raises ``ValueError`` saying what is wrong.

Both backends: NumPy models/layers (``lowrank_ref``) and PyTorch models/layers
(``lowrank_gpu``); tensors pass through NumPy, so a file written from one loads into the other.
bfloat16 tensors are stored as float32 (NumPy has no bfloat16) and cast back on loading.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from lowrank_ref import registry
from lowrank_ref.config import config_from_dict, config_to_dict

__all__ = ["save_adapter", "load_adapter", "read_adapter_metadata", "peft_key", "shared_to_file", "shared_from_file",
           "FORMAT_NAME", "FORMAT_VERSION", "KEY_PREFIX"]

FORMAT_NAME = "lowrank-ref-adapter"
FORMAT_VERSION = 1
KEY_PREFIX = "base_model.model."


def peft_key(path: str, method, name: str) -> str:
    """The file key of tensor ``name`` (math name) of the ``method`` adapter (a registry name or
    spec) at dotted ``path``: PEFT's key suffix where the method's ``SPEC.peft`` names one."""
    spec = registry.get_method(method) if isinstance(method, str) else method
    suffix = spec.peft.tensors.get(name, name) if spec.peft is not None else name
    return f"{KEY_PREFIX}{path}.{suffix}" if path else f"{KEY_PREFIX}{suffix}"


# --- the two backends, seen through one small interface --------------------------------------
def _backend(obj) -> str:
    from lowrank_ref.nn.module import Module

    if isinstance(obj, Module):
        return "numpy"
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return "torch"
    raise TypeError(f"model_or_layer must be a lowrank_ref.nn.Module or a torch.nn.Module, got {type(obj).__name__}")


def _adapters(obj, backend: str) -> dict:
    if backend == "numpy":
        from lowrank_ref.inject import adapter_layers
    else:
        from lowrank_gpu.inject import adapter_layers
    return adapter_layers(obj)


def _is_adapter(obj, backend: str) -> bool:
    if backend == "numpy":
        from lowrank_ref.adapters.base import AdapterLinear
    else:
        from lowrank_gpu.adapters.base import AdapterLinear
    return isinstance(obj, AdapterLinear)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    if not isinstance(x, np.ndarray) and hasattr(x, "get"):  # cupy
        return x.get()
    return np.asarray(x)


def _shape(x) -> tuple:
    return tuple(int(d) for d in x.shape)


def _is_floating(x) -> bool:
    if hasattr(x, "is_floating_point"):
        return bool(x.is_floating_point())
    return bool(np.issubdtype(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, np.floating))


def _class_path(spec, backend: str):
    return spec.numpy if backend == "numpy" else spec.torch


def _method_of(layer, backend: str) -> str:
    """The registry name whose class for ``backend`` is exactly ``type(layer)``."""
    for name in registry.method_names():
        path = _class_path(registry.get_method(name), backend)
        if path is None:
            continue
        try:
            cls = registry.load_object(path)
        except (ImportError, AttributeError):  # a method whose file is not there (yet)
            continue
        if cls is type(layer):
            return name
    raise ValueError(f"{type(layer).__name__} is not a registered method; known methods: "
                     f"{', '.join(registry.method_names())}")


# --- saving ----------------------------------------------------------------------------------
def _layer_meta(path: str, layer, backend: str, tensors: dict) -> dict:
    cfg = layer.config
    spec = registry.get_method(_method_of(layer, backend))
    meta = {"method": spec.name, "config": config_to_dict(cfg), "tensors": {}}
    meta.update(spec.metadata_for(cfg))  # what the SPEC says files carry (LoRA: scaling, its rule)
    for name, value in layer.adapter_state().items():
        key = peft_key(path, spec, name)
        if key in tensors:
            raise ValueError(f"two tensors map to the file key {key!r}")
        arr = np.ascontiguousarray(_to_numpy(value))
        tensors[key] = arr
        meta["tensors"][name] = {"key": key, "shape": list(arr.shape), "dtype": arr.dtype.name}
    return meta


def _summary(layers_meta: dict) -> dict[str, str]:
    """The top-level ``method``/``r``/``alpha``/``scaling``/``scaling_rule`` strings."""
    values = {
        "method": [m["method"] for m in layers_meta.values()],
        "r": [m["config"].get("r") for m in layers_meta.values()],
        "alpha": [m["config"].get("alpha") for m in layers_meta.values()],
        "scaling": [m.get("scaling") for m in layers_meta.values()],
        "scaling_rule": [m.get("scaling_rule") for m in layers_meta.values()],
    }
    out = {}
    for key, vals in values.items():
        if all(v is None for v in vals):
            continue
        out[key] = str(vals[0]) if len(set(map(str, vals))) == 1 else "per-layer"
    return out


def save_adapter(model_or_layer, path, metadata: dict | None = None) -> str:
    """Write the adapters of ``model_or_layer`` (a model with adapters, or one adapter layer) to
    ``path`` as safetensors; returns ``path``. ``metadata``: a JSON-serialisable dict kept in the
    file. The file is written to a temporary name and moved into place, so a failed save never
    leaves half a file."""
    backend = _backend(model_or_layer)
    layers = _adapters(model_or_layer, backend)
    if not layers:
        raise ValueError("model_or_layer holds no adapter layers: inject() or adapt() first")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        user = json.dumps(metadata if metadata is not None else {}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    tensors: dict[str, np.ndarray] = {}
    layers_meta = {p: _layer_meta(p, layer, backend, tensors) for p, layer in layers.items()}
    shared_meta = shared_to_file(model_or_layer, tensors)
    header = {
        "format": "pt",
        "adapter_format": FORMAT_NAME,
        "adapter_format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers_meta, sort_keys=True),
        "user_metadata": user,
        **_summary(layers_meta),
    }
    if shared_meta:
        header["shared"] = json.dumps(shared_meta, sort_keys=True)
    from safetensors.numpy import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --- reading and checking --------------------------------------------------------------------
def _read(path) -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file, or a ValueError saying why not."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the safetensors parser's own error type, or a numpy dtype error
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    return tensors, header


def _parse_header(header: dict, path) -> tuple[dict, dict]:
    if header.get("adapter_format") != FORMAT_NAME:
        raise ValueError(f"{path!r} is not a lowrank-ref adapter file "
                         f"(adapter_format={header.get('adapter_format')!r}, expected {FORMAT_NAME!r})")
    version = header.get("adapter_format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path!r} has adapter_format_version {version!r}; this version reads {FORMAT_VERSION}")
    try:
        layers = json.loads(header["layers"])
        user = json.loads(header.get("user_metadata", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} has a damaged 'layers' metadata entry: {e}") from None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path!r}: 'layers' metadata must be a non-empty object")
    for p, m in layers.items():
        if not isinstance(m, dict) or not {"method", "config", "tensors"} <= set(m) \
                or not isinstance(m["tensors"], dict) or not isinstance(m["config"], dict):
            raise ValueError(f"{path!r}: layer {p!r} metadata needs 'method', 'config' and 'tensors'")
        for n, t in m["tensors"].items():
            ok = (isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("dtype"), str)
                  and isinstance(t.get("shape"), list) and all(isinstance(d, int) for d in t["shape"]))
            if not ok:
                raise ValueError(f"{path!r}: layer {p!r} tensor {n!r} metadata needs key, shape, dtype")
    return layers, user


def _options(p: str, m: dict) -> dict:
    """The layer's constructor options from the file: a flat object of JSON scalars."""
    options = m.get("options", {})
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, (bool, int, float, str)) for k, v in options.items()):
        raise ValueError(f"layer {p!r}: 'options' metadata must be an object of scalars, got {options!r}")
    return options


def _plan(layers: dict) -> dict:
    """{path: (spec, config)}, checking that every method and config is known and valid."""
    plan = {}
    for p, m in layers.items():
        spec = registry.get_method(m["method"])  # ValueError listing the known methods
        try:
            cfg = config_from_dict(m["config"])
            # files written before QLoRA had its own config kept blocksize/double_quant as "options"
            options = dict(_options(p, m))
            cfg = spec.coerce_config(cfg, options)
            if options:
                raise ValueError(f"unknown layer 'options' {sorted(options)}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {p!r}: bad config in file for method {spec.name!r}: {e}") from None
        plan[p] = (spec, cfg)
    return plan


def _check_tensors(tensors: dict, layers: dict) -> None:
    declared = {t["key"]: (p, n, t) for p, m in layers.items() for n, t in m["tensors"].items()}
    if len(declared) != sum(len(m["tensors"]) for m in layers.values()):
        raise ValueError("adapter file metadata names one tensor key twice")
    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise ValueError(f"adapter file tensors do not match its metadata: missing {missing}, extra {extra}")
    for key, (_, _, t) in declared.items():
        arr = tensors[key]
        if list(arr.shape) != list(t["shape"]):
            raise ValueError(f"{key}: shape {arr.shape} in the file, its metadata says {tuple(t['shape'])}")
        if arr.dtype.name != t["dtype"]:
            raise ValueError(f"{key}: dtype {arr.dtype.name} in the file, its metadata says {t['dtype']}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"{key} holds NaN or inf values")


def read_adapter_metadata(path) -> dict:
    """The metadata of an adapter file: ``{"layers": {...}, "user": {...}, "format_version": 1}``
    (every tensor is checked as well, so a damaged file is reported here too)."""
    tensors, header = _read(path)
    layers, user = _parse_header(header, path)
    shared_from_file(header, tensors, path)
    _check_tensors(tensors, layers)
    return {"layers": layers, "user": user, "format_version": int(header["adapter_format_version"])}


# --- loading ---------------------------------------------------------------------------------
def load_adapter(model_or_layer, path) -> dict:
    """Load adapter weights from ``path`` into ``model_or_layer``; returns the file's metadata.

    If the model holds no adapters yet, they are injected first, per layer as the file says
    (method and full config). Then every tensor's name, shape and dtype is checked against the
    model's adapters, and only then are weights copied. Any mismatch raises ``ValueError`` and
    leaves the model as it was."""
    backend = _backend(model_or_layer)
    tensors, header = _read(path)
    layers, user = _parse_header(header, path)
    plan = _plan(layers)
    shared = shared_from_file(header, tensors, path)
    _check_tensors(tensors, layers)

    adapters = _adapters(model_or_layer, backend)
    snapshot = None
    if not adapters:
        snapshot = _inject_from_plan(model_or_layer, plan, layers, backend)
        adapters = _adapters(model_or_layer, backend)
    try:
        states = _match(adapters, layers, plan, tensors, backend)
        from lowrank_ref.inject import check_shared_state, load_shared_state

        check_shared_state(model_or_layer, shared)
        for p, state in states.items():
            adapters[p].load_adapter_state(state)
        load_shared_state(model_or_layer, shared)
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    return {"layers": layers, "user": user, "format_version": int(header["adapter_format_version"])}


def _inject_from_plan(model, plan: dict, layers: dict, backend: str):
    if "" in plan:
        raise ValueError("the file holds a single adapter layer (path ''): load it into an adapter "
                         "layer built with the same config (lowrank_ref.adapt), not into a plain layer")
    groups: dict = {}  # layers built alike: same method
    for p, (spec, cfg) in plan.items():
        groups.setdefault(spec.name, {})[p] = (spec, cfg)
    if backend == "numpy":
        from lowrank_ref.inject import build_adapters
    else:
        from lowrank_gpu.inject import build_adapters
    snaps = []
    try:
        for group in groups.values():
            spec, _ = next(iter(group.values()))
            path = _class_path(spec, backend)
            if path is None:
                raise ValueError(f"method {spec.name!r} has no {backend} implementation")
            # a fresh random init on purpose: everything the layer needs must come from the file,
            # so a tensor that the file lacks but a seed would regenerate shows up as a mismatch
            snaps.append(build_adapters(model, {p: (spec, cfg) for p, (_, cfg) in group.items()}, rng=None))
    except BaseException:
        for s in reversed(snaps):
            s.restore()
        raise
    return _Snapshots(snaps)


class _Snapshots:
    def __init__(self, snaps):
        self.snaps = snaps

    def restore(self) -> None:
        for s in reversed(self.snaps):
            s.restore()


def _match(adapters: dict, layers: dict, plan: dict, tensors: dict, backend: str) -> dict:
    """{path: {name: array}} after checking the model's adapters against the file."""
    missing = sorted(set(adapters) - set(layers))
    extra = sorted(set(layers) - set(adapters))
    if missing or extra:
        raise ValueError(f"the file's adapted layers do not match the model's: layers in the model but "
                         f"not the file {missing}; in the file but not the model {extra}")
    states = {}
    for p, layer in adapters.items():
        spec, cfg = plan[p]
        where = f"layer {p!r}" if p else "the layer"
        method = _method_of(layer, backend)
        if method != spec.name:
            raise ValueError(f"{where}: the file holds method {spec.name!r}, the model has {method!r}")
        if layer.config != cfg:
            raise ValueError(f"{where}: config differs: file {cfg}, model {layer.config}")
        if getattr(layer, "merged", False):
            raise ValueError(f"{where} is merged: unmerge() before loading adapter weights")
        own = layer.adapter_state()
        declared = layers[p]["tensors"]
        if set(own) != set(declared):
            raise ValueError(f"{where}: the file holds tensors {sorted(declared)}, the layer needs {sorted(own)}")
        state = {}
        for n, t in declared.items():
            arr = tensors[t["key"]]
            if tuple(arr.shape) != _shape(own[n]):
                raise ValueError(f"{t['key']}: shape {tuple(arr.shape)} in the file, the layer's {n} is {_shape(own[n])}")
            if np.issubdtype(arr.dtype, np.floating) != _is_floating(own[n]):
                raise ValueError(f"{t['key']}: dtype {arr.dtype.name} in the file does not fit the layer's {n} "
                                 f"({getattr(own[n], 'dtype', '?')})")
            if not _is_floating(own[n]) and str(arr.dtype) not in str(own[n].dtype):
                raise ValueError(f"{t['key']}: dtype {arr.dtype.name} in the file, the layer's {n} is {own[n].dtype}")
            state[n] = arr
        states[p] = state
    return states


# --- shared state (SPEC.shared): once per file -----------------------------------------------
def shared_to_file(model_or_layer, tensors: dict) -> dict:
    """Add the shared-state tensors of ``model_or_layer`` (one module per method with
    ``SPEC.shared``, held once by the model as ``lowrank_shared.<method>``) to ``tensors``, each
    once, under ``base_model.model.lowrank_shared.<method>.<name>``; return the header's
    ``shared`` entry, ``{method: {"tensors": {name: {"key", "shape", "dtype"}}}}`` (``{}`` when
    nothing is shared: the file then has no such entry). NaN or inf is refused here, at save."""
    from lowrank_ref.inject import SHARED_ATTR, shared_state

    meta = {}
    for method, state in shared_state(model_or_layer).items():
        entry = {}
        for name, value in state.items():
            key = f"{KEY_PREFIX}{SHARED_ATTR}.{method}.{name}"
            arr = np.ascontiguousarray(_to_numpy(value))
            if key in tensors:
                raise ValueError(f"two tensors map to the file key {key!r}")
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise ValueError(f"shared state {method}.{name} holds NaN or inf values: not saved")
            tensors[key] = arr
            entry[name] = {"key": key, "shape": list(arr.shape), "dtype": arr.dtype.name}
        meta[method] = {"tensors": entry}
    return meta


def shared_from_file(header: dict, tensors: dict, path) -> dict:
    """Take the tensors that the header's ``shared`` entry declares out of ``tensors`` (what
    remains are the layers'), each checked against its metadata (key, shape, dtype, finite);
    return ``{method: {name: array}}`` (``{}`` for a file without shared state)."""
    raw = header.get("shared")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path!r} has a damaged 'shared' metadata entry: {type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r}: 'shared' metadata must be an object")
    out: dict = {}
    for method, entry in meta.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise ValueError(f"{path!r}: shared state {method!r} metadata needs 'tensors'")
        out[method] = {}
        for name, t in entry["tensors"].items():
            ok = (isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("dtype"), str)
                  and isinstance(t.get("shape"), list) and all(type(d) is int for d in t["shape"]))
            if not ok:
                raise ValueError(f"{path!r}: shared tensor {method}.{name} metadata needs key, shape, dtype")
            if t["key"] not in tensors:
                raise ValueError(f"{path!r}: shared tensor {t['key']!r} is declared but not in the file")
            arr = tensors.pop(t["key"])
            if list(arr.shape) != t["shape"] or arr.dtype.name != t["dtype"]:
                raise ValueError(f"{t['key']}: {arr.dtype.name} {tuple(arr.shape)} in the file, its metadata "
                                 f"says {t['dtype']} {tuple(t['shape'])}")
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise ValueError(f"{t['key']} holds NaN or inf values")
            out[method][name] = arr
    return out
