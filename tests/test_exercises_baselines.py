"""Chapter 09's exercises beyond what ``tests/test_exercises.py`` runs for every chapter in
``CHECKS`` (solution passes, unmodified stub fails, notebook and solutions agree): the mistake
each exercise invites fails its check too."""

from __future__ import annotations

import numpy as np
import pytest
from test_exercises import _solutions

from lowrank_ref import exercises as ex
from lowrank_ref.nn.attention import s2_attention_mask

CASES = [("09-baselines", name, chk) for name, chk in ex.CHECKS["09-baselines"]]
IDS = [f"{ch}:{name}" for ch, name, _ in CASES]


@pytest.mark.parametrize("chapter,name,chk", CASES, ids=IDS)
def test_check_fails_on_a_plausible_wrong_answer(chapter, name, chk):
    """Beyond the stub: the mistake each exercise invites (γ on the columns, the skip connection
    left out of dh, the biases forgotten, the prompt's batch sum forgotten, the prefixes treated as
    constants, the MLP left out of the count, the roll version's wrap-around, interpolating end to
    end) fails too."""
    sol = _solutions(chapter)
    wrong = {
        "ssf_merge": lambda W, b, g, be: (W * g[None, :] if W.shape[0] == W.shape[1] else W * 0, g * b + be),
        "adapter_backward": lambda dy, h, Wd, bd, Wu: (lambda r: (r[0] - dy,) + tuple(r[1:]))(
            sol.adapter_backward(dy, h, Wd, bd, Wu)),
        "adapter_params": lambda d, m: 2 * d * m,
        # P̄ taken from the first row only (the batch sum forgotten)
        "prompt_backward": lambda dH, k: (dH[:, k:], dH[0, :k]),
        # the prefixes treated as constants: no gradient for P_k
        "prefix_attention_backward": lambda dy, q, k, v, pk, pv: (lambda r: r[:3] + (0 * r[3], r[4]))(
            sol.prefix_attention_backward(dy, q, k, v, pk, pv)),
        # the prefixes counted, the MLP that trains them not
        "prefix_params": lambda L, C, k, h, projection: 2 * L * k * C,
        # the reference's roll version: the shifted heads wrap around and see later tokens
        "s2_mask": lambda T, H, n: s2_attention_mask(T, H, n, roll=True),
        # stretch the old axis end to end (u = j (L-1)/(L'-1)) instead of u = j L / L'
        "interpolate_positions": lambda table, n: np.stack(
            [np.interp(np.linspace(0, len(table) - 1, n), np.arange(len(table)), col) for col in table.T], axis=1),
    }[name]
    assert not chk(wrong, verbose=False).ok
