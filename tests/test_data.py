"""The built-in data: deterministic from seeds, a dialect that really differs, a small vocabulary,
batches that are next-token pairs."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ref import data
from lowrank_ref.data.dialect import OBJECT_MARKER, SWAPS, render_dialect
from lowrank_ref.data.grammar import NounPhrase, Sentence, draw_sentences, render_base


def test_same_seed_same_text_other_seed_other_text():
    a = data.corpus(200, seed=7)
    assert a == data.corpus(200, seed=7)
    assert a != data.corpus(200, seed=8)


def test_builtin_task_is_deterministic_and_splits_differ():
    t = data.builtin_task(0)
    fresh = data.builtin_task.__wrapped__(0)  # bypass the cache
    for name in ("base_train", "base_heldout", "dialect_train", "dialect_heldout"):
        assert np.array_equal(getattr(t, name), getattr(fresh, name)), name
    # held-out text is not a copy of the training text
    n = t.base_heldout.size
    assert not np.array_equal(t.base_train[:n], t.base_heldout)
    assert not t.base_train.flags.writeable


def test_vocabulary_is_small_and_round_trips():
    tok = data.default_tokenizer()
    assert tok.vocab_size <= 64
    text = "the hound big spies a cat ko ."
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("the unicorn sleeps .")
    with pytest.raises(ValueError, match=r"\[0, "):
        tok.decode([tok.vocab_size])


def test_tokenizer_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="repeat"):
        data.WordTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="without spaces"):
        data.WordTokenizer(["a b"])
    with pytest.raises(ValueError, match="non-empty"):
        data.WordTokenizer([])


def test_dialect_rules_on_a_hand_built_sentence():
    # "some happy dogs see the red ball near a tree ." written by hand in both languages
    obj = NounPhrase("the", "ball", False, "red", ("near", NounPhrase("a", "tree", False)))
    s = Sentence(NounPhrase("some", "dog", True, "happy"), "sees", obj)
    assert " ".join(render_base(s)) == "some happy dogs see the red ball near a tree ."
    assert " ".join(render_dialect(s)) == "some hounds happy spy the ball red ko near a tree ."
    intransitive = Sentence(NounPhrase("a", "cat", False), "sleeps", None)
    assert render_dialect(intransitive) == render_base(intransitive)  # nothing to change here


def test_base_language_never_uses_dialect_words_and_the_dialect_always_marks_objects():
    sents = draw_sentences(500, seed=3)
    base_words = {w for s in sents for w in render_base(s)}
    assert not base_words & (set(SWAPS.values()) | {OBJECT_MARKER})
    for s in sents:
        words = render_dialect(s)
        assert words.count(OBJECT_MARKER) == (s.obj is not None)
        assert not set(words) & set(SWAPS)  # every swapped word is replaced


def test_agreement_holds_in_generated_text():
    for s in draw_sentences(300, seed=11):
        words = render_base(s)
        verb = s.verb_form
        assert verb in words
        singular_verb = verb.endswith("s")  # sees / sleeps / carries vs see / sleep / carry
        assert singular_verb == (not s.subject.plural), words


def test_selection_rules_hold_in_generated_text():
    from lowrank_ref.data.grammar import ADJECTIVES, TRANSITIVE

    def nps(np_):
        yield np_
        if np_.pp is not None:
            yield from nps(np_.pp[1])

    for s in draw_sentences(400, seed=5):
        assert s.subject.kind == "animate"
        if s.obj is not None:
            assert s.obj.kind in TRANSITIVE[s.verb][1]
        for np_ in list(nps(s.subject)) + (list(nps(s.obj)) if s.obj else []):
            if np_.adj is not None:
                assert np_.kind in ADJECTIVES[np_.adj], (np_.adj, np_.noun)
    assert TRANSITIVE["chases"][1] == ("animate",) and TRANSITIVE["eats"][1] == ("food",)
    assert ADJECTIVES["happy"] == ("animate",) and "animate" not in ADJECTIVES["red"]


def test_dialect_differs_measurably_in_word_statistics():
    t = data.builtin_task(0)
    V = t.vocab_size
    p = np.bincount(t.base_heldout, minlength=V) / t.base_heldout.size
    q = np.bincount(t.dialect_heldout, minlength=V) / t.dialect_heldout.size
    tv = 0.5 * np.abs(p - q).sum()  # total-variation distance of the word frequencies
    assert tv > 0.1
    # bigrams that the base language never produces are common in the dialect
    def bigrams(a):
        return set(zip(a[:-1].tolist(), a[1:].tolist()))

    new = bigrams(t.dialect_heldout) - bigrams(t.base_train)
    pairs = list(zip(t.dialect_heldout[:-1].tolist(), t.dialect_heldout[1:].tolist()))
    share = sum(p in new for p in pairs) / len(pairs)
    assert share > 0.2


def test_get_batch_windows_are_shifted_by_one():
    tokens = np.arange(100, dtype=np.int64)
    x, y = data.get_batch(tokens, batch_size=5, block_size=8, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (5, 8)
    assert np.array_equal(y, x + 1)  # consecutive ids: the target is the next token
    x2, _ = data.get_batch(tokens, batch_size=5, block_size=8, rng=np.random.default_rng(0))
    assert np.array_equal(x, x2)
    assert x.max() + 1 <= 99


def test_eval_windows_cover_the_start_without_overlap():
    tokens = np.arange(50, dtype=np.int64)
    x, y = data.eval_windows(tokens, block_size=10)
    assert x.shape == (4, 10)
    assert np.array_equal(x.reshape(-1), np.arange(40))
    assert np.array_equal(y.reshape(-1), np.arange(1, 41))
    assert data.eval_windows(tokens, 10, max_windows=2)[0].shape == (2, 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 200}, "at least"),
    ({"rng": 3}, "Generator"),
])
def test_get_batch_bad_input(kwargs, match):
    args = {"tokens": np.arange(100), "batch_size": 2, "block_size": 4, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        data.get_batch(**args)


def test_get_batch_rejects_float_tokens():
    with pytest.raises(TypeError, match="integer"):
        data.get_batch(np.ones(100), 2, 4, np.random.default_rng(0))
