"""The multi-task data: four dialects that really differ from the base language and from one
another, deterministic from a seed, batches with a task id per row, evaluation per task."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ref import data
from lowrank_ref.data.dialect import render_dialect
from lowrank_ref.data.grammar import NounPhrase, Sentence, draw_sentences, render_base
from lowrank_ref.data.multitask import TASKS, render_task

# "the big cat sees a ball near the stone ." and "some dogs sleep ." as trees
S1 = Sentence(NounPhrase("the", "cat", False, "big"), "sees",
              NounPhrase("a", "ball", False, None, ("near", NounPhrase("the", "stone", False))))
S2 = Sentence(NounPhrase("some", "dog", True), "sleeps", None)

# written by hand from the rules in the module docstring
EXPECTED = {
    "base": ("the big cat sees a ball near the stone .", "some dogs sleep ."),
    "hound": ("the cat big spies a ball ko near the stone .", "some hounds sleep ."),
    "verb_final": ("the big cat a ball near the stone sees .", "some dogs sleep ."),
    "agreement": ("the big cat see a ball near the stone .", "some dogs sleeps ."),
    "relabel": ("the small bird sees a stone under the ball .", "some dogs sleep ."),
}
# changed flags, by hand (1 where a task's rule wrote or moved the word)
EXPECTED_CHANGED = {
    "hound": "01110010000",
    "verb_final": "0001111110",
    "agreement": "0001000000",
    "relabel": "0110011010",
}


@pytest.mark.parametrize("task", ("base",) + TASKS)
def test_each_task_writes_the_hand_written_sentences(task):
    for s, want in zip((S1, S2), EXPECTED[task]):
        assert " ".join(w for w, _ in render_task(s, task)) == want
    if task in EXPECTED_CHANGED:
        flags = "".join(str(int(c)) for _, c in render_task(S1, task))
        assert flags == EXPECTED_CHANGED[task]


def test_hound_is_the_shipped_dialect_and_base_is_the_base_language():
    for s in draw_sentences(300, seed=3):
        assert [w for w, _ in render_task(s, "hound")] == render_dialect(s)
        assert [w for w, _ in render_task(s, "base")] == render_base(s)
        assert not any(c for _, c in render_task(s, "base"))


def test_tasks_differ_from_the_base_and_from_each_other():
    sents = draw_sentences(400, seed=5)
    texts = {t: [" ".join(w for w, _ in render_task(s, t)) for s in sents] for t in ("base",) + TASKS}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            differ = np.mean([x != y for x, y in zip(texts[a], texts[b])])
            assert differ > 0.3, (a, b, differ)


def test_aligned_tasks_flag_exactly_the_words_that_differ_from_the_base():
    # agreement and relabel keep every word in place: a flag is set iff the word differs from the base
    for s in draw_sentences(200, seed=9):
        base = [w for w, _ in render_task(s, "base")]
        for task in ("agreement", "relabel"):
            pairs = render_task(s, task)
            assert len(pairs) == len(base)
            assert [c for _, c in pairs] == [w != b for (w, _), b in zip(pairs, base)]
        # verb_final: the same words, verb last
        vf = [w for w, _ in render_task(s, "verb_final")]
        assert sorted(vf) == sorted(base)
        if s.obj is not None:
            assert vf[-2] == s.verb_form


def test_multitask_data_is_deterministic_and_splits_differ():
    mt = data.multitask_data(0)
    fresh = data.multitask_data.__wrapped__(0)
    other = data.multitask_data.__wrapped__(1)
    assert mt.tasks == TASKS and mt.vocab_size == data.default_tokenizer().vocab_size
    for t in range(mt.n_tasks):
        assert np.array_equal(mt.train[t], fresh.train[t])
        assert np.array_equal(mt.heldout_changed[t], fresh.heldout_changed[t])
        assert not np.array_equal(mt.train[t][:500], other.train[t][:500])
        assert not np.array_equal(mt.train[t][: mt.heldout[t].size], mt.heldout[t])
        assert mt.train[t].shape == mt.train_changed[t].shape
        assert 0.05 < mt.train_changed[t].mean() < 0.6
        assert not mt.train[t].flags.writeable
    # tasks do not share text
    assert not np.array_equal(mt.train[1][:200], mt.train[2][:200])


def test_batch_rows_are_windows_of_their_task():
    mt = data.multitask_data(0)
    x, y, tid = data.get_multitask_batch(mt, 24, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (24, 16) and tid.shape == (24,) and tid.dtype == np.int64
    assert set(tid.tolist()) == set(range(mt.n_tasks))
    for row in range(24):
        tokens = mt.train[tid[row]]
        win = np.concatenate([x[row], y[row, -1:]])
        starts = np.flatnonzero(tokens[: tokens.size - 16] == win[0])
        assert any(np.array_equal(tokens[s : s + 17], win) for s in starts)
        assert np.array_equal(x[row, 1:], y[row, :-1])
    _, _, only = data.get_multitask_batch(mt, 8, 16, np.random.default_rng(0), tasks="relabel")
    assert (only == 3).all()
    a = data.get_multitask_batch(mt, 8, 16, np.random.default_rng(4))
    b = data.get_multitask_batch(mt, 8, 16, np.random.default_rng(4))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_bad_inputs_name_the_argument():
    mt = data.multitask_data(0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown task"):
        data.get_multitask_batch(mt, 4, 8, rng, tasks="klingon")
    with pytest.raises(ValueError, match="task id"):
        data.get_multitask_batch(mt, 4, 8, rng, tasks=4)
    with pytest.raises(ValueError, match="split"):
        data.get_multitask_batch(mt, 4, 8, rng, split="test")
    with pytest.raises(ValueError, match="batch_size"):
        data.get_multitask_batch(mt, 0, 8, rng)
    with pytest.raises(TypeError, match="mt must"):
        data.get_multitask_batch(data.builtin_task(0), 4, 8, rng)
    with pytest.raises(ValueError, match="task must be one of"):
        render_task(S1, "pirate")
    with pytest.raises(ValueError, match="seed"):
        data.multitask_data(-1)


def test_evaluation_per_task_sees_the_changes_the_base_model_does_not_know():
    from lowrank_ref.models import load_pretrained

    mt = data.multitask_data(0)
    model = load_pretrained(progress=False)
    ev = data.evaluate_multitask(model, mt, max_windows=16)
    assert set(ev["per_task"]) == set(TASKS)
    for name, r in ev["per_task"].items():
        assert 0 <= r["changed_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["changed_tokens"] > 0
        # a model of the base language predicts the changed words worse than the rest
        assert r["changed_accuracy"] < r["accuracy"], name
    assert ev["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in ev["per_task"].values()]))
    with pytest.raises(ValueError, match="no layer of the model takes a condition"):
        data.evaluate_multitask(model, mt, max_windows=2, conditional=True)
