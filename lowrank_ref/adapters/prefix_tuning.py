r"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021, arXiv:2101.00190): learned key and value vectors in front of every layer's attention
keys and values; the model stays frozen. Chapter 09, §Prefix tuning, derives the attention's
backward with prefixes and the encoder's.

For layer ``l`` with prefixes ``P_k^l, P_v^l`` ``(p, C)`` (split into heads like ``K``, ``V``)::

    K' = [P_k^l; K]    V' = [P_v^l; V]              (p+T, hs) per head
    S = Q K'ᵀ/√hs + M'    M' = [0 (T, p) | causal (T, T)]   every position sees every prefix
    Y = softmax(S) V'

(:class:`lowrank_ref.nn.attention.CausalSelfAttention`, ``kv_prefix``). The prefixes take no
position (the input keeps positions ``0..T-1``), so unlike prompt tuning they take no context
length; they cost ``p`` extra keys per query.

**The re-parameterisation** (the paper's §4.3: training ``P`` directly is unstable, so ``P`` is
the output of an MLP while training, as PEFT's ``prefix_projection=True``)::

    Z = tanh(E W1ᵀ + b1)          E (p, C), W1 (h, C), b1 (h,)           Z (p, h)
    P = Z W2ᵀ + b2                W2 (2·L·C, h), b2 (2·L·C,)             P (p, 2·L·C)
    P -> (p, L, 2, C) -> (L, 2, p, C)   layer, key/value, position, channel

Backward, for ``P̄`` ``(L, 2, p, C)`` gathered from the layers (read back as ``(p, 2·L·C)``)::

    W̄2 = P̄ᵀ Z    b̄2 = Σ_i P̄_i    Z̄ = P̄ W2    Ā = Z̄ ⊙ (1 − Z²)
    W̄1 = Āᵀ E    b̄1 = Σ_i Ā_i    Ē = Ā W1

:meth:`PrefixEncoder.finalize` runs the MLP once and keeps only its output ``P`` as the parameter
(``2·L·p·C`` numbers; the paper keeps only the prefixes after training): the outputs do not change.
With ``projection=False`` ``P`` is the parameter from the start.

**Init**: ``E ~ N(0, 1)`` (PEFT's ``nn.Embedding`` default), ``W1, W2 ~ N(0, init_std²)``, biases 0;
without the MLP, ``P ~ N(0, init_std²)``. No init makes the prefixes invisible (a zero key still
takes softmax mass), so the model is not exactly the base at init.

**Not mergeable**: the prefixes enter through the softmax, not through any weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.prompt_tuning import check_prompt_model
from lowrank_ref.config import check_alpha, check_rank
from lowrank_ref.nn.module import Module, Parameter, StateError, array_module
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "prefix_encoder_forward", "prefix_encoder_backward",
           "prefix_init", "prefix_tuning", "finalize", "NOT_MERGEABLE_WHY", "SPEC"]

NOT_MERGEABLE_WHY = ("prefix tuning puts learned keys and values in front of each layer's own; they enter "
                     "through the softmax, not through any weight, so there is nothing to fold into the model")


@dataclass(frozen=True)
class PrefixTuningConfig:
    r"""Prefix tuning (Li & Liang 2021): ``k`` key/value prefixes at every layer.

    Args:
        k: prefix length ``p`` (PEFT: ``num_virtual_tokens``).
        projection: train through the MLP re-parameterisation (PEFT: ``prefix_projection``);
            ``finalize()`` drops it. ``False``: train ``P`` directly.
        hidden: the MLP's hidden width ``h`` (PEFT: ``encoder_hidden_size``).
        init_std: the std of ``W1``, ``W2`` (or of ``P`` without the MLP).
    """

    k: int = 8
    projection: bool = True
    hidden: int = 64
    init_std: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "k", check_rank(self.k, "k"))
        object.__setattr__(self, "hidden", check_rank(self.hidden, "hidden"))
        if not isinstance(self.projection, (bool, np.bool_)):
            raise TypeError(f"projection must be a bool, got {self.projection!r}")
        object.__setattr__(self, "projection", bool(self.projection))
        s = check_alpha(self.init_std, "init_std")
        if s == 0:
            raise ValueError("init_std must be > 0 (a zero W2 starts every prefix at b2 = 0 with W1 "
                             "without a gradient), got 0.0")
        object.__setattr__(self, "init_std", s)

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def prefix_init(config: PrefixTuningConfig, n_layer: int, d_model: int, rng: np.random.Generator) -> dict:
    """The initial tensors (float64): ``{"E", "W1", "b1", "W2", "b2"}`` with the MLP, else ``{"P"}``
    ``(L, 2, p, C)``. Both backends call this, so one seed gives the same prefixes in each."""
    p, h, C, L, s = config.k, config.hidden, d_model, n_layer, config.init_std
    if not config.projection:
        return {"P": s * rng.standard_normal((L, 2, p, C))}
    return {"E": rng.standard_normal((p, C)), "W1": s * rng.standard_normal((h, C)), "b1": np.zeros(h),
            "W2": s * rng.standard_normal((2 * L * C, h)), "b2": np.zeros(2 * L * C)}


class EncoderCache(NamedTuple):
    E: np.ndarray  # (p, C)
    Z: np.ndarray  # tanh(E W1ᵀ + b1) (p, h)
    W1: np.ndarray  # (h, C)
    W2: np.ndarray  # (2·L·C, h)
    L: int


def prefix_encoder_forward(params: dict, n_layer: int):
    r"""P = tanh(E W1ᵀ + b1) W2ᵀ + b2, as ``(L, 2, p, C)``; returns ``(P, cache)``.

    Args:
        params: ``{"E" (p, C), "W1" (h, C), "b1" (h,), "W2" (2·L·C, h), "b2" (2·L·C,)}``.
        n_layer: ``L``.
    """
    E, W1, b1, W2, b2 = (params[n] for n in ("E", "W1", "b1", "W2", "b2"))
    p, C = E.shape
    Z = array_module(E).tanh(E @ W1.T + b1)  # Z = tanh(E W1ᵀ + b1)   (p, h)
    P = Z @ W2.T + b2  # P = Z W2ᵀ + b2   (p, 2·L·C)
    P = P.reshape(p, n_layer, 2, C).transpose(1, 2, 0, 3)  # (L, 2, p, C): layer, key/value, position, channel
    return P, EncoderCache(E, Z, W1, W2, n_layer)


def prefix_encoder_backward(dP, cache: EncoderCache) -> dict:
    r"""The gradients ``{"E", "W1", "b1", "W2", "b2"}`` from ``P̄ (L, 2, p, C)``."""
    E, Z, W1, W2, L = cache
    p, C = E.shape
    dP2 = dP.transpose(2, 0, 1, 3).reshape(p, 2 * L * C)  # P̄ back to (p, 2·L·C)
    dW2 = dP2.T @ Z  # W̄2 = P̄ᵀ Z   (2·L·C, h)
    db2 = dP2.sum(axis=0)  # b̄2 = Σ_i P̄_i
    dA = dP2 @ W2  # Z̄ = P̄ W2   (p, h)
    dA *= 1 - Z * Z  # Ā = Z̄ ⊙ (1 − Z²), tanh' = 1 − tanh²
    return {"E": dA @ W1, "W1": dA.T @ E, "b1": dA.sum(axis=0), "W2": dW2, "b2": db2}  # Ē = Ā W1, W̄1 = Āᵀ E


class PrefixEncoder(Module):
    """Every layer's key/value prefixes, ``forward() -> (L, 2, p, C)``; ``model.prefix``.

    Trainable: ``E``, ``W1``, ``b1``, ``W2``, ``b2`` (the MLP; ``projection=True``) or ``P``
    ``(L, 2, p, C)`` (after :meth:`finalize`, or ``projection=False``). Not mergeable."""

    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, tensors: dict, config: PrefixTuningConfig, n_layer: int):
        super().__init__()
        self.config = config
        self.n_layer = int(n_layer)
        for n, v in tensors.items():
            setattr(self, n, Parameter(v))

    @property
    def projection(self) -> bool:
        """Whether the MLP is still there (``False`` after :meth:`finalize`)."""
        return "P" not in self._params

    @property
    def k(self) -> int:
        return (self.E if self.projection else self.P).shape[-2]

    def forward(self):
        if not self.projection:
            self._cache = "P"
            return self.P.data  # (L, 2, p, C)
        P, self._cache = prefix_encoder_forward({n: p.data for n, p in self._params.items()}, self.n_layer)
        return P

    def backward(self, dP) -> None:
        cache = self._pop_cache()
        if cache == "P":
            self.P.accumulate(dP)
            return None
        for n, g in prefix_encoder_backward(dP, cache).items():
            getattr(self, n).accumulate(g)
        return None

    def finalize(self) -> None:
        """Replace the MLP by its output: ``P = MLP(E)`` becomes the one parameter (trainable as
        the MLP was). The model's outputs stay the same. A no-op without the MLP."""
        if not self.projection:
            return
        P, _ = prefix_encoder_forward({n: p.data for n, p in self._params.items()}, self.n_layer)
        trainable = self.E.trainable
        for n in ("E", "W1", "b1", "W2", "b2"):
            delattr(self, n)
        self.P = Parameter(array_module(P).ascontiguousarray(P), trainable=trainable)
        self._cache = None

    def merge(self) -> None:
        raise ValueError(f"PrefixEncoder is not mergeable: {NOT_MERGEABLE_WHY}")

    def extra_repr(self) -> str:
        return f"k={self.k}, layers={self.n_layer}, projection={self.projection}"


def finalize(model) -> None:
    """:meth:`PrefixEncoder.finalize` on ``model.prefix`` (either backend): only the prefixes stay."""
    prefix = getattr(model, "prefix", None)
    if prefix is None:
        raise StateError("finalize: the model has no prefix (inject prefix tuning first)")
    prefix.finalize()


def prefix_tuning(model, config: PrefixTuningConfig | None = None, rng=None) -> int:
    """Freeze ``model`` (a NumPy GPT) and hang a :class:`PrefixEncoder` on it as ``model.prefix``;
    returns the trainable count. Bad input changes nothing."""
    from lowrank_ref.inject import _is_torch_module, set_trainable
    from lowrank_ref.nn.module import as_rng

    config = PrefixTuningConfig() if config is None else config
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"config must be a PrefixTuningConfig, got {type(config).__name__}")
    if _is_torch_module(model):
        from lowrank_gpu.adapters.prefix_tuning import prefix_tuning as torch_prefix_tuning

        return torch_prefix_tuning(model, config, rng)
    check_prompt_model(model, config, "prefix tuning")
    c = model.config
    tensors = prefix_init(config, c.n_layer, c.d_model, as_rng(rng))  # drawn on the host
    xp = array_module(model.tok_emb.weight.data)
    set_trainable(model, "none")
    model.prefix = PrefixEncoder({n: xp.asarray(v.astype(model.dtype)) for n, v in tensors.items()}, config,
                                 c.n_layer)
    return model.num_trainable_parameters()


SPEC = MethodSpec(
    name="prefix_tuning",
    config=PrefixTuningConfig,
    model_fn=PerBackend("lowrank_ref.adapters.prefix_tuning:prefix_tuning",
                        "lowrank_gpu.adapters.prefix_tuning:prefix_tuning"),
    description="prefix tuning, Li & Liang 2021: learned key/value prefixes at every layer, trained "
                "through an MLP that finalize() drops (not mergeable)",
    # PEFT has PREFIX_TUNING, but hands the prefixes to the base as past_key_values, which our GPT
    # does not take: no PeftMapping (chapter 09, §Prefix tuning)
    example=lambda: Example(config=PrefixTuningConfig(k=2, hidden=3)),
    mergeable=False,
    compare={"prefix_tuning": CompareRow(PrefixTuningConfig(k=8, hidden=64), targets=(), lr=1e-2, order=39)},
)
