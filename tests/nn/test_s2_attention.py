"""LongLoRA's shifted sparse attention (S²-Attn, REFERENCES §11): the grouped fast path against a
dense masked attention written here, the masks against hand-drawn ones, the leak of the
reference's ``roll`` version, gradcheck, torch autograd, full attention in eval, bad lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from nn_strategies import compare_with_torch, perturb

import lowrank_gpu.nn.gpt as gpt_t
import lowrank_ref.nn as nn
from lowrank_ref.gradcheck import check_gradients, gradcheck
from lowrank_ref.nn.attention import (
    ShiftedSparseAttention,
    s2_attention_backward,
    s2_attention_forward,
    s2_attention_mask,
    s2_attention_roll,
)


def dense_attention(q, k, v, allowed):
    """softmax(QKᵀ/√hs restricted to ``allowed``) V, per head: the slow, obvious reference."""
    hs = q.shape[-1]
    s = np.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(hs)
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bhtd", p, v)


def qkv(rng, B, H, T, hs):
    return tuple(rng.standard_normal((B, H, T, hs)) for _ in range(3))


def test_masks_drawn_by_hand():
    # T = 8, two groups of G = 4: plain heads see [0,4) and [4,8); shifted heads [0,2), [2,6), [6,8)
    plain = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0],
                      [1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0],
                      [0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]], bool)
    shifted = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0],
                        [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
                        [0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1]], bool)
    # the roll version's shifted heads: rows 0, 1 (tokens 0, 1) sit after tokens 6, 7 and see them
    rolled = shifted.copy()
    rolled[0, 6] = rolled[0, 7] = rolled[1, 6] = rolled[1, 7] = True
    rolled[6, 7] = False  # ...and token 6 sits after 7 there, not before
    rolled[7, 6] = rolled[7, 7] = True
    m = s2_attention_mask(8, 4, n_groups=2)
    np.testing.assert_array_equal(m[0], plain)
    np.testing.assert_array_equal(m[1], plain)
    np.testing.assert_array_equal(m[2], shifted)
    np.testing.assert_array_equal(m[3], shifted)
    r = s2_attention_mask(8, 2, n_groups=2, roll=True)
    np.testing.assert_array_equal(r[0], plain)
    np.testing.assert_array_equal(r[1], rolled)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 4), ng=st.sampled_from([1, 2, 4]), mult=st.integers(1, 2),
       hs=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_grouped_path_equals_the_dense_masked_attention(B, H, ng, mult, hs, seed):
    T = 2 * ng * mult
    q, k, v = qkv(np.random.default_rng(seed), B, H, T, hs)
    y, _ = s2_attention_forward(q, k, v, n_groups=ng)
    assert_close(y, dense_attention(q, k, v, s2_attention_mask(T, H, ng)), "S²-Attn vs dense mask")
    assert_close(s2_attention_roll(q, k, v, ng), dense_attention(q, k, v, s2_attention_mask(T, H, ng, roll=True)),
                 "roll version vs its dense mask")


def test_no_wrap_version_is_causal_and_the_roll_version_leaks():
    rng = np.random.default_rng(0)
    B, H, T, hs = 1, 4, 16, 3
    q, k, v = qkv(rng, B, H, T, hs)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, -1] += 1.0  # change only the last token's key and value
    v2[:, :, -1] += 1.0
    G = T // 4
    ours = s2_attention_forward(q, k, v)[0], s2_attention_forward(q, k2, v2)[0]
    roll = s2_attention_roll(q, k, v), s2_attention_roll(q, k2, v2)
    np.testing.assert_array_equal(ours[0][:, :, :-1], ours[1][:, :, :-1])  # nothing before T-1 moves
    early = np.abs(roll[0][:, H // 2:, : G // 2] - roll[1][:, H // 2:, : G // 2])
    assert early.max(-1).min() > 1e-3, "the roll version's first G/2 tokens should see the last token"
    np.testing.assert_array_equal(roll[0][:, : H // 2, :-1], roll[1][:, : H // 2, :-1])  # unshifted heads: no leak


@settings(max_examples=4, deadline=None)
@given(t=st.integers(0, 15), seed=st.integers(0, 2**16))
def test_no_token_sees_a_later_one(t, seed):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 1, 2, 16, 2)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t + 1:] = rng.standard_normal(k2[:, :, t + 1:].shape)
    v2[:, :, t + 1:] = rng.standard_normal(v2[:, :, t + 1:].shape)
    a, b = s2_attention_forward(q, k, v)[0], s2_attention_forward(q, k2, v2)[0]
    np.testing.assert_array_equal(a[:, :, : t + 1], b[:, :, : t + 1])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pure_backward_gradcheck(dropout):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 2, 4, 8, 2)
    dy = rng.standard_normal(q.shape)

    def fwd():  # a fresh generator each call: the same dropout mask every time
        return s2_attention_forward(q, k, v, n_groups=2, dropout=dropout, rng=np.random.default_rng(7))

    y, cache = fwd()
    dq, dk, dv = s2_attention_backward(dy, cache)
    report = check_gradients(lambda: float(np.sum(fwd()[0] * dy)), {"q": q, "k": k, "v": v},
                             {"q": dq, "k": dk, "v": dv})
    assert report.ok, "\n" + str(report)


def test_module_gradcheck_in_training_mode():
    rng = np.random.default_rng(2)
    attn = perturb(ShiftedSparseAttention(6, 2, rng=rng, dtype=np.float64, n_groups=2), rng)
    report = gradcheck(attn, rng.standard_normal((2, 8, 6)))
    assert {r.name for r in report.results} == set(attn.trainable_parameters()) | {"input"}
    assert report.ok, "\n" + str(report)


@pytest.mark.parametrize("training", [True, False])
def test_numpy_vs_torch_autograd(training):
    rng = np.random.default_rng(3)
    attn = perturb(ShiftedSparseAttention(8, 4, rng=rng, dtype=np.float64), rng).train(training)
    tattn = gpt_t.ShiftedSparseAttention(8, 4, dtype=torch.float64).train(training)
    x = rng.standard_normal((2, 16, 8))
    compare_with_torch(attn, tattn, x, rng.standard_normal((2, 16, 8)), f"S²-Attn training={training}")


def test_eval_mode_is_full_attention_and_training_mode_is_not():
    rng = np.random.default_rng(4)
    s2 = perturb(ShiftedSparseAttention(8, 2, rng=rng, dtype=np.float64), rng)
    full = nn.CausalSelfAttention(8, 2, rng=rng, dtype=np.float64)
    full.load_state_dict({n: p.data for n, p in s2.parameters().items()})
    x = rng.standard_normal((1, 16, 8))
    assert np.abs(s2.forward(x) - full.forward(x)).max() > 1e-3  # training: groups
    s2.eval()
    assert_close(s2.forward(x), full.forward(x), "eval S²-Attn vs full attention")
    s2.backward(np.ones((1, 16, 8)))  # the backward of the full path follows the eval forward


def test_gpt_with_s2_attention_numpy_vs_torch():
    cfg = nn.GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, d_model=8)
    rng = np.random.default_rng(5)
    model = perturb(nn.GPT(cfg, rng=rng, dtype=np.float64, attention="s2"), rng)
    assert all(isinstance(b.attn, ShiftedSparseAttention) for b in model.blocks)
    tmodel = gpt_t.from_numpy(model)
    assert tmodel.attention == "s2" and gpt_t.to_numpy(tmodel).attention == "s2"
    idx = rng.integers(0, 11, (2, 16))
    dz = rng.standard_normal((2, 16, 11))
    z = model.forward(idx)
    model.zero_grad()
    model.backward(dz)
    zt = tmodel(torch.from_numpy(idx))
    zt.backward(torch.from_numpy(dz))
    assert_close(z, zt, "GPT s2 logits")
    tp = dict(tmodel.named_parameters())
    for n, p in model.parameters().items():
        assert_close(p.grad, tp[n].grad, f"GPT s2 grad of {n}", rtol=1e-9)


@pytest.mark.parametrize("T", [4, 12, 15])
def test_a_length_that_does_not_divide_is_a_clear_error_in_both_backends(T):
    np_attn = ShiftedSparseAttention(4, 2, rng=np.random.default_rng(0))
    t_attn = gpt_t.ShiftedSparseAttention(4, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        np_attn.forward(np.zeros((1, T, 4), np.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        t_attn(torch.zeros(1, T, 4))
    np_attn.eval(), t_attn.eval()  # full attention at inference takes any length
    np_attn.forward(np.zeros((1, T, 4), np.float32))
    t_attn(torch.zeros(1, T, 4))


def test_bad_options_are_clear_errors():
    cfg = nn.GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, d_model=4)
    for make in (lambda a: nn.GPT(cfg, attention=a), lambda a: gpt_t.GPT(cfg, attention=a)):
        with pytest.raises(ValueError, match="attention"):
            make("sparse")
        with pytest.raises(TypeError, match="attention"):
            make(None)
    for make in (ShiftedSparseAttention, gpt_t.ShiftedSparseAttention):
        with pytest.raises(ValueError, match="n_groups"):
            make(4, 2, n_groups=0)
