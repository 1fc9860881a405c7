"""Optimizer.state_dict / load_state_dict: a restored optimizer takes the same next step, and a
state that does not fit is refused before anything changes."""

import numpy as np
import pytest

from lowrank_ref import optim
from lowrank_ref.nn.module import Parameter


def _params(seed=0):
    r = np.random.default_rng(seed)
    return {"a": Parameter(r.standard_normal((3, 2))), "b": Parameter(r.standard_normal(4))}


def _grads(params, seed):
    r = np.random.default_rng(seed)
    for p in params.values():
        p.grad = r.standard_normal(p.data.shape)


@pytest.mark.parametrize("make", [lambda p: optim.AdamW(p, lr=0.1, weight_decay=0.1),
                                  lambda p: optim.Adam(p, lr=0.1),
                                  lambda p: optim.SGD(p, lr=0.1, momentum=0.9)])
def test_restored_optimizer_takes_the_same_step(make):
    p1 = _params()
    o1 = make(p1)
    for s in range(3):
        _grads(p1, s)
        o1.step()
    sd = o1.state_dict()
    p2 = {n: Parameter(p.data.copy()) for n, p in p1.items()}
    o2 = make(p2)
    o2.load_state_dict(sd)
    assert o2.steps == 3
    _grads(p1, 9)
    _grads(p2, 9)
    o1.step()
    o2.step()
    for n in p1:
        np.testing.assert_array_equal(p1[n].data, p2[n].data)
    # the state was copied: stepping o1 did not change what o2 loaded
    assert sd["state"]["a"] is not o2.state["a"]


def test_a_state_that_does_not_fit_is_refused_and_nothing_changes():
    p = _params()
    o = optim.Adam(p, lr=0.1)
    _grads(p, 0)
    o.step()
    good = o.state_dict()
    bad = o.state_dict()
    bad["state"]["a"]["exp_avg"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"a\.exp_avg has shape \(2, 2\)"):
        o.load_state_dict(bad)
    with pytest.raises(ValueError, match="does not hold"):
        o.load_state_dict({"steps": 1, "state": {"zzz": {}}})
    with pytest.raises(ValueError, match="keys 'steps' and 'state'"):
        o.load_state_dict({"state": {}})
    after = o.state_dict()
    for n in good["state"]:
        np.testing.assert_array_equal(good["state"][n]["exp_avg"], after["state"][n]["exp_avg"])
