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
  shape and dtype; a layer whose base was stored in 4 bits by ``inject(quantize=...)`` also has
  ``"base_quant": {"quant_type", "blocksize", "double_quant"}`` (a QLoRA layer's storage is in its
  config already). Loading into a model without adapters quantises those layers' float bases the
  same way before it builds the adapters (so a file trained on an NF4 base is never silently run
  on the float weights); loading into adapters that are already there refuses a base stored
  otherwise. The 4-bit base itself is not in the file: it is rebuilt from the model's weights;
* ``user_metadata``: JSON of the ``metadata`` argument;
* ``shared`` (only for methods with ``SPEC.shared``): JSON ``{method: {"tensors": ...}}`` of the
  state the layers share, stored once under ``base_model.model.lowrank_shared.<method>.<name>``;
* ``method``, ``r``, ``alpha``, ``scaling``, ``scaling_rule`` at the top level too, for a reader
  with any safetensors tool: the common value when every layer has the same one, else
  ``"per-layer"`` (then ``layers`` has each). Loading reads ``layers``, never these.

Safetensors only, never pickle: a file is data and cannot run code when it is opened.
Loading checks everything (the file parses, the format, the methods, every key, shape, dtype,
NaN/inf) *before* it changes the model, and raises ``ValueError`` saying what is wrong.

**Files are untrusted.** :func:`read_safetensors` reads the container by hand: the 8-byte header
length is checked against the file size (and a cap), the JSON header's nesting depth is counted
before it is parsed (every JSON read from a file, ``layers`` and ``adapter_config.json``
included, is depth-bounded: a ``ValueError``, never a ``RecursionError``), and every tensor's
dtype, shape and byte range is checked before one byte of data is read. What the metadata claims
(a rank of 20,000,000 in a 2 KB file) is checked against the tensors and the model's layer before
any adapter is built (:func:`check_sizes`, exact where the method's ``SPEC.shapes`` says what its
layer holds); values that the model's dtype cannot hold (a float64 ``1e300`` into float32) are
refused rather than loaded as inf (:func:`check_fits`); saving NaN or inf is refused at save time.

**PEFT folders** (``PeftModel.save_pretrained``: ``adapter_config.json`` +
``adapter_model.safetensors``), written once from the ``SPEC``\ s: :func:`load_peft` picks the
method whose ``SPEC.peft.peft_type`` is the folder's and whose ``claims`` accepts its config, builds
each layer's config with ``SPEC.peft.from_peft``, selects the layers with PEFT's own
``target_modules`` / ``exclude_modules`` rules (:func:`peft_matches`), and loads the tensors
(through ``SPEC.peft.tensors`` and ``from_peft_tensor``); :func:`save_peft` writes the folder back
(``SPEC.peft.to_peft``); :func:`peft_state_dict` gives the tensors or their gradients under PEFT's
keys. A field of ``adapter_config.json`` that neither io nor the method's mapping understands, and
that asks for something (not null/false/empty), is refused with the list of what is supported.

Both backends: NumPy models/layers (``lowrank_ref``) and PyTorch models/layers
(``lowrank_gpu``); tensors pass through NumPy, so a file written from one loads into the other.
bfloat16 tensors are stored as float32 (NumPy has no bfloat16) and cast back on loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from lowrank_ref import registry
from lowrank_ref.config import config_from_dict, config_to_dict

__all__ = ["save_adapter", "load_adapter", "read_adapter_metadata", "peft_key", "shared_to_file", "shared_from_file",
           "load_peft", "save_peft", "peft_state_dict", "read_safetensors", "parse_json",
           "check_sizes", "check_fits", "peft_matches", "peft_pattern", "peft_uniform", "peft_default_and_pattern",
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
def _backend(obj, what: str = "model_or_layer") -> str:
    from lowrank_ref.nn.module import Module

    if isinstance(obj, Module):
        return "numpy"
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return "torch"
    raise TypeError(f"{what} must be a lowrank_ref.nn.Module or a torch.nn.Module, got {type(obj).__name__}")


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
def _check_finite_to_save(key: str, arr: np.ndarray) -> None:
    """Refuse to write NaN or inf: a file that cannot load is found out now, not at load time."""
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"cannot save {key}: it holds {bad} NaN or inf value(s) (the adapter diverged?)")


def _layer_meta(path: str, layer, backend: str, tensors: dict) -> dict:
    cfg = layer.config
    spec = registry.get_method(_method_of(layer, backend))
    meta = {"method": spec.name, "config": config_to_dict(cfg), "tensors": {}}
    meta.update(spec.metadata_for(cfg))  # what the SPEC says files carry (LoRA: scaling, its rule)
    quant = _layer_quant(layer, spec)
    if quant is not None:  # inject(quantize=...): the base the adapter was trained on
        meta["base_quant"] = quant.to_dict()
    for name, value in layer.adapter_state().items():
        key = peft_key(path, spec, name)
        if key in tensors:
            raise ValueError(f"two tensors map to the file key {key!r}")
        arr = np.ascontiguousarray(_to_numpy(value))
        _check_finite_to_save(key, arr)
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
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    if _json_depth(user) > MAX_JSON_DEPTH:  # what loading would refuse is refused now
        raise ValueError(f"metadata nests {_json_depth(user)} levels deep; files keep at most {MAX_JSON_DEPTH}")
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


# --- untrusted bytes: the safetensors container and JSON, read with bounds ----------------------
MAX_HEADER_BYTES = 32 << 20  # a safetensors header (JSON) larger than this is refused unread
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json larger than this is refused unread
MAX_JSON_DEPTH = 32  # nesting of any JSON read from a file: deeper is a ValueError, never a RecursionError

# safetensors dtype names -> NumPy dtype (little-endian); BF16 is read as its 16 bits, then widened
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
def _json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text``, counted without parsing it (brackets
    inside string literals do not count), in linear time: a hostile file can make the parser
    neither recurse nor, with a crafted string, spend quadratic time here."""
    b = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)  # ASCII bytes stay themselves
    quotes = np.flatnonzero(b == ord('"'))
    slashes = np.flatnonzero(b == ord("\\"))
    if slashes.size and quotes.size:  # a quote after an odd run of backslashes is escaped
        new_run = np.concatenate(([True], np.diff(slashes) != 1))
        run_start = slashes[new_run][np.cumsum(new_run) - 1]  # where each backslash's run begins
        j = np.searchsorted(slashes, quotes - 1)
        hit = (j < slashes.size) & (slashes[np.minimum(j, slashes.size - 1)] == quotes - 1)
        run = np.where(hit, quotes - run_start[np.minimum(j, slashes.size - 1)], 0)
        quotes = quotes[run % 2 == 0]
    brackets = np.flatnonzero((b == ord("[")) | (b == ord("{")) | (b == ord("]")) | (b == ord("}")))
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # outside strings: even quotes before
    if brackets.size == 0:
        return 0
    kind = b[brackets]
    steps = np.where((kind == ord("[")) | (kind == ord("{")), 1, -1)
    return int(max(0, np.cumsum(steps).max()))


def parse_json(text, what: str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` for text from a file: a ``ValueError`` naming ``what`` if it is not
    JSON, nests deeper than ``max_depth``, or holds NaN/Infinity (not JSON)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 text: {e}") from None
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a JSON string, got {type(text).__name__}")
    depth = _json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep; at most {max_depth} are read")

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _dims(shape) -> bool:
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                           for d in shape)


def read_safetensors(path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file, read by hand so that nothing is allocated
    before it is checked: the 8-byte header length against the file size, the JSON header's depth,
    every entry's dtype, shape and byte range (inside the data, no overlaps, exactly
    ``prod(shape) * itemsize`` bytes). Only then are the tensors read, each from its own range.
    BF16 tensors come back as float32 (exactly). Any problem is a ``ValueError``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")

    def bad(why):
        return ValueError(f"{path!r} is not a readable safetensors file: {why}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = np.frombuffer(f.read(8), dtype="<u8")
        n = int(n)
        if n > size - 8:
            raise bad(f"the header claims {n} bytes, the file has {size - 8} after the length")
        if n > MAX_HEADER_BYTES:
            raise bad(f"a {n}-byte header is larger than the {MAX_HEADER_BYTES} bytes read")
        try:
            header = parse_json(f.read(n), "its header")
        except ValueError as e:
            raise bad(e) from None
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise bad("__metadata__ must map strings to strings")
        data_size = size - 8 - n
        ranges = []
        for key, entry in header.items():
            if not (isinstance(entry, dict) and entry.get("dtype") in _ST_DTYPES and _dims(entry.get("shape"))
                    and _dims(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2):
                raise bad(f"tensor {key!r}: needs a known dtype ({', '.join(_ST_DTYPES)}), a shape of "
                          f"non-negative ints and two data_offsets; got {str(entry)[:200]}")
            begin, stop = entry["data_offsets"]
            nbytes = int(np.prod(entry["shape"], dtype=object)) * np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize
            if not begin <= stop <= data_size or stop - begin != nbytes:
                raise bad(f"tensor {key!r}: bytes [{begin}, {stop}) for {nbytes} bytes of "
                          f"{entry['dtype']}{entry['shape']}; the data holds {data_size}")
            ranges.append((begin, stop, key))
        ranges.sort()
        for (_, stop, key), (begin, _, other) in zip(ranges, ranges[1:]):
            if begin < stop:
                raise bad(f"tensors {key!r} and {other!r} overlap")
        tensors = {}
        for begin, stop, key in ranges:
            entry = header[key]
            f.seek(8 + n + begin)
            buf = bytearray(stop - begin)
            if f.readinto(buf) != len(buf):
                raise bad(f"tensor {key!r}: the file ends early")
            arr = np.frombuffer(buf, dtype=_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            if entry["dtype"] == "BF16":  # the high half of a float32
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            tensors[key] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return tensors, meta


def _read(path) -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file, or a ValueError saying why not."""
    return read_safetensors(path)


def _parse_header(header: dict, path) -> tuple[dict, dict]:
    if header.get("adapter_format") != FORMAT_NAME:
        raise ValueError(f"{path!r} is not a lowrank-ref adapter file "
                         f"(adapter_format={header.get('adapter_format')!r}, expected {FORMAT_NAME!r})")
    version = header.get("adapter_format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path!r} has adapter_format_version {version!r}; this version reads {FORMAT_VERSION}")
    if "layers" not in header:
        raise ValueError(f"{path!r} has a damaged 'layers' metadata entry: it is missing")
    try:
        layers = parse_json(header["layers"], "its 'layers' metadata")
        user = parse_json(header.get("user_metadata", "{}"), "its 'user_metadata'")
    except ValueError as e:
        raise ValueError(f"{path!r} has a damaged 'layers' metadata entry: {e}") from None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path!r}: 'layers' metadata must be a non-empty object")
    for p, m in layers.items():
        if not isinstance(m, dict) or not {"method", "config", "tensors"} <= set(m) \
                or not isinstance(m["tensors"], dict) or not isinstance(m["config"], dict) \
                or not isinstance(m["method"], str):
            raise ValueError(f"{path!r}: layer {p!r} metadata needs 'method', 'config' and 'tensors'")
        for n, t in m["tensors"].items():
            ok = (isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("dtype"), str)
                  and _dims(t.get("shape")))
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


def _layer_quant(layer, spec):
    """The :class:`~lowrank_ref.inject.BaseQuant` of an adapter put on a 4-bit base by
    ``inject(quantize=...)``; ``None`` for a float base and for a method whose config holds its
    storage (QLoRA)."""
    from lowrank_ref.inject import BaseQuant, quantizes_itself

    if not getattr(layer, "quantized", False) or quantizes_itself(spec):
        return None
    return BaseQuant.of(layer.base)


def _base_quants(layers: dict, plan: dict) -> dict:
    """``{path: BaseQuant or None}`` from the file's ``base_quant`` entries (untrusted: a bad one
    is a ``ValueError`` naming the layer)."""
    from lowrank_ref.inject import BaseQuant, check_quantizable

    out = {}
    for p, m in layers.items():
        q = m.get("base_quant")
        if q is None:
            out[p] = None
            continue
        try:
            if not isinstance(q, dict) or set(q) != {"quant_type", "blocksize", "double_quant"}:
                raise ValueError(f"must be an object with quant_type, blocksize, double_quant, got {q!r}")
            out[p] = BaseQuant(q["quant_type"], q["blocksize"], q["double_quant"])
            check_quantizable(plan[p][0], out[p])
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {p!r}: bad 'base_quant' metadata: {e}") from None
    return out


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
    quants = _base_quants(layers, plan)
    shared = shared_from_file(header, tensors, path)
    _check_tensors(tensors, layers)

    adapters = _adapters(model_or_layer, backend)
    snapshot = None
    if not adapters:
        shapes = {p: {n: tuple(t["shape"]) for n, t in m["tensors"].items()} for p, m in layers.items()}
        check_sizes(model_or_layer, plan, shapes)  # before anything is built (allocated)
        snapshot = _inject_from_plan(model_or_layer, plan, layers, backend, quants)
        adapters = _adapters(model_or_layer, backend)
    try:
        states = _match(adapters, layers, plan, tensors, backend, quants)
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


def _inject_from_plan(model, plan: dict, layers: dict, backend: str, quants: dict | None = None):
    if "" in plan:
        raise ValueError("the file holds a single adapter layer (path ''): load it into an adapter "
                         "layer built with the same config (lowrank_ref.adapt), not into a plain layer")
    quants = quants or {}
    groups: dict = {}  # layers built alike: same method, same base storage
    for p, (spec, cfg) in plan.items():
        groups.setdefault((spec.name, quants.get(p)), {})[p] = (spec, cfg)
    if backend == "numpy":
        from lowrank_ref.inject import build_adapters
    else:
        from lowrank_gpu.inject import build_adapters
    snaps = []
    try:
        for (_, quant), group in groups.items():
            spec, _ = next(iter(group.values()))
            path = _class_path(spec, backend)
            if path is None:
                raise ValueError(f"method {spec.name!r} has no {backend} implementation")
            # a fresh random init on purpose: everything the layer needs must come from the file,
            # so a tensor that the file lacks but a seed would regenerate shows up as a mismatch
            snaps.append(build_adapters(model, {p: (spec, cfg) for p, (_, cfg) in group.items()}, rng=None,
                                        quantize=quant))
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


def _match(adapters: dict, layers: dict, plan: dict, tensors: dict, backend: str, quants: dict | None = None) -> dict:
    """{path: {name: array}} after checking the model's adapters against the file (and, with
    ``quants``, the storage of their bases against the file's ``base_quant``)."""
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
        if quants is not None and _layer_quant(layer, spec) != quants[p]:
            said = lambda q: "a float base" if q is None else f"a base stored in {q}"  # noqa: E731
            raise ValueError(f"{where}: the file's adapter was trained on {said(quants[p])}, the model's layer "
                             f"has {said(_layer_quant(layer, spec))} (inject(..., quantize=...) as the file says)")
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
            check_fits(t["key"], arr, own[n])
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
    meta = parse_json(raw, f"{path!r}: the 'shared' metadata entry")  # depth-bounded, like 'layers'
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


# --- what a file claims, checked against the model before anything is allocated ---------------
def _dtype_limit(target):
    """The largest finite magnitude ``target``'s dtype holds (None: not a float)."""
    dtype = getattr(target, "dtype", None)
    if hasattr(dtype, "is_floating_point"):  # a torch dtype
        import torch

        return float(torch.finfo(dtype).max) if dtype.is_floating_point else None
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype).max) if np.issubdtype(dtype, np.floating) else None


def check_fits(key: str, arr: np.ndarray, target) -> None:
    """Refuse values that the target tensor's dtype cannot hold (a float64 ``1e300`` into float32
    would load as inf): a ``ValueError`` naming ``key``; NaN and inf are refused as well."""
    if not np.issubdtype(arr.dtype, np.inexact) or arr.size == 0:
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{key} holds NaN or inf values")
    limit = _dtype_limit(target)
    peak = float(np.max(np.abs(arr)))
    if limit is not None and peak > limit:
        raise ValueError(f"{key}: a value of magnitude {peak:.4g} overflows the layer's "
                         f"{getattr(target, 'dtype', '?')} (largest {limit:.4g}); it would load as inf")


def _base_of(model, path: str):
    """The layer at ``path`` that an adapter would wrap (None where there is none)."""
    try:
        mod = model.get_submodule(path) if path else model
    except (AttributeError, KeyError):
        return None
    mod = getattr(mod, "base", mod)
    return mod if hasattr(mod, "in_features") and hasattr(mod, "out_features") else None


def check_sizes(model, plan: dict, shapes: dict) -> None:
    """Before building adapters from a file: every layer's config must fit the tensors the file
    holds for it and the model's layer, so a small file cannot make the loader allocate a lot.

    ``plan``: ``{path: (spec, config)}``; ``shapes``: ``{path: {math name: shape}}`` of the file.
    With ``SPEC.shapes`` the file's shapes must be exactly the ones the config gives on that layer;
    without it, every integer field of the config is bounded by the scalars the file holds for the
    layer plus those of the base weight."""
    for p, (spec, cfg) in plan.items():
        base = _base_of(model, p)
        if base is None:
            continue  # no such layer: the injection step says so, listing the layers there are
        fin, fout = int(base.in_features), int(base.out_features)
        have = {n: tuple(int(d) for d in s) for n, s in shapes[p].items()}
        where = f"layer {p!r}" if p else "the layer"
        if spec.shapes is not None:
            want = {n: tuple(int(d) for d in s) for n, s in spec.shapes(cfg, fin, fout).items()}
            if want != have:
                diff = {n: (have.get(n), want.get(n)) for n in sorted(set(want) | set(have))
                        if have.get(n) != want.get(n)}
                raise ValueError(f"{where} ({fout}x{fin}): the shapes of the file's tensors do not fit its config {cfg}: "
                                 + ", ".join(f"{n} is {h} in the file, the config needs {w}"
                                             for n, (h, w) in diff.items()))
            continue
        bound = sum(int(np.prod(s, dtype=object)) for s in have.values()) + fin * fout
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v > bound:
                raise ValueError(f"{where} ({fout}x{fin}): config field {f.name}={v} is larger than the "
                                 f"{bound} scalars of the file's tensors and the base weight together")


# --- PEFT folders: adapter_config.json + adapter_model.safetensors ---------------------------
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# fields of adapter_config.json that every method shares: read here (targets) or informative only
PEFT_COMMON = ("peft_type", "target_modules", "exclude_modules", "task_type", "base_model_name_or_path",
               "revision", "inference_mode", "auto_mapping", "peft_version")
MAX_PATTERN_CHARS = 4096  # a target or pattern regex longer than this is refused


def _inert(v) -> bool:
    """A field value that asks for nothing (PEFT writes every field; most hold null/false/{})."""
    if isinstance(v, dict):
        return all(_inert(x) for x in v.values())
    return v is None or v is False or (isinstance(v, (str, list)) and not v)


def _regex(pattern, what: str):
    import re

    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} must be a string of at most {MAX_PATTERN_CHARS} characters, got {str(pattern)[:80]!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a regular expression: {e}") from None


def _check_targets(targets, what: str):
    if isinstance(targets, str):
        _regex(targets, what)
        return targets
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{what} must be a regular expression or a list of module names, got {str(targets)[:200]}")
    return targets


def peft_matches(name: str, targets) -> bool:
    """Does PEFT's ``target_modules`` (or ``exclude_modules``) select the
    module called ``name``? A string is a regular expression that must match the whole name; a
    list matches a name equal to an entry or ending in ``"." + entry`` (PEFT's rule,
    ``peft.tuners.tuners_utils.check_target_module_exists``)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return _regex(targets, "target pattern").fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def peft_pattern(patterns, name: str, default, what: str = "pattern"):
    """The value ``rank_pattern``/``alpha_pattern`` give the module ``name``: the first key ``k``
    (in the file's order) for which ``(.*\\.)?(k)$`` matches ``name`` (PEFT's
    ``get_pattern_key``), else ``default``."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise ValueError(f"{what} must be an object {{pattern: value}}, got {type(patterns).__name__}")
    for key, value in patterns.items():
        _regex(key, f"{what} key")
        if _regex(rf"(.*\.)?({key})$", f"{what} key").match(name):
            return value
    return default


def peft_uniform(configs: dict, field: str):
    """The one value of ``field`` over ``configs`` ``{path: config}``, or a ``ValueError``: PEFT's
    folder holds it once for every layer."""
    values = {getattr(c, field) for c in configs.values()}
    if len(values) != 1:
        raise ValueError(f"the layers differ in {field!r} ({sorted(map(repr, values))}); a PEFT folder holds one "
                         f"{field} for every layer")
    return values.pop()


def peft_default_and_pattern(configs: dict, field: str):
    """``(value, {escaped path: other value})``: the most common value of ``field`` (ties: the
    smallest) and a PEFT pattern, matching exactly one layer, for every layer that differs."""
    import re
    from collections import Counter

    counts = Counter(getattr(c, field) for c in configs.values())
    top = max(counts.values())
    common = min(v for v, k in counts.items() if k == top)
    pattern = {re.escape(p): _json_number(getattr(c, field)) for p, c in configs.items() if getattr(c, field) != common}
    return _json_number(common), pattern


def _json_number(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _linear_modules(model, backend: str) -> dict:
    """``{name: module}`` of every module PEFT could see in ``model``, adapters kept whole (their
    ``base`` is not a separate module); a second dict of the linear (or adapted) ones."""
    if backend == "numpy":
        from lowrank_ref.adapters.base import AdapterLinear
        from lowrank_ref.nn.linear import Linear
    else:
        from torch.nn import Linear

        from lowrank_gpu.adapters.base import AdapterLinear
    every, linear, inside = {}, {}, []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        every[name] = mod
        if isinstance(mod, AdapterLinear):
            inside.append(name)
            linear[name] = mod
        elif isinstance(mod, Linear):
            linear[name] = mod
    return every, linear


def _folder(folder) -> str:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    return os.fspath(folder)


def _read_peft_config(folder) -> tuple[str, dict]:
    folder = _folder(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no PEFT folder at {folder!r}")
    path = os.path.join(folder, PEFT_CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} holds no {PEFT_CONFIG_NAME}: not a PeftModel.save_pretrained folder")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path!r} is {size} bytes; an adapter config of more than {MAX_CONFIG_BYTES} is not read")
    with open(path, "rb") as f:
        cfg = parse_json(f.read(), repr(path))
    if not isinstance(cfg, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(cfg).__name__}")
    return path, cfg


def _peft_methods() -> list:
    return [s for s in registry.methods().values() if s.is_layer and s.peft is not None]


def _peft_spec(cfg: dict, where: str):
    """The one method whose ``SPEC.peft`` reads this config (``peft_type`` and ``claims``)."""
    specs = _peft_methods()
    loadable = [s for s in specs if s.peft.from_peft is not None]
    supported = ", ".join(f"{s.peft.peft_type} ({s.name})" for s in loadable)
    ptype = cfg.get("peft_type")
    if not isinstance(ptype, str):
        raise ValueError(f"{where}: peft_type is missing or not a string ({ptype!r}); supported: {supported}")
    hits = []
    for s in loadable:
        if s.peft.peft_type.upper() != ptype.upper():
            continue
        try:
            claimed = s.peft.claims is None or bool(s.peft.claims(cfg))
        except Exception as e:  # a claims() that cannot read this config: it does not claim it
            raise ValueError(f"{where}: the {s.name!r} mapping cannot read this config: {e}") from None
        if claimed:
            hits.append(s)
    if not hits:
        known = sorted({s.peft.peft_type for s in loadable})
        if ptype.upper() in known:
            raise ValueError(f"{where}: no method reads this {ptype} config (its options pick none of: {supported})")
        raise ValueError(f"{where}: peft_type {ptype!r} is not supported; supported: {supported}")
    if len(hits) > 1:
        raise ValueError(f"{where}: methods {[s.name for s in hits]} all claim this {ptype} config")
    spec = hits[0]
    understood = set(PEFT_COMMON) | set(spec.peft.options)
    extra = sorted(k for k, v in cfg.items() if k not in understood and not _inert(v))
    if extra:
        raise ValueError(f"{where}: field(s) {extra} are not supported for {spec.name!r} (PEFT {ptype}); "
                         f"supported fields: {', '.join(sorted(understood))}")
    return spec


def _peft_targets(cfg: dict, modules: dict, linear: dict, where: str) -> list[str]:
    """The module names ``target_modules`` selects (minus ``exclude_modules``), all linear; an
    entry that selects nothing or a module that is not linear is an error."""
    targets = cfg.get("target_modules")
    if targets is None:
        raise ValueError(f"{where}: target_modules is missing (null); name the modules the adapters are on")
    if targets == "all-linear":
        raise ValueError(f"{where}: target_modules='all-linear' is not supported (PEFT resolves it from the "
                         "transformers model's output layer); list the modules instead")
    targets = _check_targets(targets, f"{where}: target_modules")
    exclude = cfg.get("exclude_modules")
    if exclude is not None:
        exclude = _check_targets(exclude, f"{where}: exclude_modules")
    names = list(modules)
    for t in [targets] if isinstance(targets, str) else targets:
        if not any(peft_matches(n, t if isinstance(targets, str) else [t]) for n in names):
            listing = ", ".join(linear) or "(none)"
            raise ValueError(f"{where}: target_modules entry {t!r} matches no module of the model; "
                             f"its linear layers are: {listing}")
    chosen = [n for n in names if peft_matches(n, targets) and not peft_matches(n, exclude)]
    if not chosen:
        raise ValueError(f"{where}: exclude_modules leaves none of the target_modules")
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in chosen if n not in linear]
    if not_linear:
        raise ValueError(f"{where}: target_modules selects modules that are not linear layers: "
                         f"{', '.join(not_linear[:10])}")
    return chosen


def _short(keys, k: int = 8) -> str:
    keys = sorted(keys)
    return str(keys[:k])[:-1] + (f", ... ({len(keys) - k} more)]" if len(keys) > k else "]")


def _peft_tensor_names(model, spec, path: str, cfg) -> list:
    """The tensors a layer at ``path`` holds: ``SPEC.shapes``'s names where the method gives them
    (LoKr's set depends on the layer's size: ``w1`` or ``w1_a``/``w1_b``), else every name of
    ``SPEC.peft.tensors``."""
    base = _base_of(model, path)
    if spec.shapes is None or base is None:
        return list(spec.peft.tensors)
    try:
        return list(spec.shapes(cfg, int(base.in_features), int(base.out_features)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"layer {path!r}: {e}") from None


def load_peft(model, folder) -> dict:
    """Inject and load the adapters of a ``PeftModel.save_pretrained`` folder into ``model``.

    ``model`` is a NumPy model (``lowrank_ref.nn``) or a torch model (``lowrank_gpu``'s GPT, a
    ``transformers`` model, any ``torch.nn.Module``) whose module names are the PEFT base model's.
    The method is the registered one whose ``SPEC.peft`` has the folder's ``peft_type`` and claims
    its options (LoRA or DoRA by ``use_dora``); each layer's config comes from
    ``SPEC.peft.from_peft`` (``r``, ``lora_alpha``, ``rank_pattern``, ...). Everything is checked
    (the config's fields and types, the targets, every tensor's key, shape and values) before the
    model changes; an error is a ``ValueError`` and leaves the model as it was. A model that already
    holds adapters on exactly those layers, with the same configs, just gets the weights.

    Returns ``{"method": name, "configs": {path: config}, "peft_config": dict}``."""
    backend = _backend(model, "model")
    where, cfg = _read_peft_config(folder)
    spec = _peft_spec(cfg, where)
    modules, linear = _linear_modules(model, backend)
    paths = _peft_targets(cfg, modules, linear, where)
    plan = {}
    for p in paths:
        try:
            plan[p] = (spec, spec.peft.from_peft(cfg, p))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: layer {p!r}: {e}") from None
    weights = os.path.join(os.fspath(folder), PEFT_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        other = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(os.fspath(folder), n))]
        why = f" (it holds {other[0]}, a pickle: not read; save with safe_serialization=True)" if other else ""
        raise ValueError(f"{os.fspath(folder)!r} holds no {PEFT_WEIGHTS_NAME}{why}")
    tensors, _ = read_safetensors(weights)
    expected = {peft_key(p, spec, n): (p, n) for p in paths for n in _peft_tensor_names(model, spec, p, plan[p][1])}
    shared_keys = {key: n for n, key in spec.peft.shared.items()}  # stored once per folder
    missing = set(expected) - set(tensors) | set(shared_keys) - set(tensors)
    extra = set(tensors) - set(expected) - set(shared_keys)
    if missing or extra:
        raise ValueError(f"{weights!r}: its tensors do not match the model's target layers: missing "
                         f"{_short(missing)}, unexpected {_short(extra)}")
    states: dict = {p: {} for p in paths}
    for key, (p, n) in expected.items():
        arr = tensors[key]
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{key}: dtype {arr.dtype.name}; adapter tensors are floating point")
        if spec.peft.from_peft_tensor is not None:
            try:
                arr = np.asarray(spec.peft.from_peft_tensor(n, arr, plan[p][1]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{key}: {e}") from None
        states[p][n] = arr
    shared_state = {}
    for key, n in shared_keys.items():
        if not np.issubdtype(tensors[key].dtype, np.floating):
            raise ValueError(f"{key}: dtype {tensors[key].dtype.name}; adapter tensors are floating point")
        shared_state[n] = tensors[key]
    shapes = {p: {n: a.shape for n, a in st.items()} for p, st in states.items()}
    adapters = _adapters(model, backend)
    snapshot = None
    if not adapters:
        check_sizes(model, plan, shapes)
        snapshot = _inject_from_plan(model, plan, {}, backend)
        adapters = _adapters(model, backend)
    elif set(adapters) != set(paths):
        raise ValueError(f"the model already holds adapters on {_short(adapters)}, the folder's targets are "
                         f"{_short(paths)}: load into the bare model, or into adapters on the same layers")
    try:
        layers = {p: {"tensors": {n: {"key": peft_key(p, spec, n)} for n in states[p]}} for p in paths}
        loaded = _match(adapters, layers, plan, {peft_key(p, spec, n): a for p in paths for n, a in states[p].items()},
                        backend)
        if shared_keys:
            from lowrank_ref.inject import load_shared_state

            try:
                load_shared_state(model, {spec.name: shared_state})
            except ValueError as e:
                raise ValueError(f"{weights!r}: {e}") from None
        for p, state in loaded.items():
            adapters[p].load_adapter_state(state)
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    return {"method": spec.name, "configs": {p: c for p, (_, c) in plan.items()}, "peft_config": cfg}


def _peft_layers(model, backend: str, what: str) -> tuple[dict, dict]:
    """``(layers, specs)``: the adapter layers and their methods, each with a PEFT mapping."""
    layers = _adapters(model, backend)
    if not layers:
        raise ValueError("model holds no adapter layers: inject() or load_peft() first")
    specs = {p: registry.get_method(_method_of(layer, backend)) for p, layer in layers.items()}
    none = sorted({s.name for s in specs.values() if s.peft is None or (what == "save" and s.peft.to_peft is None)})
    if none:
        ok = [s.name for s in _peft_methods() if what != "save" or s.peft.to_peft is not None]
        raise ValueError(f"method(s) {none} have no PEFT mapping{' for saving' if what == 'save' else ''}; "
                         f"methods that do: {', '.join(ok)}")
    return layers, specs


def _peft_tensor(spec, name: str, value, cfg) -> np.ndarray:
    arr = np.ascontiguousarray(_to_numpy(value))
    if spec.peft.to_peft_tensor is not None:
        arr = np.ascontiguousarray(spec.peft.to_peft_tensor(name, arr, cfg))
    return arr


def peft_state_dict(model, grads: bool = False) -> dict:
    """``{PEFT key: NumPy array}`` of every adapter tensor in ``model`` (NumPy or torch), under the
    keys of PEFT's ``adapter_model.safetensors`` (``base_model.model.<path>.lora_A.weight``) and
    in PEFT's shapes; with ``grads=True`` the gradients of the trainable ones instead (a tensor
    with no gradient yet is an error: run a backward pass first)."""
    backend = _backend(model, "model")
    layers, specs = _peft_layers(model, backend, "state")
    out = {}
    for p, layer in layers.items():
        spec = specs[p]
        if grads:
            values = {}
            for n, param in layer.adapter_parameters().items():
                if param.grad is None:
                    raise ValueError(f"{peft_key(p, spec, n)} has no gradient: run forward and backward first")
                values[n] = param.grad
        else:
            values = layer.adapter_state()
        for n, v in values.items():
            if n not in spec.peft.tensors:
                raise ValueError(f"method {spec.name!r}'s tensor {n!r} has no PEFT name (SPEC.peft.tensors)")
            out[peft_key(p, spec, n)] = _peft_tensor(spec, n, v, layer.config)
    if not grads:
        from lowrank_ref.inject import shared_state

        for method, state in shared_state(model).items():
            mapping = registry.get_method(method).peft
            for n, v in state.items():
                if mapping is None or n not in mapping.shared:
                    raise ValueError(f"method {method!r}'s shared tensor {n!r} has no PEFT name (SPEC.peft.shared)")
                out[mapping.shared[n]] = np.ascontiguousarray(_to_numpy(v))
    return out


def save_peft(model, folder) -> str:
    """Write ``model``'s adapters as a PEFT folder (``adapter_config.json`` from
    ``SPEC.peft.to_peft``, ``adapter_model.safetensors`` in PEFT's keys and shapes) that
    ``peft.PeftModel.from_pretrained`` loads onto the same base model. Every layer must hold one
    method with a PEFT mapping; ``target_modules`` lists the adapted layers by full name.
    Adapters holding NaN or inf are refused; nothing is written unless everything checks out.
    Returns ``folder``."""
    backend = _backend(model, "model")
    folder = _folder(folder)
    layers, specs = _peft_layers(model, backend, "save")
    if "" in layers:
        raise ValueError("model is a single adapter layer: a PEFT folder describes layers of a model by name")
    names = sorted({s.name for s in specs.values()})
    if len(names) > 1:
        raise ValueError(f"the model holds several methods {names}; a PEFT folder holds one")
    spec = next(iter(specs.values()))
    merged = sorted(p for p, layer in layers.items() if getattr(layer, "merged", False))
    if merged:
        raise ValueError(f"layers {merged} are merged: unmerge() before saving their adapters")
    configs = {p: layer.config for p, layer in layers.items()}
    fields = dict(spec.peft.to_peft(configs))
    config = {"peft_type": spec.peft.peft_type, "target_modules": sorted(layers), "task_type": None,
              "base_model_name_or_path": None, "revision": None, "inference_mode": True, **fields}
    tensors = peft_state_dict(model)
    for key, arr in tensors.items():
        _check_finite_to_save(key, arr)
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tmp = []
    try:
        fd, wtmp = tempfile.mkstemp(prefix=".adapter-", suffix=".safetensors", dir=folder)
        os.close(fd)
        tmp.append(wtmp)
        save_file(tensors, wtmp, metadata={"format": "pt"})
        fd, ctmp = tempfile.mkstemp(prefix=".adapter-", suffix=".json", dir=folder)
        tmp.append(ctmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(wtmp, os.path.join(folder, PEFT_WEIGHTS_NAME))
        os.replace(ctmp, os.path.join(folder, PEFT_CONFIG_NAME))
    finally:
        for t in tmp:
            if os.path.exists(t):
                os.remove(t)
    return folder
