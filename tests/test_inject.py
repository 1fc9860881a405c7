"""inject: target matching, per-layer overrides, freezing, rollback on error; NumPy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import LoRALinear
from lowrank_ref.inject import InjectResult, inject, select_targets, set_trainable
from lowrank_ref.nn import Linear, Module, ModuleList
from lowrank_ref.nn.gpt import GPT, GPTConfig

ATTN = ("q", "k", "v", "o")


class Attn(Module):
    def __init__(self, d, rng):
        super().__init__()
        for n in ATTN:
            setattr(self, n, Linear(d, d, rng=rng, dtype=np.float64))


class MLP(Module):
    def __init__(self, d, rng):
        super().__init__()
        self.fc = Linear(d, 2 * d, rng=rng, dtype=np.float64)
        self.proj = Linear(2 * d, d, rng=rng, dtype=np.float64)


class Block(Module):
    def __init__(self, d, rng):
        super().__init__()
        self.attn = Attn(d, rng)
        self.mlp = MLP(d, rng)


class Toy(Module):
    """The GPT's naming without the GPT: blocks.{i}.attn.{q,k,v,o}, blocks.{i}.mlp.{fc,proj}, head."""

    def __init__(self, d=4, n=2, vocab=5, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.blocks = ModuleList([Block(d, rng) for _ in range(n)])
        self.head = Linear(d, vocab, bias=False, rng=rng, dtype=np.float64)

    def forward(self, x):
        for b in self.blocks:
            a = b.attn
            x = x + a.o.forward(a.q.forward(x) * a.k.forward(x) + a.v.forward(x))
            x = x + b.mlp.proj.forward(np.tanh(b.mlp.fc.forward(x)))
        return self.head.forward(x)


def _names(n=2):
    return [f"blocks.{i}.{g}.{leaf}" for i in range(n)
            for g, leaves in (("attn", ATTN), ("mlp", ("fc", "proj"))) for leaf in leaves]


def _randomise_B(model, seed=1):
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():
        if name.endswith(".B"):
            p.data = rng.standard_normal(p.shape).astype(p.data.dtype)


@pytest.mark.parametrize("targets, want", [
    (("q", "v"), ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]),
    ("fc", ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]),
    ("blocks.0.attn.*", [f"blocks.0.attn.{x}" for x in ATTN]),
    ("blocks.*.mlp.fc", ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]),
    ("attn", [n for n in _names() if ".attn." in n]),
    ("mlp", [n for n in _names() if ".mlp." in n]),
    ("all", _names()),
    (("all", "head"), _names() + ["head"]),
    (("blocks.1.attn.o", "q"), ["blocks.0.attn.q", "blocks.1.attn.q", "blocks.1.attn.o"]),
])
def test_target_matching(targets, want):
    model = Toy()
    res = inject(model, lr.LoRAConfig(r=2), targets=targets, rng=0)
    assert res.replaced == want  # in model order
    for name, mod in model.named_modules():
        if name in want:
            assert isinstance(mod, LoRALinear)
        elif name and not name.endswith(".base") and isinstance(mod, Linear):
            assert name not in want


def test_only_adapter_tensors_train_and_counts_add_up():
    model = Toy(d=4)
    total_before = model.num_parameters()
    res = inject(model, lr.LoRAConfig(r=3), targets=("q", "fc"), rng=0)
    trainable = model.trainable_parameters()
    assert sorted(trainable) == sorted(f"{n}.{t}" for n in res.replaced for t in "AB")
    # q: 4 -> 4, fc: 4 -> 8; r (in + out) scalars each, two blocks
    assert res.trainable_params == 2 * (3 * (4 + 4) + 3 * (4 + 8))
    assert res.total_params == total_before + res.trainable_params == model.num_parameters()
    assert isinstance(res, InjectResult) and 0 < res.trainable_fraction < 1
    text = str(res)
    assert "blocks.1.mlp.fc" in text and f"{res.trainable_params:,}" in text and "lora" in text


def test_zero_B_keeps_the_output_and_nonzero_B_changes_only_adapted_paths():
    model = Toy()
    x = np.random.default_rng(3).standard_normal((2, 3, 4))
    y0 = model.forward(x)
    inject(model, lr.LoRAConfig(r=2), targets="attn", rng=0)
    np.testing.assert_array_equal(model.forward(x), y0)  # B = 0
    _randomise_B(model)
    assert not np.allclose(model.forward(x), y0)
    # merging every adapter reproduces the same function with plain weights
    y1 = model.forward(x)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert_close(model.forward(x), y1, "merged model", rtol=1e-12, atol=1e-12)


def test_per_layer_ranks_and_alphas_later_patterns_win():
    model = Toy()
    cfg = lr.LoRAConfig(r=2, alpha=4)
    res = inject(model, cfg, targets="all", ranks={"attn": 4, "blocks.1.*": 8, "blocks.1.attn.v": 1},
                 alphas={"fc": 32.0}, rng=0)
    get = model.get_submodule
    assert get("blocks.0.attn.q").A.shape == (4, 4)
    assert get("blocks.0.mlp.proj").A.shape == (2, 8)  # untouched: config.r
    assert get("blocks.1.attn.q").A.shape == (8, 4)
    assert get("blocks.1.attn.v").A.shape == (1, 4)
    assert get("blocks.0.mlp.fc").scaling == 32.0 / 2
    assert get("blocks.1.mlp.fc").scaling == 32.0 / 8
    assert get("blocks.0.attn.k").scaling == 4 / 4
    assert res.configs["blocks.1.attn.v"] == cfg.replace(r=1)


def test_no_match_lists_the_linear_layers_and_changes_nothing():
    model = Toy()
    with pytest.raises(ValueError, match=r"'query'.*blocks\.0\.attn\.q.*head"):
        inject(model, lr.LoRAConfig(r=2), targets=("q", "query"))
    with pytest.raises(ValueError, match="ranks pattern 'nope'"):
        inject(model, lr.LoRAConfig(r=2), targets="q", ranks={"nope": 3})
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert all(p.trainable for p in model.parameters().values())


def test_error_midway_restores_every_layer_and_flag():
    model = Toy()
    model.blocks[1].attn.q.weight.data[0, 0] = np.nan  # the 2nd target's base is not finite
    before = {n: m for n, m in model.named_modules()}
    flags = {n: p.trainable for n, p in model.parameters().items()}
    with pytest.raises(ValueError, match="finite"):
        inject(model, lr.LoRAConfig(r=2), targets="q", rng=0)
    assert {n: m for n, m in model.named_modules()} == before
    assert {n: p.trainable for n, p in model.parameters().items()} == flags


def test_bad_arguments():
    model = Toy()
    with pytest.raises(ValueError, match="rank|r must"):
        inject(model, lr.LoRAConfig(r=2), targets="q", ranks={"q": 0})
    with pytest.raises(TypeError, match="config"):
        inject(model, None, targets="q")
    with pytest.raises(TypeError, match="no method takes a config of type dict"):
        inject(model, {"r": 2}, targets="q")
    with pytest.raises(ValueError, match="known methods: .*lora"):
        inject(model, lr.LoRAConfig(), targets="q", method="lorax")
    with pytest.raises(TypeError, match="config must be a BitFitConfig for method 'bitfit'"):
        inject(model, lr.LoRAConfig(), method="bitfit")
    with pytest.raises(ValueError, match="empty"):
        inject(model, lr.LoRAConfig(), targets=())
    with pytest.raises(TypeError, match="targets"):
        inject(model, lr.LoRAConfig(), targets=[3])
    with pytest.raises(TypeError, match="model"):
        inject([1, 2], lr.LoRAConfig())
    with pytest.raises(TypeError, match="rng"):
        inject(model, lr.LoRAConfig(), targets="q", rng="seed")
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_adapted_layers_are_not_targets_again_and_second_inject_keeps_first_adapters():
    model = Toy()
    inject(model, lr.LoRAConfig(r=2), targets="q", rng=0)
    with pytest.raises(ValueError, match=r"matches no linear layer.*already adapted.*blocks\.1\.attn\.q"):
        inject(model, lr.LoRAConfig(r=2), targets="q")
    res = inject(model, lr.LoRAConfig(r=2), targets="v", rng=1)
    names = set(model.trainable_parameters())
    assert {"blocks.0.attn.q.A", "blocks.0.attn.v.B"} <= names and res.replaced == ["blocks.0.attn.v", "blocks.1.attn.v"]


def test_same_rng_seed_same_adapters():
    a, b = Toy(), Toy()
    inject(a, lr.LoRAConfig(r=2), targets="all", rng=7)
    inject(b, lr.LoRAConfig(r=2), targets="all", rng=np.random.default_rng(7))
    for (n, p), (_, q) in zip(a.parameters().items(), b.parameters().items()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    qa, va = a.get_submodule("blocks.0.attn.q").A.data, a.get_submodule("blocks.0.attn.v").A.data
    assert not np.array_equal(qa, va)  # one stream: each layer draws its own init


def test_set_trainable_modes():
    model = Toy()
    inject(model, lr.LoRAConfig(r=2), targets="q", rng=0)
    n_all = set_trainable(model, "all")
    assert n_all == model.num_parameters()
    n_bias = set_trainable(model, "bias")
    assert set(model.trainable_parameters()) == {n for n in model.parameters() if n.endswith(".bias")}
    assert n_bias == sum(p.size for n, p in model.parameters().items() if n.endswith("bias"))
    assert set_trainable(model, "none") == 0
    set_trainable(model, "adapters")
    assert set(model.trainable_parameters()) == {f"blocks.{i}.attn.q.{t}" for i in range(2) for t in "AB"}
    with pytest.raises(ValueError, match="mode must be one of"):
        set_trainable(model, "biases")


def test_select_targets_is_pure():
    names = ["a.q", "a.k", "head", "fc"]
    assert select_targets(names, "all") == ["a.q", "a.k", "fc"]
    assert select_targets(names, ["*.k", "head"]) == ["a.k", "head"]


# --- on the GPT ------------------------------------------------------------------------------
def _gpt(seed=0):
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8),
               rng=np.random.default_rng(seed), dtype=np.float64)


def test_gpt_inject_names_and_training_step_touches_only_adapters():
    model = _gpt()
    res = inject(model, lr.LoRAConfig(r=2), targets=("attn", "mlp"), rng=0)
    assert res.replaced == _names(2)
    _randomise_B(model)
    before = {n: p.data.copy() for n, p in model.parameters().items()}
    idx = np.random.default_rng(1).integers(0, 13, (2, 8))
    loss, dlogits = model.loss(idx[:, :-1], idx[:, 1:])
    model.backward(dlogits)
    opt = lr.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    opt.step()
    for n, p in model.parameters().items():
        changed = not np.array_equal(p.data, before[n])
        assert changed == (n.endswith(".A") or n.endswith(".B")), n
        if not p.trainable:
            assert p.grad is None, n


def test_gpt_numpy_and_torch_injection_agree():
    from lowrank_gpu.nn.convert import to_torch
    from lowrank_gpu.nn.gpt import from_numpy

    npm = _gpt()
    tm = from_numpy(npm)
    cfg = lr.LoRAConfig(r=2, alpha=3.0)
    r1 = inject(npm, cfg, targets=("q", "fc"), ranks={"blocks.1.*": 3}, rng=0)
    r2 = inject(tm, cfg, targets=("q", "fc"), ranks={"blocks.1.*": 3}, rng=0)  # forwarded to lowrank_gpu
    assert r1.replaced == r2.replaced and r1.trainable_params == r2.trainable_params
    assert r1.total_params == r2.total_params
    _randomise_B(npm)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if p.requires_grad:
                p.copy_(to_torch(npm.parameters()[n].data))
    idx = np.random.default_rng(2).integers(0, 13, (2, 6))
    assert_close(tm(torch.tensor(idx)), npm.forward(idx), "logits torch vs numpy", *(1e-10, 1e-12))


# --- torch models ----------------------------------------------------------------------------
class HFLike(torch.nn.Module):
    """Hugging Face style names: layers.{i}.self_attn.{q_proj,...}, lm_head."""

    def __init__(self, d=6):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for _ in range(2):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            for n in ("q_proj", "k_proj", "v_proj"):
                setattr(layer.self_attn, n, torch.nn.Linear(d, d, dtype=torch.float64))
            layer.norm = torch.nn.LayerNorm(d, dtype=torch.float64)
            self.layers.append(layer)
        self.lm_head = torch.nn.Linear(d, 3, dtype=torch.float64)

    def forward(self, x):
        for layer in self.layers:
            a = layer.self_attn
            x = layer.norm(x + a.q_proj(x) * a.k_proj(x) + a.v_proj(x))
        return self.lm_head(x)


def test_torch_inject_any_module():
    from lowrank_gpu.adapters import LoRALinear as TorchLoRA
    from lowrank_gpu.inject import inject as tinject

    torch.manual_seed(0)
    model = HFLike()
    x = torch.randn(2, 6, dtype=torch.float64)
    y0 = model(x).detach()
    res = tinject(model, lr.LoRAConfig(r=2), targets=("q_proj", "v_proj"), rng=0)
    assert res.replaced == [f"layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    assert all(isinstance(model.get_submodule(n), TorchLoRA) for n in res.replaced)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.{t}" for n in res.replaced for t in "AB"}
    assert model.layers[0].self_attn.q_proj.A.dtype == torch.float64
    assert_close(model(x), y0, "zero-B torch output")
    assert "lm_head" not in tinject(HFLike(), lr.LoRAConfig(r=1), targets="all").replaced
    with pytest.raises(ValueError, match=r"'query'.*layers\.0\.self_attn\.q_proj"):
        tinject(HFLike(), lr.LoRAConfig(r=1), targets="query")


def test_torch_inject_rolls_back():
    from lowrank_gpu.inject import inject as tinject

    model = HFLike()
    with torch.no_grad():
        model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")
    mods = dict(model.named_modules())
    with pytest.raises(ValueError, match="finite"):
        tinject(model, lr.LoRAConfig(r=2), targets="q_proj")
    assert dict(model.named_modules()) == mods
    assert all(p.requires_grad for p in model.parameters())


def test_torch_set_trainable_and_baselines_via_inject():
    model = HFLike()
    res = inject(model, method="bitfit")
    want = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert res.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in want)
    assert inject(model, method="full").trainable_params == sum(p.numel() for p in model.parameters())
