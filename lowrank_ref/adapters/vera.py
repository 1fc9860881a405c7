r"""VeRA: frozen random projections shared by every adapted layer, and two trained vectors per
layer (Kopiczko, Blankevoort and Asano 2024, "VeRA: Vector-based Random Matrix Adaptation",
arXiv:2310.11454, Eq. 2). Chapter 06 derives the backward.

Forward (PyTorch layout, ``W0 (out, in)``), for one layer::

    y = x W0ᵀ + b0 + ((x A_sᵀ) ⊙ d) B_sᵀ ⊙ b        ΔW = diag(b) B_s diag(d) A_s

* ``A (r, in_max)`` and ``B (out_max, r)`` are drawn once per model, frozen, and **shared by every
  adapted layer**; ``in_max``/``out_max`` are the largest ``in``/``out`` of the adapted layers.
  Each layer uses the slices ``A_s = A[:, :in]`` and ``B_s = B[:out, :]``: the first ``in``
  columns and the first ``out`` rows, exactly as PEFT does (``peft.tuners.vera.layer``); the
  paper says nothing about layers of different sizes.
* ``d (r,)`` (init ``d_initial``, 0.1 by default) and ``b (out,)`` (init 0, so ΔW = 0 at the
  start) are trained per layer: ``r + out`` scalars against LoRA's ``r (in + out)``.
* There is no α.

Backward, for upstream ȳ (N, out), with h = x A_sᵀ (N, r), g = h ⊙ d (N, r), z = g B_sᵀ (N, out)::

    b̄ = Σ_n ȳ_n ⊙ z_n      z̄ = ȳ ⊙ b      ḡ = z̄ B_s      d̄ = Σ_n ḡ_n ⊙ h_n
    h̄ = ḡ ⊙ d              x̄ = ȳ W0 + h̄ A_s

and, when ``A``, ``B`` train (Tied-LoRA, :mod:`lowrank_ref.adapters.tied_lora`, uses the same
functions), ``Ā_s = h̄ᵀ x`` and ``B̄_s = z̄ᵀ g``: a tensor that several layers share gets the sum
of their contributions.

The projections are PEFT's init: Kaiming-uniform with gain √2 and ``fan_in = size(1)``, so
``A ~ U(±√(6/in_max))`` and ``B ~ U(±√(6/r))``, ``A`` drawn first (REFERENCES §3.2), here from
NumPy's generator seeded with ``projection_seed``. PEFT draws them with torch's CPU generator,
which NumPy cannot reproduce: that is why the projections are stored in the adapter file
(``save_projection=True``) and why a PEFT folder saved without them cannot be loaded.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_bool, check_rank
from lowrank_ref.inject import as_rng
from lowrank_ref.nn.module import Module, Parameter, array_module
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping, PerBackend

__all__ = ["VeRAConfig", "VeRALinear", "vera_forward", "vera_backward", "vera_projections",
           "vera_param_count", "lora_param_count", "SharedTensors", "SPEC"]


def check_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    return int(v)


def check_float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class VeRAConfig:
    r"""VeRA (Kopiczko et al. 2024): ``ΔW = diag(b) B[:out] diag(d) A[:, :in]``.

    Args:
        r: the rank of the shared projections (PEFT's default 256; the paper uses 256 and 1024).
            Every layer of a model shares it.
        d_initial: the initial value of every entry of ``d`` (the paper's §3.3 and PEFT: 0.1).
        projection_seed: the seed of the projections (PEFT's ``projection_prng_key``).
        save_projection: store the projections in the adapter file (``True``, PEFT's default);
            ``False`` redraws them from the seed on load, which works only within this package.
    """

    r: int = 256
    d_initial: float = 0.1
    projection_seed: int = 0
    save_projection: bool = True

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "d_initial", check_float(self.d_initial, "d_initial"))
        seed = check_int(self.projection_seed, "projection_seed")
        if seed < 0:
            raise ValueError(f"projection_seed must be >= 0, got {seed}")
        object.__setattr__(self, "projection_seed", seed)
        object.__setattr__(self, "save_projection", check_bool(self.save_projection, "save_projection"))

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def vera_param_count(r: int, in_features: int, out_features: int) -> int:
    """Trained scalars of one VeRA layer: ``d (r,)`` and ``b (out,)``: ``r + out``."""
    return r + out_features


def lora_param_count(r: int, in_features: int, out_features: int) -> int:
    """Trained scalars of one LoRA layer: ``A (r, in)`` and ``B (out, r)``: ``r (in + out)``."""
    return r * (in_features + out_features)


def kaiming_uniform(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """PEFT's ``_kaiming_init``: ``U(±√3·√2/√fan_in)`` with ``fan_in = shape[1]`` (float64)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape)


def vera_projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A (r, in_max), B (out_max, r))``, Kaiming-uniform from NumPy's generator with ``seed``;
    ``A`` is drawn first (PEFT's order). float64."""
    rng = np.random.default_rng(seed)
    A = kaiming_uniform(rng, (r, in_max))
    B = kaiming_uniform(rng, (out_max, r))
    return A, B


class SharedTensors(Module):
    """A shared-state module that holds trained tensors (``Parameter``\\ s) and frozen ones (plain
    arrays, which no ``set_trainable`` mode can turn on). Both are stored in adapter files
    (:meth:`adapter_state`), the frozen ones only when ``save_frozen``."""

    def __init__(self, trained: dict, frozen: dict, save_frozen: bool = True):
        super().__init__()
        object.__setattr__(self, "frozen", dict(frozen))
        object.__setattr__(self, "save_frozen", bool(save_frozen))
        for n, v in trained.items():
            setattr(self, n, Parameter(v))

    def __getattr__(self, name):
        frozen = self.__dict__.get("frozen", {})
        if name in frozen:
            return frozen[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def dtype(self):
        """The float dtype the shared tensors are held in (that of the first one)."""
        first = next(iter([*self.frozen.values(), *(p.data for p in self._params.values())]), None)
        return np.dtype(np.float32) if first is None else first.dtype

    def cast_like(self, W) -> None:
        """The frozen arrays in ``W``'s array module and dtype (the parameters: the engine's ``like``)."""
        xp = array_module(W)
        for n, v in self.frozen.items():
            if array_module(v) is not xp or v.dtype != W.dtype:
                self.frozen[n] = xp.asarray(v, dtype=W.dtype)

    def adapter_state(self) -> dict:
        out = {n: p.data for n, p in self._params.items()}
        if self.save_frozen:
            out.update(self.frozen)
        return out

    def load_adapter_state(self, state: dict) -> None:
        own = self.adapter_state()
        if set(state) != set(own):
            raise ValueError(f"shared state names {sorted(state)} do not match {sorted(own)}")
        for n, v in state.items():
            if tuple(np.shape(v)) != tuple(own[n].shape):
                raise ValueError(f"shared state {n!r} has shape {tuple(np.shape(v))}, expected {tuple(own[n].shape)}")
        for n, v in state.items():
            xp = array_module(own[n])
            if n in self._params:
                self._params[n].data = xp.asarray(np.array(v), dtype=own[n].dtype)
                self._params[n].grad = None
            else:
                self.frozen[n] = xp.asarray(np.array(v), dtype=own[n].dtype)


def own_shared(layer, method: str, module):
    """Attach ``module`` to a lone ``layer`` as ``layer.lowrank_shared.<method>`` (what the engine's
    ``build_layer`` does) and return the ``SharedRef`` the layer uses."""
    from lowrank_ref.inject import NUMPY, SharedRef

    NUMPY.ops.like(module, layer.base) if not layer.quantized else None
    NUMPY.attach_shared(layer, method, module)
    return SharedRef(module, "")


def one_value(configs: dict, field: str, method: str):
    """The one value of ``field`` that every layer's config must share (a ``ValueError`` if not)."""
    values = {getattr(c, field) for c in configs.values()}
    if len(values) != 1:
        raise ValueError(f"{method}: every layer shares the projections, so {field} must be the same for all "
                         f"of them, got {sorted(values)}")
    return values.pop()


def shared_projections(configs: dict, shapes: dict):
    """``(A (r, in_max), B (out_max, r), save_projection)`` for the layers ``shapes = {name: (out, in)}``,
    from the configs' one ``r`` and ``projection_seed`` (both backends' builders call this)."""
    r = one_value(configs, "r", "VeRA")
    seed = one_value(configs, "projection_seed", "VeRA")
    save = one_value(configs, "save_projection", "VeRA")
    out_max = max(o for o, _ in shapes.values())
    in_max = max(i for _, i in shapes.values())
    A, B = vera_projections(r, in_max, out_max, seed)
    return A, B, save


def build_shared(configs: dict, shapes: dict, rng=None) -> SharedTensors:
    """The shared frozen projections (:func:`shared_projections`); the engine's ``rng`` is not
    used: the seed is the config's."""
    A, B, save = shared_projections(configs, shapes)
    return SharedTensors({}, {"A": A, "B": B}, save_frozen=save)


class VeRACache(NamedTuple):
    x2: np.ndarray  # (N, in)
    h: np.ndarray  # x A_sᵀ (N, r)
    g: np.ndarray  # h ⊙ d (N, r)
    W: np.ndarray
    A: np.ndarray
    B: np.ndarray
    d: np.ndarray
    b: np.ndarray
    lead: tuple


def vera_forward(x, params, cfg=None):
    r"""y = x W0ᵀ + b0 + ((x Aᵀ) ⊙ d) Bᵀ ⊙ b.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "bias": (out,) or None, "A": (r, in), "B": (out, r),
            "d": (r,), "b": (out,)}``; ``A``, ``B`` already sliced to the layer (VeRA's ``A_s``, ``B_s``).
        cfg: the layer's config, taken like every method's ``<m>_forward``; the product has no
            hyper-parameter beyond its tensors (no α), so it is not read.
    Returns:
        ``(y (..., out), cache)``. Backward in :func:`vera_backward` (module docstring).

    ``z ⊙ b = g Bᵀ ⊙ b = g (diag(b) B)ᵀ``: ``b`` is folded into the small ``(out, r)`` matrix, so no
    ``(N, out)`` array but ``y`` is made (the plain ``z = g Bᵀ``, ``z ⊙ b`` and their sum were three;
    the backward does not need ``z``).
    """
    W, bias, A, B, d, b = (params[k] for k in ("W", "bias", "A", "B", "d", "b"))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    h = x2 @ A.T  # (N, r)
    g = h * d  # (N, r)
    y = x2 @ W.T  # (N, out)
    y += g @ (b[:, None] * B).T  # + (g Bᵀ) ⊙ b = g (diag(b) B)ᵀ
    if bias is not None:
        y += bias
    return y.reshape(*lead, W.shape[0]), VeRACache(x2, h, g, W, A, B, d, b, lead)


def vera_backward(dy, cache: VeRACache, need_AB: bool = False):
    r"""Return ``(x̄, grads)``; grads ``d``, ``b`` (and ``A``, ``B`` with ``need_AB``, else None)::

        b̄ = Σ_n ȳ_n ⊙ z_n    z̄ = ȳ ⊙ b    ḡ = z̄ B    d̄ = Σ_n ḡ_n ⊙ h_n    h̄ = ḡ ⊙ d
        x̄ = ȳ W0 + h̄ A       Ā = h̄ᵀ x     B̄ = z̄ᵀ g

    computed without an ``(N, out)`` temporary: with ``P = ȳᵀ g (out, r)``,
    ``b̄_i = Σ_n ȳ_ni Σ_k g_nk B_ik = Σ_k P_ik B_ik`` and ``B̄ = z̄ᵀ g = diag(b) P``; and
    ``ḡ = (ȳ ⊙ b) B = ȳ (diag(b) B)``.
    """
    x2, h, g, W, A, B, d, b, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    P = dy2.T @ g  # P = ȳᵀ g   (out, r)
    db = (P * B).sum(axis=1)  # b̄ = Σ_n ȳ ⊙ z = Σ_k P ⊙ B   (out,)
    dg = dy2 @ (b[:, None] * B)  # ḡ = z̄ B = ȳ diag(b) B   (N, r)
    dd = (dg * h).sum(axis=0)  # d̄ = Σ ḡ ⊙ h   (r,)
    dh = dg * d  # h̄ = ḡ ⊙ d   (N, r)
    dx = dy2 @ W  # ȳ W0   (N, in)
    dx += dh @ A  # x̄ = ȳ W0 + h̄ A
    grads = {"d": dd, "b": db, "A": None, "B": None, "W": None, "bias": None}
    if need_AB:
        grads["A"] = dh.T @ x2  # Ā = h̄ᵀ x   (r, in)
        grads["B"] = b[:, None] * P  # B̄ = z̄ᵀ g = diag(b) P   (out, r)
    return dx.reshape(*lead, W.shape[1]), grads


class VeRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus VeRA's update. Trainable: ``d (r,)`` and
    ``b (out,)``; the projections are the model's shared ones (``shared=``, which the injection
    engine builds once per model), sliced to this layer.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`VeRAConfig`.
        rng: accepted like every method's; VeRA's init is deterministic given the seed.
        shared: the model's projections (a ``SharedRef``, which the engine passes). Without it
            (a layer built on its own) the layer draws its own from the seed and holds them as
            ``lowrank_shared.vera``, as ``lowrank_ref.adapt`` does.
    """

    CONFIG = VeRAConfig

    def __init__(self, base, config: VeRAConfig | None = None, rng=None, shared=None):
        config = self.check_config(config)
        super().__init__(base, config)
        as_rng(rng)  # no randomness here (the projections come from the seed); the rng is checked like every method's
        if shared is None:  # a lone layer: its own projections, held as self.lowrank_shared.vera
            shared = own_shared(self, "vera", build_shared({"": config}, {"": (self.out_features, self.in_features)}))
        A, B = shared.A, shared.B
        if A.shape[0] != config.r or B.shape[1] != config.r:
            raise ValueError(f"the shared projections have rank {A.shape[0]}, this layer's config r={config.r}")
        if A.shape[1] < self.in_features or B.shape[0] < self.out_features:
            raise ValueError(f"VeRA layer (out={self.out_features}, in={self.in_features}) is larger than the "
                             f"shared projections A {tuple(A.shape)}, B {tuple(B.shape)}: they need "
                             f"in <= {A.shape[1]} and out <= {B.shape[0]}")
        self.shared = shared
        # on a 4-bit base the layer computes in the shared tensors' dtype (the engine builds them in the
        # float model's dtype), instead of casting them to float32 under the other layers using them
        W = base.weight.data if not self.quantized else np.zeros(0, shared.dtype)
        shared.cast_like(W)
        dtype = W.dtype
        xp = array_module(self.shared.A)
        self.d = Parameter(xp.full(config.r, config.d_initial, dtype=dtype))
        self.b = Parameter(xp.zeros(self.out_features, dtype=dtype))  # b = 0: ΔW = 0 at init

    def projections(self):
        """``(A_s, B_s) = (A[:, :in], B[:out, :])``: PEFT's slices of the shared projections."""
        return self.shared.A[:, : self.in_features], self.shared.B[: self.out_features, :]

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = diag(b) B_s diag(d) A_s, (out, in)."""
        A, B = self.projections()
        return (self.b.data[:, None] * B) @ (self.d.data[:, None] * A)

    def _forward(self, x):
        A, B = self.projections()
        bias = None if self.base.bias is None else self.base.bias.data
        y, self._cache = vera_forward(x, {"W": self.w0(), "bias": bias, "A": A, "B": B,
                                          "d": self.d.data, "b": self.b.data})
        return y

    def _backward(self, dy):
        dx, grads = vera_backward(dy, self._pop_cache())
        self.d.accumulate(grads["d"])
        self.b.accumulate(grads["b"])
        return dx


# --- PEFT (peft.tuners.vera) ------------------------------------------------------------------
NO_PROJECTION = ("this VeRA folder was saved with save_projection=False, so it holds no vera_A/vera_B: "
                 "PEFT redraws them from projection_prng_key with torch's CPU generator, which NumPy cannot "
                 "reproduce; save the PEFT model again with VeraConfig(save_projection=True)")


def _to_peft(configs: dict) -> dict:
    r = one_value(configs, "r", "VeRA")
    seed = one_value(configs, "projection_seed", "VeRA")
    d0 = one_value(configs, "d_initial", "VeRA")
    if not one_value(configs, "save_projection", "VeRA"):
        raise ValueError("save_projection=False cannot be saved as a PEFT folder: PEFT would redraw the "
                         "projections with torch's generator, which gives other matrices than this package's")
    return {"r": r, "projection_prng_key": seed, "d_initial": d0, "save_projection": True,
            "vera_dropout": 0.0, "bias": "none", "fan_in_fan_out": False}


def _from_peft(peft_config: dict, path: str) -> VeRAConfig:
    if peft_config.get("save_projection", True) is not True:
        raise ValueError(NO_PROJECTION)
    if peft_config.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out=True (Conv1D layers) is not supported")
    if peft_config.get("vera_dropout", 0.0) not in (0, 0.0, None):
        raise ValueError(f"vera_dropout={peft_config['vera_dropout']!r} is not supported (only 0)")
    if peft_config.get("bias", "none") not in ("none", None):
        raise ValueError(f"bias={peft_config['bias']!r} is not supported (only 'none')")
    return VeRAConfig(r=peft_config.get("r", 256), d_initial=peft_config.get("d_initial", 0.1),
                      projection_seed=peft_config.get("projection_prng_key", 0), save_projection=True)


def _shapes(cfg: VeRAConfig, in_features: int, out_features: int) -> dict:
    return {"d": (cfg.r,), "b": (out_features,)}


SPEC = MethodSpec(
    name="vera",
    config=VeRAConfig,
    numpy="lowrank_ref.adapters.vera:VeRALinear",
    torch="lowrank_gpu.adapters.vera:VeRALinear",
    description="VeRA, Kopiczko et al. 2024: ΔW = diag(b) B[:out] diag(d) A[:, :in], A and B frozen, random, shared",
    overridable=(),
    file_metadata=lambda cfg: {"projections": "shared, stored" if cfg.save_projection else "shared, from the seed"},
    shapes=_shapes,
    peft=PeftMapping("VERA", {"d": "vera_lambda_d", "b": "vera_lambda_b"}, to_peft=_to_peft, from_peft=_from_peft,
                     options=("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                              "fan_in_fan_out", "bias", "init_weights"),
                     shared={"A": "base_model.vera_A", "B": "base_model.vera_B"}),
    example=lambda: Example(6, 5, VeRAConfig(r=4, d_initial=0.5)),
    shared=PerBackend("lowrank_ref.adapters.vera:build_shared", "lowrank_gpu.adapters.vera:build_shared"),
    compare={
        # the paper's placement (query and value). r = 64: every q/v layer of the built-in model is
        # 64 wide, so ΔW's rank is min(r, 64) and PEFT's default r = 256 reaches no higher rank
        # (it only adds entries to d, and costs 2.2x the step time: 57 vs 26 ms here, dialect
        # 0.305 vs 0.291 in one run each). lr 5e-2: VeRA trains only vectors; at r = 256, 1e-2
        # gave 0.250 and 5e-2 gave 0.305 (one run each)
        "vera": CompareRow(VeRAConfig(r=64), targets=("q", "v"), lr=5e-2, order=40),
    },
)
