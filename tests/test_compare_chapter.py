"""Chapter 04's claims about the comparison, measured.

1. The dialect is the base language with exactly three changes (two swapped word pairs, adjectives
   after the noun, the object particle ``ko``): undoing those three by hand, with code written here
   and not the package's, gives back the base sentence, and each change occurs as often as the
   grammar's probabilities say.
2. At this model size activations dominate a training step's memory, and the gap between the
   ``full`` and ``lora`` rows is the gradient and the two Adam moments (4 + 8 bytes of float32) of
   every scalar full fine-tuning trains and LoRA does not.
"""

from __future__ import annotations

import math

from lowrank_ref.data.dialect import render_dialect
from lowrank_ref.data.grammar import (
    ADJECTIVES,
    NOUNS,
    P_ADJ,
    P_INTRANSITIVE,
    draw_sentences,
    render_base,
)
from lowrank_ref.experiments.compare import run_compare
from lowrank_ref.models import load_pretrained

# the chapter's list of changes, written out again by hand
UNSWAP = {"hound": "dog", "hounds": "dogs", "spies": "sees", "spy": "see"}
NOUN_FORMS = {n for sg, (pl, _) in NOUNS.items() for n in (sg, pl)} | {"hound", "hounds"}


def _undo_dialect(words: list[str]) -> list[str]:
    """Dialect -> base: drop `ko`, swap the four words back, put each adjective before its noun."""
    out: list[str] = []
    for w in words:
        if w == "ko":
            continue
        w = UNSWAP.get(w, w)
        if w in ADJECTIVES:
            out.insert(len(out) - 1, w)  # "the cat big" -> "the big cat"
        else:
            out.append(w)
    return out


def test_the_dialect_is_the_base_language_with_exactly_three_changes():
    sents = draw_sentences(3000, seed=404)
    changed = {"ko": 0, "swap": 0, "adj": 0}
    for s in sents:
        dia, base = render_dialect(s), render_base(s)
        assert _undo_dialect(dia) == base, (dia, base)
        changed["ko"] += dia.count("ko")
        changed["swap"] += sum(w in UNSWAP for w in dia)
        changed["adj"] += sum(w in ADJECTIVES for w in dia)
        for i, w in enumerate(dia):  # every adjective sits right after a noun in the dialect ...
            if w in ADJECTIVES:
                assert dia[i - 1] in NOUN_FORMS, dia
        for i, w in enumerate(base):  # ... and right before one in the base language
            if w in ADJECTIVES:
                assert base[i + 1] in NOUN_FORMS, base
    assert all(v > 100 for v in changed.values()), changed  # no change is vacuous


def test_the_changes_occur_as_often_as_the_grammar_says():
    n = 4000
    sents = draw_sentences(n, seed=405)
    dia = [render_dialect(s) for s in sents]
    # `ko` marks the object of a transitive verb: a sentence is transitive with 1 - P_INTRANSITIVE
    p = 1 - P_INTRANSITIVE
    share = sum("ko" in d for d in dia) / n
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), share
    # every noun phrase carries an adjective with probability P_ADJ, so adjectives per noun ≈ P_ADJ
    nouns = sum(w in NOUN_FORMS for d in dia for w in d)
    adjs = sum(w in ADJECTIVES for d in dia for w in d)
    assert abs(adjs / nouns - P_ADJ) < 4 * math.sqrt(P_ADJ * (1 - P_ADJ) / nouns), adjs / nouns


def test_memory_rows_differ_by_gradient_and_adam_state_and_activations_dominate():
    model = load_pretrained()
    cfg = model.config
    every = sum(p.data.size for p in model.parameters().values())  # full fine-tuning trains all
    lora = cfg.n_layer * 2 * 8 * (cfg.d_model + cfg.d_model)  # r = 8 on q and v: A (8, d), B (d, 8)
    twelve = 12 * (every - lora)  # float32 gradient + Adam's m and v per extra trainable scalar
    peak = {}
    for b in (4, 16):
        rows = run_compare(["full", "lora"], steps=2, batch_size=b, eval_windows=1, progress=False)
        peak[b] = {r["method"]: r["peak_memory_bytes"] for r in rows}
        gap = peak[b]["full"] - peak[b]["lora"]
        assert 0.9 * twelve < gap < 1.1 * twelve, (b, gap, twelve)
    # activations grow with the batch at about the same rate for both methods ...
    per_window = {m: (peak[16][m] - peak[4][m]) / 12 for m in ("full", "lora")}
    assert abs(per_window["full"] / per_window["lora"] - 1) < 0.1, per_window
    # ... and at the default batch (16 windows) they are most of LoRA's peak
    assert 16 * per_window["lora"] > 0.8 * peak[16]["lora"], (per_window, peak[16])
