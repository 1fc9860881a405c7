"""``inject(train_also=...)``: LongLoRA's "LoRA+" (LoRA plus trainable embeddings and norms) and
Houlsby's trainable layer norms. Exactly the selected parameters train, in both backends; bad
selectors are errors that leave the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowrank_ref as lr
from lowrank_gpu.nn.gpt import from_numpy
from lowrank_ref.inject import inject
from lowrank_ref.train import train

CFG = lr.nn.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8, mlp_ratio=2)
V, T, C, L = 13, 8, 8, 2
NORM_NAMES = [f"blocks.{i}.{ln}.{w}" for i in range(L) for ln in ("ln1", "ln2") for w in ("weight", "bias")] + \
             ["ln_f.weight", "ln_f.bias"]


def model(backend):
    m = lr.nn.GPT(CFG, rng=np.random.default_rng(0))
    return m if backend == "numpy" else from_numpy(m)


def trainable(m):
    if isinstance(m, torch.nn.Module):
        return {n for n, p in m.named_parameters() if p.requires_grad}
    return set(m.trainable_parameters())


def values(m):
    if isinstance(m, torch.nn.Module):
        return {n: p.detach().clone().numpy() for n, p in m.named_parameters()}
    return {n: p.data.copy() for n, p in m.parameters().items()}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_lora_plus_trains_lora_embeddings_and_norms_only(backend):
    m = model(backend)
    res = inject(m, lr.LoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=0, train_also=("embeddings", "norms"))
    lora = {f"blocks.{i}.attn.{t}.{f}" for i in range(L) for t in ("q", "v") for f in ("A", "B")}
    assert trainable(m) == lora | {"tok_emb.weight", "pos_emb.weight"} | set(NORM_NAMES)
    assert res.also_trained == ["tok_emb.weight", "pos_emb.weight", *NORM_NAMES[:4], *NORM_NAMES[4:8], *NORM_NAMES[8:]]
    # by hand: 4 layers of r (in + out), the two tables, 2L + 1 LayerNorms of 2C each
    assert res.trainable_params == 4 * 2 * (C + C) + V * C + T * C + (2 * L + 1) * 2 * C
    before = values(m)
    data = np.random.default_rng(1).integers(0, V, 400)
    train(m, data, steps=3, lr=1e-2, batch_size=4, rng=0, progress=False)
    after = values(m)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == trainable(m)  # every selected tensor moved, nothing else did


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_houlsby_adapters_with_the_papers_trainable_layer_norms(backend):
    m = model(backend)
    inject(m, lr.HoulsbyConfig(bottleneck=2), targets=("o", "proj"), rng=0, train_also="norms")
    adapters = {f"blocks.{i}.{p}.{n}" for i in range(L) for p in ("attn.o", "mlp.proj")
                for n in ("W_down", "b_down", "W_up", "b_up")}
    assert trainable(m) == adapters | set(NORM_NAMES)


def test_patterns_select_by_parameter_name():
    m = model("numpy")
    res = inject(m, lr.LoRAConfig(r=2), targets="q", train_also=["ln_f.*", "tok_emb.weight"])
    assert res.also_trained == ["tok_emb.weight", "ln_f.weight", "ln_f.bias"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("bad, err, match", [
    ("nothing*", ValueError, "matches no parameter"),
    ("", TypeError, "train_also"),
    ((), TypeError, "train_also"),
    ([3], TypeError, "train_also"),
    ("blocks.0.attn.q.weight", ValueError, "frozen base of an adapter"),
])
def test_bad_selectors_are_errors_and_change_nothing(backend, bad, err, match):
    m = model(backend)
    flags, before = trainable(m), values(m)
    with pytest.raises(err, match=match):
        inject(m, lr.LoRAConfig(r=2), targets=("q", "v"), train_also=bad)
    assert trainable(m) == flags and not lr.inject.adapter_layers(m)
    assert all(np.array_equal(before[n], v) for n, v in values(m).items())


def test_a_whole_model_mode_refuses_train_also():
    with pytest.raises(ValueError, match="whole-model mode"):
        inject(model("numpy"), method="bitfit", train_also="norms")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_compare_saves_the_extra_trained_tensors_beside_the_adapter_file(backend, tmp_path):
    import os

    from safetensors.numpy import load_file

    from lowrank_ref.experiments.compare import save_trained

    m = model(backend)
    res = inject(m, lr.LoRAConfig(r=2), targets="q", rng=0, train_also="norms")
    size = save_trained(m, tmp_path / "a.safetensors")
    extra = load_file(str(tmp_path / "a.extra.safetensors"))
    assert sorted(extra) == sorted(res.also_trained)
    assert size == os.path.getsize(tmp_path / "a.safetensors") + os.path.getsize(tmp_path / "a.extra.safetensors")
    now = values(m)
    assert all(np.array_equal(extra[n], now[n]) for n in extra)
