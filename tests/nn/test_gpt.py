"""The GPT's own invariants (causality, init, generation), the nn layers' mathematical claims, and
weight transfer between the NumPy and torch GPTs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close, requires_cuda
from hypothesis import given
from hypothesis import strategies as st
from nn_strategies import arrays, perturb

import lowrank_gpu.nn as gnn
import lowrank_ref.nn as nn
from lowrank_ref.nn.activations import softmax, softmax_backward


def small_gpt(dtype=np.float64, seed=0, **kw):
    cfg = nn.GPTConfig(**{"vocab_size": 9, "block_size": 8, "n_layer": 2, "n_head": 2, "d_model": 8,
                          "mlp_ratio": 2, **kw})
    return nn.GPT(cfg, rng=np.random.default_rng(seed), dtype=dtype)


@given(seed=st.integers(0, 2**16), t=st.integers(0, 6))
def test_no_position_sees_the_future(seed, t):
    rng = np.random.default_rng(seed)
    m = perturb(small_gpt(), rng)
    idx = rng.integers(0, 9, (2, 8))
    changed = idx.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + rng.integers(0, 8, changed[:, t + 1:].shape)) % 9
    a, b = m.forward(idx), m.forward(changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])  # bit-identical up to position t
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])  # later positions do see their own inputs


def test_attention_output_at_position_zero_is_its_own_value():
    """With one visible position the softmax weight is exactly 1: y_0 = o(v(x_0))."""
    rng = np.random.default_rng(1)
    attn = perturb(nn.CausalSelfAttention(6, 3, rng=rng, dtype=np.float64), rng)
    x = rng.standard_normal((2, 4, 6))
    y = attn.forward(x)
    np.testing.assert_allclose(y[:, 0], attn.o.forward(attn.v.forward(x[:, :1]))[:, 0], rtol=1e-13, atol=1e-14)


def test_key_bias_gets_zero_gradient():
    """A key bias b_k adds q·b_k to every score in a row; softmax ignores a constant shift of its
    row, so the loss does not depend on b_k (a fact the chapter states)."""
    rng = np.random.default_rng(2)
    attn = perturb(nn.CausalSelfAttention(4, 2, rng=rng, dtype=np.float64), rng)
    attn.forward(rng.standard_normal((3, 5, 4)))
    attn.backward(rng.standard_normal((3, 5, 4)))
    np.testing.assert_allclose(attn.k.bias.grad, 0.0, atol=1e-12)
    assert np.abs(attn.q.bias.grad).max() > 1e-3


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), d=st.integers(2, 8), data=st.data())
def test_layernorm_output_has_zero_mean_unit_variance(lead, d, data):
    x = data.draw(arrays(tuple(lead) + (d,), scale=5.0)) + 3.0
    y = nn.LayerNorm(d, eps=1e-12, dtype=np.float64).forward(x)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-8)


@given(V=st.integers(1, 6), shift=st.floats(-1e3, 1e3), data=st.data())
def test_softmax_rows_sum_to_one_and_ignore_shifts(V, shift, data):
    z = data.draw(arrays((3, V), scale=50.0))
    p = softmax(z)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(softmax(z + shift), p, rtol=1e-9, atol=1e-300)
    # the backward is orthogonal to the all-ones direction (shifting z changes nothing)
    np.testing.assert_allclose(softmax_backward(np.random.default_rng(0).standard_normal(z.shape), p).sum(-1),
                               0.0, atol=1e-12)


def test_cross_entropy_known_values():
    V = 5
    loss, dz = nn.cross_entropy(np.zeros((3, V)), np.array([0, 4, 2]))
    assert loss == pytest.approx(np.log(V), rel=1e-15)  # uniform logits: -log(1/V)
    np.testing.assert_allclose(dz.sum(axis=-1), 0.0, atol=1e-16)
    np.testing.assert_allclose(dz[0], np.array([1 / V - 1, 1 / V, 1 / V, 1 / V, 1 / V]) / 3, rtol=1e-14)
    # huge logits do not overflow: the correct class by a margin of 1000 gives loss ~ e^-1000 ~ 0
    big = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    loss, dz = nn.cross_entropy(big, np.array([0, 0]))
    assert np.isfinite(loss) and loss == pytest.approx(500.0)  # (0 + 1000) / 2
    assert np.all(np.isfinite(dz))


def test_gpt_init_follows_gpt2():
    m = small_gpt(seed=3, d_model=64, n_head=4, vocab_size=64, block_size=32, n_layer=2)
    p = m.parameters()
    assert np.std(p["tok_emb.weight"].data) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["blocks.0.mlp.fc.weight"].data) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["blocks.1.attn.o.weight"].data) == pytest.approx(0.02 / np.sqrt(4), rel=0.1)
    assert np.std(p["blocks.1.mlp.proj.weight"].data) == pytest.approx(0.02 / np.sqrt(4), rel=0.05)
    assert np.all(p["blocks.0.attn.q.bias"].data == 0) and np.all(p["ln_f.weight"].data == 1)
    # at init the logits are small, so the loss is close to log(vocab)
    idx = np.random.default_rng(0).integers(0, 64, (4, 32))
    loss, _ = nn.cross_entropy(m.forward(idx), idx)
    assert loss == pytest.approx(np.log(64), rel=0.02)


def test_same_seed_same_model():
    a, b = small_gpt(seed=5), small_gpt(seed=5)
    for n, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[n])


def test_generate_greedy_matches_forward_argmax_and_restores_modes():
    rng = np.random.default_rng(4)
    m = perturb(small_gpt(dropout=0.3), rng)
    m.train()
    prompt = rng.integers(0, 9, (2, 3))
    out = m.generate(prompt, 7, temperature=0.0)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert all(mod.training for _, mod in m.named_modules())
    with pytest.raises(RuntimeError, match="before forward"):  # generate leaves no cache behind
        m.backward(np.zeros((2, 1, 9)))
    m.eval()
    for t in range(3, 10):  # each greedy token is the argmax of the eval logits on the last 8 tokens
        ctx = out[:, max(0, t - 8):t]
        np.testing.assert_array_equal(out[:, t], m.forward(ctx)[:, -1].argmax(-1))


def test_generate_samples_from_the_softmax():
    """Sampling frequencies of the first new token follow softmax(logits / temperature)."""
    rng = np.random.default_rng(6)
    m = perturb(small_gpt(vocab_size=4), rng, scale=0.5)
    prompt = np.tile(np.array([[1, 2]]), (4000, 1))
    out = m.generate(prompt, 1, rng=np.random.default_rng(7), temperature=2.0)
    p = softmax(m.forward(prompt[:1])[0, -1] / 2.0)
    freq = np.bincount(out[:, -1], minlength=4) / len(out)
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / 4000))
    assert out.min() >= 0 and out.max() < 4


def test_generate_bad_arguments():
    m = small_gpt()
    with pytest.raises(ValueError, match="temperature"):
        m.generate(np.zeros((1, 2), dtype=np.int64), 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m.generate(np.zeros(2, dtype=np.int64), 2)


def test_weight_transfer_numpy_torch_numpy_identical_logits():
    rng = np.random.default_rng(8)
    m = perturb(small_gpt(), rng)
    idx = rng.integers(0, 9, (3, 8))
    t = gnn.from_numpy(m)
    assert t.tok_emb.weight.dtype == torch.float64
    assert [n for n, _ in t.named_parameters()] == list(m.parameters())
    back = gnn.to_numpy(t)
    for n, v in m.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[n], v, err_msg=n)
    np.testing.assert_array_equal(back.forward(idx), m.forward(idx))
    assert_close(m.forward(idx), t(torch.from_numpy(idx)), "logits numpy vs torch", *TOL["float64"])


def test_weight_transfer_torch_to_numpy_float32():
    torch.manual_seed(0)
    cfg = nn.GPTConfig(vocab_size=9, block_size=8, n_layer=2, n_head=2, d_model=8)
    t = gnn.GPT(cfg, rng=1)
    m = gnn.to_numpy(t)
    assert m.dtype == np.float32
    idx = np.random.default_rng(9).integers(0, 9, (2, 8))
    with torch.no_grad():
        assert_close(m.forward(idx), t(torch.from_numpy(idx)), "float32 logits", *TOL["float32"])


def test_copy_state_checks_names_and_shapes():
    m = small_gpt()
    other = gnn.GPT(nn.GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, d_model=8, mlp_ratio=2))
    with pytest.raises(ValueError, match="blocks.1"):
        gnn.copy_state(m, other)
    wide = gnn.GPT(nn.GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, d_model=8, mlp_ratio=2))
    before = {n: p.detach().clone() for n, p in wide.named_parameters()}
    with pytest.raises(ValueError, match="tok_emb.weight"):
        gnn.copy_state(m, wide)
    for n, p in wide.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed although the copy was refused"
    with pytest.raises(TypeError, match="lowrank_ref.nn.GPT"):
        gnn.from_numpy(other)


@requires_cuda
def test_torch_gpt_on_cuda_matches_numpy_float64():
    rng = np.random.default_rng(10)
    m = perturb(small_gpt(), rng)
    t = gnn.from_numpy(m, device="cuda")
    assert t.head.weight.device.type == "cuda"
    idx = rng.integers(0, 9, (3, 8))
    logits = t(torch.from_numpy(idx).cuda())
    assert_close(m.forward(idx), logits, "logits numpy vs cuda", *TOL["float64"])
    back = gnn.to_numpy(t)
    np.testing.assert_array_equal(back.forward(idx), m.forward(idx))


def test_torch_generate_greedy_matches_numpy():
    rng = np.random.default_rng(11)
    m = perturb(small_gpt(dropout=0.2), rng)
    t = gnn.from_numpy(m)
    t.train()
    prompt = rng.integers(0, 9, (2, 3))
    out_t = t.generate(torch.from_numpy(prompt), 9, temperature=0.0)
    assert t.training
    np.testing.assert_array_equal(out_t.numpy(), m.generate(prompt, 9, temperature=0.0))
    sampled = t.generate(torch.from_numpy(prompt), 4, rng=0, temperature=1.0, top_k=2)
    assert sampled.shape == (2, 7) and int(sampled.max()) < 9
    np.testing.assert_array_equal(sampled.numpy(), t.generate(torch.from_numpy(prompt), 4, rng=0, top_k=2).numpy())


def test_numpy_top_k_one_is_greedy():
    rng = np.random.default_rng(12)
    m = perturb(small_gpt(), rng)
    prompt = rng.integers(0, 9, (3, 2))
    np.testing.assert_array_equal(m.generate(prompt, 6, rng=rng, temperature=1.5, top_k=1),
                                  m.generate(prompt, 6, temperature=0.0))
