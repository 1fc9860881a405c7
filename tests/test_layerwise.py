"""Layer-wise LoRA/DoRA in the small GPT: targets by pattern, per-layer ranks and alphas, parameter
counts by hand, a whole-model gradcheck through DoRA layers, and NumPy vs torch on the model."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import DoRALinear, LoRALinear
from lowrank_ref.gradcheck import gradcheck
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig

D, V, T, L = 8, 7, 4, 2


def tiny_gpt(seed=0, dtype=np.float64):
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2, d_model=D), rng=np.random.default_rng(seed), dtype=dtype)


def perturb(model, rng):
    """Move every adapter away from its init: non-zero B, m off the row norms."""
    for _, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, DoRALinear)):
            mod.B.data = 0.3 * rng.standard_normal(mod.B.shape)
            if isinstance(mod, DoRALinear):
                mod.m.data = mod.m.data * rng.uniform(0.7, 1.3, mod.m.shape)


@pytest.mark.parametrize("targets, expected", [
    ("q", ["blocks.0.attn.q", "blocks.1.attn.q"]),
    (("q", "v"), ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]),
    ("blocks.1.attn.*", ["blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.o"]),
    ("mlp", ["blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"]),
    ("all", [f"blocks.{i}.{g}" for i in range(L) for g in
             ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")]),
])
def test_dora_targets_and_counts(targets, expected):
    model = tiny_gpt()
    res = inject(model, lr.DoRAConfig(r=2, alpha=4), targets=targets, rng=0)
    assert res.method == "dora" and res.replaced == expected
    shapes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "fc": (4 * D, D), "proj": (D, 4 * D)}
    by_hand = 0
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer, DoRALinear)
        out, inn = shapes[name.rsplit(".", 1)[1]]
        by_hand += 2 * (inn + out) + out  # A (r, in), B (out, r), m (out,)
    assert res.trainable_params == model.num_trainable_parameters() == by_hand


def test_rank_and_alpha_patterns_per_layer():
    model = tiny_gpt()
    res = inject(model, lr.DoRAConfig(r=2, alpha=4), targets="attn",
                 ranks={"blocks.0.*": 4, "v": 1}, alphas={"blocks.1.attn.o": 32}, rng=0)
    r = {n: c.r for n, c in res.configs.items()}
    assert r == {"blocks.0.attn.q": 4, "blocks.0.attn.k": 4, "blocks.0.attn.v": 1, "blocks.0.attn.o": 4,
                 "blocks.1.attn.q": 2, "blocks.1.attn.k": 2, "blocks.1.attn.v": 1, "blocks.1.attn.o": 2}
    o = model.get_submodule("blocks.1.attn.o")
    assert o.config.alpha == 32 and o.scaling == 16.0 and o.A.shape == (2, D)
    assert model.get_submodule("blocks.0.attn.v").A.shape == (1, D)
    # the config of each layer is kept on the layer (io stores it per layer)
    assert all(model.get_submodule(n).config == c for n, c in res.configs.items())


def test_untargeted_layers_stay_frozen_and_unchanged():
    model = tiny_gpt()
    before = model.state_dict()
    inject(model, lr.DoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=0)
    perturb(model, np.random.default_rng(1))
    idx = np.random.default_rng(2).integers(0, V, (2, T))
    model.backward(np.ones_like(model.forward(idx)))
    trainable = model.trainable_parameters()
    assert set(trainable) == {f"blocks.{i}.attn.{t}.{p}" for i in range(L) for t in "qv" for p in "ABm"}
    for name, p in model.parameters().items():
        if name not in trainable:
            assert p.grad is None, name
    after = model.state_dict()
    for name, v in before.items():  # base weights keep their values under the new names
        new = name.replace("attn.q.", "attn.q.base.").replace("attn.v.", "attn.v.base.")
        assert np.array_equal(after[new], v), name


@pytest.mark.parametrize("detach", [False, True])
def test_whole_model_through_dora_layers(detach):
    """Exact gradient: gradcheck every adapter entry through the GPT. Detached: it must differ
    from the numeric gradient in A and B (that is what detaching means) but not in m."""
    model = tiny_gpt(seed=3)
    inject(model, lr.DoRAConfig(r=2, alpha=4, detach_norm=detach), targets=("blocks.0.attn.q", "blocks.1.mlp.fc"), rng=0)
    perturb(model, np.random.default_rng(4))
    idx = np.random.default_rng(5).integers(0, V, (2, T))
    rep = gradcheck(model, idx)
    if not detach:
        rep.raise_if_failed()
    else:
        ok = {r.name: r.ok for r in rep.results}
        assert ok["blocks.0.attn.q.m"] and ok["blocks.1.mlp.fc.m"]
        assert not ok["blocks.0.attn.q.A"] and not ok["blocks.1.mlp.fc.B"]


def test_numpy_and_torch_models_agree():
    torch = pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import copy_state, from_numpy

    model = tiny_gpt(seed=6)
    tmodel = from_numpy(model)
    cfg = lr.DoRAConfig(r=2, alpha=4, detach_norm=False)
    kw = dict(targets=("attn", "fc"), ranks={"blocks.1.*": 3})
    inject(model, cfg, rng=0, **kw)
    inject(tmodel, cfg, rng=0, **kw)
    perturb(model, np.random.default_rng(7))
    copy_state(model, tmodel)  # same names on both sides, adapters included
    idx = np.random.default_rng(8).integers(0, V, (3, T))
    logits = model.forward(idx)
    w = np.random.default_rng(9).standard_normal(logits.shape)
    model.backward(w)
    tlogits = tmodel(torch.from_numpy(idx))
    (tlogits * torch.from_numpy(w)).sum().backward()
    assert_close(logits, tlogits, "logits", 1e-10, 1e-12)
    tgrads = {n: p.grad for n, p in tmodel.named_parameters() if p.requires_grad}
    ngrads = {n: p.grad for n, p in model.trainable_parameters().items()}
    assert set(tgrads) == set(ngrads) and len(ngrads) == 3 * 2 * 5
    for n, g in ngrads.items():
        assert_close(g, tgrads[n], n, 1e-8, 1e-10)
