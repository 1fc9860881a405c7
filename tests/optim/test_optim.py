"""Optimizers, schedule and clipping: torch.optim as the oracle (float64), plus the invariants
that need no oracle (frozen parameters untouched, state sizes, decoupled vs coupled decay)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

from lowrank_ref.nn import Parameter
from lowrank_ref.optim import SGD, Adam, AdamW, CosineWithWarmup, clip_grad_norm, cosine_schedule

shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3)


def _pair(rng, shapes, dtype=np.float64):
    """The same starting values as lowrank_ref Parameters and as torch leaf tensors."""
    vals = [rng.standard_normal(s).astype(dtype) for s in shapes]
    mine = {f"p{i}": Parameter(v.copy()) for i, v in enumerate(vals)}
    theirs = [torch.tensor(v.copy(), requires_grad=True) for v in vals]
    return mine, theirs


def _run(opt, topt, mine, theirs, rng, steps, skip=None):
    for t in range(steps):
        for i, (p, tp) in enumerate(zip(mine.values(), theirs)):
            if skip is not None and i == skip:
                p.grad, tp.grad = None, None
                continue
            g = rng.standard_normal(p.shape)
            p.grad = g.copy()
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for i, (p, tp) in enumerate(zip(mine.values(), theirs)):
            assert_close(p.data, tp, f"param {i} after step {t + 1}")


@given(shapes=shapes, seed=st.integers(0, 2**16), lr=st.floats(1e-3, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(), wd=st.sampled_from([0.0, 0.1]))
def test_sgd_matches_torch(shapes, seed, lr, momentum, nesterov, wd):
    nesterov = nesterov and momentum > 0
    rng = np.random.default_rng(seed)
    mine, theirs = _pair(rng, shapes)
    opt = SGD(mine, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    topt = torch.optim.SGD(theirs, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    _run(opt, topt, mine, theirs, rng, steps=4)


@given(shapes=shapes, seed=st.integers(0, 2**16), lr=st.floats(1e-4, 0.1),
       b1=st.sampled_from([0.0, 0.5, 0.9]), b2=st.sampled_from([0.9, 0.999]),
       eps=st.sampled_from([1e-8, 1e-3]), wd=st.sampled_from([0.0, 0.01, 0.3]),
       decoupled=st.booleans())
def test_adam_and_adamw_match_torch(shapes, seed, lr, b1, b2, eps, wd, decoupled):
    rng = np.random.default_rng(seed)
    mine, theirs = _pair(rng, shapes)
    cls, tcls = (AdamW, torch.optim.AdamW) if decoupled else (Adam, torch.optim.Adam)
    opt = cls(mine, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    topt = tcls(theirs, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    _run(opt, topt, mine, theirs, rng, steps=5, skip=None)
    for name, tp in zip(mine, theirs):
        assert_close(opt.state[name]["exp_avg"], topt.state[tp]["exp_avg"], f"{name} exp_avg")
        assert_close(opt.state[name]["exp_avg_sq"], topt.state[tp]["exp_avg_sq"], f"{name} exp_avg_sq")
        assert opt.state[name]["step"] == int(topt.state[tp]["step"]) == 5


def test_params_without_grad_are_untouched_and_get_no_state(rng):
    mine, theirs = _pair(rng, [(2, 3), (3,), (4, 1)])
    before = {n: p.data.copy() for n, p in mine.items()}
    opt = AdamW(mine, lr=0.1, weight_decay=0.5)  # decay must not touch a parameter without grad
    topt = torch.optim.AdamW(theirs, lr=0.1, weight_decay=0.5)
    _run(opt, topt, mine, theirs, rng, steps=3, skip=1)
    np.testing.assert_array_equal(mine["p1"].data, before["p1"])
    assert "p1" not in opt.state and set(opt.state) == {"p0", "p2"}
    assert not np.array_equal(mine["p0"].data, before["p0"])


def test_frozen_parameter_in_a_model_is_never_changed(rng):
    from lowrank_ref.nn import Linear

    lin = Linear(3, 2, rng=rng, dtype=np.float64)
    lin.bias.trainable = False
    opt = SGD(lin.parameters(), lr=0.1)
    lin.forward(rng.standard_normal((4, 3)))
    lin.backward(np.ones((4, 2)))
    b0, w0 = lin.bias.data.copy(), lin.weight.data.copy()
    opt.step()
    assert lin.bias.grad is None
    np.testing.assert_array_equal(lin.bias.data, b0)
    assert not np.array_equal(lin.weight.data, w0)


def test_zero_grad_sets_none(rng):
    mine, _ = _pair(rng, [(2, 2)])
    opt = SGD(mine, lr=1.0)
    mine["p0"].grad = np.ones((2, 2))
    opt.zero_grad()
    assert mine["p0"].grad is None


def test_list_params_named_by_position(rng):
    ps = [Parameter(rng.standard_normal(3)) for _ in range(2)]
    opt = Adam(ps, lr=0.1)
    ps[1].grad = np.ones(3)
    opt.step()
    assert list(opt.params) == ["0", "1"] and set(opt.state) == {"1"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_bytes_counts_the_moment_buffers(rng, dtype):
    shapes = [(3, 5), (7,)]
    n = sum(int(np.prod(s)) for s in shapes)
    itemsize = np.dtype(dtype).itemsize
    for make, copies in [(lambda m: SGD(m, lr=0.1), 0), (lambda m: SGD(m, lr=0.1, momentum=0.9), 1),
                         (lambda m: Adam(m), 2), (lambda m: AdamW(m), 2)]:
        mine, _ = _pair(rng, shapes, dtype)
        opt = make(mine)
        assert opt.state_bytes() == 0  # state is created lazily, at the first step
        for p in mine.values():
            p.grad = np.ones(p.shape, dtype=dtype)
        opt.step()
        assert opt.state_bytes() == copies * n * itemsize
        for p in mine.values():
            assert p.data.dtype == dtype  # updates keep the parameter's dtype


def test_adam_first_step_moves_by_lr_times_sign(rng):
    """Bias correction makes Adam's first step -lr·g/(|g| + eps) ≈ -lr·sign(g), whatever |g| is."""
    g = rng.standard_normal((4, 4)) * np.logspace(-3, 3, 16).reshape(4, 4)
    p = Parameter(np.zeros((4, 4)))
    opt = Adam([p], lr=0.01, eps=1e-12)
    p.grad = g
    opt.step()
    np.testing.assert_allclose(p.data, -0.01 * g / (np.abs(g) + 1e-12), rtol=1e-12)
    np.testing.assert_allclose(p.data, -0.01 * np.sign(g), rtol=1e-6)


def test_adamw_decay_is_decoupled_adam_decay_is_not():
    """With a zero gradient AdamW shrinks θ by exactly (1 - lr·λ); Adam's L2 term instead goes
    through the adaptive denominator and moves θ by about lr toward zero."""
    theta = np.array([2.0, -0.5, 10.0])
    p1, p2 = Parameter(theta.copy()), Parameter(theta.copy())
    wopt, aopt = AdamW([p1], lr=0.1, weight_decay=0.2), Adam([p2], lr=0.1, weight_decay=0.2)
    p1.grad, p2.grad = np.zeros(3), np.zeros(3)
    wopt.step()
    aopt.step()
    np.testing.assert_allclose(p1.data, theta * (1 - 0.1 * 0.2), rtol=1e-12)
    np.testing.assert_allclose(p2.data, theta - 0.1 * np.sign(theta), rtol=1e-6)


def test_lr_is_settable_and_used():
    p = Parameter(np.array([1.0]))
    opt = SGD([p], lr=0.1)
    opt.lr = 0.5
    p.grad = np.array([2.0])
    opt.step()
    assert p.data[0] == pytest.approx(1.0 - 0.5 * 2.0)


@pytest.mark.parametrize("bad, exc, match", [
    ({"lr": -0.1}, ValueError, "lr"), ({"lr": float("nan")}, ValueError, "lr"),
    ({"lr": "0.1"}, TypeError, "lr"), ({"lr": True}, TypeError, "lr"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"), ({"betas": (0.9,)}, ValueError, "betas"),
    ({"eps": -1.0}, ValueError, "eps"), ({"weight_decay": -0.1}, ValueError, "weight_decay"),
])
def test_adam_bad_arguments(bad, exc, match):
    with pytest.raises(exc, match=match):
        Adam([Parameter(np.zeros(2))], **bad)


def test_bad_params_and_sgd_arguments():
    with pytest.raises(ValueError, match="empty"):
        SGD({}, lr=0.1)
    with pytest.raises(TypeError, match="Parameter"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="dict"):
        SGD(Parameter(np.zeros(2)), lr=0.1)
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], lr=0.1, momentum=1.5)
    opt = SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    assert opt.lr == 0.1  # the bad value was not kept


# --- the schedule ----------------------------------------------------------------------------
def test_cosine_schedule_landmarks():
    base, lo, T, W = 0.1, 0.01, 110, 10
    assert cosine_schedule(0, T, base, W, lo) == 0.0
    assert cosine_schedule(5, T, base, W, lo) == pytest.approx(base / 2)
    assert cosine_schedule(W, T, base, W, lo) == pytest.approx(base)
    assert cosine_schedule(W + 50, T, base, W, lo) == pytest.approx((base + lo) / 2)
    assert cosine_schedule(T, T, base, W, lo) == pytest.approx(lo)
    assert cosine_schedule(T + 7, T, base, W, lo) == pytest.approx(lo)
    lrs = [cosine_schedule(t, T, base, W, lo) for t in range(W, T + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@given(total=st.integers(1, 60), eta_min=st.sampled_from([0.0, 1e-3]))
def test_cosine_without_warmup_matches_torch_cosine_annealing(total, eta_min):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=eta_min)
    for t in range(total + 1):
        got = cosine_schedule(t, total, 0.05, 0, eta_min)
        assert got == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), t
        opt.step()
        sched.step()


def test_scheduler_object_sets_optimizer_lr_and_torch_twin_agrees():
    from lowrank_gpu.optim import CosineWithWarmup as TorchCosine

    p = Parameter(np.zeros(1))
    opt = SGD([p], lr=0.2)
    sched = CosineWithWarmup(opt, total_steps=20, warmup_steps=4, min_lr=0.02)
    tp = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.2)
    tsched = TorchCosine(topt, total_steps=20, warmup_steps=4, min_lr=0.02)
    seen = []
    for t in range(25):
        assert opt.lr == pytest.approx(cosine_schedule(t, 20, 0.2, 4, 0.02))
        assert topt.param_groups[0]["lr"] == pytest.approx(opt.lr)
        seen.append(opt.lr)
        sched.step()
        tsched.step()
    assert seen[0] == 0.0 and max(seen) == pytest.approx(0.2) and seen[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("kwargs, match", [
    ({"step": -1}, "step"), ({"total_steps": 0}, "total_steps"), ({"warmup_steps": 200}, "warmup_steps"),
    ({"min_lr": 1.0}, "min_lr"), ({"base_lr": -1.0}, "base_lr"), ({"step": 1.5}, "step"),
])
def test_cosine_schedule_bad_arguments(kwargs, match):
    args = {"step": 0, "total_steps": 100, "base_lr": 0.1, "warmup_steps": 0, "min_lr": 0.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        cosine_schedule(**args)


# --- clipping --------------------------------------------------------------------------------
@given(shapes=shapes, seed=st.integers(0, 2**16), max_norm=st.floats(0.01, 10.0),
       scale=st.sampled_from([0.01, 1.0, 100.0]), norm_type=st.sampled_from([2.0, 1.0, math.inf]))
def test_clip_grad_norm_matches_torch(shapes, seed, max_norm, scale, norm_type):
    rng = np.random.default_rng(seed)
    mine, theirs = _pair(rng, shapes)
    for p, tp in zip(mine.values(), theirs):
        g = rng.standard_normal(p.shape) * scale
        p.grad, tp.grad = g.copy(), torch.tensor(g)
    got = clip_grad_norm(mine, max_norm, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    assert got == pytest.approx(float(want), rel=1e-12)
    for i, (p, tp) in enumerate(zip(mine.values(), theirs)):
        assert_close(p.grad, tp.grad, f"clipped grad {i}")


def test_clip_skips_missing_grads_and_returns_the_norm_before_clipping():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    a.grad = np.array([3.0, 4.0])
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad, [0.6, 0.8], rtol=1e-6)
    assert b.grad is None
    a.grad = np.array([0.3, 0.4])
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(a.grad, [0.3, 0.4])  # below the threshold: unchanged
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([a], -1.0)


def test_torch_side_helpers():
    from lowrank_gpu import optim as gopt

    lin = torch.nn.Linear(3, 2)
    opt = gopt.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(4, 3)).sum().backward()
    total = gopt.clip_grad_norm(lin.parameters(), 1e-3)
    assert isinstance(total, float) and total > 1e-3
    opt.step()
    assert gopt.state_bytes(opt) == 2 * (3 * 2 + 2) * 4
