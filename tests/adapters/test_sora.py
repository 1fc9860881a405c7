"""SoRA's own math: ΔW = s B diag(g) A written out; the pure functions' gradients (A, g, B, x) with a
dropout mask; the proximal step is the true soft-threshold T_ξ (the prox of ξ|x|, found here by
brute force) with ξ = η_t λ, unlike the reference code's masks (zero below 2ξ, no lr), in both
training loops; pruning the zero gates gives a smaller LoRA with identical outputs, both backends;
a negative λ is an error. The generic life cycle is the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref import data
from lowrank_ref.adapters import LoRALinear, SoRALinear
from lowrank_ref.adapters.sora import (
    SoRAHooks,
    lambda_sweep,
    reference_threshold,
    soft_threshold,
    sora_backward,
    sora_forward,
)
from lowrank_ref.gradcheck import check_gradients
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.train import train


def make_layer(rng, r=5, out=4, inn=6, lam=0.1):
    W, b = rng.standard_normal((out, inn)), rng.standard_normal(out)
    layer = SoRALinear(lr.nn.Linear.from_arrays(W, b), lr.SoRAConfig(r=r, alpha=2.0, lam=lam), rng=1)
    layer.B.data = rng.standard_normal(layer.B.shape)
    layer.A.data = rng.standard_normal(layer.A.shape)
    return layer, W, b


def test_delta_weight_is_s_B_diag_g_A_and_the_gradients_hold_with_dropout():
    rng = np.random.default_rng(0)
    layer, W, b = make_layer(rng)
    A, g, B = layer.A.data, layer.g.data, layer.B.data
    assert_close(layer.delta_weight(), (2.0 / 5) * B @ np.diag(g) @ A, "ΔW = s B diag(g) A")
    x, w = rng.standard_normal((7, 6)), rng.standard_normal((7, 4))
    mask = (rng.random(x.shape) > 0.3) / 0.7
    params = {"W": W, "b": b, "A": A, "g": g, "B": B}
    y, cache = sora_forward(x, params, layer.config, mask=mask)
    assert_close(y, x @ W.T + b + (2.0 / 5) * (x * mask) @ (B @ np.diag(g) @ A).T, "y")
    dx, grads = sora_backward(w, cache)
    assert grads["W"] is None and grads["b"] is None
    report = check_gradients(lambda: float(np.sum(sora_forward(x, params, layer.config, mask=mask)[0] * w)),
                             {"x": x, "A": A, "g": g, "B": B},
                             {"x": dx, "A": grads["A"], "g": grads["g"], "B": grads["B"]})
    assert report.ok, str(report)


def test_the_layer_starts_as_the_base():
    rng = np.random.default_rng(1)
    W, b = rng.standard_normal((4, 6)), rng.standard_normal(4)
    layer = SoRALinear(lr.nn.Linear.from_arrays(W, b), lr.SoRAConfig(r=3), rng=0)
    x = rng.standard_normal((2, 6))
    assert np.all(layer.B.data == 0) and np.all(layer.g.data != 0)
    assert_close(layer.forward(x), x @ W.T + b, "B = 0: the base")


# --- the proximal step ------------------------------------------------------------------------
def test_soft_threshold_is_the_prox_of_the_l1_norm_and_the_reference_masks_are_not():
    xi = 0.3
    x = np.array([-1.0, -0.5, -0.45, -0.3, -0.1, 0.0, 0.2, 0.31, 0.45, 0.59, 0.61, 2.0])
    # prox_{ξ|·|}(x) = argmin_z ½(z − x)² + ξ|z|, by brute force on a fine grid
    z = np.linspace(-3, 3, 600001)
    brute = np.array([z[np.argmin(0.5 * (z - v) ** 2 + xi * np.abs(z))] for v in x])
    assert_close(soft_threshold(x, xi), brute, "T_ξ vs argmin", atol=2e-5)
    ref = reference_threshold(x, xi)
    band = (np.abs(x) > xi) & (np.abs(x) < 2 * xi)  # (ξ, 2ξ): the reference zeroes these
    assert band.sum() == 5  # -0.5, -0.45, 0.31, 0.45, 0.59
    assert np.all(ref[band] == 0) and np.all(soft_threshold(x, xi)[band] != 0)
    edge = np.abs(x) == xi  # |x| = ξ exactly: no mask applies, the reference leaves it as it is
    assert_close(ref[edge], x[edge], "the reference at |x| = ξ")
    rest = ~band & ~edge
    assert_close(ref[rest], soft_threshold(x, xi)[rest], "the same for |x| < ξ and |x| ≥ 2ξ")


def tiny_gpt():
    cfg = GPTConfig(vocab_size=data.default_tokenizer().vocab_size, block_size=8, n_layer=1, n_head=2,
                    d_model=8, mlp_ratio=2)
    return GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)


def _one_step(backend, lam, lr_=0.05):
    model = tiny_gpt()
    if backend == "torch":
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, lr.SoRAConfig(r=6, alpha=4, lam=lam), targets=("q", "v"), rng=0)
    layers = {"q": model.blocks[0].attn.q, "v": model.blocks[0].attn.v}
    for i, layer in enumerate(layers.values()):  # the same gates in both backends, some small
        state = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in layer.adapter_state().items()}
        state["g"] = np.array([0.02, -0.04, 0.5, -0.9, 0.06, 1.3]) * (i + 1)
        layer.load_adapter_state(state)
    train(model, data.builtin_task(0).dialect_train, steps=1, lr=lr_, batch_size=2, optimizer="sgd", momentum=0.0,
          clip=None, progress=False, rng=0)
    return {n: np.array(layer.g.detach().numpy() if hasattr(layer.g, "detach") else layer.g.data)
            for n, layer in layers.items()}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_after_each_step_the_gates_are_soft_thresholded_with_xi_lr_times_lambda(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    lam, lr_ = 0.8, 0.05
    plain = _one_step(backend, 0.0, lr_)  # λ = 0: the optimizer's step alone (T_0 is the identity)
    sparse = _one_step(backend, lam, lr_)  # the same step, then g ← T_ξ(g), ξ = η λ = 0.04
    for n in plain:
        assert_close(sparse[n], soft_threshold(plain[n], lr_ * lam), f"{n}: T_(ηλ)")
        assert not np.allclose(sparse[n], reference_threshold(plain[n], lam))  # not the reference's ξ = λ
    assert (sparse["q"] == 0).sum() >= 1  # small gates were cut


def test_the_hooks_need_the_learning_rate():
    rng = np.random.default_rng(0)
    hooks = SoRAHooks(None, {"l": make_layer(rng)[0]})
    with pytest.raises(ValueError, match="learning rate"):
        hooks.after_step(0)
    hooks.lr = 1.0
    hooks.after_step(0)
    assert hooks.gate_history[-1]["l"] == hooks.layers["l"].active_rank


# --- pruning -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("zeros", [[1, 3], [], [0, 1, 2, 3, 4]])
def test_pruning_the_zero_gates_gives_a_smaller_lora_with_identical_outputs(backend, zeros):
    rng = np.random.default_rng(len(zeros))
    layer, W, b = make_layer(rng)
    layer.g.data[zeros] = 0.0
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from lowrank_gpu.adapters import LoRALinear as TorchLoRA

        tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), layer.config, backend="torch")
        tl.load_adapter_state(layer.adapter_state())
        pruned = tl.prune()
        assert isinstance(pruned, TorchLoRA)
        x = torch.from_numpy(rng.standard_normal((3, 2, 6)))
        with torch.no_grad():
            mine, theirs = pruned(x).numpy(), tl(x).numpy()
        A = pruned.A.detach().numpy()
    else:
        pruned = layer.prune()
        assert isinstance(pruned, LoRALinear)
        x = rng.standard_normal((3, 2, 6))
        mine, theirs = pruned.forward(x), layer.forward(x)
        A = pruned.A.data
    kept = 5 - len(zeros)
    assert pruned.r == max(1, kept) and A.shape == (max(1, kept), 6)
    assert pruned.scaling == pytest.approx(layer.scaling)  # s is kept: α' = s r'
    assert_close(mine, theirs, "pruned LoRA vs SoRA")
    if kept:
        assert_close(A, layer.A.data[[i for i in range(5) if i not in zeros]], "A' = A[keep]")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_prune_model_swaps_every_sora_layer_for_its_lora_and_keeps_the_logits(backend):
    from lowrank_ref.adapters.sora import prune_model

    model = tiny_gpt()
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, lr.SoRAConfig(r=4, alpha=4), targets=("q", "v"), rng=0)
    rng = np.random.default_rng(3)
    for layer in (model.blocks[0].attn.q, model.blocks[0].attn.v):
        state = {k: np.array(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in layer.adapter_state().items()}
        state["B"] = rng.standard_normal(state["B"].shape)
        state["g"][[0, 2]] = 0.0
        layer.load_adapter_state(state)
    idx = rng.integers(0, model.config.vocab_size, (2, 8))
    if backend == "torch":
        with torch.no_grad():
            before = model(torch.from_numpy(idx)).numpy()
            kept = prune_model(model)
            after = model(torch.from_numpy(idx)).numpy()
    else:
        before = model.forward(idx)
        kept = prune_model(model)
        after = model.forward(idx)
        model._cache = None
    assert kept == {"blocks.0.attn.q": 2, "blocks.0.attn.v": 2}
    assert type(model.blocks[0].attn.q).__name__ == "LoRALinear" and model.blocks[0].attn.q.r == 2
    assert_close(after, before, "logits after pruning", rtol=1e-9, atol=1e-10)


def test_prune_refuses_a_merged_layer():
    layer, _, _ = make_layer(np.random.default_rng(0))
    layer.merge()
    with pytest.raises(ValueError, match="while merged"):
        layer.prune()


# --- bad input ------------------------------------------------------------------------------
def test_a_negative_or_non_number_lambda_is_a_clear_error():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam must be finite and non-negative"):
            lr.SoRAConfig(lam=bad)
    for bad in ("0.1", None, True):
        with pytest.raises(TypeError, match="lam must be"):
            lr.SoRAConfig(lam=bad)


def test_the_lambda_sweep():
    assert_close(lambda_sweep(0.0, 1.0, 5), np.array([0, 0.25, 0.5, 0.75, 1.0]), "linear")
    assert_close(lambda_sweep(1e-3, 1e-1, 3, "log"), np.array([1e-3, 1e-2, 1e-1]), "log")
    with pytest.raises(ValueError, match="lam_start"):
        lambda_sweep(-1.0, 1.0, 3)
    with pytest.raises(ValueError, match="stages"):
        lambda_sweep(0.0, 1.0, 0)
    with pytest.raises(ValueError, match="log sweep"):
        lambda_sweep(0.0, 1.0, 3, "log")


# --- sparse factors (density < 1) ------------------------------------------------------------
def test_magnitude_mask_keeps_the_largest_entries():
    from lowrank_ref.adapters.sora import magnitude_mask

    a = np.array([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    np.testing.assert_array_equal(magnitude_mask(a, 0.5), [[False, True, True], [True, False, False]])
    assert magnitude_mask(a, 1e-9).sum() == 1 and magnitude_mask(a, 1.0).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_factor_masks_reach_the_density_after_the_warmup_and_stay_fixed(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    from lowrank_ref.inject import adapter_layers

    model = tiny_gpt()
    if backend == "torch":
        from lowrank_gpu.inject import adapter_layers  # noqa: F811
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, lr.SoRAConfig(r=4, alpha=8, lam=0.0, density=0.25, density_warmup=2), targets=("q", "v"),
           rng=np.random.default_rng(0))
    layers = adapter_layers(model)
    tokens = data.builtin_task(0).dialect_train

    def arrays():
        return {n: {k: np.array(getattr(m, k).detach().numpy() if backend == "torch" else getattr(m, k).data)
                    for k in ("A", "B")} for n, m in layers.items()}

    train(model, tokens, steps=1, lr=1e-2, batch_size=2, progress=False, rng=0)
    assert all(m.factor_masks is None and m.factor_density > 0.5 for m in layers.values())  # still dense
    train(model, tokens, steps=2, lr=1e-2, batch_size=2, progress=False, rng=1)  # a new loop: steps 0, 1
    fixed = arrays()
    for n in layers:
        for k, a in fixed[n].items():
            assert (a != 0).sum() == int(np.ceil(0.25 * a.size)), (n, k)  # exactly the target share
    train(model, tokens, steps=3, lr=1e-2, batch_size=2, progress=False, rng=2)
    later = arrays()
    for n in fixed:
        for k in ("A", "B"):
            np.testing.assert_array_equal(later[n][k] != 0, fixed[n][k] != 0)  # the same entries, fixed
            assert not np.array_equal(later[n][k], fixed[n][k])  # ...and they still train


@pytest.mark.parametrize("kw,err,pat", [
    ({"density": 0.0}, ValueError, "density"),
    ({"density": 1.5}, ValueError, "density"),
    ({"density": "0.5"}, TypeError, "density"),
    ({"density": 0.5, "density_warmup": 0}, ValueError, "density_warmup"),
    ({"density_warmup": -1}, ValueError, "density_warmup"),
])
def test_bad_density_settings_name_the_argument(kw, err, pat):
    with pytest.raises(err, match=pat):
        lr.SoRAConfig(**kw)
