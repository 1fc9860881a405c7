"""Configs take NumPy scalars as the numbers they are; bad values name the argument."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.inject import inject
from lowrank_ref.nn import GPT, GPTConfig


def test_numpy_scalars_are_taken_as_python_numbers():
    cfg = lr.LoRAConfig(r=np.int64(3), alpha=np.float32(2.0), dropout=np.float64(0.25), rslora=np.True_)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora) == (3, 2.0, 0.25, True)
    assert type(cfg.rslora) is bool and type(cfg.alpha) is float
    assert lr.DoRAConfig(detach_norm=np.False_).detach_norm is False


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(alpha=np.True_), TypeError, "alpha must be a real number"),
    (dict(alpha=1 + 2j), TypeError, "alpha must be a real number"),
    (dict(rslora=1), TypeError, "rslora must be a bool"),
    (dict(r=2.0), TypeError, "r must be a positive integer"),
    (dict(dropout=np.float32(1.0)), ValueError, r"dropout must be in \[0, 1\)"),
])
def test_bad_config_values_name_the_argument(kwargs, err, words):
    with pytest.raises(err, match=words):
        lr.LoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(ranks={"q": 0}), r"ranks\['q'\] must be a positive integer"),
    (dict(alphas={"blocks.0.*": -1.0}), r"alphas\['blocks.0.\*'\] must be finite and non-negative"),
])
def test_inject_overrides_name_the_entry_and_change_nothing(kwargs, words):
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, d_model=8), rng=np.random.default_rng(0))
    before = set(model.parameters())
    with pytest.raises(ValueError, match=words):
        inject(model, lr.LoRAConfig(r=2), targets=("q", "v"), **kwargs)
    assert set(model.parameters()) == before
    assert all(p.trainable for p in model.parameters().values())


def test_no_part_of_the_reference_imports_torch_cupy_or_the_mirror():
    mods = ["lowrank_ref", "lowrank_ref.nn", "lowrank_ref.adapters", "lowrank_ref.quant", "lowrank_ref.optim",
            "lowrank_ref.data", "lowrank_ref.io", "lowrank_ref.inject", "lowrank_ref.train", "lowrank_ref.models",
            "lowrank_ref.gradcheck", "lowrank_ref.registry", "lowrank_ref.api", "lowrank_ref.cli",
            "lowrank_ref.experiments", "lowrank_ref.experiments.compare"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in ('torch', 'cupy', 'lowrank_gpu') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_train_with_backend_cupy_points_to_cuda():
    from lowrank_ref.data import builtin_task
    from lowrank_ref.train import train

    model = GPT(GPTConfig(vocab_size=61, block_size=4, n_layer=1, n_head=2, d_model=8), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="backend='cuda'"):
        train(model, builtin_task().base_train, steps=1, backend="cupy", progress=False)
