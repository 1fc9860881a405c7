"""LoRA composition (lowrank_ref.compose): LoraHub's factor mixing against the sum of updates, the
cross terms between them, a composed adapter injected into a model, and the derivative-free
weight search; bad input refused."""

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.compose import (
    LoRAState,
    apply_composed,
    compose,
    cross_terms,
    lora_state,
    search_weights,
)
from lowrank_ref.inject import adapter_layers, inject
from lowrank_ref.nn.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8)
IDX = np.random.default_rng(4).integers(0, 11, (2, 8))


def _adapted(seed, r=2, alpha=4.0):
    model = GPT(CFG, rng=np.random.default_rng(0), dtype=np.float64)
    inject(model, lr.LoRAConfig(r=r, alpha=alpha), targets=("q", "v"), rng=seed)
    g = np.random.default_rng(100 + seed)
    for p in model.trainable_parameters().values():
        p.data = g.standard_normal(p.shape)
    return model


def _states(n=3):
    return [lora_state(_adapted(k)) for k in range(n)]


def test_one_hot_weights_give_that_adapter_in_both_modes():
    states = _states()
    for mode in ("lorahub", "sum"):
        c = compose(states, [0.0, 1.0, 0.0], mode)
        for p in states[1].layers:
            np.testing.assert_allclose(c.delta(p), states[1].delta(p), rtol=1e-12, atol=1e-12)


def test_sum_mode_is_the_weighted_sum_of_updates_and_lorahub_adds_the_cross_terms():
    states = _states()
    w = np.array([0.7, -0.4, 1.2])
    hub, total = compose(states, w, "lorahub"), compose(states, w, "sum")
    extra = cross_terms(states, w)
    for p in states[0].layers:
        by_hand = sum(wi * st.delta(p) for wi, st in zip(w, states))  # Σ wᵢ sᵢ Bᵢ Aᵢ
        np.testing.assert_allclose(total.delta(p), by_hand, rtol=1e-12, atol=1e-12)
        assert total.layers[p][0].shape[0] == 3 * 2  # rank Σ rᵢ
        assert hub.layers[p][0].shape[0] == 2  # rank r
        np.testing.assert_allclose(hub.delta(p) - total.delta(p), extra[p], rtol=1e-10, atol=1e-10)
        assert np.linalg.norm(extra[p]) > 1e-3 * np.linalg.norm(by_hand)  # the modes really differ
        # LoraHub is quadratic: scaling w by 2 scales its ΔW by 4; the sum scales by 2
        np.testing.assert_allclose(compose(states, 2 * w, "lorahub").delta(p), 4 * hub.delta(p), rtol=1e-12)
        np.testing.assert_allclose(compose(states, 2 * w, "sum").delta(p), 2 * total.delta(p), rtol=1e-12)


@pytest.mark.parametrize("mode", ["lorahub", "sum"])
def test_a_composed_adapter_in_a_model_gives_the_composed_update(mode):
    models = [_adapted(k) for k in range(3)]
    states = [lora_state(m) for m in models]
    w = [0.5, 0.25, -0.3]
    c = compose(states, w, mode)
    model = apply_composed(models[0], c)
    layers = adapter_layers(model)
    assert sorted(layers) == sorted(c.layers)
    for p, layer in layers.items():
        np.testing.assert_allclose(layer.merged_weight() - layer.base.weight.data, c.delta(p), rtol=1e-12, atol=1e-12)
    # the source model is untouched
    np.testing.assert_array_equal(adapter_layers(models[0])["blocks.0.attn.q"].A.data, states[0].layers["blocks.0.attn.q"][0])


def test_the_search_finds_the_minimum_of_a_known_objective():
    target = np.array([0.8, -0.5, 0.0, 1.1])
    res = search_weights(lambda w: float(np.sum((w - target) ** 2)), 4, budget=400, seed=1, l1=0.0)
    np.testing.assert_allclose(res.weights, target, atol=0.05)
    assert res.evaluations == 400 and res.history == sorted(res.history, reverse=True)
    again = search_weights(lambda w: float(np.sum((w - target) ** 2)), 4, budget=400, seed=1, l1=0.0)
    np.testing.assert_array_equal(again.weights, res.weights)  # seeded: repeatable
    # the bound holds and the L1 penalty pulls an indifferent weight to 0
    far = search_weights(lambda w: float((w[0] - 5.0) ** 2), 2, budget=200, seed=0)
    assert far.weights[0] == pytest.approx(1.5) and abs(far.weights[1]) < 0.05


def test_bad_input_is_refused():
    states = _states(2)
    with pytest.raises(ValueError, match="one entry per adapter"):
        compose(states, [1.0], "sum")
    with pytest.raises(ValueError, match="mode"):
        compose(states, [1.0, 0.0], "mean")
    with pytest.raises(ValueError, match="finite"):
        compose(states, [np.nan, 0.0])
    with pytest.raises(TypeError, match="LoRAState"):
        compose([], [])
    other = lora_state(_adapted(5, r=3, alpha=6.0))
    with pytest.raises(ValueError, match="same rank and scale"):
        compose([states[0], other], [0.5, 0.5], "lorahub")
    assert compose([states[0], other], [0.5, 0.5], "sum").layers["blocks.0.attn.q"][0].shape[0] == 5
    moved = LoRAState({"blocks.0.attn.k": states[0].layers["blocks.0.attn.q"],
                       "blocks.0.attn.v": states[0].layers["blocks.0.attn.v"]})
    with pytest.raises(ValueError, match="other layers"):
        compose([states[0], moved], [0.5, 0.5], "sum")
    with pytest.raises(ValueError, match="budget"):
        search_weights(lambda w: 0.0, 2, budget=0)
    with pytest.raises(ValueError, match="objective returned nan"):
        search_weights(lambda w: float("nan"), 2, budget=3)
    ia3 = GPT(CFG, rng=np.random.default_rng(0))
    inject(ia3, lr.IA3Config(), targets=("q",), rng=0)
    with pytest.raises(TypeError, match="LoRA layers only"):
        lora_state(ia3)
