"""KronA's own math: the size rule and its errors (a side that does not divide names the
dimension and the divisors that would work), gradcheck of A, B and x, the hand-derived backward
against torch autograd through ``torch.kron``, the init (A Kaiming, B = 0, ΔW = 0; both factors
get gradients after one step), rank(A ⊗ B) = rank(A)·rank(B) reached by the layer (Hypothesis).
The generic life-cycle checks are the contract tests'. KronA^B_res (a block wrapper, not a
registered method): gradcheck, the formula against np.kron, the init, why it cannot be merged,
NumPy vs torch autograd inside a GPT block, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters import KronALinear
from lowrank_ref.adapters.krona import krona_backward, krona_forward, krona_shapes
from lowrank_ref.gradcheck import gradcheck

RTOL, ATOL = TOL["float64"]


def make_layer(rng, out=8, inn=6, cfg=None):
    W = rng.standard_normal((out, inn))
    layer = KronALinear(lr.nn.Linear.from_arrays(W, rng.standard_normal(out)), cfg or lr.KronAConfig(scale=2.0), rng=0)
    for p in layer.trainable_parameters().values():
        p.data = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
    return layer


@pytest.mark.parametrize("cfg, inn, out, want", [
    (lr.KronAConfig(), 768, 768, {"A": (24, 24), "B": (32, 32)}),  # REFERENCES §1.1: 24·32 = 768
    (lr.KronAConfig(), 6, 8, {"A": (2, 2), "B": (4, 3)}),
    (lr.KronAConfig(), 7, 9, {"A": (3, 1), "B": (3, 7)}),  # 7 is prime: 1 · 7
    (lr.KronAConfig(a_out=4, a_in=3), 6, 8, {"A": (4, 3), "B": (2, 2)}),
])
def test_size_rule(cfg, inn, out, want):
    assert krona_shapes(cfg, inn, out) == want


def test_a_side_that_does_not_divide_names_the_dimension_and_the_divisors():
    base = lr.nn.Linear.from_arrays(np.ones((8, 6)))
    with pytest.raises(ValueError, match=r"a_out=3 does not divide out_features=8.*\[1, 2, 4, 8\]"):
        KronALinear(base, lr.KronAConfig(a_out=3))
    with pytest.raises(ValueError, match=r"a_in=4 does not divide in_features=6.*\[1, 2, 3, 6\]"):
        KronALinear(base, lr.KronAConfig(a_in=4))
    assert base.weight.trainable  # nothing half-built: the base is as it was
    for kw, kind in [({"a_out": 0}, ValueError), ({"a_in": 2.0}, TypeError), ({"scale": float("nan")}, ValueError)]:
        with pytest.raises(kind, match=next(iter(kw))):
            lr.KronAConfig(**kw)


@pytest.mark.parametrize("cfg", [lr.KronAConfig(scale=2.0), lr.KronAConfig(a_out=4, a_in=3, scale=0.5)])
def test_gradcheck_and_autograd(cfg):
    rng = np.random.default_rng(1)
    layer = make_layer(rng, cfg=cfg)
    report = gradcheck(layer, rng.standard_normal((2, 3, 6)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "A", "B"}
    x, w = rng.standard_normal((5, 6)), rng.standard_normal((5, 8))
    params = {"W": layer.base.weight.data, "b": layer.base.bias.data, "A": layer.A.data, "B": layer.B.data}
    y, cache = krona_forward(x, params, cfg)
    dx, grads = krona_backward(w, cache)
    At, Bt = (torch.tensor(params[n], requires_grad=True) for n in ("A", "B"))
    xt = torch.tensor(x, requires_grad=True)
    yt = xt @ (torch.tensor(params["W"]) + cfg.scale * torch.kron(At, Bt)).T + torch.tensor(params["b"])
    (yt * torch.tensor(w)).sum().backward()
    assert_close(y, yt, "y vs dense (torch.kron)", RTOL, ATOL)
    assert_close(dx, xt.grad, "x̄ vs autograd", RTOL, ATOL)
    assert_close(grads["A"], At.grad, "Ā vs autograd", RTOL, ATOL)
    assert_close(grads["B"], Bt.grad, "B̄ vs autograd", RTOL, ATOL)


def test_init_one_factor_zero_and_both_train_after_a_step():
    rng = np.random.default_rng(2)
    layer = KronALinear(lr.nn.Linear.from_arrays(rng.standard_normal((8, 6))), lr.KronAConfig(), rng=0)
    assert layer.A.data.any() and not layer.B.data.any()
    assert np.abs(layer.A.data).max() <= 1 / np.sqrt(layer.A.shape[1])  # U(±1/√a_in)
    np.testing.assert_array_equal(layer.delta_weight(), 0)
    x = rng.standard_normal((4, 6))
    layer.forward(x)
    layer.backward(rng.standard_normal((4, 8)))
    assert not layer.A.grad.any() and layer.B.grad.any()  # B = 0: Ā = 0 on the first step only
    layer.B.data -= 0.1 * layer.B.grad
    layer.A.grad = None
    layer.forward(x)
    layer.backward(rng.standard_normal((4, 8)))
    assert layer.A.grad.any()


@settings(max_examples=10, deadline=None)
@given(out=st.sampled_from([4, 6, 8, 12]), inn=st.sampled_from([4, 6, 9, 10]), seed=st.integers(0, 2**16))
def test_the_update_reaches_rank_a_times_rank_b(out, inn, seed):
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, out, inn, lr.KronAConfig())
    rank = np.linalg.matrix_rank
    assert rank(layer.delta_weight()) == rank(layer.A.data) * rank(layer.B.data) == layer.r


# --- KronA^B_res: parallel to a whole block, plus a scaled residual -------------------------------
import lowrank_gpu as lg  # noqa: E402
from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402
from lowrank_ref.adapters.krona import KronAResBlock, krona_res_backward, krona_res_forward  # noqa: E402
from lowrank_ref.nn.gpt import GPT, GPTConfig  # noqa: E402
from lowrank_ref.nn.module import StateError  # noqa: E402
from lowrank_ref.nn.transformer import MLP  # noqa: E402


def _res_block(rng, d=6, cfg=None):
    """KronA^B_res around a float64 GELU MLP (d -> 4d -> d), with A, B, s_res random and non-zero."""
    mlp = MLP(d, 4 * d, rng=rng, dtype=np.float64)
    blk = KronAResBlock(mlp, d, cfg or lr.KronAResConfig(scale=2.0), rng=0)
    for p in blk.trainable_parameters().values():
        p.data = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
    return blk


@pytest.mark.parametrize("train_residual", [True, False])
def test_res_block_gradcheck_adapter_and_input_block_frozen(train_residual):
    rng = np.random.default_rng(30)
    blk = _res_block(rng, cfg=lr.KronAResConfig(scale=2.0, train_residual=train_residual))
    names = {"A", "B"} | ({"s_res"} if train_residual else set())
    assert set(blk.trainable_parameters()) == names  # the block's own weights are frozen
    report = gradcheck(blk, rng.standard_normal((2, 3, 6)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", *names}


def test_res_block_is_f_plus_kron_plus_scaled_input_and_starts_with_b_zero():
    rng = np.random.default_rng(31)
    mlp = MLP(6, 24, rng=rng, dtype=np.float64)
    x = rng.standard_normal((5, 6))
    fx = mlp.forward(x)
    mlp._cache = None
    fresh = KronAResBlock(mlp, 6, lr.KronAResConfig(residual_scale=0.5), rng=0)
    assert not fresh.B.data.any() and fresh.A.data.any()  # one factor zero (the choice made here)
    assert_close(fresh.forward(x), fx + 0.5 * x, "init: F(x) + s_res x (the Kronecker term is 0)")
    fresh._cache = None
    assert_close(KronAResBlock(mlp, 6, lr.KronAResConfig(residual_scale=0.0), rng=0).forward(x), fx,
                 "residual_scale = 0 starts exactly at the block")
    blk = _res_block(np.random.default_rng(32))
    blk.block = mlp
    s, sres = 2.0, float(blk.s_res.data[0])
    want = fx + s * x @ np.kron(blk.A.data, blk.B.data).T + sres * x
    assert_close(blk.forward(x), want, "F(x) + s x (A ⊗ B)ᵀ + s_res x vs np.kron", RTOL, ATOL)


def test_res_block_is_not_affine_so_not_mergeable():
    """No (d, d) weight and bias reproduce the wrapped GELU block: the least-squares affine fit
    of its outputs leaves a residual far above rounding (why KronA^B_res is not mergeable)."""
    rng = np.random.default_rng(33)
    blk = _res_block(rng)
    x = 3 * rng.standard_normal((200, 6))
    y = blk.forward(x)
    X1 = np.hstack([x, np.ones((200, 1))])
    coef, *_ = np.linalg.lstsq(X1, y, rcond=None)
    assert np.abs(X1 @ coef - y).max() > 1e-2 * np.abs(y).max()
    assert not hasattr(blk, "merge")


def test_res_block_numpy_matches_torch_twin_and_torch_autograd_in_a_gpt():
    """Both backends wrap a GPT block's MLP (its input is ln2(h)); outputs and every gradient agree."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8)
    m = GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)
    tm = from_numpy(m)
    rcfg = lr.KronAResConfig(scale=1.5, residual_scale=0.7)
    m.blocks[0].mlp = KronAResBlock(m.blocks[0].mlp, 8, rcfg, rng=0)
    tm.blocks[0].mlp = lg.adapters.krona.KronAResBlock(tm.blocks[0].mlp, 8, rcfg, rng=0)
    rng = np.random.default_rng(34)
    ours, theirs = m.blocks[0].mlp, tm.blocks[0].mlp
    with torch.no_grad():
        for n, p in ours.trainable_parameters().items():
            p.data = rng.standard_normal(p.shape)
            getattr(theirs, n).copy_(torch.from_numpy(p.data))
    idx = rng.integers(0, 11, (2, 7))
    w = rng.standard_normal((2, 7, 11))
    logits = m.forward(idx)
    m.backward(w)
    tl = tm(torch.tensor(idx))
    (tl * torch.tensor(w)).sum().backward()
    assert_close(logits, tl, "logits numpy vs torch", RTOL, ATOL)
    for n, p in ours.trainable_parameters().items():
        assert_close(p.grad, getattr(theirs, n).grad, f"{n}̄ numpy vs torch autograd", RTOL, ATOL)
    assert theirs.block.fc.weight.grad is None  # the block is frozen in torch too


def test_res_block_bad_input():
    mlp = MLP(6, 24, rng=np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(ValueError, match=r"a_out=4 does not divide out_features=6.*\[1, 2, 3, 6\]"):
        KronAResBlock(mlp, 6, lr.KronAResConfig(a_out=4))
    with pytest.raises(ValueError, match="features must be a positive integer"):
        KronAResBlock(mlp, 0)
    with pytest.raises(TypeError, match="config must be a KronAResConfig"):
        KronAResBlock(mlp, 6, lr.KronAConfig())
    with pytest.raises(TypeError, match="residual_scale must be a real number"):
        lr.KronAResConfig(residual_scale="1")
    with pytest.raises(ValueError, match="residual_scale must be finite"):
        lr.KronAResConfig(residual_scale=float("nan"))
    with pytest.raises(TypeError, match="train_residual must be a bool"):
        lr.KronAResConfig(train_residual=1)
    with pytest.raises(ValueError, match="maps its input's shape to itself"):
        krona_res_forward(np.ones((2, 6)), np.ones((2, 4)), {"A": np.ones((2, 2)), "B": np.ones((3, 3)),
                                                             "s_res": np.ones(1)}, lr.KronAResConfig())
    blk = KronAResBlock(mlp, 6)
    with pytest.raises(StateError, match="before forward"):
        blk.backward(np.ones((2, 6)))
    assert callable(krona_res_backward)


def test_res_block_twins_have_the_same_constructor_and_public_names():
    """Not an exported layer (it wraps a block, not a Linear, so test_mirror's adapter surface does
    not apply); the two backends still mirror each other."""
    import inspect

    ref, gpu = KronAResBlock, lg.adapters.krona.KronAResBlock
    def params(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert params(ref) == params(gpu)
    own = {n for n in vars(ref) if not n.startswith("_")} - {"backward"}
    assert own == {n for n in vars(gpu) if not n.startswith("_")}
