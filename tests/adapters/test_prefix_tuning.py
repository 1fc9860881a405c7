"""Prefix tuning's own math: the attention with key/value prefixes against a loop-by-loop reference
written here (every query sees every prefix, and only its own past of the input); its backward
(input, weights, and both prefixes) by gradcheck and against torch autograd; prefixes leave the
causal structure alone (a future token changes nothing before it); the MLP re-parameterisation's
gradients by gradcheck, and its parameter count; ``finalize()`` keeps only ``P (L, 2, p, C)``
(``2·L·p·C`` numbers) with the outputs unchanged, in both backends, and training goes on after it;
bad configs and a second inject are named errors. The generic checks (gradcheck of the whole
model, NumPy = torch, merge refused, save/load) are the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters.prefix_tuning import SPEC, prefix_encoder_backward, prefix_encoder_forward
from lowrank_ref.gradcheck import check_gradients, gradcheck
from lowrank_ref.inject import inject
from lowrank_ref.nn.attention import CausalSelfAttention
from lowrank_ref.nn.gpt import GPT, GPTConfig

torch = pytest.importorskip("torch")
from lowrank_gpu.nn.gpt import CausalSelfAttention as TorchAttention  # noqa: E402
from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402

B, T, C, NH, P_LEN = 2, 4, 6, 2, 3
CFG = GPTConfig(vocab_size=9, block_size=8, n_layer=2, n_head=2, d_model=6)
IDX = np.random.default_rng(3).integers(0, 9, (2, 5))


def _attention(seed=0):
    attn = CausalSelfAttention(C, NH, rng=np.random.default_rng(seed), dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for p in attn.parameters().values():
        p.data = rng.standard_normal(p.shape) * 0.5  # away from the zero biases
    return attn


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _reference(attn, x, kv):
    """Per batch row, head and query position, in loops: the keys a query may see are the p
    prefixes and the input's positions s <= t."""
    lin = {n: (attn.parameters()[f"{n}.weight"].data, attn.parameters()[f"{n}.bias"].data) for n in "qkvo"}
    hs = C // NH
    out = np.zeros((B, T, C))
    for b in range(B):
        q, k, v = ((x[b] @ W.T + bias) for W, bias in (lin["q"], lin["k"], lin["v"]))  # (T, C)
        y = np.zeros((T, C))
        for h in range(NH):
            cols = slice(h * hs, (h + 1) * hs)
            for t in range(T):
                keys = np.concatenate([kv[0][:, cols], k[: t + 1, cols]])  # p prefixes, then s <= t
                vals = np.concatenate([kv[1][:, cols], v[: t + 1, cols]])
                w = _softmax(keys @ q[t, cols] / np.sqrt(hs))
                y[t, cols] = w @ vals
        out[b] = y @ lin["o"][0].T + lin["o"][1]
    return out


def test_attention_with_prefixes_matches_a_loop_reference():
    attn = _attention()
    rng = np.random.default_rng(4)
    x, kv = rng.standard_normal((B, T, C)), rng.standard_normal((2, P_LEN, C))
    attn.kv_prefix = kv
    assert_close(attn.forward(x), _reference(attn, x, kv), "attention with prefixes")


def test_the_attention_backward_with_prefixes_passes_gradcheck():
    attn = _attention()
    rng = np.random.default_rng(5)
    x, kv = rng.standard_normal((B, T, C)), rng.standard_normal((2, P_LEN, C))
    attn.kv_prefix = kv
    gradcheck(attn, x).raise_if_failed()  # the input and the four projections
    w = rng.standard_normal((B, T, C))
    attn.forward(x)
    attn.backward(w)

    def loss():
        y = attn.forward(x)
        attn._cache = None
        for _, m in attn.named_modules():
            m._cache = None
        return float(np.sum(y * w))

    check_gradients(loss, {"kv_prefix": kv}, {"kv_prefix": attn.kv_prefix_grad}).raise_if_failed()


def test_the_attention_with_prefixes_matches_torch_autograd():
    attn = _attention()
    rng = np.random.default_rng(6)
    x, kv, w = rng.standard_normal((B, T, C)), rng.standard_normal((2, P_LEN, C)), rng.standard_normal((B, T, C))
    t_attn = TorchAttention(C, NH, dtype=torch.float64)
    with torch.no_grad():
        for n, p in t_attn.named_parameters():
            p.copy_(torch.from_numpy(attn.parameters()[n].data))
    attn.kv_prefix = kv
    y = attn.forward(x)
    attn.zero_grad()
    dx = attn.backward(w)
    xt = torch.from_numpy(x).requires_grad_(True)
    kvt = torch.from_numpy(kv).requires_grad_(True)
    t_attn.kv_prefix = kvt
    yt = t_attn(xt)
    (yt * torch.from_numpy(w)).sum().backward()
    assert_close(y, yt.detach().numpy(), "y")
    assert_close(dx, xt.grad.numpy(), "x̄")
    assert_close(attn.kv_prefix_grad, kvt.grad.numpy(), "(P̄_k, P̄_v)")
    for n, p in t_attn.named_parameters():
        assert_close(attn.parameters()[n].grad, p.grad.numpy(), f"{n} grad")


def test_prefixes_keep_the_model_causal_and_reach_every_position():
    model = GPT(CFG, rng=np.random.default_rng(0), dtype=np.float64)
    base = model.forward(IDX)
    inject(model, lr.PrefixTuningConfig(k=2, hidden=4), rng=0)
    y = model.forward(IDX)
    assert np.all(np.abs(y - base).max(axis=-1) > 0)  # every position of every row sees the prefixes
    later = IDX.copy()
    later[:, -1] = (later[:, -1] + 1) % 9  # change the last token only
    np.testing.assert_array_equal(model.forward(later)[:, :-1], y[:, :-1])  # nothing before it moves


@pytest.mark.parametrize("projection", [True, False])
def test_a_two_layer_gpt_with_prefixes_passes_gradcheck(projection):
    model = GPT(CFG, rng=np.random.default_rng(0), dtype=np.float64)
    inject(model, lr.PrefixTuningConfig(k=2, hidden=3, projection=projection), rng=0)
    rng = np.random.default_rng(1)
    for p in model.trainable_parameters().values():
        p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    assert set(model.trainable_parameters()) == (
        {f"prefix.{n}" for n in ("E", "W1", "b1", "W2", "b2")} if projection else {"prefix.P"})
    gradcheck(model, IDX).raise_if_failed()


def test_the_encoder_backward_passes_gradcheck():
    rng = np.random.default_rng(2)
    L, p, h = 3, 2, 4
    params = {"E": rng.standard_normal((p, C)), "W1": rng.standard_normal((h, C)), "b1": rng.standard_normal(h),
              "W2": rng.standard_normal((2 * L * C, h)), "b2": rng.standard_normal(2 * L * C)}
    w = rng.standard_normal((L, 2, p, C))
    out, cache = prefix_encoder_forward(params, L)
    assert out.shape == (L, 2, p, C)
    grads = prefix_encoder_backward(w, cache)
    check_gradients(lambda: float(np.sum(prefix_encoder_forward(params, L)[0] * w)), params, grads).raise_if_failed()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_finalize_keeps_only_the_prefixes_and_the_outputs(backend):
    np_model = GPT(CFG, rng=np.random.default_rng(0), dtype=np.float64)
    model = np_model if backend == "numpy" else from_numpy(np_model)
    k, h, L, C_ = 3, 5, CFG.n_layer, CFG.d_model
    res = inject(model, lr.PrefixTuningConfig(k=k, hidden=h), rng=0)
    assert res.trainable_params == k * C_ + h * C_ + h + 2 * L * C_ * h + 2 * L * C_  # E, W1, b1, W2, b2

    def run():
        if backend == "numpy":
            return model.forward(IDX)
        with torch.no_grad():
            return model(torch.from_numpy(IDX)).numpy()

    before = run()
    lr.adapters.prefix_tuning.finalize(model)
    assert not model.prefix.projection
    params = dict(model.named_parameters()) if backend == "torch" else model.parameters()
    trained = sorted(n for n, p in params.items() if (p.requires_grad if backend == "torch" else p.trainable))
    assert trained == ["prefix.P"]
    assert tuple(params["prefix.P"].shape) == (L, 2, k, C_)  # 2·L·p·C numbers, the paper's count
    assert_close(run(), before, "outputs after finalize", rtol=1e-12, atol=1e-13)
    lr.adapters.prefix_tuning.finalize(model)  # a no-op now
    # training goes on after finalize: P gets a gradient
    if backend == "numpy":
        model.forward(IDX)
        model.backward(np.ones((*IDX.shape, CFG.vocab_size)))
        assert model.prefix.P.grad is not None and np.any(model.prefix.P.grad != 0)
    else:
        model(torch.from_numpy(IDX)).sum().backward()
        assert model.prefix.P.grad is not None and bool((model.prefix.P.grad != 0).any())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_prefix_tuning_takes_no_positions(backend):
    np_model = GPT(CFG, rng=np.random.default_rng(0), dtype=np.float64)
    model = np_model if backend == "numpy" else from_numpy(np_model)
    inject(model, lr.PrefixTuningConfig(k=4), rng=0)
    assert model.max_input_length == CFG.block_size
    full = np.zeros((1, CFG.block_size), dtype=np.int64)
    out = model.forward(full) if backend == "numpy" else model(torch.from_numpy(full))
    assert tuple(out.shape) == (1, CFG.block_size, CFG.vocab_size)


def test_bad_configs_and_a_second_inject():
    for bad, err in ((dict(k=0), ValueError), (dict(hidden=0), ValueError), (dict(projection=1), TypeError),
                     (dict(init_std=0.0), ValueError)):
        with pytest.raises(err):
            lr.PrefixTuningConfig(**bad)
    for backend in ("numpy", "torch"):
        np_model = GPT(CFG, rng=np.random.default_rng(0), dtype=np.float64)
        model = np_model if backend == "numpy" else from_numpy(np_model)
        inject(model, lr.PrefixTuningConfig(k=2), rng=0)
        with pytest.raises(ValueError, match="already has a 'prefix'"):
            inject(model, lr.PrefixTuningConfig(k=2), rng=0)
        with pytest.raises(ValueError, match="already has a 'prefix'"):
            inject(model, lr.PromptTuningConfig(k=2), rng=0)
    with pytest.raises(ValueError, match="needs a GPT"):
        inject(lr.nn.Linear(3, 3), lr.PrefixTuningConfig(k=2))


def test_the_compare_row_uses_no_linear_targets():
    row = SPEC.compare["prefix_tuning"]
    assert row.targets == () and row.config.projection and not SPEC.mergeable and not SPEC.is_layer


def test_one_head_with_prefixes_mixes_the_prefix_values_and_the_plain_attention():
    # chapter 09 §5.1: Y_t = λ_t Y_t^prefix + (1 − λ_t) Y_t^plain with λ_t the softmax mass on the
    # prefixes; o is affine, so the same mixture holds after it (one head: λ is one number per t)
    attn = CausalSelfAttention(C, 1, rng=np.random.default_rng(0), dtype=np.float64)
    rng = np.random.default_rng(9)
    for p in attn.parameters().values():
        p.data = rng.standard_normal(p.shape) * 0.5
    x, kv = rng.standard_normal((B, T, C)), rng.standard_normal((2, P_LEN, C))
    attn.kv_prefix = None
    plain = attn.forward(x)
    attn._cache = None
    attn.kv_prefix = kv
    mixed = attn.forward(x)
    attn._cache = None
    prm = attn.parameters()
    q = x @ prm["q.weight"].data.T + prm["q.bias"].data  # (B, T, C)
    k = x @ prm["k.weight"].data.T + prm["k.bias"].data
    s_pre = q @ kv[0].T / np.sqrt(C)  # (B, T, p)
    s_own = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, q @ k.transpose(0, 2, 1) / np.sqrt(C))
    m = np.maximum(s_pre.max(-1), s_own.max(-1))[..., None]
    e_pre, e_own = np.exp(s_pre - m).sum(-1), np.exp(s_own - m).sum(-1)
    lam = (e_pre / (e_pre + e_own))[..., None]  # (B, T, 1)
    a_pre = np.exp(s_pre - s_pre.max(-1, keepdims=True))
    a_pre /= a_pre.sum(-1, keepdims=True)
    prefix_only = (a_pre @ kv[1]) @ prm["o.weight"].data.T + prm["o.bias"].data  # attention to the prefixes alone
    assert np.all((lam > 0) & (lam < 1))  # no prefix is ever invisible, none takes all the mass
    assert_close(mixed, lam * prefix_only + (1 - lam) * plain, "λ-mixture")
