r"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", EMNLP 2021, arXiv:2104.08691): ``k`` learned vectors in front of the input's token
embeddings; the whole model stays frozen and only those ``k · C`` numbers train. Chapter 09,
§Prompt tuning, derives the backward and measures what it costs.

With token embeddings ``X_e = E_tok[idx]`` ``(B, T, C)`` and the prompt ``P`` ``(k, C)``::

    H = [P; X_e]                     (B, k+T, C)   the same P in front of every row
    x0 = H + E_pos[0 .. k+T-1]       the prompt takes positions 0..k-1, the input k..k+T-1

so an input may be at most ``block_size - k`` tokens long (:attr:`GPT.max_input_length`; a longer
one is a ``ValueError``). The logits of the prompt's own ``k`` positions predict nothing and are
dropped: the model still returns ``(B, T, V)``.

Backward, for the upstream ``H̄`` (B, k+T, C) that the frozen network hands back::

    P̄ = Σ_b H̄[b, :k]       X̄_e = H̄[:, k:]

(the prompt is broadcast over the batch, so its gradient sums over it). That is all: the rest of
the backward is the frozen model's own, run at ``k + T`` positions.

**Init** (the paper compares three; PEFT names them ``RANDOM``, ``SAMPLE_VOCAB``, ``TEXT``):

* ``"random"``: ``N(0, init_std²)``; ``init_std = 0.02`` by default, the scale the GPT's token
  embeddings are initialised at (PEFT's ``RANDOM`` is ``nn.Embedding``'s default ``N(0, 1)``, far
  larger than this model's embeddings).
* ``"vocab"``: the token-table rows of ``k`` token ids drawn uniformly (with repeats).
* ``"text"``: the rows of ``init_text`` tokenised by the built-in word tokenizer
  (:func:`lowrank_ref.data.tokenizer.default_tokenizer`), repeated or cut to ``k`` (as PEFT's
  ``TEXT``); a word outside the vocabulary is a ``ValueError``.

**Not mergeable**: ``P`` is extra input, not a change of any weight, so ``merge()`` refuses.

This is a whole-model mode (``SPEC.model_fn``): ``inject(model, PromptTuningConfig(k=8))`` freezes
the model and hangs a :class:`PromptEmbedding` on it as ``model.prompt``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lowrank_ref.config import check_alpha, check_rank
from lowrank_ref.nn.module import Module, Parameter, array_module, to_host
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend

__all__ = ["PromptTuningConfig", "PromptEmbedding", "prompt_forward", "prompt_backward", "prompt_init",
           "prompt_tuning", "check_prompt_model", "PROMPT_INITS", "NOT_MERGEABLE_WHY", "SPEC"]

PROMPT_INITS = ("random", "vocab", "text")
NOT_MERGEABLE_WHY = ("prompt tuning adds k input vectors in front of the sequence, not a change of any "
                     "weight, so there is nothing to fold into the model; the prompt stays in every forward")


@dataclass(frozen=True)
class PromptTuningConfig:
    r"""Prompt tuning (Lester et al. 2021): ``k`` learned input vectors in front of the sequence.

    Args:
        k: the number of prompt vectors (PEFT: ``num_virtual_tokens``); at most ``block_size - 1``.
        init: ``"random"``, ``"vocab"`` (sampled token embeddings) or ``"text"`` (``init_text``'s).
        init_text: the words for ``init="text"`` (PEFT: ``prompt_tuning_init_text``).
        init_std: the std of ``init="random"``.
    """

    k: int = 8
    init: str = "random"
    init_text: str = ""
    init_std: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "k", check_rank(self.k, "k"))
        if not isinstance(self.init, str):
            raise TypeError(f"init must be a string, got {type(self.init).__name__}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, PROMPT_INITS))}, got {self.init!r}")
        if not isinstance(self.init_text, str):
            raise TypeError(f"init_text must be a string, got {type(self.init_text).__name__}")
        if self.init == "text" and not self.init_text.split():
            raise ValueError("init='text' needs a non-empty init_text")
        if self.init != "text" and self.init_text:
            raise ValueError(f"init_text is only read with init='text', got init={self.init!r}")
        s = check_alpha(self.init_std, "init_std")
        if s == 0:
            raise ValueError("init_std must be > 0, got 0.0")
        object.__setattr__(self, "init_std", s)

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def prompt_init(config: PromptTuningConfig, tok_table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The initial prompt ``(k, C)``, float64, from the model's token table ``(V, C)`` (read only).
    Both backends call this, so one seed gives the same prompt in each."""
    V, C = tok_table.shape
    k = config.k
    if config.init == "random":
        return config.init_std * rng.standard_normal((k, C))
    if config.init == "vocab":
        return np.asarray(tok_table[rng.integers(0, V, k)], dtype=np.float64)
    from lowrank_ref.data.tokenizer import default_tokenizer

    try:
        ids = default_tokenizer().encode(config.init_text)
    except ValueError as e:
        raise ValueError(f"init_text: {e}") from None
    if ids.max() >= V:
        raise ValueError(f"init_text: token id {int(ids.max())} is outside the model's vocabulary of {V}")
    ids = np.resize(ids, k)  # repeated, or cut, to k ids
    return np.asarray(tok_table[ids], dtype=np.float64)


def prompt_forward(x_e, P):
    r"""H = [P; X_e]: ``x_e (B, T, C)``, ``P (k, C)`` -> ``(H (B, k+T, C), cache)``.

    Backward (:func:`prompt_backward`): ``P̄ = Σ_b H̄[b, :k]``, ``X̄_e = H̄[:, k:]``."""
    xp = array_module(x_e)
    B, _, C = x_e.shape
    k = P.shape[0]
    h = xp.concatenate([xp.broadcast_to(P.astype(x_e.dtype, copy=False), (B, k, C)), x_e], axis=1)  # (B, k+T, C)
    return h, k


def prompt_backward(dh, cache):
    r"""``(X̄_e (B, T, C), P̄ (k, C))`` from ``H̄ (B, k+T, C)``."""
    k = cache
    return dh[:, k:], dh[:, :k].sum(axis=0)  # X̄_e = H̄[:, k:];  P̄ = Σ_b H̄[b, :k]


class PromptEmbedding(Module):
    """The prompt ``P (k, C)`` (trainable) in front of the token embeddings; ``model.prompt``.

    ``forward(x_e (B, T, C)) -> (B, k+T, C)``; ``backward(dh) -> dx_e`` (accumulates ``P.grad``).
    Not mergeable: ``merge()`` is a ``ValueError`` that says why."""

    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, P: np.ndarray, config: PromptTuningConfig):
        super().__init__()
        self.config = config
        self.P = Parameter(P)

    @property
    def k(self) -> int:
        return self.P.shape[0]

    def forward(self, x_e):
        h, self._cache = prompt_forward(x_e, self.P.data)
        return h

    def backward(self, dh):
        dx, dP = prompt_backward(dh, self._pop_cache())
        self.P.accumulate(dP)
        return dx

    def merge(self) -> None:
        raise ValueError(f"PromptEmbedding is not mergeable: {NOT_MERGEABLE_WHY}")

    def extra_repr(self) -> str:
        return f"k={self.k}, d_model={self.P.shape[1]}"


def check_prompt_model(model, config: PromptTuningConfig, what: str = "prompt tuning") -> None:
    """Everything prompt (or prefix) tuning needs of ``model``, checked before it changes anything:
    a GPT of this package (NumPy or torch), with no prompt/prefix yet, and ``k < block_size``
    (for prompt tuning, which takes positions)."""
    cfg = getattr(model, "config", None)
    if not (hasattr(model, "tok_emb") and hasattr(model, "blocks") and hasattr(cfg, "block_size")):
        # a ValueError, as for a layer method whose targets match nothing: the method does not apply
        raise ValueError(f"{what} needs a GPT of lowrank_ref.nn.gpt or lowrank_gpu.nn.gpt (it puts its "
                         f"vectors into that model's embeddings and attention), got {type(model).__name__}")
    for attr in ("prompt", "prefix"):
        if getattr(model, attr, None) is not None:
            raise ValueError(f"{what}: the model already has a {attr!r} module; inject once, into a fresh model")
    if what == "prompt tuning" and config.k >= cfg.block_size:
        raise ValueError(f"k={config.k} prompt vectors leave no room for input: the prompt takes k of the "
                         f"model's block_size={cfg.block_size} positions, so k must be at most {cfg.block_size - 1}")


def prompt_tuning(model, config: PromptTuningConfig | None = None, rng=None) -> int:
    """Freeze ``model`` (a NumPy GPT) and put a :class:`PromptEmbedding` in front of its tokens as
    ``model.prompt``; return the trainable count (``k · C``). Bad input changes nothing."""
    from lowrank_ref.inject import _is_torch_module, set_trainable
    from lowrank_ref.nn.module import as_rng

    config = PromptTuningConfig() if config is None else config
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config must be a PromptTuningConfig, got {type(config).__name__}")
    if _is_torch_module(model):
        from lowrank_gpu.adapters.prompt_tuning import prompt_tuning as torch_prompt_tuning

        return torch_prompt_tuning(model, config, rng)
    check_prompt_model(model, config)
    table = model.tok_emb.weight.data
    P = prompt_init(config, to_host(table), as_rng(rng))  # drawn on the host, as every init here
    set_trainable(model, "none")
    model.prompt = PromptEmbedding(array_module(table).asarray(P.astype(model.dtype)), config)
    return model.num_trainable_parameters()


SPEC = MethodSpec(
    name="prompt_tuning",
    config=PromptTuningConfig,
    model_fn=PerBackend("lowrank_ref.adapters.prompt_tuning:prompt_tuning",
                        "lowrank_gpu.adapters.prompt_tuning:prompt_tuning"),
    description="prompt tuning, Lester et al. 2021: k learned vectors in front of the input embeddings "
                "(takes k of the block_size positions; not mergeable)",
    # PEFT has PROMPT_TUNING, but drives the base through inputs_embeds=, which our GPT does not take:
    # no PeftMapping (chapter 09, §Prompt tuning)
    example=lambda: Example(config=PromptTuningConfig(k=2)),
    mergeable=False,
    compare={"prompt_tuning": CompareRow(PromptTuningConfig(k=8, init="vocab"), targets=(), lr=0.3, order=38)},
)
