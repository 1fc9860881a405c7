"""Baselines: full fine-tuning and BitFit (Ben Zaken et al. 2021), NumPy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowrank_ref as lr
from lowrank_ref import registry
from lowrank_ref.adapters.baselines import BitFitConfig, FullFinetuneConfig, bitfit, full_finetune
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig


def _gpt():
    return GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, d_model=8),
               rng=np.random.default_rng(0), dtype=np.float64)


def _bias_count_by_hand(cfg: GPTConfig) -> int:
    """Per block: q,k,v,o biases (4 C), fc (mlp_ratio C), proj (C), two LayerNorm shifts (2 C);
    plus the final LayerNorm's shift (C); the head has no bias."""
    C = cfg.d_model
    return cfg.n_layer * (4 * C + cfg.mlp_ratio * C + C + 2 * C) + C


def test_bitfit_trains_exactly_the_biases():
    model = _gpt()
    n = bitfit(model)
    names = set(model.trainable_parameters())
    assert names and all(x.rsplit(".", 1)[-1] == "bias" for x in names)
    assert n == _bias_count_by_hand(model.config) == model.num_trainable_parameters()
    assert {"blocks.0.ln1.bias", "blocks.1.ln2.bias", "ln_f.bias"} <= names  # LayerNorm shifts too


def test_full_finetune_trains_everything():
    model = _gpt()
    model.requires_grad_(False)
    assert full_finetune(model) == model.num_parameters() == model.num_trainable_parameters()


def test_registered_as_whole_model_methods():
    for name, cfg_cls, fn in (("full", FullFinetuneConfig, full_finetune), ("bitfit", BitFitConfig, bitfit)):
        spec = registry.get_method(name)
        assert spec.numpy is None and spec.torch is None and not spec.is_layer
        assert registry.load_object(spec.model_fn.numpy) is fn
        assert spec.config is cfg_cls
        res = inject(_gpt(), cfg_cls())  # found by config type, like a layer method
        assert res.method == name and res.replaced == []
    res = inject(_gpt(), method="bitfit")
    assert res.trainable_params == _bias_count_by_hand(_gpt().config)


def test_bitfit_without_biases_is_an_error_and_changes_nothing():
    model = lr.nn.Linear(3, 2, bias=False)
    with pytest.raises(ValueError, match="no bias"):
        bitfit(model)
    assert model.weight.trainable


def test_torch_twins_agree_with_numpy():
    from lowrank_gpu.adapters import baselines as tb
    from lowrank_gpu.nn.gpt import from_numpy

    npm = _gpt()
    tm = from_numpy(npm)
    assert tb.bitfit(tm) == bitfit(npm)
    assert {n for n, p in tm.named_parameters() if p.requires_grad} == set(npm.trainable_parameters())
    assert tb.full_finetune(tm) == full_finetune(npm)
    with pytest.raises(ValueError, match="no bias"):
        tb.bitfit(torch.nn.Linear(2, 2, bias=False))
    assert bitfit(tm) == _bias_count_by_hand(npm.config)  # the NumPy entry point forwards torch models


def test_baseline_configs_have_no_fields():
    with pytest.raises(ValueError, match="no fields"):
        BitFitConfig().replace(r=2)
    with pytest.raises(ValueError, match="no fields"):
        FullFinetuneConfig().replace(alpha=1)
    with pytest.raises(ValueError, match="whole-model"):
        inject(_gpt(), FullFinetuneConfig(), ranks={"q": 2})


def test_adapt_refuses_whole_model_modes():
    base = lr.nn.Linear(3, 2)
    for call in (lambda: lr.adapt(base, BitFitConfig()), lambda: lr.adapt(base, None, method="full")):
        with pytest.raises(ValueError, match="whole-model mode"):
            call()
