r"""The base language: a small seeded grammar of English-like sentences, written word by word.

Every sentence is ``subject verb [object] .`` with a few rules that make the next word partly
predictable, so a small model has something to learn beyond word frequencies:

- **Agreement.** Determiners carry number (``a``/``every`` singular, ``some``/``many`` plural,
  ``the`` either), and the verb agrees with its subject (``the cat sees``, ``the cats see``).
- **Selection.** Subjects are animate; ``chases`` wants an animate object, ``eats`` food,
  ``finds`` and ``carries`` food or things; ``happy`` describes only animals and people,
  ``red`` only food and things.
- **Optional parts.** An adjective before a noun (probability ``P_ADJ``), a prepositional phrase
  after it (``P_PP``), an intransitive verb instead of a transitive one (``P_INTRANSITIVE``).

A sentence is first drawn as a small tree of Python objects (:class:`NounPhrase`,
:class:`Sentence`) and only then written out as words, so the dialect
(:mod:`lowrank_ref.data.dialect`) can write the *same* trees with its own rules. The draw uses
``random.Random`` seeded with an integer: the same seed gives the same text on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "DETERMINERS", "NOUNS", "ADJECTIVES", "TRANSITIVE", "INTRANSITIVE", "PREPOSITIONS",
    "NounPhrase", "Sentence", "draw_sentence", "draw_sentences", "render_base", "base_words",
]

# -- the lexicon ------------------------------------------------------------------------------
# determiner -> the numbers it goes with
DETERMINERS = {"the": ("sg", "pl"), "a": ("sg",), "every": ("sg",), "some": ("pl",), "many": ("pl",)}

# noun -> (plural, kind); kind is "animate", "food" or "thing"
NOUNS = {
    "cat": ("cats", "animate"), "dog": ("dogs", "animate"), "bird": ("birds", "animate"),
    "fox": ("foxes", "animate"), "child": ("children", "animate"), "farmer": ("farmers", "animate"),
    "apple": ("apples", "food"), "seed": ("seeds", "food"),
    "ball": ("balls", "thing"), "stone": ("stones", "thing"), "tree": ("trees", "thing"),
    "house": ("houses", "thing"),
}

# adjective -> the noun kinds it may describe
ADJECTIVES = {
    "big": ("animate", "food", "thing"), "small": ("animate", "food", "thing"),
    "old": ("animate", "thing"), "happy": ("animate",), "red": ("food", "thing"),
}

# transitive verb (singular form) -> (plural form, the object kinds it takes)
TRANSITIVE = {
    "sees": ("see", ("animate", "food", "thing")), "likes": ("like", ("animate", "food", "thing")),
    "chases": ("chase", ("animate",)), "eats": ("eat", ("food",)),
    "finds": ("find", ("food", "thing")), "carries": ("carry", ("food", "thing")),
}
INTRANSITIVE = {"sleeps": "sleep", "runs": "run", "sings": "sing"}
PREPOSITIONS = ("near", "under", "with")
END = "."

P_ADJ = 0.4  # an adjective before a noun
P_PP = 0.15  # a prepositional phrase after a noun (at most one level deep)
P_INTRANSITIVE = 0.25  # "the cat sleeps ." instead of "the cat sees a ball ."


@dataclass(frozen=True)
class NounPhrase:
    det: str
    noun: str  # the singular lemma, e.g. "fox"
    plural: bool
    adj: str | None = None
    pp: tuple[str, NounPhrase] | None = None  # (preposition, its noun phrase)

    @property
    def kind(self) -> str:
        return NOUNS[self.noun][1]

    @property
    def form(self) -> str:
        """The noun as written: ``"fox"`` or ``"foxes"``."""
        return NOUNS[self.noun][0] if self.plural else self.noun


@dataclass(frozen=True)
class Sentence:
    subject: NounPhrase
    verb: str  # the singular lemma, e.g. "sees" or "sleeps"
    obj: NounPhrase | None  # None for an intransitive verb

    @property
    def verb_form(self) -> str:
        """The verb agreeing with the subject's number."""
        if self.obj is None:
            return INTRANSITIVE[self.verb] if self.subject.plural else self.verb
        return TRANSITIVE[self.verb][0] if self.subject.plural else self.verb


def _draw_np(r: random.Random, kinds: tuple[str, ...], allow_pp: bool = True) -> NounPhrase:
    noun = r.choice([n for n, (_, k) in NOUNS.items() if k in kinds])
    plural = r.random() < 0.4
    number = "pl" if plural else "sg"
    det = r.choice([d for d, nums in DETERMINERS.items() if number in nums])
    adj = None
    if r.random() < P_ADJ:
        adj = r.choice([a for a, ks in ADJECTIVES.items() if NOUNS[noun][1] in ks])
    pp = None
    if allow_pp and r.random() < P_PP:
        pp = (r.choice(PREPOSITIONS), _draw_np(r, ("animate", "food", "thing"), allow_pp=False))
    return NounPhrase(det, noun, plural, adj, pp)


def draw_sentence(r: random.Random) -> Sentence:
    """One sentence tree drawn with the generator ``r``."""
    subject = _draw_np(r, ("animate",))
    if r.random() < P_INTRANSITIVE:
        return Sentence(subject, r.choice(list(INTRANSITIVE)), None)
    verb = r.choice(list(TRANSITIVE))
    return Sentence(subject, verb, _draw_np(r, TRANSITIVE[verb][1]))


def draw_sentences(n: int, seed: int) -> list[Sentence]:
    """``n`` sentence trees from the integer ``seed`` (same seed, same trees)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    r = random.Random(seed)
    return [draw_sentence(r) for _ in range(n)]


def _render_np_base(np_: NounPhrase) -> list[str]:
    words = [np_.det] + ([np_.adj] if np_.adj else []) + [np_.form]  # det [adj] noun
    if np_.pp is not None:
        prep, inner = np_.pp
        words += [prep] + _render_np_base(inner)
    return words


def render_base(s: Sentence) -> list[str]:
    """The sentence in the base language, as a list of words ending in ``"."``."""
    words = _render_np_base(s.subject) + [s.verb_form]
    if s.obj is not None:
        words += _render_np_base(s.obj)
    return words + [END]


def base_words() -> list[str]:
    """Every word the base language can produce, in a fixed order."""
    words = list(DETERMINERS)
    for sg, (pl, _) in NOUNS.items():
        words += [sg, pl]
    words += list(ADJECTIVES)
    for sg, (pl, _) in TRANSITIVE.items():
        words += [sg, pl]
    for sg, pl in INTRANSITIVE.items():
        words += [sg, pl]
    return words + list(PREPOSITIONS) + [END]
