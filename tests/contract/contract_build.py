"""What the contract tests build: every registered layer method's ``SPEC.example()`` as a layer in
any backend, moved away from its init, with the few operations the tests need written once per
backend family (NumPy arrays with a hand-written backward; torch tensors with autograd).

Nothing here names a method: a method gets every contract test by declaring a ``SPEC`` with an
``example``. The one place that does name methods is :data:`KNOWN_GAPS`, the contract tests that
a method is known to fail today (strict xfails, each with its reason), so the list is short and
every entry says who fixes it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import requires_cuda, requires_cupy

import lowrank_ref as lr
from lowrank_ref import registry

LAYER_METHODS = [s.name for s in registry.methods().values() if s.is_layer]
MODEL_METHODS = [s.name for s in registry.methods().values() if not s.is_layer]
# layer methods that fold into their base (SPEC.mergeable): the merge and dense-view tests run on these;
# the others (a non-linearity inside: Houlsby adapters) must refuse merge() instead
MERGEABLE_METHODS = [s.name for s in registry.methods().values() if s.is_layer and s.mergeable]
UNMERGEABLE_METHODS = [s.name for s in registry.methods().values() if s.is_layer and not s.mergeable]

NUMPY_FAMILY = ("numpy", "cupy")  # the reference's classes (on NumPy or CuPy arrays)
TORCH_FAMILY = ("torch", "cuda")  # the mirror's classes (torch on the CPU or a CUDA GPU)


def _param(backend):
    marks = {"cuda": [requires_cuda, pytest.mark.gpu], "cupy": [requires_cupy, pytest.mark.gpu]}.get(backend, [])
    return pytest.param(backend, id=backend, marks=marks)


ALL_BACKENDS = [_param(b) for b in ("numpy", "torch", "cuda", "cupy")]
NUMPY_BACKENDS = [_param(b) for b in NUMPY_FAMILY]
TORCH_BACKENDS = [_param(b) for b in TORCH_FAMILY]

# Backend agreement / self-consistency tolerances (rtol, atol), by the dtype computed in.
TOL = {"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-5)}

# (test, method, backend) -> why it fails today. Strict: the day it passes, the entry must go.
# Empty: every gap the contract tests found was closed (the life cycle written once, issue 7).
KNOWN_GAPS: dict = {}


# the tests that consult KNOWN_GAPS (the first item of its keys)
GAP_TESTS = ("backward_while_merged", "merged_training", "wrong_shape_dy",
             "bad_input_x_last_dim", "bad_input_0d", "bad_input_int", "bad_input_dy")


def known_gap(request, test: str, method: str, backend: str) -> None:
    """Mark this test a strict xfail if :data:`KNOWN_GAPS` lists it."""
    assert test in GAP_TESTS, test
    reason = KNOWN_GAPS.get((test, method, backend))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def torch():
    return pytest.importorskip("torch")


def to_np(a) -> np.ndarray:
    """A NumPy copy of a NumPy/CuPy array or a torch tensor (float64 stays float64)."""
    if a is None:
        return None
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy().copy()
    if hasattr(a, "__cuda_array_interface__"):
        return a.get()
    return np.array(a, copy=True)


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def copy_adapter_state(src, dst) -> None:
    """Copy ``src``'s adapter tensors into ``dst`` by math name (either backend into either)."""
    dst.load_adapter_state({n: to_np(v) for n, v in src.adapter_state().items()})


@dataclasses.dataclass
class Case:
    """One layer of ``method`` in ``backend``, and the base arrays it was built from."""

    method: str
    backend: str
    layer: object
    W: np.ndarray  # the float64 base weight (out, in) the layer was built from
    b: np.ndarray | None

    @property
    def spec(self):
        return registry.get_method(self.method)

    @property
    def torch_family(self) -> bool:
        return self.backend in TORCH_FAMILY

    @property
    def in_features(self) -> int:
        return self.W.shape[1]

    @property
    def out_features(self) -> int:
        return self.W.shape[0]

    @property
    def dtype(self) -> str:
        """The dtype the adapter computes in (its tensors'), as a name: "float64", "float32"."""
        v = next(iter(self.layer.adapter_state().values()))
        return str(v.dtype).replace("torch.", "")

    # the backend's native arrays --------------------------------------------------------
    def native(self, x: np.ndarray, requires_grad: bool = False):
        """``x`` (NumPy) as this backend's array, in the compute dtype; its layout is kept on
        NumPy and CPU torch (``torch.from_numpy`` keeps strides)."""
        if self.torch_family:
            t = torch().from_numpy(x).to(device=_device(self.backend), dtype=getattr(torch(), self.dtype))
            return t.requires_grad_(requires_grad)
        x = x if x.dtype == self.dtype else x.astype(self.dtype)
        if self.backend == "cupy":
            import cupy

            return cupy.asarray(x)
        return x

    # the computation --------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.torch_family:
            with torch().no_grad():
                return to_np(self.layer(self.native(x)))
        return to_np(self.layer.forward(self.native(x)))

    def base_forward(self, x: np.ndarray) -> np.ndarray:
        """The frozen base alone (a Linear, or a quantised one)."""
        if self.torch_family:
            with torch().no_grad():
                return to_np(self.layer.base(self.native(x)))
        y = self.layer.base.forward(self.native(x))
        self.layer.base._cache = None
        return to_np(y)

    def base_weight(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W_eff (out, in), b_eff (out,))``: the base as the layer computes with it (a quantised
        base: its dequantised weight), read from the base's own forward: ``base(I) - base(0)``."""
        eye = np.eye(self.in_features)
        b0 = self.base_forward(np.zeros((1, self.in_features)))[0]
        return (self.base_forward(eye) - b0).T, b0

    def forward_backward(self, x: np.ndarray, dy: np.ndarray):
        """``(y, dx, {math name: gradient})`` for the loss ``sum(y * dy)``."""
        if self.torch_family:
            self.layer.zero_grad(set_to_none=True)
            xt = self.native(x, requires_grad=True)
            y = self.layer(xt)
            (y * self.native(dy)).sum().backward()
            grads = {n: to_np(p.grad) for n, p in self.trained_parameters().items()}
            assert all(p.grad is None for p in self.layer.parameters() if not p.requires_grad)
            return to_np(y), to_np(xt.grad), grads
        self.layer.zero_grad()
        y = self.layer.forward(self.native(x))
        dx = self.layer.backward(self.native(dy))
        grads = {n: to_np(p.grad) for n, p in self.trained_parameters().items()}
        return to_np(y), to_np(dx), grads

    def adapter_state(self) -> dict:
        return {n: to_np(v) for n, v in self.layer.adapter_state().items()}

    def trained_parameters(self) -> dict:
        """The adapter's parameters by math name, plus, for a method with ``SPEC.shared``, the
        trained tensors of the lone layer's own shared state (``lowrank_shared.<method>.<name>``:
        Tied-LoRA's tied ``A``); frozen shared tensors are not parameters."""
        out = dict(self.layer.adapter_parameters())
        params = dict(self.layer.named_parameters()) if self.torch_family else self.layer.parameters()
        out.update({n: p for n, p in params.items() if n.startswith("lowrank_shared.")})
        return out

    def trainable_names(self) -> set:
        if self.torch_family:
            return {n for n, p in self.layer.named_parameters() if p.requires_grad}
        return set(self.layer.trainable_parameters())

    def base_state(self) -> dict:
        """Copies of every array the base holds (weights, biases, 4-bit storage and scales)."""
        if self.torch_family:
            return {k: to_np(v) for k, v in self.layer.base.state_dict().items() if v is not None}
        return _arrays_of(self.layer.base)


def _arrays_of(obj, prefix: str = "", depth: int = 0) -> dict:
    """Every NumPy/CuPy array reachable through ``obj``'s attributes (Parameters' ``data``,
    dataclass fields such as a 4-bit tensor's codes and scales), by dotted name."""
    from lowrank_ref.nn.module import Parameter

    out = {}
    if depth > 4:
        return out
    items = list(vars(obj).items())
    for k, v in items:
        if isinstance(v, dict):  # a Module's own registries (_params, _modules), or a dict of arrays
            items += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
    for k, v in items:
        if k == "_cache" or k.startswith("_cache.") or v is None or isinstance(v, dict):
            continue
        name = f"{prefix}{k}"
        if isinstance(v, Parameter):
            out[name] = to_np(v.data)
        elif isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "__cuda_array_interface__"):
            out[name] = to_np(v)
        elif hasattr(v, "__dict__") and not isinstance(v, type) and not callable(v):
            out.update(_arrays_of(v, f"{name}.", depth + 1))
    return out


def assert_same_bits(after: dict, before: dict, what: str = "base") -> None:
    assert sorted(after) == sorted(before), f"{what}: arrays {sorted(after)} vs {sorted(before)}"
    for k in before:
        assert after[k].dtype == before[k].dtype, f"{what} {k}: dtype {after[k].dtype} vs {before[k].dtype}"
        assert np.array_equal(after[k], before[k], equal_nan=True), f"{what} {k} changed"


def build(method: str, backend: str, seed: int = 0, dtype: str | None = None, scale=(1, 1)) -> Case:
    """``SPEC.example()`` of ``method`` as a layer in ``backend``: a random float64 base of the
    example's shape (times ``scale`` = (out, in) multipliers), the example's config and keywords,
    then every adapter tensor moved to random non-zero values (so ``ΔW ≠ 0``). ``dtype``:
    ``"float64"`` casts the whole layer (its compute dtype) before the adapter is perturbed."""
    spec = registry.get_method(method)
    ex = spec.example()
    rng = np.random.default_rng(seed)
    out, inn = ex.out_features * scale[0], ex.in_features * scale[1]
    W = rng.standard_normal((out, inn))
    b = rng.standard_normal(out) if ex.bias else None
    base = lr.nn.Linear.from_arrays(W.copy(), None if b is None else b.copy())
    kw = dict(ex.kwargs)
    if backend in TORCH_FAMILY:
        torch()
        layer = lr.adapt(base, ex.config, backend=backend, method=method, rng=seed + 1, **kw)
        if dtype is not None:
            layer = layer.to(getattr(torch(), dtype))
    else:
        layer = lr.adapt(base, ex.config, backend="numpy", method=method, rng=seed + 1, **kw)
        if dtype is not None:
            layer.astype(np.dtype(dtype))
    set_example_condition(layer, ex)
    case = Case(method, backend, layer, W, b)
    perturb(case, rng)
    if backend == "cupy":  # as lr.adapt(backend="cupy") does: the layer's arrays onto the GPU
        import cupy

        for p in layer.parameters().values():
            p.data = cupy.asarray(p.data)
    return case


def set_example_condition(layer, ex) -> None:
    """A conditional method's example condition (``Example.condition``, one task id for every
    row) as the layer's ``.condition``, as ``GPT.forward(idx, cond=...)`` would set it."""
    if ex.condition is not None:
        assert getattr(layer, "takes_condition", False), "Example.condition for a layer that takes none"
        layer.condition = ex.condition


def perturb(case: Case, rng: np.random.Generator, scale: float = 0.5) -> None:
    """Move every adapter tensor by Gaussian noise (away from the init's zeros and ones)."""
    state = case.adapter_state()
    case.layer.load_adapter_state({n: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype)
                                   for n, v in state.items()})


def torch_twin(case: Case, seed: int = 12345):
    """The torch layer of ``case``'s method on the same base, with ``case``'s adapter tensors
    copied by math name, in ``case``'s compute dtype."""
    tc = torch()
    ex = case.spec.example()
    base = lr.nn.Linear.from_arrays(case.W.copy(), None if case.b is None else case.b.copy())
    tl = lr.adapt(base, ex.config, backend="torch", method=case.method, rng=seed, **dict(ex.kwargs))
    tl = tl.to(getattr(tc, case.dtype))
    set_example_condition(tl, ex)
    copy_adapter_state(case.layer, tl)
    return Case(case.method, "torch", tl, case.W, case.b)


def with_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``x`` in a non-contiguous memory layout."""
    if layout == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        v = big[..., ::2]
    elif layout == "transposed" and x.ndim >= 2:
        v = np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)
    else:
        v = x
    np.testing.assert_array_equal(v, x)
    return v


# --- whole-model modes (full, BitFit): a small GPT -------------------------------------------
IDX = np.random.default_rng(5).integers(0, 11, (2, 6))  # (B, T) token ids


# block_size 8 > T = 6: room for a whole-model mode that takes positions (prompt tuning's k = 2)
GPT_CFG = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8)


def mode_config(method: str):
    """The config a whole-model mode is injected with here: its ``SPEC.example()``'s (sized for
    this small GPT), or ``None`` (its defaults) when it has no example."""
    spec = registry.get_method(method)
    return None if spec.example is None else spec.example().config


def gpt_in(backend: str):
    """A small float64 GPT (the same weights each call) as a NumPy or a torch model."""
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**GPT_CFG), rng=np.random.default_rng(0), dtype=np.float64)
    if backend == "numpy":
        return model
    from lowrank_gpu.nn.gpt import from_numpy

    return from_numpy(model)


def model_params(model) -> dict:
    """``{name: parameter}`` of a NumPy or torch model."""
    if hasattr(model, "named_parameters"):
        return dict(model.named_parameters())
    return model.parameters()


def model_trainable(model) -> set:
    if hasattr(model, "named_parameters"):
        return {n for n, p in model.named_parameters() if p.requires_grad}
    return set(model.trainable_parameters())


def perturb_trainable(model, rng, scale: float = 0.1) -> list:
    """Move every trainable tensor by noise (as training would); returns their names, sorted."""
    names = sorted(model_trainable(model))
    params = model_params(model)
    for n in names:
        p = params[n]
        if hasattr(p, "detach"):
            with torch().no_grad():
                p.add_(torch().from_numpy(scale * rng.standard_normal(tuple(p.shape))).to(p.dtype))
        else:
            p.data = p.data + scale * rng.standard_normal(p.shape)
    return names
