r"""A word-level tokenizer with a fixed, small vocabulary: one id per word of either language.

The vocabulary is the base language's words followed by the dialect's new words, in the order
the lexicon lists them (no counting, no sorting by frequency), so ids never depend on a corpus or
a seed. Text is words separated by single spaces; ``"."`` is a word of its own.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.data.dialect import dialect_only_words
from lowrank_ref.data.grammar import base_words

__all__ = ["WordTokenizer", "default_tokenizer"]


class WordTokenizer:
    """Maps words to ids ``0 .. vocab_size-1`` and back.

    Args:
        words: the vocabulary in id order; no duplicates, no empty strings or spaces inside.
    """

    def __init__(self, words):
        words = list(words)
        if not words:
            raise ValueError("words must be a non-empty list of vocabulary words")
        for w in words:
            if not isinstance(w, str) or not w or any(c.isspace() for c in w):
                raise ValueError(f"every vocabulary word must be a non-empty string without spaces, got {w!r}")
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"words must not repeat; repeated: {dup}")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text) -> np.ndarray:
        """``"the cat sleeps ."`` (or a list of words) -> int64 ids, shape ``(n_words,)``."""
        words = text.split() if isinstance(text, str) else list(text)
        unknown = sorted({w for w in words if w not in self.index})
        if unknown:
            raise ValueError(f"text has words outside the vocabulary: {unknown[:10]}")
        return np.fromiter((self.index[w] for w in words), dtype=np.int64, count=len(words))

    def decode(self, ids) -> str:
        """int ids -> words joined by spaces."""
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got min {ids.min()}, max {ids.max()}")
        return " ".join(self.words[int(i)] for i in ids.reshape(-1))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def default_tokenizer() -> WordTokenizer:
    """The tokenizer of the built-in task: base words, then the dialect's new words."""
    return WordTokenizer(base_words() + dialect_only_words())
