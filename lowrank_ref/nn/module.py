r"""Parameter and Module: the two containers every layer in the reference is built from.

A :class:`Parameter` holds an array ``.data`` and, after a backward pass, its gradient ``.grad``.
A frozen parameter (``trainable=False``) never receives a gradient: its ``.grad`` stays ``None``
(never a silent array of zeros), so "only the adapter got gradients" is something a test can see.

A :class:`Module` owns parameters and sub-modules by attribute name, the way ``torch.nn.Module``
does, so dotted names (``blocks.0.attn.q.weight``) are the same in both backends and weights can
move between them by name.

The backward contract: ``forward(x)`` stores what it needs in ``self._cache``; ``backward(dy)``
returns ``dx`` and *adds* to ``.grad`` of every trainable parameter (accumulation, like autograd),
then releases the cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lowrank_ref.nn.checks import nonfinite_error

__all__ = ["Parameter", "Module", "ModuleList", "StateError", "check_finite", "array_module", "as_rng",
           "to_array_module", "where_is", "to_host",
           "check_condition", "set_condition"]


class StateError(RuntimeError, ValueError):
    """A call made in the wrong state: ``backward`` before ``forward``, training a merged layer,
    merging twice. A ``ValueError`` (bad input, as the project promises) and a ``RuntimeError``."""


def array_module(a):
    """``numpy``, or ``cupy`` for a CuPy array: the reference's array code runs on either.

    CuPy is recognised by the array's type and imported only then, so NumPy users never load it.
    An array type may also name its module itself (class attribute ``_lowrank_array_module``): the
    CPU stand-in for CuPy in the tests does, to prove that nothing bypasses the array module."""
    named = getattr(type(a), "_lowrank_array_module", None)
    if named is not None:
        return named
    if type(a).__module__.partition(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def where_is(ref, host):
    """``host`` (a NumPy array, e.g. a dropout mask drawn from a NumPy generator) moved to the array
    module of ``ref``: a no-op on NumPy, a host-to-device copy on CuPy. Random draws stay on NumPy's
    generators in every backend, so a seeded run draws the same masks on the CPU and the GPU."""
    xp = array_module(ref)
    return host if xp is np else xp.asarray(host)


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array: a copy from the device for a CuPy array (``.get()``), else as is."""
    return a.get() if array_module(a) is not np else np.asarray(a)


def to_array_module(model, xp):
    """Move ``model`` onto the array module ``xp`` (``cupy``, or ``numpy`` to come back), in place:
    every parameter's ``.data`` and every array a module holds as an attribute (frozen 4-bit codes,
    shared projections, buffers). Gradients and forward caches are dropped. Returns ``model``.

    This is what makes ``backend="cupy"`` train whole models with the reference's own code: the
    layers, the hand-written backward passes and the optimizer take their array module from their
    inputs (:func:`array_module`), so once the arrays live on the GPU, so does every step."""
    def move(a):
        if xp is np:
            return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
        return xp.asarray(a)

    def is_array(v):
        return isinstance(v, np.ndarray) or (not isinstance(v, (str, bytes)) and hasattr(v, "__array_function__")
                                             and hasattr(v, "shape") and hasattr(v, "dtype"))

    seen: set[int] = set()

    def visit(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for k, v in list(vars(obj).items()):
            if k in ("_params", "_modules"):
                continue
            if isinstance(v, Parameter):
                v.data, v.grad = move(v.data), None
            elif isinstance(v, Module):
                visit(v)
            elif is_array(v):
                object.__setattr__(obj, k, move(v))
            elif isinstance(v, dict) and v and all(is_array(e) for e in v.values()):
                for kk in list(v):  # frozen arrays by name (VeRA's shared projections)
                    v[kk] = move(v[kk])
            elif isinstance(v, (list, tuple)) and v and all(isinstance(e, Module) for e in v):
                for e in v:
                    visit(e)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith("lowrank_ref") \
                    and not isinstance(v, (type, np.random.Generator)) and not callable(v):
                visit(v)  # a helper object of the package (a quantised tensor, shared state)
        if isinstance(obj, Module):
            object.__setattr__(obj, "_cache", None)

    visit(model)
    return model


def check_finite(name: str, array: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``name`` if ``array`` holds NaN or inf."""
    if not np.all(np.isfinite(array)):
        raise nonfinite_error(name, int(np.size(array) - np.count_nonzero(np.isfinite(array))))


class Parameter:
    """An array that a model learns (or keeps frozen).

    Attributes:
        data: the value, any shape, a floating dtype.
        grad: ``None`` until a backward pass reaches it; then an array like ``data``.
        trainable: frozen parameters never get a gradient.
    """

    __slots__ = ("data", "grad", "trainable")

    def __init__(self, data, trainable: bool = True):
        data = array_module(data).asarray(data)
        if not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"Parameter data must be a floating array, got dtype {data.dtype}")
        self.data = data
        self.grad: np.ndarray | None = None
        self.trainable = bool(trainable)

    def accumulate(self, g: np.ndarray) -> None:
        """Add ``g`` to ``.grad`` (creating it), or do nothing if the parameter is frozen."""
        if not self.trainable:
            return
        xp = array_module(self.data)
        g = xp.asarray(g, dtype=self.data.dtype).reshape(self.data.shape)
        if self.grad is None:
            self.grad = g.copy()
        else:
            self.grad += g

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __repr__(self) -> str:
        state = "trainable" if self.trainable else "frozen"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, {state})"


class Module:
    """Base class: registers ``Parameter`` and ``Module`` attributes in assignment order."""

    def __init__(self) -> None:
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_cache", None)

    # -- registration ---------------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        params, modules = self.__dict__["_params"], self.__dict__["_modules"]
        # replacing a parameter or module keeps its place in the order (as torch does), so that
        # swapping a layer for an adapter and back leaves names and parameters in model order
        if not isinstance(value, Parameter):
            params.pop(name, None)
        if not isinstance(value, Module):
            modules.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__["_params"].pop(name, None)
        self.__dict__["_modules"].pop(name, None)
        object.__delattr__(self, name)

    # -- the computation ------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _pop_cache(self):
        """Return the forward cache and clear it; a clear error if forward has not run."""
        cache = self._cache
        if cache is None:
            raise StateError(
                f"{type(self).__name__}.backward called before forward "
                "(or twice for one forward): run forward(x) first"
            )
        self._cache = None
        return cache

    # -- traversal ------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Yield ``(dotted_name, module)`` for this module (name ``""``) and every descendant."""
        yield prefix, self
        for name, mod in self._modules.items():
            yield from mod.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self) -> dict[str, Module]:
        return dict(self._modules)

    def parameters(self) -> dict[str, Parameter]:
        """Every parameter by dotted name, e.g. ``{"blocks.0.attn.q.weight": Parameter}``."""
        out: dict[str, Parameter] = {}
        for prefix, mod in self.named_modules():
            for name, p in mod._params.items():
                out[f"{prefix}.{name}" if prefix else name] = p
        return out

    def trainable_parameters(self) -> dict[str, Parameter]:
        return {n: p for n, p in self.parameters().items() if p.trainable}

    def num_trainable_parameters(self) -> int:
        """How many scalars an optimizer updates."""
        return sum(p.size for p in self.trainable_parameters().values())

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters().values())

    def get_submodule(self, dotted: str) -> Module:
        mod: Module = self
        for part in dotted.split(".") if dotted else []:
            if part not in mod._modules:
                raise KeyError(f"no submodule {dotted!r} (missing {part!r})")
            mod = mod._modules[part]
        return mod

    def set_submodule(self, dotted: str, new: Module) -> None:
        parent_name, _, leaf = dotted.rpartition(".")
        parent = self.get_submodule(parent_name)
        if leaf not in parent._modules:
            raise KeyError(f"no submodule {dotted!r}")
        if isinstance(parent, _Indexable):
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)

    # -- state ----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for p in self.parameters().values():
            p.grad = None

    def requires_grad_(self, flag: bool = True) -> Module:
        """Mark every parameter trainable (``True``) or frozen (``False``)."""
        for p in self.parameters().values():
            p.trainable = bool(flag)
            if not flag:
                p.grad = None
        return self

    def train(self, mode: bool = True) -> Module:
        """Switch dropout on (``True``) or off. Nothing else changes: merging is explicit."""
        for _, mod in self.named_modules():
            object.__setattr__(mod, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def astype(self, dtype) -> Module:
        """Cast every parameter to ``dtype`` in place (e.g. ``np.float64`` for gradcheck)."""
        for p in self.parameters().values():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: p.data.copy() for n, p in self.parameters().items()}

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy arrays into parameters by name; checks every name and shape before changing any."""
        params = self.parameters()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        for name, value in state.items():
            if name in params and np.shape(value) != params[name].shape:
                raise ValueError(
                    f"state_dict[{name!r}] has shape {np.shape(value)}, "
                    f"expected {params[name].shape}"
                )
        for name, value in state.items():
            if name in params:
                params[name].data = np.array(value, dtype=params[name].data.dtype)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, mod in self._modules.items():
            sub = repr(mod).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + ")" if len(lines) > 1 else lines[0] + ")"


class _Indexable:
    """Marker for containers whose children are addressed by integer position."""


class ModuleList(Module, _Indexable):
    """A list of modules named ``"0"``, ``"1"``, ... (as in PyTorch)."""

    def __init__(self, modules=()):
        super().__init__()
        self._items: list[Module] = []
        for m in modules:
            self.append(m)

    def append(self, m: Module) -> None:
        self._modules[str(len(self._items))] = m
        self._items.append(m)

    def __getitem__(self, i: int) -> Module:
        return self._items[i]

    def __setitem__(self, i: int, m: Module) -> None:
        self._items[i] = m
        self._modules[str(i if i >= 0 else len(self._items) + i)] = m

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


# --- conditions: a per-row input for conditional adapters (a task id per batch row) ----------
def check_condition(cond, batch: int):
    """``cond`` as one integer per batch row, shape ``(batch,)``: a NumPy ``int64`` array (a torch
    tensor stays a tensor, checked the same way). ``None`` stays ``None``."""
    if cond is None:
        return None
    if hasattr(cond, "detach"):  # torch: keep it on its device
        if cond.is_floating_point() or cond.is_complex() or str(cond.dtype) == "torch.bool":
            raise TypeError(f"cond must hold integers (one per batch row), got dtype {cond.dtype}")
        shape = tuple(cond.shape)
    else:
        arr = np.asarray(cond)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"cond must hold integers (one per batch row), got dtype {arr.dtype}")
        cond, shape = arr.astype(np.int64, copy=False), arr.shape
    if shape != (batch,):
        raise ValueError(f"cond must have shape ({batch},), one condition per batch row, got {shape}")
    if (cond < 0).any():
        raise ValueError("cond must be non-negative")
    return cond


def set_condition(modules, cond) -> int:
    """Give ``cond`` (``None`` or one integer per batch row) to every module in ``modules`` that
    takes a condition (class attribute ``takes_condition = True``), as its ``.condition``; return
    how many took it. A condition that no module takes is an error (it would be silently ignored)."""
    n = 0
    for m in modules:
        if getattr(m, "takes_condition", False):
            m.condition = cond
            n += 1
    if cond is not None and n == 0:
        raise ValueError("cond was given but no layer of the model takes a condition "
                         "(inject a conditional method, or pass cond=None)")
    return n


def as_rng(rng) -> np.random.Generator:
    """``rng`` as a ``numpy.random.Generator``: ``None`` (fresh entropy), an int seed, or a
    Generator (returned as it is, so one stream can feed several layers); anything else is a
    ``TypeError``. The one conversion that inject, the training loops and the layers share."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (hasattr(rng, "__index__") and not isinstance(rng, (bool, np.bool_))):
        return np.random.default_rng(None if rng is None else int(rng.__index__()))
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")

