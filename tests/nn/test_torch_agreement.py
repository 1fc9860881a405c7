"""Every nn layer: the hand-written NumPy backward against PyTorch autograd, in float64.

Each test draws shapes and a memory layout (contiguous, strided, transposed) for the input and
compares the forward, the input gradient and every parameter gradient (see nn_strategies)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st
from nn_strategies import arrays, compare_with_torch, copy_to_torch, perturb

import lowrank_gpu.nn as gnn
import lowrank_ref.nn as nn

dims = st.integers(1, 6)


@given(lead=st.lists(dims, min_size=0, max_size=2), n_in=dims, n_out=dims, bias=st.booleans(), data=st.data())
def test_linear(lead, n_in, n_out, bias, data):
    rng = np.random.default_rng(0)
    layer = nn.Linear(n_in, n_out, bias=bias, rng=rng, dtype=np.float64)
    x = data.draw(arrays(tuple(lead) + (n_in,)))
    dy = rng.standard_normal(tuple(lead) + (n_out,))
    compare_with_torch(layer, torch.nn.Linear(n_in, n_out, bias=bias), x, dy, "Linear")


@given(lead=st.lists(dims, min_size=1, max_size=2), vocab=st.integers(1, 5), dim=dims,
       seed=st.integers(0, 2**16))
def test_embedding(lead, vocab, dim, seed):
    rng = np.random.default_rng(seed)
    emb = nn.Embedding(vocab, dim, rng=rng, dtype=np.float64)
    idx = rng.integers(0, vocab, tuple(lead))  # small vocab: repeated ids are likely
    dy = rng.standard_normal(tuple(lead) + (dim,))
    temb = copy_to_torch(emb, torch.nn.Embedding(vocab, dim))
    y = emb.forward(idx)
    assert emb.backward(dy) is None
    yt = temb(torch.from_numpy(idx))
    yt.backward(torch.from_numpy(dy))
    assert_close(y, yt, "Embedding forward")
    assert_close(emb.weight.grad, temb.weight.grad, "Embedding weight grad")


@given(lead=st.lists(dims, min_size=0, max_size=2), d=st.integers(1, 8), data=st.data())
def test_layernorm(lead, d, data):
    rng = np.random.default_rng(1)
    ln = perturb(nn.LayerNorm(d, dtype=np.float64), rng)
    x = data.draw(arrays(tuple(lead) + (d,), scale=3.0))
    dy = rng.standard_normal(x.shape)
    compare_with_torch(ln, torch.nn.LayerNorm(d, eps=1e-5), x, dy, "LayerNorm")


@given(lead=st.lists(dims, min_size=1, max_size=3), data=st.data())
def test_gelu(lead, data):
    x = data.draw(arrays(tuple(lead), scale=3.0))
    dy = np.random.default_rng(2).standard_normal(x.shape)
    compare_with_torch(nn.GELU(), torch.nn.GELU(), x, dy, "GELU")


@given(lead=st.lists(dims, min_size=1, max_size=3), p=st.floats(0.0, 0.9), data=st.data())
def test_dropout_eval_is_identity_like_torch(lead, p, data):
    x = data.draw(arrays(tuple(lead)))
    dy = np.random.default_rng(3).standard_normal(x.shape)
    y, dx = compare_with_torch(nn.Dropout(p).eval(), torch.nn.Dropout(p).eval(), x, dy, "Dropout(eval)")
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


@given(B=st.integers(1, 3), T=st.integers(1, 5), n_head=st.integers(1, 3), hs=st.integers(1, 3), data=st.data())
def test_attention(B, T, n_head, hs, data):
    rng = np.random.default_rng(4)
    C = n_head * hs
    attn = perturb(nn.CausalSelfAttention(C, n_head, rng=rng, dtype=np.float64), rng)
    x = data.draw(arrays((B, T, C)))
    dy = rng.standard_normal((B, T, C))
    compare_with_torch(attn, gnn.CausalSelfAttention(C, n_head), x, dy, "CausalSelfAttention")


@given(lead=st.lists(dims, min_size=1, max_size=2), d=dims, hidden=dims, data=st.data())
def test_mlp(lead, d, hidden, data):
    rng = np.random.default_rng(5)
    mlp = perturb(nn.MLP(d, hidden, rng=rng, dtype=np.float64), rng)
    x = data.draw(arrays(tuple(lead) + (d,)))
    dy = rng.standard_normal(x.shape)
    compare_with_torch(mlp, gnn.MLP(d, hidden), x, dy, "MLP")


@given(B=st.integers(1, 2), T=st.integers(1, 4), n_head=st.integers(1, 2), hs=st.integers(1, 3),
       mlp_ratio=st.integers(1, 3), data=st.data())
def test_block(B, T, n_head, hs, mlp_ratio, data):
    rng = np.random.default_rng(6)
    C = n_head * hs
    block = perturb(nn.Block(C, n_head, mlp_ratio, rng=rng, dtype=np.float64), rng)
    x = data.draw(arrays((B, T, C)))
    dy = rng.standard_normal((B, T, C))
    compare_with_torch(block, gnn.Block(C, n_head, mlp_ratio), x, dy, "Block")


@given(B=st.integers(1, 3), T=st.integers(1, 5), vocab=st.integers(2, 9), n_layer=st.integers(1, 2),
       n_head=st.integers(1, 2), hs=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_gpt_with_cross_entropy(B, T, vocab, n_layer, n_head, hs, seed):
    rng = np.random.default_rng(seed)
    cfg = nn.GPTConfig(vocab_size=vocab, block_size=5, n_layer=n_layer, n_head=n_head,
                       d_model=n_head * hs, mlp_ratio=2)
    model = perturb(nn.GPT(cfg, rng=rng, dtype=np.float64), rng)
    idx = rng.integers(0, vocab, (B, T))
    targets = rng.integers(0, vocab, (B, T))
    if B * T > 1:
        targets[0, 0] = -100  # one ignored position
    tmodel = gnn.from_numpy(model)
    logits = model.forward(idx)
    loss, dlogits = nn.cross_entropy(logits, targets)
    model.zero_grad()
    assert model.backward(dlogits) is None
    tlogits = tmodel(torch.from_numpy(idx))
    tloss = torch.nn.functional.cross_entropy(tlogits.reshape(-1, vocab), torch.from_numpy(targets).reshape(-1),
                                              ignore_index=-100)
    tloss.backward()
    assert_close(logits, tlogits, "GPT logits")
    assert_close(np.array(loss), tloss, "GPT loss")
    tp = dict(tmodel.named_parameters())
    assert set(tp) == set(model.parameters())
    for n, p in model.parameters().items():
        assert_close(p.grad, tp[n].grad, f"GPT grad of {n}", rtol=1e-9, atol=1e-12)


@given(lead=st.lists(dims, min_size=1, max_size=2), V=st.integers(1, 7), scale=st.sampled_from([1.0, 30.0, 1e3]),
       data=st.data())
def test_cross_entropy(lead, V, scale, data):
    rng = np.random.default_rng(7)
    z = data.draw(arrays(tuple(lead) + (V,), scale=scale))
    t = rng.integers(0, V, tuple(lead))
    ignore = rng.random(t.shape) < 0.3
    ignore.flat[0] = False  # at least one position counts
    t = np.where(ignore, -100, t)
    loss, dz = nn.cross_entropy(z, t)
    zt = torch.tensor(np.array(z), requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt.reshape(-1, V), torch.from_numpy(t).reshape(-1), ignore_index=-100)
    lt.backward()
    assert np.isfinite(loss)
    assert_close(np.array(loss), lt, "cross_entropy loss", rtol=1e-10, atol=1e-12)
    assert_close(dz, zt.grad, "cross_entropy dlogits")
    assert np.all(dz[ignore] == 0)


def test_cross_entropy_module_matches_function():
    rng = np.random.default_rng(8)
    z, t = rng.standard_normal((3, 4)), rng.integers(0, 4, 3)
    ce = nn.CrossEntropyLoss()
    loss = ce.forward(z, t)
    ref_loss, ref_dz = nn.cross_entropy(z, t)
    assert loss == ref_loss
    np.testing.assert_allclose(ce.backward(2.0), 2.0 * ref_dz)
