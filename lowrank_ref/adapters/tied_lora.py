r"""Tied-LoRA: LoRA's two matrices tied across layers, with a scaling vector on each side
(Renduchintala, Konuk and Kuchaiev 2023, "Tied-LoRA: Enhancing parameter efficiency of LoRA with
weight tying", arXiv:2311.09578). Chapter 06 derives the backward.

Forward (PyTorch layout, ``W0 (out, in)``), for one layer ``ℓ``::

    y = x W0ᵀ + b0 + ((x Aᵀ) ⊙ u) Bᵀ ⊙ v        ΔW_ℓ = diag(v_ℓ) B diag(u_ℓ) A

with ``A (r, in)`` and ``B (out, r)`` **tied**: one pair per projection type (every ``q`` layer
shares one ``A`` and one ``B``, every ``v`` layer another; ``tie="all"``: one pair for every
adapted layer, which needs them all of one shape), and ``u (r,)``, ``v (out,)`` per layer. Each
of ``A, B, u, v`` trains or stays frozen by the config, and ``A``, ``B`` can each be tied or not,
so that

* plain LoRA is ``tie_A = tie_B = False``, ``u``, ``v`` frozen at 1, ``A``, ``B`` trained;
* VeRA is ``A``, ``B`` tied, frozen and random, ``u``, ``v`` trained (VeRA's ``d`` and ``b``);
* the paper's best ("TL6", REFERENCES §4) ties ``A`` and ``B`` and trains all four.

The paper's TL1-TL6 table is not public in full, so the configurations are named by what they
tie and train (:attr:`TiedLoRAConfig.label`: ``"tie AB, train ABuv"``), not by number.

Backward: :func:`lowrank_ref.adapters.vera.vera_backward` (the same product, with ``d = u``,
``b = v``), plus ``Ā = h̄ᵀ x`` and ``B̄ = z̄ᵀ g``. A tied tensor's gradient is the **sum** over the
layers that share it: each layer's backward adds its share into the one ``.grad``.

Init, so that ΔW = 0 at the start and something can move it: the first trained tensor of
``B, v, u, A`` starts at zero (``B`` when it trains, as in LoRA; else ``v``, as VeRA's ``b``);
``u`` starts at ``u_init`` (VeRA's ``d_initial``), ``v`` at 1; ``A`` and ``B`` are
Kaiming-uniform as VeRA's projections (``U(±√(6/in))``, ``U(±√(6/r))``). Tied tensors are drawn
from NumPy's generator with ``tie_seed`` (the same in both backends); untied ones from the
layer's ``rng``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.vera import (
    SharedTensors,
    check_float,
    check_int,
    kaiming_uniform,
    one_value,
    own_shared,
    vera_backward,
    vera_forward,
)
from lowrank_ref.config import check_bool, check_rank
from lowrank_ref.inject import as_rng
from lowrank_ref.nn.module import Parameter, array_module
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend

__all__ = ["TiedLoRAConfig", "TiedLoRALinear", "tie_group", "zero_tensor", "SPEC"]

TIES = ("type", "all")
TENSORS = ("A", "B", "u", "v")


@dataclass(frozen=True)
class TiedLoRAConfig:
    r"""Tied-LoRA: ``ΔW = diag(v) B diag(u) A`` with ``A``, ``B`` tied across layers.

    Args:
        r: the rank, shared by every layer.
        train_A, train_B, train_u, train_v: which tensors train (the others stay at their init).
        tie_A, tie_B: share ``A`` / ``B`` across layers (``False``: each layer has its own).
        tie: ``"type"``: one tied tensor per projection type (the layer name's last part, ``q``,
            ``v``, ``fc``); ``"all"``: one for every adapted layer (all must have one shape).
        u_init: the initial value of ``u`` (when ``u`` is not the tensor that starts at zero).
        tie_seed: the seed of the tied tensors' draw.
    """

    r: int = 8
    train_A: bool = True
    train_B: bool = True
    train_u: bool = True
    train_v: bool = True
    tie_A: bool = True
    tie_B: bool = True
    tie: str = "type"
    u_init: float = 1.0
    tie_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        for f in ("train_A", "train_B", "train_u", "train_v", "tie_A", "tie_B"):
            object.__setattr__(self, f, check_bool(getattr(self, f), f))
        if not isinstance(self.tie, str) or self.tie not in TIES:
            raise ValueError(f"tie must be one of {TIES}, got {self.tie!r}")
        object.__setattr__(self, "u_init", check_float(self.u_init, "u_init"))
        seed = check_int(self.tie_seed, "tie_seed")
        if seed < 0:
            raise ValueError(f"tie_seed must be >= 0, got {seed}")
        object.__setattr__(self, "tie_seed", seed)
        if not any(self.trains(n) for n in TENSORS):
            raise ValueError("train_A, train_B, train_u and train_v are all False: nothing would train")

    def trains(self, name: str) -> bool:
        return getattr(self, f"train_{name}")

    def tied(self, name: str) -> bool:
        return name in ("A", "B") and getattr(self, f"tie_{name}")

    @property
    def label(self) -> str:
        """What it ties and trains: ``"tie AB, train ABuv"``, ``"tie none, train AB"`` (LoRA)."""
        tied = "".join(n for n in "AB" if self.tied(n)) or "none"
        return f"tie {tied}, train {''.join(n for n in TENSORS if self.trains(n))}"

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def zero_tensor(cfg: TiedLoRAConfig) -> str:
    """The tensor that starts at zero (ΔW = 0 at init): the first trained of ``B, v, u, A``."""
    return next(n for n in ("B", "v", "u", "A") if cfg.trains(n))


def tie_group(cfg: TiedLoRAConfig, layer_name: str) -> str:
    """The tied tensors' group of layer ``layer_name``: its last part (``"q"``), or ``"all"``."""
    return "all" if cfg.tie == "all" else layer_name.rsplit(".", 1)[-1]


def init_tensor(name: str, cfg: TiedLoRAConfig, out: int, inn: int, rng) -> np.ndarray:
    """The init of ``name`` (float64) for a layer of ``(out, in)``."""
    shape = {"A": (cfg.r, inn), "B": (out, cfg.r), "u": (cfg.r,), "v": (out,)}[name]
    if name == zero_tensor(cfg):
        return np.zeros(shape)
    if name == "u":
        return np.full(shape, cfg.u_init)
    if name == "v":
        return np.ones(shape)
    return kaiming_uniform(rng, shape)


_SAME = ("r", "train_A", "train_B", "train_u", "train_v", "tie_A", "tie_B", "tie", "tie_seed", "u_init")


def tied_shapes(configs: dict, shapes: dict) -> dict:
    """``{group: (out, in)}`` of the tied groups; layers of one group must have one shape."""
    cfg = next(iter(configs.values()))
    groups: dict = {}
    for name, shape in shapes.items():
        groups.setdefault(tie_group(cfg, name), {})[name] = tuple(shape)
    out = {}
    for g, members in groups.items():
        if len(set(members.values())) > 1:
            listing = ", ".join(f"{n or '(layer)'} (out={o}, in={i})" for n, (o, i) in sorted(members.items()))
            raise ValueError(f"Tied-LoRA ties {'every layer' if g == 'all' else repr(g) + ' layers'} to one A and B, "
                             f"but they have different shapes: {listing}; tie='type' or untie A/B")
        out[g] = next(iter(members.values()))
    return out


def shared_tensors(configs: dict, shapes: dict) -> tuple[dict, dict]:
    """``(trained, frozen)`` float64 arrays of the tied tensors, ``{"A_q": ..., "B_q": ...}``."""
    for f in _SAME:
        one_value(configs, f, "Tied-LoRA")
    cfg = next(iter(configs.values()))
    trained, frozen = {}, {}
    if not (cfg.tie_A or cfg.tie_B):
        return trained, frozen
    rng = np.random.default_rng(cfg.tie_seed)
    for g, (out, inn) in sorted(tied_shapes(configs, shapes).items()):
        for n in ("A", "B"):
            if cfg.tied(n):
                (trained if cfg.trains(n) else frozen)[f"{n}_{g}"] = init_tensor(n, cfg, out, inn, rng)
    return trained, frozen


def build_shared(configs: dict, shapes: dict, rng=None) -> SharedTensors:
    trained, frozen = shared_tensors(configs, shapes)
    return SharedTensors(trained, frozen, save_frozen=True)


class TiedLoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus Tied-LoRA's update. Trained tensors are
    parameters (the tied ones held once by the model, as ``lowrank_shared.tied_lora.A_q``);
    frozen ones plain arrays, which no ``set_trainable`` mode turns on, stored in adapter files.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`TiedLoRAConfig`.
        rng: draws the untied random tensors.
        shared: the model's tied tensors (a ``SharedRef``, which the engine passes, named after
            the layer it is handed to: that picks the group). Without it the layer ties to itself.
    """

    CONFIG = TiedLoRAConfig

    def __init__(self, base, config: TiedLoRAConfig | None = None, rng=None, shared=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        if shared is None:  # a lone layer: its "tied" tensors are its own
            shared = own_shared(self, "tied_lora", build_shared({"": config}, {"": (self.out_features, self.in_features)}))
        self.shared = shared
        self.group = tie_group(config, shared.layer)
        W = base.weight.data if not self.quantized else np.zeros(0, shared.dtype)  # as VeRA's layer
        shared.cast_like(W)
        for n in ("A", "B"):
            if config.tied(n):
                t = self._tied(n)
                want = (config.r, self.in_features) if n == "A" else (self.out_features, config.r)
                if tuple(t.shape) != want:
                    raise ValueError(f"the tied {n} of group {self.group!r} has shape {tuple(t.shape)}, this layer "
                                     f"(out={self.out_features}, in={self.in_features}) needs {want}")
        dtype = W.dtype
        xp = array_module(W)
        object.__setattr__(self, "frozen", {})
        for n in TENSORS:
            if config.tied(n):
                continue
            v = xp.asarray(init_tensor(n, config, self.out_features, self.in_features, rng), dtype=dtype)
            if config.trains(n):
                setattr(self, n, Parameter(v))
            else:
                self.frozen[n] = v

    def _tied(self, n):
        return getattr(self.shared, f"{n}_{self.group}")

    def tensor(self, n):
        """``A``, ``B``, ``u`` or ``v``: a ``Parameter`` when it trains, else an array."""
        if self.config.tied(n):
            return self._tied(n)
        return self._params[n] if n in self._params else self.frozen[n]

    def array(self, n) -> np.ndarray:
        t = self.tensor(n)
        return t.data if isinstance(t, Parameter) else t

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = diag(v) B diag(u) A, (out, in)."""
        A, B, u, v = (self.array(n) for n in TENSORS)
        return (v[:, None] * B) @ (u[:, None] * A)

    def _forward(self, x):
        bias = None if self.base.bias is None else self.base.bias.data
        A, B, u, v = (self.array(n) for n in TENSORS)
        y, self._cache = vera_forward(x, {"W": self.w0(), "bias": bias, "A": A, "B": B, "d": u, "b": v})
        return y

    def _backward(self, dy):
        cfg = self.config
        dx, g = vera_backward(dy, self._pop_cache(), need_AB=cfg.train_A or cfg.train_B)
        for n, gn in (("A", g["A"]), ("B", g["B"]), ("u", g["d"]), ("v", g["b"])):
            t = self.tensor(n)
            if isinstance(t, Parameter):
                t.accumulate(gn)  # a tied tensor: every layer of its group adds its share
        return dx

    # adapter files: the layer's own tensors, trained and frozen (a frozen random A is not
    # recomputable from the config); the tied ones are the shared state's
    def adapter_state(self) -> dict:
        return {n: self.array(n) for n in TENSORS if not self.config.tied(n)}

    def load_adapter_state(self, state: dict) -> None:
        own = self.adapter_state()
        if set(state) != set(own):
            raise ValueError(f"adapter state names {sorted(state)} do not match {sorted(own)}")
        for n, v in state.items():
            if np.shape(v) != own[n].shape:
                raise ValueError(f"adapter state {n!r} has shape {np.shape(v)}, expected {own[n].shape}")
        if self.merged:
            raise ValueError("Tied-LoRA layer is merged: unmerge() before loading its adapters")
        for n, v in state.items():
            xp = array_module(own[n])
            arr = xp.asarray(np.array(v), dtype=own[n].dtype)
            if n in self._params:
                self._params[n].data = arr
                self._params[n].grad = None
            else:
                self.frozen[n] = arr


def _shapes(cfg: TiedLoRAConfig, in_features: int, out_features: int) -> dict:
    full = {"A": (cfg.r, in_features), "B": (out_features, cfg.r), "u": (cfg.r,), "v": (out_features,)}
    return {n: s for n, s in full.items() if not cfg.tied(n)}


#: the corners and the paper's best, by what they tie and train (``label``)
GRID = {
    "lora": TiedLoRAConfig(train_u=False, train_v=False, tie_A=False, tie_B=False),
    "vera": TiedLoRAConfig(train_A=False, train_B=False, u_init=0.1),
    "tie_AB_train_ABuv": TiedLoRAConfig(),
    "tie_AB_train_Buv": TiedLoRAConfig(train_A=False),
    "tie_AB_train_Bv": TiedLoRAConfig(train_A=False, train_u=False),
}

SPEC = MethodSpec(
    name="tied_lora",
    config=TiedLoRAConfig,
    numpy="lowrank_ref.adapters.tied_lora:TiedLoRALinear",
    torch="lowrank_gpu.adapters.tied_lora:TiedLoRALinear",
    description="Tied-LoRA, Renduchintala et al. 2023: ΔW = diag(v) B diag(u) A, A and B tied across layers",
    overridable=(),
    file_metadata=lambda cfg: {"label": cfg.label},
    shapes=_shapes,
    # A tied (the shared state, random, trained), B per layer: both kinds of tensor, ΔW ≠ 0 once moved
    example=lambda: Example(6, 5, TiedLoRAConfig(r=3, tie_B=False)),
    shared=PerBackend("lowrank_ref.adapters.tied_lora:build_shared", "lowrank_gpu.adapters.tied_lora:build_shared"),
    compare={
        # the paper's best (A and B tied per projection type, all four trained), on q and v, at
        # LoRA's rank 8: 2,336 trainable against LoRA's 4,096. lr 1e-2 (of 3e-3 and 1e-2, one run
        # each: dialect 0.261 and 0.313): a tied matrix gets the sum of four layers' gradients
        "tied_lora": CompareRow(TiedLoRAConfig(r=8), targets=("q", "v"), lr=1e-2, order=41),
    },
)
