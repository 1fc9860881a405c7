"""Rank growth in the style of SeLoRA: the growth test's closed form against an explicit
rank-(r+1) LoRA, growth keeps the output, the hooks grow layers in both training loops with the
optimizer state following, grown files load, bad configs. The life cycle and NumPy ≈ torch of the
layer itself are the contract tests' (``pytest tests/contract -k selora``)."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.adapters.lora import LoRAConfig, LoRALinear
from lowrank_ref.adapters.selora import SeLoRAConfig, SeLoRAHooks, SeLoRALinear, growth_ratio
from lowrank_ref.nn import Linear
from lowrank_ref.optim import grow_state


def _layer(r=2, init_r=1, alpha=4.0, max_r=4, seed=0, **kw):
    rng = np.random.default_rng(seed)
    base = Linear.from_arrays(rng.standard_normal((5, 7)), rng.standard_normal(5))
    layer = SeLoRALinear(base, SeLoRAConfig(init_r=init_r, r=r, alpha=alpha, max_r=max_r, **kw), rng=seed)
    layer.B.data = rng.standard_normal(layer.B.data.shape)  # away from B = 0
    layer.A.data = rng.standard_normal(layer.A.data.shape)
    return layer, rng


def test_the_trial_ratio_equals_an_explicit_rank_r_plus_1_lora_on_the_same_batch():
    layer, rng = _layer(r=2)
    x, dy = rng.standard_normal((3, 4, 7)), rng.standard_normal((3, 4, 5))
    layer.probing = True
    y = layer.forward(x)
    layer.backward(dy)
    ratio = layer.growth_ratio()
    # the oracle: a rank-3 LoRA holding [A; a_trial], [B, 0] with the same scale s = α/init_r
    s = layer.scaling
    trial = LoRALinear(layer.base, LoRAConfig(r=3, alpha=s * 3), rng=0)
    trial.load_adapter_state({"A": np.vstack([layer.A.data, layer.a_trial]),
                              "B": np.hstack([layer.B.data, np.zeros((5, 1))])})
    assert trial.scaling == pytest.approx(s)
    np.testing.assert_allclose(trial.forward(x), y, rtol=1e-12, atol=1e-12)  # the zero column changes nothing
    trial.backward(dy)
    gA, gB = trial.A.grad, trial.B.grad
    np.testing.assert_array_equal(gA[2], 0.0)  # the new row of A gets no gradient while b_new = 0
    F_r = np.sum(gA[:2] ** 2) + np.sum(gB[:, :2] ** 2)
    F_r1 = np.sum(gA**2) + np.sum(gB**2)
    assert ratio == pytest.approx(F_r1 / F_r, rel=1e-12)
    assert ratio > 1.0
    np.testing.assert_allclose(layer.A.grad, gA[:2], rtol=1e-12)  # probing leaves the gradients as they are


def test_growth_keeps_the_output_and_appends_the_trial_row_and_a_zero_column():
    layer, rng = _layer(r=1, max_r=3)
    x = rng.standard_normal((4, 7))
    y0, dW0 = layer.forward(x), layer.delta_weight()
    a = layer.a_trial.copy()
    layer.grow()
    assert layer.r == layer.config.r == 2 and layer.A.data.shape == (2, 7) and layer.B.data.shape == (5, 2)
    np.testing.assert_array_equal(layer.A.data[1], a)
    np.testing.assert_array_equal(layer.B.data[:, 1], 0.0)
    assert not np.array_equal(layer.a_trial, a)  # a fresh trial row
    assert layer.scaling == 4.0  # α / init_r, not α / r
    np.testing.assert_allclose(layer.forward(x), y0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.delta_weight(), dW0, rtol=1e-13, atol=1e-13)
    layer.grow()
    with pytest.raises(ValueError, match="max_r=3"):
        layer.grow()
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        SeLoRALinear.grow(layer)


def test_growth_ratio_edge_cases():
    assert growth_ratio(2.0, 2.0) == 2.0
    assert growth_ratio(0.0, 1.0) == np.inf
    assert np.isnan(growth_ratio(0.0, 0.0))  # no signal: nan >= threshold is False, no growth


def test_grow_state_pads_moments_with_zeros_and_keeps_the_old_ones():
    m = np.arange(6.0).reshape(2, 3)
    state = {"step": 4, "exp_avg": m.copy(), "exp_avg_sq": m.copy() ** 2}
    grow_state("A", state, (3, 3))
    assert state["step"] == 4 and state["exp_avg"].shape == (3, 3)
    np.testing.assert_array_equal(state["exp_avg"][:2], m)
    np.testing.assert_array_equal(state["exp_avg"][2], 0.0)
    with pytest.raises(ValueError, match="A.*only growth"):
        grow_state("A", state, (2, 3))
    with pytest.raises(ValueError, match="A.*cannot grow"):
        grow_state("A", {"shape": (2, 3), "q": np.zeros(6, np.int8)}, (3, 3))


def test_an_adamw_step_after_growth_matches_a_fresh_moment_for_the_new_entries():
    from lowrank_ref.nn.module import Parameter

    p = Parameter(np.ones((1, 3)))
    opt = lr.optim.AdamW({"A": p}, lr=0.1, weight_decay=0.0)
    p.grad = np.full((1, 3), 0.5)
    opt.step()
    m_old = opt.state["A"]["exp_avg"].copy()
    p.data = np.vstack([p.data, np.zeros((1, 3))])  # the parameter grows by a row
    p.grad = np.full((2, 3), 0.5)
    opt.step()
    st = opt.state["A"]
    np.testing.assert_allclose(st["exp_avg"][0], 0.9 * m_old[0] + 0.1 * 0.5)
    np.testing.assert_allclose(st["exp_avg"][1], 0.1 * 0.5)  # started from zero


def _tiny_model(backend):
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=8), rng=np.random.default_rng(0))
    if backend == "torch":
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    return model


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_training_loop_grows_layers_through_the_hooks_and_the_file_loads_grown(backend, tmp_path):
    if backend == "torch":
        pytest.importorskip("torch")
    from lowrank_ref.inject import adapter_layers, inject
    from lowrank_ref.io import load_adapter, save_adapter
    from lowrank_ref.train import train

    model = _tiny_model(backend)
    # threshold 1 grows at every check (the ratio is never below 1): checks after steps 1, 3, 5
    cfg = SeLoRAConfig(init_r=1, alpha=2.0, max_r=3, threshold=1.0, interval=2)
    inject(model, cfg, targets=("q", "v"), method="selora", rng=np.random.default_rng(0))
    tokens = np.random.default_rng(1).integers(0, 16, 400)
    train(model, tokens, 6, lr=1e-2, batch_size=2, rng=0, progress=False)  # Adam's state grows twice
    if backend == "numpy":
        layers = adapter_layers(model)
    else:
        from lowrank_gpu.inject import adapter_layers as torch_layers

        layers = torch_layers(model)
    assert {n: m.r for n, m in layers.items()} == {n: 3 for n in layers}  # 1 -> 2 -> 3, then capped
    path = save_adapter(model, tmp_path / "grown.safetensors")
    fresh = _tiny_model(backend)
    load_adapter(fresh, path)
    x = np.random.default_rng(2).integers(0, 16, (2, 8))
    if backend == "numpy":
        model.eval(), fresh.eval()
        np.testing.assert_allclose(fresh.forward(x), model.forward(x), rtol=1e-6, atol=1e-6)
    else:
        import torch

        model.eval(), fresh.eval()
        with torch.no_grad():
            xt = torch.from_numpy(x)
            np.testing.assert_allclose(fresh(xt).numpy(), model(xt).numpy(), rtol=1e-6, atol=1e-6)


def test_numpy_and_torch_hooks_make_the_same_growth_decisions():
    torch = pytest.importorskip("torch")
    from lowrank_gpu.adapters.selora import SeLoRALinear as TorchSeLoRA

    layer, rng = _layer(r=1, max_r=4, threshold=1.4, interval=1)
    layer.A.data = rng.uniform(-0.4, 0.4, (1, 7))  # A on the scale of the trial row (U(±1/√7))
    layer.B.data *= 1e-3  # a small B: Ā is small and the ratio ~ 1 + ‖b̄_new‖²/‖B̄‖² varies around 2
    twin = TorchSeLoRA(torch.nn.Linear(7, 5).double(), layer.config, rng=0)
    with torch.no_grad():
        twin.base.weight.copy_(torch.from_numpy(layer.base.weight.data))
        twin.base.bias.copy_(torch.from_numpy(layer.base.bias.data))
    hooks = {"numpy": SeLoRAHooks(None, {"l": layer}), "torch": SeLoRAHooks(None, {"l": twin})}
    grown = {"numpy": [], "torch": []}
    for step in range(5):
        twin.load_adapter_state({"A": layer.A.data, "B": layer.B.data})
        twin.a_trial = torch.from_numpy(layer.a_trial.copy())
        x, dy = rng.standard_normal((6, 7)), rng.standard_normal((6, 5))
        for h in hooks.values():
            h.before_step(step)
        layer.zero_grad()
        layer.forward(x)
        layer.backward(dy)
        twin.train()
        (twin(torch.from_numpy(x)) * torch.from_numpy(dy)).sum().backward()
        ratios = {"numpy": layer.growth_ratio(), "torch": twin.growth_ratio()}
        assert ratios["numpy"] == pytest.approx(ratios["torch"], rel=1e-10)
        for b, h in hooks.items():
            h.after_step(step)
            grown[b].append(h.ranks["l"])
        twin.zero_grad(set_to_none=True)
        layer.B.data = layer.B.data + 1e-3 * rng.standard_normal(layer.B.data.shape)  # vary the ratio
    assert grown["numpy"] == grown["torch"]
    assert len(set(grown["numpy"])) > 1  # some growth and some not: the threshold decides


@pytest.mark.parametrize("kw,err,pat", [
    ({"init_r": 0}, ValueError, "init_r"),
    ({"init_r": 3, "max_r": 2}, ValueError, "max_r"),
    ({"threshold": 0.5}, ValueError, "threshold"),
    ({"threshold": float("nan")}, ValueError, "threshold"),
    ({"threshold": "2"}, TypeError, "threshold"),
    ({"interval": 0}, ValueError, "interval"),
    ({"r": 9, "max_r": 8}, ValueError, r"\br=9"),
    ({"dropout": 1.0}, ValueError, "dropout"),
])
def test_bad_configs_name_the_argument(kw, err, pat):
    with pytest.raises(err, match=pat):
        SeLoRAConfig(**kw)
