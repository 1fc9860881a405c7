r"""Built-in data, generated (never downloaded): a base language, its dialect, a word tokenizer, batches.

    from lowrank_ref import data
    task = data.builtin_task()          # cached; the same seed gives the same token arrays
    task.base_train, task.base_heldout, task.dialect_train, task.dialect_heldout
    x, y = data.get_batch(task.dialect_train, batch_size=16, block_size=32, rng=np.random.default_rng(0))

Four splits, each from its own seed (derived from one ``seed`` by ``numpy.random.SeedSequence``):
the base language to pre-train on, held-out base text to measure forgetting, dialect text to
fine-tune on, and held-out dialect text to measure what fine-tuning taught. ``DATA_VERSION``
changes whenever the grammar, the dialect or the vocabulary changes (the shipped model records it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lowrank_ref.data.batching import eval_windows, get_batch
from lowrank_ref.data.dialect import render_dialect
from lowrank_ref.data.grammar import draw_sentences, render_base
from lowrank_ref.data.multitask import (
    MultiTaskData,
    evaluate_multitask,
    get_multitask_batch,
    multitask_data,
)
from lowrank_ref.data.tokenizer import WordTokenizer, default_tokenizer

__all__ = ["DATA_VERSION", "Task", "builtin_task", "corpus", "get_batch", "eval_windows",
           "WordTokenizer", "default_tokenizer",
           "MultiTaskData", "multitask_data", "get_multitask_batch", "evaluate_multitask"]

DATA_VERSION = "1"

# sentences per split (a sentence is about 7.5 words on average)
SPLIT_SENTENCES = {"base_train": 40_000, "base_heldout": 1_500, "dialect_train": 6_000, "dialect_heldout": 1_500}


def corpus(n_sentences: int, seed: int, dialect: bool = False) -> list[str]:
    """``n_sentences`` sentences as word lists joined into one flat list of words."""
    render = render_dialect if dialect else render_base
    words: list[str] = []
    for s in draw_sentences(n_sentences, seed):
        words += render(s)
    return words


@dataclass(frozen=True)
class Task:
    """The built-in fine-tuning task: token arrays (int64, 1-D) and the tokenizer that made them."""

    tokenizer: WordTokenizer
    base_train: np.ndarray
    base_heldout: np.ndarray
    dialect_train: np.ndarray
    dialect_heldout: np.ndarray
    seed: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


@lru_cache(maxsize=4)
def builtin_task(seed: int = 0) -> Task:
    """The four splits from one integer ``seed`` (cached; the arrays are read-only)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    tok = default_tokenizer()
    seeds = np.random.SeedSequence(int(seed)).generate_state(len(SPLIT_SENTENCES))
    arrays = {}
    for (name, n), s in zip(SPLIT_SENTENCES.items(), seeds):
        ids = tok.encode(corpus(n, int(s), dialect=name.startswith("dialect")))
        ids.flags.writeable = False
        arrays[name] = ids
    return Task(tokenizer=tok, seed=int(seed), **arrays)
