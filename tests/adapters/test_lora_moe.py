"""The mixture of LoRA experts' own math: the forward as the per-token sum written out, dense and
top-k routing (gates, the gradient through the kept gates only), the balancing loss (its value at
the two extremes, its hand-derived gradient by central differences and against torch autograd),
the hooks in both training loops (the same losses and router weights), and the config's bad
values. The generic life cycle (refused merge, state errors, save/load, NumPy ≈ torch with top-2)
is the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close

import lowrank_ref as lr
from lowrank_ref.adapters.lora_moe import (
    balance_loss,
    lora_moe_backward,
    lora_moe_forward,
    router_gates,
    router_gates_backward,
)
from lowrank_ref.gradcheck import check_gradients, gradcheck


def make_layer(cfg, seed=0, out=5, inn=6):
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((out, inn)), rng.standard_normal(out)
    layer = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, rng=seed)
    layer.load_adapter_state({n: v + rng.standard_normal(v.shape) for n, v in layer.adapter_state().items()})
    return layer, W, b


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
def test_forward_is_the_per_token_sum_over_experts(top_k):
    cfg = lr.LoRAMoEConfig(r=2, alpha=3.0, n_experts=4, top_k=top_k)
    layer, W, b = make_layer(cfg)
    x = np.random.default_rng(1).standard_normal((3, 2, 6))
    y = layer.forward(x)
    A, B, Wg, s = layer.A.data, layer.B.data, layer.Wg.data, cfg.scaling
    for idx in np.ndindex(3, 2):
        xv = x[idx]
        z = Wg @ xv
        keep = np.argsort(-z)[: (top_k or 4)]
        g = np.zeros(4)
        g[keep] = np.exp(z[keep]) / np.exp(z[keep]).sum()
        want = W @ xv + b + sum(g[e] * s * B[e] @ A[e] @ xv for e in range(4))
        assert_close(y[idx], want, f"token {idx}, top_k={top_k}")


def test_top_k_gates_keep_the_k_largest_and_the_gradient_flows_through_them_only():
    z = np.random.default_rng(2).standard_normal((7, 5))
    g = router_gates(z, 2)
    assert np.all((g > 0).sum(axis=1) == 2)
    kept = np.argsort(-z, axis=1)[:, :2]
    assert np.all(np.take_along_axis(g, kept, axis=1) > 0)
    assert_close(g.sum(axis=1), np.ones(7), "gates sum to 1")
    dz = router_gates_backward(np.random.default_rng(3).standard_normal((7, 5)), g)
    np.testing.assert_array_equal(dz[g == 0], 0)  # a dropped expert's logit gets no gradient
    assert np.all(np.abs(dz[g > 0]) > 0)
    assert_close(router_gates(z, 5), router_gates(z, None), "top_k = E is dense", 0, 0)


@pytest.mark.parametrize("top_k", [None, 3])
def test_gradcheck_dense_and_top_k(top_k):
    layer, *_ = make_layer(lr.LoRAMoEConfig(r=2, alpha=3.0, n_experts=4, top_k=top_k), seed=4)
    report = gradcheck(layer, np.random.default_rng(5).standard_normal((2, 3, 6)))
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "A", "B", "Wg"}


def test_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    from lowrank_gpu.adapters.lora_moe import router_gates as t_gates

    rng = np.random.default_rng(6)
    E, r, inn, out, N = 3, 2, 4, 3, 8
    p = {"W": rng.standard_normal((out, inn)), "b": rng.standard_normal(out), "A": rng.standard_normal((E, r, inn)),
         "B": rng.standard_normal((E, out, r)), "Wg": rng.standard_normal((E, inn))}
    x, dy = rng.standard_normal((N, inn)), rng.standard_normal((N, out))
    for top_k in (None, 2):
        cfg = lr.LoRAMoEConfig(r=r, alpha=5.0, n_experts=E, top_k=top_k)
        y, cache = lora_moe_forward(x, p, cfg)
        dx, grads = lora_moe_backward(dy, cache)
        assert grads["W"] is None and grads["b"] is None
        tp = {k: torch.tensor(v, requires_grad=k not in ("W", "b")) for k, v in p.items()}
        tx = torch.tensor(x, requires_grad=True)
        g = t_gates(tx @ tp["Wg"].T, top_k)
        ty = tx @ tp["W"].T + tp["b"] + cfg.scaling * torch.einsum("ne,eor,eri,ni->no", g, tp["B"], tp["A"], tx)
        (ty * torch.from_numpy(dy)).sum().backward()
        rtol, atol = TOL["float64"]
        assert_close(y, ty, f"y top_k={top_k}", rtol, atol)
        assert_close(dx, tx.grad, f"dx top_k={top_k}", rtol, atol)
        for k in ("A", "B", "Wg"):
            assert_close(grads[k], tp[k].grad, f"d{k} top_k={top_k}", rtol, atol)


def test_balance_loss_values_at_the_extremes_and_its_gradient():
    N, E = 6, 4
    assert balance_loss(np.full((N, E), 1 / E))[0] == pytest.approx(0, abs=1e-15)  # balanced: cv² = 0
    one = np.zeros((N, E))
    one[:, 2] = 1  # every token to one expert: I = (0, 0, N, 0), cv² = E − 1
    assert balance_loss(one)[0] == pytest.approx(E - 1)
    g = np.random.default_rng(7).uniform(0.1, 1, (N, E))  # any g (rows need not sum to 1)
    value, dg = balance_loss(g)
    imp = g.sum(0)
    assert value == pytest.approx(np.var(imp) / np.mean(imp) ** 2)
    report = check_gradients(lambda: balance_loss(g)[0], {"g": g}, {"g": np.array(dg)})
    assert report.ok, str(report)


@pytest.mark.parametrize("top_k", [None, 2])
def test_the_layers_balance_gradient_on_the_router_by_central_differences_and_torch(top_k):
    torch = pytest.importorskip("torch")
    cfg = lr.LoRAMoEConfig(r=2, alpha=3.0, n_experts=4, top_k=top_k, balance_weight=0.3)
    layer, W, b = make_layer(cfg, seed=8)
    x = np.random.default_rng(9).standard_normal((5, 6))

    def value():
        layer.forward(x)
        layer._cache = None
        return layer.balance_loss()[0]

    layer.forward(x)
    layer._cache = None
    v, dWg = layer.balance_loss()
    assert layer.balance_loss() is None  # read once
    report = check_gradients(value, {"Wg": layer.Wg.data}, {"Wg": dWg})
    assert report.ok, str(report)
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0)
    tl.load_adapter_state(layer.adapter_state())
    tx = torch.tensor(x, requires_grad=True)
    tl(tx)
    tv = tl.balance_loss()
    tv.backward()
    assert float(tv.detach()) == pytest.approx(v, rel=1e-12)
    assert_close(dWg, tl.Wg.grad, "W̄_g: numpy vs torch autograd", *TOL["float64"])
    assert tx.grad is None  # the term stops at the layer's input, in torch as in NumPy
    layer.eval()
    layer.forward(x)
    assert layer.balance_loss() is None  # evaluation keeps nothing for the term


def _moe_gpts(cfg):
    """The same GPT with LoRA MoE on q and v (experts away from their init), NumPy and torch."""
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_ref.inject import adapter_layers, inject
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, d_model=8),
                rng=np.random.default_rng(0), dtype=np.float64)
    t_model = from_numpy(model)
    inject(model, cfg, targets=("q", "v"), rng=0)
    inject(t_model, cfg, targets=("q", "v"), rng=0)
    rng = np.random.default_rng(1)
    t_layers = dict(t_model.named_modules())
    for name, layer in adapter_layers(model).items():
        layer.load_adapter_state({n: v + rng.standard_normal(v.shape) for n, v in layer.adapter_state().items()})
        t_layers[name].load_adapter_state(layer.adapter_state())
    return model, t_model


def test_both_training_loops_add_the_balancing_term_and_train_the_same_router():
    pytest.importorskip("torch")
    from lowrank_ref.train import train, training_hooks

    cfg = lr.LoRAMoEConfig(r=2, alpha=4.0, n_experts=3, top_k=2, balance_weight=0.5)
    tokens = np.random.default_rng(2).integers(0, 11, 400)
    kw = dict(steps=3, lr=1e-2, batch_size=4, progress=False, rng=3)
    np_model, t_model = _moe_gpts(cfg)
    r_np, r_t = train(np_model, tokens, **kw), train(t_model, tokens, **kw)
    np.testing.assert_allclose(r_np.losses, r_t.losses, rtol=1e-9)
    t_params = dict(t_model.named_parameters())
    for name, p in np_model.trainable_parameters().items():
        assert_close(p.data, t_params[name], f"{name} after 3 steps", 1e-8, 1e-10)
    # and the term is really in the loss: without it the same run differs
    plain, _ = _moe_gpts(cfg.replace(balance_weight=0.0))
    assert not np.allclose(train(plain, tokens, **kw).losses, r_np.losses)
    (hooks,) = training_hooks(np_model)
    assert type(hooks).__name__ == "LoRAMoEHooks" and set(hooks.layers) == {"blocks.0.attn.q", "blocks.0.attn.v"}


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="top_k must be between 1 and n_experts=4"):
        lr.LoRAMoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k must be between 1 and n_experts"):
        lr.LoRAMoEConfig(top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        lr.LoRAMoEConfig(top_k=True)
    with pytest.raises(ValueError, match="balance_weight must be finite and non-negative"):
        lr.LoRAMoEConfig(balance_weight=-1)
    with pytest.raises(ValueError, match="n_experts must be a positive integer"):
        lr.LoRAMoEConfig(n_experts=0)


def test_the_update_is_not_one_matrix_so_nothing_can_merge_it():
    """Chapter 08 §7: a linear layer's update is linear in x; the experts' part is not (the gates
    depend on x), so no W' reproduces it. Scaling a token by 2 does not scale its update by 2."""
    layer, W, b = make_layer(lr.LoRAMoEConfig(r=2, alpha=3.0, n_experts=3), seed=10)
    x = np.random.default_rng(11).standard_normal((4, 6))

    def update(v):
        return layer.forward(v) - (v @ W.T + b)

    assert not np.allclose(update(2 * x), 2 * update(x), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="not mergeable: .*different matrix for every token"):
        layer.merge()


def test_top_1_routing_gives_the_router_no_gradient_at_all():
    """Chapter 08 §7's pitfall: with k = 1 the one kept gate is softmax of one logit = 1, so W̄_g = 0
    from the task loss and from the balancing term; with k = 2 both reach the router."""
    x, dy = np.random.default_rng(12).standard_normal((6, 6)), np.random.default_rng(13).standard_normal((6, 5))
    for k, moves in ((1, False), (2, True)):
        layer, *_ = make_layer(lr.LoRAMoEConfig(r=2, alpha=3.0, n_experts=4, top_k=k, balance_weight=1.0), seed=14)
        layer.forward(x)
        layer.backward(dy)
        _, dWg = layer.balance_loss()
        assert (np.abs(layer.Wg.grad).max() > 1e-8) == moves, f"task loss, k={k}"
        assert (np.abs(dWg).max() > 1e-8) == moves, f"balancing term, k={k}"
