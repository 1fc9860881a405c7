"""Central differences (lowrank_ref.gradcheck, float64, every entry) for every layer's input and
every trainable parameter, and for the small GPT end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nn_strategies import arrays, perturb

import lowrank_ref.nn as nn
from lowrank_ref.gradcheck import check_gradients, gradcheck


def _assert_full_report(report, module, with_input=True):
    names = {r.name for r in report.results}
    expected = set(module.trainable_parameters()) | ({"input"} if with_input else set())
    assert names == expected, f"checked {sorted(names)}, expected {sorted(expected)}"
    assert report.ok, "\n" + str(report)


@settings(max_examples=8)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), data=st.data())
def test_linear_gradcheck(lead, n_in, n_out, data):
    layer = nn.Linear(n_in, n_out, rng=np.random.default_rng(0), dtype=np.float64)
    x = data.draw(arrays(tuple(lead) + (n_in,)))
    _assert_full_report(gradcheck(layer, x), layer)


@settings(max_examples=8)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), d=st.integers(2, 6), data=st.data())
def test_layernorm_gradcheck(lead, d, data):
    ln = perturb(nn.LayerNorm(d, dtype=np.float64), np.random.default_rng(1))
    x = data.draw(arrays(tuple(lead) + (d,), scale=2.0))
    _assert_full_report(gradcheck(ln, x), ln)


@settings(max_examples=8)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_gelu_gradcheck(lead, data):
    x = data.draw(arrays(tuple(lead), scale=3.0))
    _assert_full_report(gradcheck(nn.GELU(), x), nn.GELU())


def test_embedding_gradcheck_with_repeated_ids():
    emb = nn.Embedding(4, 3, rng=np.random.default_rng(2), dtype=np.float64)
    idx = np.array([[0, 2, 2], [3, 0, 2]])  # ids 0 and 2 repeat; id 1 is never used
    report = gradcheck(emb, idx)  # integer input: only the table is checked
    _assert_full_report(report, emb, with_input=False)
    np.testing.assert_array_equal(emb.weight.grad[1], 0.0)


@settings(max_examples=6)
@given(B=st.integers(1, 2), T=st.integers(1, 4), n_head=st.integers(1, 2), hs=st.integers(1, 3), data=st.data())
def test_attention_gradcheck(B, T, n_head, hs, data):
    rng = np.random.default_rng(3)
    attn = perturb(nn.CausalSelfAttention(n_head * hs, n_head, rng=rng, dtype=np.float64), rng)
    x = data.draw(arrays((B, T, n_head * hs)))
    _assert_full_report(gradcheck(attn, x), attn)


def test_mlp_and_block_gradcheck():
    rng = np.random.default_rng(4)
    mlp = perturb(nn.MLP(3, 5, rng=rng, dtype=np.float64), rng)
    _assert_full_report(gradcheck(mlp, rng.standard_normal((2, 3))), mlp)
    block = perturb(nn.Block(4, 2, mlp_ratio=2, rng=rng, dtype=np.float64), rng)
    _assert_full_report(gradcheck(block, rng.standard_normal((2, 3, 4))), block)


def test_block_with_dropout_in_eval_gradcheck():
    rng = np.random.default_rng(5)
    block = perturb(nn.Block(4, 2, mlp_ratio=1, dropout=0.5, rng=rng, dtype=np.float64), rng).eval()
    _assert_full_report(gradcheck(block, rng.standard_normal((1, 3, 4))), block)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_gpt_end_to_end_gradcheck(n_layer):
    rng = np.random.default_rng(6)
    cfg = nn.GPTConfig(vocab_size=5, block_size=4, n_layer=n_layer, n_head=2, d_model=4, mlp_ratio=1)
    model = perturb(nn.GPT(cfg, rng=rng, dtype=np.float64), rng)
    idx = np.array([[0, 3, 3, 1], [4, 4, 0, 2]])
    _assert_full_report(gradcheck(model, idx), model, with_input=False)


def test_gpt_through_cross_entropy_gradcheck():
    """The loss a training step uses: mean cross-entropy of the GPT's logits, with one ignored target."""
    rng = np.random.default_rng(7)
    cfg = nn.GPTConfig(vocab_size=5, block_size=3, n_layer=1, n_head=1, d_model=3, mlp_ratio=1)
    model = perturb(nn.GPT(cfg, rng=rng, dtype=np.float64), rng)
    idx, targets = np.array([[1, 2, 0]]), np.array([[2, -100, 4]])
    model.zero_grad()
    _, dlogits = nn.cross_entropy(model.forward(idx), targets)
    model.backward(dlogits)
    params = model.trainable_parameters()

    def loss():
        value = nn.cross_entropy(model.forward(idx), targets)[0]
        for _, m in model.named_modules():
            m._cache = None
        return value

    report = check_gradients(loss, {n: p.data for n, p in params.items()}, {n: p.grad for n, p in params.items()})
    assert report.ok, "\n" + str(report)


@settings(max_examples=8)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), V=st.integers(1, 5), data=st.data())
def test_cross_entropy_gradcheck(lead, V, data):
    z = data.draw(arrays(tuple(lead) + (V,), scale=2.0))
    z = np.ascontiguousarray(z)
    t = np.random.default_rng(8).integers(0, V, tuple(lead))
    _, dz = nn.cross_entropy(z, t)
    report = check_gradients(lambda: nn.cross_entropy(z, t)[0], {"logits": z}, {"logits": dz})
    assert report.ok, "\n" + str(report)
