"""Chapter 09's exercises beyond what ``tests/test_exercises.py`` runs for every chapter in
``CHECKS`` (solution passes, unmodified stub fails, notebook and solutions agree): the mistake
each exercise invites fails its check too."""

from __future__ import annotations

import pytest
from test_exercises import _solutions

from lowrank_ref import exercises as ex

CASES = [("09-baselines", name, chk) for name, chk in ex.CHECKS["09-baselines"]]
IDS = [f"{ch}:{name}" for ch, name, _ in CASES]


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_check_fails_on_a_plausible_wrong_answer(chapter, name, chk):
    """Beyond the stub: the mistake each exercise invites (γ on the columns, the skip connection
    left out of dh, the biases forgotten) fails too."""
    sol = _solutions(chapter)
    wrong = {
        "ssf_merge": lambda W, b, g, be: (W * g[None, :] if W.shape[0] == W.shape[1] else W * 0, g * b + be),
        "adapter_backward": lambda dy, h, Wd, bd, Wu: (lambda r: (r[0] - dy,) + tuple(r[1:]))(
            sol.adapter_backward(dy, h, Wd, bd, Wu)),
        "adapter_params": lambda d, m: 2 * d * m,
    }[name]
    assert not chk(wrong, verbose=False).ok
