"""Chapter 08 §5's composition experiment: the quick run has the recorded structure, and the
chapter's statements hold in the committed result file."""

import json
import pathlib

import pytest

from lowrank_ref.experiments import lorahub

DATA = pathlib.Path(__file__).resolve().parent.parent / "chapters" / "data" / "lorahub.json"


def test_quick_run_has_every_row_for_every_target():
    res = lorahub.run(quick=True)
    assert res["quick"] and res["pool"] == ["hound", "verb_final", "agreement", "relabel"]
    committed = json.loads(DATA.read_text())
    for target, _ in lorahub.TARGETS:
        rows = res["targets"][target]["rows"]
        assert list(rows) == list(committed["targets"][target]["rows"])
        for name, r in rows.items():
            assert 0.0 <= r["changed_accuracy"] <= 1.0, name
        assert rows["lorahub: searched"]["evaluations"] == res["search"]["budget"]


def test_a_target_applies_both_rules_and_changes_what_each_changes():
    from collections import Counter

    from lowrank_ref.data.grammar import draw_sentences
    from lowrank_ref.data.multitask import render_task

    for s in draw_sentences(40, 3):
        words = {t: [w for w, _ in render_task(s, t)] for t in ("base", "relabel", "agreement", "verb_final")}
        both = [w for w, _ in lorahub._render(s, "relabel+agreement")]
        verb = [j for j, (a, b) in enumerate(zip(words["agreement"], words["base"])) if a != b]
        assert len(verb) == 1  # agreement changes the verb form only
        v = verb[0]
        assert both[v] == words["agreement"][v]  # agreement's verb ...
        assert both[:v] + both[v + 1:] == words["relabel"][:v] + words["relabel"][v + 1:]  # ... in relabel's words
        moved = [w for w, _ in lorahub._render(s, "relabel+verb_final")]
        assert Counter(moved) == Counter(words["relabel"])  # relabel's words, reordered
        if s.obj is not None:
            assert moved[-2] == s.verb_form and moved != words["relabel"]  # the verb last (before ".")


@pytest.fixture(scope="module")
def committed():
    return json.loads(DATA.read_text())


def test_the_chapters_statements_hold_in_the_committed_run(committed):
    assert not committed["quick"]
    for target, t in committed["targets"].items():
        rows = t["rows"]
        acc = {k: r["changed_accuracy"] for k, r in rows.items()}
        cross = [r["cross_terms"] for r in rows.values() if r.get("cross_terms") is not None]
        assert min(cross) >= 0.3 and max(cross) <= 0.8, target  # "0.3 to 0.75 of the update's norm"
        s = acc["lorahub: searched"]
        for other in ("base", "LoRA trained on the few-shot text", "lorahub: uniform", "sum: uniform"):
            assert s > acc[other], (target, other)
        best_single = max(v for k, v in acc.items() if k.startswith("only "))
        assert s - best_single < 0.02, target  # "nothing found by search beats the best single LoRA by much"
    v = committed["targets"]["relabel+verb_final"]["rows"]
    acc = {k: r["changed_accuracy"] for k, r in v.items()}
    assert max(acc, key=acc.get) == "only verb_final"
    compositions = {k: a for k, a in acc.items() if k.startswith(("lorahub:", "sum:"))}
    assert max(compositions, key=compositions.get) == "sum: the two tasks, w = 1"
    assert acc["lorahub: uniform"] != acc["sum: uniform"]
    a = {k: r["changed_accuracy"] for k, r in committed["targets"]["relabel+agreement"]["rows"].items()}
    assert a["sum: the two tasks, w = 1"] < a["only agreement"]
