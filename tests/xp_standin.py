"""A stand-in for CuPy that runs on the CPU: proof, without a GPU, that the reference's own code
(every nn layer, every method's hand-written backward, the optimizer and the training loop) goes
through the array module and never through NumPy behind its back.

``DeviceArray`` wraps a NumPy array the way a CuPy array wraps device memory, and refuses what CuPy
refuses: turning it into a NumPy array implicitly (``np.asarray(a)``), and mixing it with a NumPy
array in one operation (``a + np.zeros(3)``; CuPy raises ``TypeError`` there). NumPy's own
functions called on it (``np.exp(a)``, ``np.einsum(..., a, b)``) dispatch to the stand-in through
``__array_ufunc__`` / ``__array_function__``, as they dispatch to CuPy. ``standin`` is the module
object (``xp``): ``standin.zeros(...)``, ``standin.asarray(host)`` (the transfer to the device),
and ``a.get()`` (the transfer back), as CuPy has them.

Every bypass raises :class:`Bypass`, naming what was passed.
"""

from __future__ import annotations

import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class Bypass(TypeError):
    """The array module was bypassed: a host NumPy array met a device array."""


def _unwrap(obj):
    if isinstance(obj, DeviceArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise Bypass(f"a host numpy.ndarray {obj.dtype}{list(obj.shape)} was mixed with device arrays "
                     "(the array module was bypassed)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and not isinstance(obj, (np.dtype,)):
        if isinstance(obj, np.generic):  # CuPy's reductions give 0-d device arrays, not scalars
            obj = np.asarray(obj)
        return DeviceArray(obj)
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class DeviceArray(NDArrayOperatorsMixin):
    __slots__ = ("_a",)
    _lowrank_array_module = None  # set below to the stand-in module (nn.module.array_module reads it)

    def __init__(self, a: np.ndarray):
        self._a = a

    # what CuPy refuses
    def __array__(self, dtype=None, copy=None):
        raise Bypass("implicit conversion of a device array to a numpy.ndarray (the array module was "
                     "bypassed; CuPy raises here too)")

    def get(self) -> np.ndarray:
        """The transfer to the host (``cupy.ndarray.get``)."""
        return self._a.copy()

    # dispatch
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if getattr(np, ufunc.__name__, None) is not ufunc:  # SciPy's erf: CuPy has it in cupyx.scipy
            raise Bypass(f"{ufunc.__name__} is not a NumPy ufunc: on CuPy it lives elsewhere (cupyx.scipy)")
        out = kwargs.get("out")
        args = _unwrap(inputs)
        kw = _unwrap(kwargs)
        r = getattr(ufunc, method)(*args, **kw)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(r)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # the ndarray surface
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name):
        if name.startswith("__"):  # never hand out __array_interface__ and the like
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_unwrap(a), **_unwrap(k)))
        return _wrap(attr)

    @property
    def T(self):
        return DeviceArray(self._a.T)

    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def nbytes(self):
        return self._a.nbytes

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(x) for x in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"DeviceArray({self._a!r})"


def _module() -> types.ModuleType:
    m = types.ModuleType("xp_standin", "CuPy stand-in (tests only)")

    def passthrough(name):
        attr = getattr(np, name)
        if isinstance(attr, (type, np.ufunc, np.dtype)) or not callable(attr):
            return attr
        if name in ("asarray", "array", "ascontiguousarray"):
            def transfer(obj, *a, **k):  # host -> device, or a device array as is
                if isinstance(obj, DeviceArray):
                    return _wrap(getattr(np, name)(obj._a, *a, **k))
                return DeviceArray(getattr(np, name)(obj, *a, **k))
            return transfer

        def fn(*a, **k):
            return _wrap(attr(*_unwrap(a), **_unwrap(k)))
        return fn

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return passthrough(name)

    m.__getattr__ = getattr_
    m.ndarray = DeviceArray

    special = types.ModuleType("xp_standin.special")

    def erf(x):
        import scipy.special

        return _wrap(scipy.special.erf(_unwrap(x)))

    special.erf = erf
    m.special = special  # what cupyx.scipy.special is to CuPy

    def asnumpy(a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    m.asnumpy = asnumpy
    m.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))  # "one GPU"
    return m


standin = _module()
DeviceArray._lowrank_array_module = standin


def to_device(model):
    """Every parameter's array (and every cached array attribute) of ``model`` onto the stand-in."""
    from lowrank_ref.nn.module import to_array_module

    return to_array_module(model, standin)
