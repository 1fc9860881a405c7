r"""The dialect: the fine-tuning target. The same sentence trees, written with three systematic changes.

1. **Swapped words.** ``dog``/``dogs`` become ``hound``/``hounds`` and ``sees``/``see`` become
   ``spies``/``spy``. These four words never occur in the base language, so a model trained on
   it has to learn them from scratch.
2. **A changed word-order rule.** Adjectives follow their noun: ``the cat big``, not
   ``the big cat``.
3. **A new suffix.** The object of a transitive verb is marked by the particle ``ko`` right after
   its noun (and adjective), before any prepositional phrase: ``a fox chases the hound small ko
   near the tree .``

Everything else (agreement, selection, how often each part occurs) is the base grammar's, so a
base model knows most of the dialect already and scores clearly worse only where a rule changed:
that is what fine-tuning has to learn, and what forgetting is measured against.
"""

from __future__ import annotations

from lowrank_ref.data.grammar import END, NounPhrase, Sentence

__all__ = ["SWAPS", "OBJECT_MARKER", "render_dialect", "dialect_only_words"]

SWAPS = {"dog": "hound", "dogs": "hounds", "sees": "spies", "see": "spy"}
OBJECT_MARKER = "ko"


def _swap(word: str) -> str:
    return SWAPS.get(word, word)


def _render_np_dialect(np_: NounPhrase, is_object: bool = False) -> list[str]:
    words = [np_.det, _swap(np_.form)] + ([np_.adj] if np_.adj else [])  # det noun [adj]
    if is_object:
        words.append(OBJECT_MARKER)  # the object suffix
    if np_.pp is not None:
        prep, inner = np_.pp
        words += [prep] + _render_np_dialect(inner)
    return words


def render_dialect(s: Sentence) -> list[str]:
    """The sentence in the dialect, as a list of words ending in ``"."``."""
    words = _render_np_dialect(s.subject) + [_swap(s.verb_form)]
    if s.obj is not None:
        words += _render_np_dialect(s.obj, is_object=True)
    return words + [END]


def dialect_only_words() -> list[str]:
    """The words that occur in the dialect but never in the base language, in a fixed order."""
    return list(SWAPS.values()) + [OBJECT_MARKER]
