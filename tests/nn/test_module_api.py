"""The Module contract: names, trainable/frozen, gradient accumulation, train/eval, state dicts,
dtypes, and the errors for bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from nn_strategies import perturb

import lowrank_ref.nn as nn


def tiny_gpt(dtype=np.float64, dropout=0.0, seed=0, n_layer=2):
    cfg = nn.GPTConfig(vocab_size=7, block_size=6, n_layer=n_layer, n_head=2, d_model=4, mlp_ratio=2,
                       dropout=dropout)
    return nn.GPT(cfg, rng=np.random.default_rng(seed), dtype=dtype)


def expected_gpt_names(n_layer):
    names = ["tok_emb.weight", "pos_emb.weight"]
    for i in range(n_layer):
        b = f"blocks.{i}."
        names += [b + "ln1.weight", b + "ln1.bias"]
        names += [b + f"attn.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")]
        names += [b + "ln2.weight", b + "ln2.bias"]
        names += [b + f"mlp.{p}.{w}" for p in ("fc", "proj") for w in ("weight", "bias")]
    return names + ["ln_f.weight", "ln_f.bias", "head.weight"]


def test_gpt_parameter_names_in_order():
    assert list(tiny_gpt().parameters()) == expected_gpt_names(2)


def test_gpt_parameter_shapes_and_count():
    m = tiny_gpt()
    p = m.parameters()
    assert p["tok_emb.weight"].shape == (7, 4) and p["pos_emb.weight"].shape == (6, 4)
    assert p["blocks.1.mlp.fc.weight"].shape == (8, 4) and p["blocks.1.mlp.proj.weight"].shape == (4, 8)
    assert p["head.weight"].shape == (7, 4)
    # by hand: embeddings 28 + 24; per block 2*(4+4) LN + 4*(16+4) attn + (32+8) + (32+4) mlp = 172
    assert m.num_parameters() == 28 + 24 + 2 * 172 + 8 + 28


def test_frozen_parameters_get_none_and_trainable_get_gradients(rng):
    m = tiny_gpt()
    m.requires_grad_(False)
    m.head.weight.trainable = True
    m.blocks[0].attn.q.requires_grad_(True)
    assert set(m.trainable_parameters()) == {"head.weight", "blocks.0.attn.q.weight", "blocks.0.attn.q.bias"}
    m.backward(rng.standard_normal(m.forward(rng.integers(0, 7, (2, 5))).shape))
    for name, p in m.parameters().items():
        if name in m.trainable_parameters():
            assert p.grad is not None and np.any(p.grad != 0), name
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
    assert m.num_trainable_parameters() == 28 + 16 + 4


def test_gradients_accumulate_and_zero_grad_clears(rng):
    m = tiny_gpt()
    idx = rng.integers(0, 7, (2, 5))
    dy = rng.standard_normal((2, 5, 7))
    m.forward(idx)
    m.backward(dy)
    once = {n: p.grad.copy() for n, p in m.parameters().items()}
    m.forward(idx)
    m.backward(dy)
    for n, p in m.parameters().items():
        np.testing.assert_allclose(p.grad, 2 * once[n], rtol=1e-12, atol=1e-15, err_msg=n)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters().values())


def test_backward_before_forward_raises(rng):
    layers = [nn.Linear(2, 2), nn.Embedding(3, 2), nn.LayerNorm(2), nn.GELU(), nn.Dropout(0.1),
              nn.CausalSelfAttention(2, 1), nn.Block(2, 1), tiny_gpt(), nn.CrossEntropyLoss()]
    for layer in layers:
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.zeros((1, 1, 2)))


def test_backward_twice_for_one_forward_raises(rng):
    m = tiny_gpt()
    m.backward(rng.standard_normal(m.forward(np.array([[1, 2]])).shape))
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward(np.zeros((1, 2, 7)))


def test_train_eval_switches_dropout_and_nothing_else(rng):
    m = tiny_gpt(dropout=0.5)
    plain = tiny_gpt(dropout=0.0)
    plain.load_state_dict(m.state_dict())
    before = m.state_dict()
    idx = rng.integers(0, 7, (3, 6))
    m.eval()
    assert all(not mod.training for _, mod in m.named_modules())
    y1, y2 = m.forward(idx), m.forward(idx)
    np.testing.assert_array_equal(y1, y2)  # no dropout in eval
    np.testing.assert_array_equal(y1, plain.forward(idx))  # eval == the dropout-free model
    m.train()
    assert all(mod.training for _, mod in m.named_modules())
    assert not np.allclose(m.forward(idx), y1)  # dropout is on in training
    for n, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)


def test_dropout_train_backward_uses_the_forward_mask(rng):
    d = nn.Dropout(0.4, rng=np.random.default_rng(3))
    x = rng.uniform(0.5, 1.5, (50, 40))  # nonzero, so y / x recovers the mask
    y = d.forward(x)
    keep = y / x
    assert set(np.unique(np.round(keep, 12))) == {0.0, round(1 / 0.6, 12)}
    assert 0.3 < np.mean(keep == 0) < 0.5
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(d.backward(dy), dy * keep, rtol=1e-12)


def test_load_state_dict_checks_everything_before_changing_anything():
    m = tiny_gpt()
    before = m.state_dict()
    bad = {n: v + 1 for n, v in before.items()}
    bad["head.weight"] = np.zeros((3, 3))  # last in order: everything before it must stay untouched
    with pytest.raises(ValueError, match="head.weight"):
        m.load_state_dict(bad)
    missing = {n: v for n, v in before.items() if n != "ln_f.bias"}
    with pytest.raises(ValueError, match="ln_f.bias"):
        m.load_state_dict(missing)
    extra = {**before, "blocks.9.attn.q.weight": np.zeros((4, 4))}
    with pytest.raises(ValueError, match="blocks.9"):
        m.load_state_dict(extra)
    for n, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)
    other = tiny_gpt(seed=1)
    m.load_state_dict(other.state_dict())
    for n, v in m.state_dict().items():
        np.testing.assert_array_equal(v, other.state_dict()[n], err_msg=n)


def test_dtype_propagation_and_astype(rng):
    m32 = tiny_gpt(dtype=np.float32)
    idx = rng.integers(0, 7, (2, 4))
    assert all(p.data.dtype == np.float32 for p in m32.parameters().values())
    y = m32.forward(idx)
    assert y.dtype == np.float32
    m32.backward(np.ones_like(y))
    assert all(p.grad.dtype == np.float32 for p in m32.parameters().values())
    m64 = tiny_gpt(dtype=np.float32).astype(np.float64)
    assert m64.forward(idx).dtype == np.float64
    np.testing.assert_allclose(m64.forward(idx), y, rtol=1e-4, atol=1e-6)
    for layer, shape in ((nn.Linear(3, 2), (2, 3)), (nn.LayerNorm(3), (2, 3)), (nn.GELU(), (2, 3)),
                         (nn.CausalSelfAttention(4, 2), (1, 2, 4)), (nn.MLP(3, 4), (2, 3))):
        assert layer.forward(np.ones(shape, np.float32)).dtype == np.float32, type(layer).__name__
        layer.astype(np.float64)
        out = layer.forward(np.ones(shape))
        assert out.dtype == np.float64, type(layer).__name__
        assert layer.backward(np.ones_like(out)).dtype == np.float64, type(layer).__name__
    assert nn.Embedding(3, 2).forward(np.array([0, 2])).dtype == np.float32
    assert nn.Embedding(3, 2, dtype=np.float64).forward(np.array([0, 2])).dtype == np.float64


def test_linear_bad_inputs():
    W = np.ones((3, 2))
    with pytest.raises(ValueError, match="2-D"):
        nn.Linear.from_arrays(np.ones(3))
    with pytest.raises(ValueError, match="bias must have shape"):
        nn.Linear.from_arrays(W, np.ones(2))
    with pytest.raises(ValueError, match="weight must be finite"):
        nn.Linear.from_arrays(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="weight must be finite"):
        nn.Linear.from_arrays(np.array([[1.0, np.inf]]))
    with pytest.raises(TypeError, match="weight must be a floating"):
        nn.Linear.from_arrays(np.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="in_features"):
        nn.Linear(0, 3)
    layer = nn.Linear.from_arrays(W)
    with pytest.raises(ValueError, match="last dimension 2"):
        layer.forward(np.ones((4, 3)))
    with pytest.raises(TypeError, match="floating"):
        layer.forward(np.ones((4, 2), dtype=np.int32))


def test_other_layers_bad_inputs():
    with pytest.raises(ValueError, match="must divide"):
        nn.CausalSelfAttention(6, 4)
    with pytest.raises(ValueError, match=r"\(B, T, 4\)"):
        nn.CausalSelfAttention(4, 2).forward(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="last dimension 3"):
        nn.LayerNorm(3).forward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="eps"):
        nn.LayerNorm(3, eps=0.0)
    with pytest.raises(TypeError, match="integer"):
        nn.Embedding(3, 2).forward(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        nn.Embedding(3, 2).forward(np.array([0, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        nn.Embedding(3, 2).forward(np.array([-1]))
    with pytest.raises(TypeError, match="floating"):
        nn.GELU().forward(np.array([1, 2]))
    with pytest.raises(ValueError, match="dropout p"):
        nn.Dropout(1.0)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"n_head": 3}, ValueError, "must divide"),
    ({"d_model": 0}, ValueError, "d_model"),
    ({"n_layer": -1}, ValueError, "n_layer"),
    ({"vocab_size": 2.5}, TypeError, "vocab_size"),
    ({"block_size": True}, TypeError, "block_size"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": "0.1"}, TypeError, "dropout"),
])
def test_gpt_config_validation(kwargs, exc, match):
    base = {"vocab_size": 5, "block_size": 4, "n_layer": 1, "n_head": 2, "d_model": 4}
    with pytest.raises(exc, match=match):
        nn.GPTConfig(**{**base, **kwargs})


def test_gpt_config_is_frozen():
    cfg = nn.GPTConfig(vocab_size=5, block_size=4)
    with pytest.raises(AttributeError):
        cfg.n_layer = 3


def test_gpt_bad_inputs(rng):
    m = tiny_gpt()
    with pytest.raises(ValueError, match="block_size=6"):
        m.forward(np.zeros((1, 7), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m.forward(np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        m.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        m.forward(np.array([[1, 7]]))
    with pytest.raises(TypeError, match="GPTConfig"):
        nn.GPT({"vocab_size": 3})
    m.forward(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="dlogits must have shape"):
        m.backward(np.zeros((1, 3, 6)))


def test_cross_entropy_bad_inputs():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        nn.cross_entropy(z, np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(TypeError, match="targets must be an integer"):
        nn.cross_entropy(z, np.zeros(2))
    with pytest.raises(TypeError, match="logits must be a floating"):
        nn.cross_entropy(np.zeros((2, 3), dtype=np.int64), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        nn.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        nn.cross_entropy(z, np.array([-100, -100]))


def test_perturbed_modules_are_not_at_init():
    """A guard for the test helper itself: ``perturb`` moves LayerNorm away from γ=1, β=0."""
    ln = perturb(nn.LayerNorm(3, dtype=np.float64), np.random.default_rng(0))
    assert not np.allclose(ln.weight.data, 1.0) and not np.allclose(ln.bias.data, 0.0)
