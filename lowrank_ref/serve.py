r"""Serving many adapters over one frozen base: mixed-adapter batches (chapter 08).

    srv = lr.serve.MultiLoRA(model)          # model: a plain base (no adapters), in eval mode
    srv.add("fr", "fr.safetensors")          # one of our adapter files, or a PEFT folder
    srv.add("de", "peft_de/")
    y = srv.forward(idx, adapters=["fr", "de", None, "fr"])   # one name per batch row; None = the base
    srv.remove("de")

Every adapted linear layer ``W0 (out, in)``, ``b (out,)`` of the served model holds the adapters'
factors stacked, slot ``k = 0`` being the base (zeros) and slot ``k ≥ 1`` the k-th adapter:
``A_all (K, R, in)``, ``B_all (K, out, R)`` (ranks padded to the largest ``R`` with zero rows and
columns, which add nothing), scalings ``s (K,)`` and row scales ``g (K, out)``. For a batch row ``i``
with slot ``k_i``:

.. math::
    y_i = g_{k_i} \odot \big(x_i W_0^\top + s_{k_i}\,(x_i A_{k_i}^\top) B_{k_i}^\top\big) + b .

* LoRA and rsLoRA: ``g = 1`` and ``s = α/r`` or ``α/√r`` (the layer's own scaling, from the file).
* DoRA: ``g = m / n`` with ``n_j = ‖W0_j + s (B A)_j‖`` over the input axis, computed once when the
  adapter is added (the weights are frozen while serving, so the norm is a constant per adapter;
  ``g_j = 0`` where ``n_j = 0``, DoRA's zero-norm rule). PEFT's mixed batches refuse DoRA; here it is
  the same gather with one more per-row vector.
* The base (``None``) and an adapter that does not adapt this layer: ``A = B = 0``, ``g = 1``.

Two kernels compute this (``kernel=``), as in Punica (Chen et al. 2023, arXiv:2310.18547):

* ``"bgmv"`` (batched gather matrix-vector): gather each row's factors, ``A_all[k] (B, R, in)``, and
  run one batched product for the shrink ``h = x Aᵀ (B, T, R)`` and one for the expand
  ``h Bᵀ (B, T, out)``. The cost does not depend on how many adapters the batch names.
* ``"sgmv"`` (segmented): group the rows by adapter (PEFT's ``_mixed_batch_forward``), and per
  group run the shrink then the expand with that adapter's own, unpadded ``A`` and ``B``.

Both equal each adapter's own model row by row (tested). Serving is inference only: a mixed batch
in training mode is a :class:`~lowrank_ref.nn.module.StateError` (PEFT refuses it too), and so is a
mixed batch while one adapter is merged into the base (:meth:`MultiLoRA.merge`, the "one adapter at
a time" way of serving). Every bad input is checked before anything changes.

``MultiLoRA(model)`` takes a NumPy model (this module) or a torch model (``lowrank_gpu.serve``,
the same class over torch tensors); the bookkeeping here is written once for both.
"""

from __future__ import annotations

import copy
import os

import numpy as np

from lowrank_ref.nn.linear import linear_forward
from lowrank_ref.nn.module import Module, StateError

__all__ = ["MultiLoRA", "ServedLinear", "bgmv", "sgmv", "adapter_factors", "as_f64", "NumpyServeOps", "BASE_NAMES", "KERNELS",
           "SERVED_METHODS"]

KERNELS = ("bgmv", "sgmv")
BASE_NAMES = (None, "__base__")  # PEFT's name for "no adapter" is "__base__"
SERVED_METHODS = ("lora", "dora")  # rsLoRA is LoRA with rslora=True


# --- the two kernels (pure NumPy) --------------------------------------------------------------

def bgmv(x, W0, b, A_all, B_all, s, g, slots):
    r"""y_i = g[k_i] ⊙ (x_i W0ᵀ + s[k_i] (x_i A_all[k_i]ᵀ) B_all[k_i]ᵀ) + b, every row at once.

    Args:
        x: ``(N, T, in)``: N batch rows of T tokens.
        W0: ``(out, in)``; b: ``(out,)`` or None.
        A_all: ``(K, R, in)``; B_all: ``(K, out, R)``; s: ``(K,)``; g: ``(K, out)``.
        slots: ``(N,)`` integers in ``[0, K)``: each row's adapter.
    Returns:
        ``(N, T, out)``.
    """
    z = linear_forward(x, W0, None)  # x W0ᵀ   (N, T, out)
    A = A_all[slots]  # gather: (N, R, in)
    Bk = B_all[slots]  # (N, out, R)
    h = np.matmul(x, A.transpose(0, 2, 1))  # shrink: h = x Aᵀ   (N, T, R)
    d = np.matmul(h, Bk.transpose(0, 2, 1))  # expand: h Bᵀ   (N, T, out)
    y = g[slots][:, None, :] * (z + s[slots][:, None, None] * d)  # g ⊙ (z + s h Bᵀ)
    return y if b is None else y + b


def sgmv(x, W0, b, factors, slots):
    r"""The same output, rows grouped by adapter: per group, the shrink then the expand.

    Args:
        x: ``(N, T, in)``; W0 ``(out, in)``; b ``(out,)`` or None.
        factors: ``{k: (A (r_k, in), B (out, r_k), s_k, g_k (out,))}`` for the slots that adapt this
            layer; a slot not in it (the base, 0) gets ``x W0ᵀ + b``.
        slots: ``(N,)`` integers.
    """
    y = linear_forward(x, W0, None)  # x W0ᵀ for every row   (N, T, out)
    for k in np.unique(slots):
        if int(k) not in factors:
            continue
        A, B, s, g = factors[int(k)]
        rows = np.flatnonzero(slots == k)  # the segment of adapter k
        xk = x[rows]  # (n_k, T, in)
        d = linear_forward(linear_forward(xk, A, None), B, None)  # (x Aᵀ) Bᵀ   (n_k, T, out)
        y[rows] = g * (y[rows] + s * d)
    return y if b is None else y + b


# --- reading an adapter layer ------------------------------------------------------------------

def as_f64(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor
        return t.detach().cpu().double().numpy()
    return np.asarray(getattr(t, "data", t), dtype=np.float64)  # a Parameter, or an array


def adapter_factors(layer, method: str) -> dict:
    r"""``{"A", "B", "s", "g"}`` (float64 NumPy) of one LoRA or DoRA layer, either backend.

    ``g = 1`` for LoRA; for DoRA ``g = m / ‖W0 + s B A‖`` row by row (0 where the norm is 0)."""
    A, B, s = as_f64(layer.A), as_f64(layer.B), float(layer.scaling)
    if method == "dora":
        V = as_f64(layer.w0()) + s * (B @ A)  # W0 + s B A   (out, in)
        n = np.sqrt(np.einsum("oi,oi->o", V, V))  # n_j = ‖V_j‖
        m = as_f64(layer.m)
        g = np.where(n > 0, m / np.where(n > 0, n, 1.0), 0.0)  # g = m / n, the zero-norm rule
    else:
        g = np.ones(B.shape[0])
    return {"A": A, "B": B, "s": s, "g": g}


# --- the served layer (NumPy) ------------------------------------------------------------------

class ServedLinear(Module):
    """A frozen linear layer with the stacked factors of every adapter that the server holds.

    ``slots`` is set by :meth:`MultiLoRA.forward` for the one call and cleared after it; with
    ``slots = None`` the layer is its base (possibly with one adapter merged)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.stack = None  # (A_all, B_all, s, g) in the base's dtype
        self.factors = {}  # {slot: (A, B, s, g)} unpadded, for "sgmv"
        self.slots = None
        self.kernel = "bgmv"

    def set_factors(self, factors: dict, n_slots: int) -> None:
        """Install ``{slot: {"A", "B", "s", "g"}}`` (float64) as the stacks of ``n_slots`` slots."""
        dt = self.base.weight.data.dtype
        out, inp = self.base.weight.data.shape
        R = max(f["A"].shape[0] for f in factors.values())
        A_all = np.zeros((n_slots, R, inp), dt)
        B_all = np.zeros((n_slots, out, R), dt)
        s = np.zeros(n_slots, dt)
        g = np.ones((n_slots, out), dt)
        for k, f in factors.items():
            r = f["A"].shape[0]
            A_all[k, :r], B_all[k, :, :r], s[k], g[k] = f["A"], f["B"], f["s"], f["g"]
        self.stack = (A_all, B_all, s, g)
        self.factors = {k: (f["A"].astype(dt), f["B"].astype(dt), dt.type(f["s"]), f["g"].astype(dt))
                        for k, f in factors.items()}

    def forward(self, x):
        W0 = self.base.weight.data
        b = None if self.base.bias is None else self.base.bias.data
        if self.slots is None:
            return linear_forward(x, W0, b)
        lead = x.shape[:-1]
        x3 = x.reshape(lead[0], -1, x.shape[-1])  # (N, T, in)
        if self.kernel == "sgmv":
            y = sgmv(x3, W0, b, self.factors, self.slots)
        else:
            y = bgmv(x3, W0, b, *self.stack, self.slots)
        return y.reshape(*lead, W0.shape[0])

    def backward(self, dy):
        raise StateError("a served layer is inference only (MultiLoRA): train each adapter in its own model")

    def extra_repr(self) -> str:
        return f"adapters={len(self.factors)}"


class NumpyServeOps:
    """What :class:`MultiLoRA` needs from a NumPy model."""

    name = "numpy"

    def check_model(self, model):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a lowrank_ref Module or a torch.nn.Module, got {type(model).__name__}")

    def adapter_layers(self, model) -> dict:
        from lowrank_ref.inject import adapter_layers

        return adapter_layers(model)

    def get(self, model, path):
        return model.get_submodule(path)

    def set(self, model, path, module):
        model.set_submodule(path, module)

    def served_type(self):
        return ServedLinear

    def weight(self, linear) -> tuple:
        return as_f64(linear.weight.data), None if linear.bias is None else as_f64(linear.bias.data)

    def set_weight(self, linear, W) -> None:
        linear.weight.data = np.asarray(W).astype(linear.weight.data.dtype)

    def get_weight(self, linear):
        return linear.weight.data

    def slots(self, slots: list[int], like):
        return np.asarray(slots, dtype=np.int64)

    def batch_size(self, idx) -> int:
        shape = getattr(idx, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"idx must have shape (B, T), got {getattr(idx, 'shape', type(idx).__name__)}")
        return int(shape[0])

    def load(self, model, source):
        from lowrank_ref.io import load_adapter, load_peft

        return load_peft(model, source) if os.path.isdir(source) else load_adapter(model, source)

    def method(self, layer) -> str:
        from lowrank_ref.adapters.dora import DoRALinear
        from lowrank_ref.adapters.lora import LoRALinear

        if getattr(layer, "quantized", False):
            return "a 4-bit base (QLoRA/QDoRA)"
        if isinstance(layer, DoRALinear):
            return "dora"
        if isinstance(layer, LoRALinear):
            return "lora"
        return type(layer).__name__


# --- the server --------------------------------------------------------------------------------

class MultiLoRA:
    """One frozen base model, many LoRA / rsLoRA / DoRA adapters, one name per batch row.

    Args:
        model: a base model with no adapters (NumPy ``lowrank_ref`` or torch ``lowrank_gpu``). Its
            adapted linear layers are replaced in place by :class:`ServedLinear` layers when the
            first adapter that touches them is added, and put back when the last one is removed.
        kernel: ``"bgmv"`` (gather, the default) or ``"sgmv"`` (rows grouped by adapter).
    """

    def __new__(cls, model, kernel: str = "bgmv"):
        if cls is MultiLoRA and not isinstance(model, Module) and _is_torch_module(model):
            from lowrank_gpu.serve import MultiLoRA as TorchMultiLoRA

            return TorchMultiLoRA(model, kernel=kernel)
        return super().__new__(cls)

    OPS = NumpyServeOps()

    def __init__(self, model, kernel: str = "bgmv"):
        self.ops = self.OPS
        self.ops.check_model(model)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        held = self.ops.adapter_layers(model)
        if held:
            raise ValueError(f"model must be a plain base with no adapters (it holds {sorted(held)[:4]}); "
                             "MultiLoRA adds them itself with add(name, path)")
        self.model = model
        self.kernel = kernel
        self._adapters: dict[str, dict] = {}  # name -> {path: factors}, in the order added
        self._served: dict = {}  # path -> ServedLinear
        self._merged: str | None = None
        self._w0_backup: dict = {}

    # -- what it holds ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def merged(self) -> str | None:
        """The name of the adapter merged into the base, or None."""
        return self._merged

    def ranks(self, name: str) -> dict:
        """``{layer path: r}`` of adapter ``name``."""
        return {p: f["A"].shape[0] for p, f in self._adapters[self._known(name)].items()}

    def _known(self, name):
        if name not in self._adapters:
            raise ValueError(f"unknown adapter {name!r}; this server holds {self.names}")
        return name

    # -- adding and removing ----------------------------------------------------------------
    def _plain_copy(self):
        """A copy of the served model with every served layer back to its plain base."""
        saved = {p: (layer.stack, layer.factors) for p, layer in self._served.items()}  # not copied
        try:
            for layer in self._served.values():
                layer.stack, layer.factors = None, {}
            dup = copy.deepcopy(self.model)
        finally:
            for p, layer in self._served.items():
                layer.stack, layer.factors = saved[p]
        for p in self._served:
            self.ops.set(dup, p, self.ops.get(dup, p).base)
        return dup

    def add(self, name: str, source) -> dict:
        """Add adapter ``name`` from one of our adapter files or a PEFT folder (``source``).

        The file is loaded into a copy of the base (all of :mod:`lowrank_ref.io`'s checks: format,
        keys, shapes against this base, values), its layers must be LoRA, rsLoRA or DoRA over this
        very base weight, and only then are the stacks rebuilt. Returns ``{path: rank}``."""
        if not isinstance(name, str) or not name or name in BASE_NAMES:
            raise ValueError(f"name must be a non-empty string other than '__base__', got {name!r}")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already here; remove it first")
        if self._merged is not None:
            raise StateError(f"adapter {self._merged!r} is merged; unmerge() before adding")
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a path (an adapter file or a PEFT folder), got {type(source).__name__}")
        source = os.fspath(source)
        dup = self._plain_copy()
        self.ops.load(dup, source)
        layers = self.ops.adapter_layers(dup)
        if not layers:
            raise ValueError(f"source {source!r} holds no adapter layers")
        factors = {}
        for path, layer in layers.items():
            method = self.ops.method(layer)
            if method not in SERVED_METHODS:
                raise ValueError(f"adapter {name!r}, layer {path!r}: MultiLoRA serves {SERVED_METHODS} "
                                 f"(rsLoRA included), got {method}")
            mine = self._served[path].base if path in self._served else self.ops.get(self.model, path)
            W, b = self.ops.weight(mine)
            W1, b1 = self.ops.weight(layer.base)
            if W.shape != W1.shape or not np.array_equal(W, W1) or not _same(b, b1):
                raise ValueError(f"adapter {name!r}, layer {path!r}: its base weight is not the served "
                                 "model's (another base, or an init that rewrites W0 such as PiSSA)")
            f = adapter_factors(layer, method)
            if not all(np.all(np.isfinite(v)) for v in (f["A"], f["B"], f["g"])):
                raise ValueError(f"adapter {name!r}, layer {path!r}: non-finite factors")
            factors[path] = f
        self._adapters[name] = factors
        try:
            self._rebuild()
        except BaseException:
            del self._adapters[name]
            self._rebuild()
            raise
        return {p: f["A"].shape[0] for p, f in factors.items()}

    def remove(self, name: str) -> None:
        """Drop adapter ``name``; layers that no adapter touches any more get their plain base back."""
        self._known(name)
        if self._merged is not None:
            raise StateError(f"adapter {self._merged!r} is merged; unmerge() before removing")
        del self._adapters[name]
        self._rebuild()

    def _rebuild(self) -> None:
        slot = {n: k + 1 for k, n in enumerate(self._adapters)}  # slot 0 is the base
        per_path: dict = {}
        for n, layers in self._adapters.items():
            for p, f in layers.items():
                per_path.setdefault(p, {})[slot[n]] = f
        Served = self.ops.served_type()
        new = {}
        for p, fs in per_path.items():
            layer = self._served.get(p)
            if layer is None:
                layer = Served(self.ops.get(self.model, p))
            layer.set_factors(fs, len(slot) + 1)
            new[p] = layer
        for p, layer in self._served.items():  # layers no adapter touches any more
            if p not in new:
                self.ops.set(self.model, p, layer.base)
        for p, layer in new.items():
            if p not in self._served:
                self.ops.set(self.model, p, layer)
        self._served = new

    def clone(self, names=None) -> MultiLoRA:
        """A new server over a plain copy of the base with the same adapters (or only ``names``),
        sharing their (frozen) factors; nothing is merged in it."""
        if self._merged is not None:
            raise StateError(f"adapter {self._merged!r} is merged; unmerge() before clone()")
        keep = self.names if names is None else [self._known(n) for n in names]
        dup = type(self)(self._plain_copy(), kernel=self.kernel)
        dup._adapters = {n: self._adapters[n] for n in keep}
        dup._rebuild()
        return dup

    # -- one adapter merged (serving one adapter at a time) ---------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (``W = g ⊙ (W0 + s B A)`` row-wise) so that a
        batch that uses only it runs at the base's cost; ``unmerge()`` restores ``W0`` bit for bit."""
        self._known(name)
        if self._merged is not None:
            raise StateError(f"adapter {self._merged!r} is already merged; unmerge() first")
        merged = {}
        for p, f in self._adapters[name].items():
            base = self._served[p].base
            W0, _ = self.ops.weight(base)
            merged[p] = f["g"][:, None] * (W0 + f["s"] * (f["B"] @ f["A"]))  # g ⊙ (W0 + s B A)
        for p, W in merged.items():
            base = self._served[p].base
            self._w0_backup[p] = self.ops.get_weight(base)
            self.ops.set_weight(base, W)
        self._merged = name

    def unmerge(self) -> None:
        if self._merged is None:
            raise StateError("no adapter is merged")
        for p, W0 in self._w0_backup.items():
            self.ops.set_weight(self._served[p].base, W0)
        self._w0_backup = {}
        self._merged = None

    # -- the mixed batch --------------------------------------------------------------------
    def _slots(self, idx, adapters) -> list[int] | None:
        batch = self.ops.batch_size(idx)
        if adapters is None:
            adapters = [None] * batch
        if isinstance(adapters, (str, bytes)) or not isinstance(adapters, (list, tuple)):
            raise TypeError(f"adapters must be a list with one adapter name (or None) per batch row, "
                            f"got {type(adapters).__name__}")
        if len(adapters) != batch:
            raise ValueError(f"adapters has {len(adapters)} names for a batch of {batch} rows (one per row)")
        for a in adapters:
            if a is not None and not isinstance(a, str):
                raise TypeError(f"adapters must hold names (str) or None, got {a!r}")
        unknown = sorted({a for a in adapters if a not in BASE_NAMES and a not in self._adapters})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapters; this server holds {self.names}")
        if self.model.training:
            raise StateError("mixed-adapter batches are inference only: call model.eval() first")
        if self._merged is not None:
            if any(a != self._merged for a in adapters):
                raise StateError(f"adapter {self._merged!r} is merged: every row must name it; "
                                 "unmerge() for a mixed batch")
            return None
        slot = {n: k + 1 for k, n in enumerate(self._adapters)}
        return [0 if a in BASE_NAMES else slot[a] for a in adapters]

    def forward(self, idx, adapters=None, kernel: str | None = None, **kwargs):
        """Logits of ``model.forward(idx)`` with row ``i`` through adapter ``adapters[i]``.

        Args:
            idx: ``(B, T)`` token ids.
            adapters: ``B`` names (``None`` or ``"__base__"``: the base), or None for all-base.
            kernel: ``"bgmv"`` or ``"sgmv"`` for this call (default: the server's).
        """
        kernel = self.kernel if kernel is None else kernel
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        slots = self._slots(idx, adapters)
        if slots is not None:
            s = self.ops.slots(slots, idx)
            for layer in self._served.values():
                layer.slots, layer.kernel = s, kernel
        try:
            return self.model.forward(idx, **kwargs)
        finally:
            for layer in self._served.values():
                layer.slots = None

    __call__ = forward


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.array_equal(a, b)


def _is_torch_module(model) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)
