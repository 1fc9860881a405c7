"""The training loops (NumPy and torch), evaluation, and the shipped pre-trained model."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

from lowrank_ref import data
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.train import evaluate, model_bytes, train


def tiny_gpt(dtype=np.float32, seed=0, block_size=8):
    cfg = GPTConfig(vocab_size=data.default_tokenizer().vocab_size, block_size=block_size, n_layer=1,
                    n_head=2, d_model=16, mlp_ratio=2)
    return GPT(cfg, rng=np.random.default_rng(seed), dtype=dtype)


@pytest.fixture(scope="module")
def task():
    return data.builtin_task(0)


def test_training_reduces_loss(task):
    model = tiny_gpt()
    before = evaluate(model, task.base_heldout, max_windows=64)
    res = train(model, task.base_train, steps=60, lr=1e-2, batch_size=8, warmup=5, rng=0, progress=False)
    after = evaluate(model, task.base_heldout, max_windows=64)
    assert len(res.losses) == 60 and len(res.lrs) == 60
    # an untrained model is near-uniform: loss ≈ ln V
    assert before["loss"] == pytest.approx(np.log(task.vocab_size), abs=0.1)
    assert after["loss"] < before["loss"] - 1.0
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10]) - 1.0
    assert after["accuracy"] > before["accuracy"]


def test_cosine_schedule_with_warmup_is_used(task):
    res = train(tiny_gpt(), task.base_train, steps=10, lr=0.1, batch_size=2, warmup=2, rng=0, progress=False)
    # warmup: 0, 0.05; then cosine from 0.1 down: step k>=2 -> 0.05 (1 + cos(pi (k-2)/8))
    expected = [0.0, 0.05] + [0.05 * (1 + np.cos(np.pi * (k - 2) / 8)) for k in range(2, 10)]
    assert np.allclose(res.lrs, expected)
    const = train(tiny_gpt(), task.base_train, steps=3, lr=0.1, batch_size=2, schedule="constant",
                  rng=0, progress=False)
    assert const.lrs == [0.1, 0.1, 0.1]


def test_evaluate_matches_a_direct_count(task):
    model = tiny_gpt(np.float64, seed=3)
    res = evaluate(model, task.dialect_heldout, max_windows=10, batch_size=4)
    toks = task.dialect_heldout
    x = toks[:80].reshape(10, 8)
    y = toks[1:81].reshape(10, 8)
    z = model.forward(x)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1).mean()
    assert res["tokens"] == 80
    assert res["accuracy"] == pytest.approx(float((z.argmax(-1) == y).mean()))
    assert res["loss"] == pytest.approx(float(nll), rel=1e-10)
    assert 0.0 <= res["accuracy"] <= 1.0


def test_adamw_state_is_two_moments_per_trainable_scalar(task):
    model = tiny_gpt()
    res = train(model, task.base_train, steps=2, lr=1e-3, batch_size=2, rng=0, progress=False,
                measure_memory=True)
    n = model.num_trainable_parameters()
    assert res.optimizer_state_bytes == 2 * 4 * n  # exp_avg and exp_avg_sq, float32
    # peak memory counts the weights plus at least the gradients and the optimizer state
    assert res.peak_memory_bytes >= model_bytes(model) + 3 * 4 * n
    assert res.seconds_per_step > 0


def test_only_lora_parameters_change(task):
    from lowrank_ref import LoRAConfig
    from lowrank_ref.inject import inject

    model = tiny_gpt()
    inject(model, LoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=0)
    before = {n: p.data.copy() for n, p in model.parameters().items()}
    train(model, task.dialect_train, steps=3, lr=1e-2, batch_size=2, rng=0, progress=False)
    for n, p in model.parameters().items():
        changed = not np.array_equal(p.data, before[n])
        assert changed == (n.endswith(".A") or n.endswith(".B")), n


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"batch_size": -1}, "batch_size"),
    ({"lr": float("nan")}, "lr"),
    ({"optimizer": "lion"}, "adamw, adam, sgd"),
    ({"schedule": "step"}, "cosine, constant"),
    ({"warmup": 5, "steps": 5}, "warmup"),
    ({"clip": 0}, "clip"),
    ({"backend": "torch"}, "numpy model"),
    ({"backend": "tpu"}, "known backends"),
    ({"rng": "seed"}, "rng"),
])
def test_train_bad_input(task, kwargs, match):
    args = {"steps": 2, "lr": 1e-3, "batch_size": 2, "progress": False, "rng": 0}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        train(tiny_gpt(), task.base_train, **args)


def test_frozen_model_cannot_train(task):
    model = tiny_gpt()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, task.base_train, steps=1, progress=False)


# -- NumPy vs torch --------------------------------------------------------------------------
def test_numpy_and_torch_loops_agree_in_float64(task):
    torch = pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_gpu.train import train as torch_train

    np_model = tiny_gpt(np.float64, seed=5)
    t_model = from_numpy(np_model)
    assert next(t_model.parameters()).dtype == torch.float64
    kw = dict(steps=4, lr=1e-2, batch_size=3, warmup=1, weight_decay=0.1, clip=0.5, progress=False)
    r_np = train(np_model, task.dialect_train, rng=11, **kw)
    r_t = torch_train(t_model, task.dialect_train, rng=11, **kw)
    assert_close(np.array(r_np.losses), np.array(r_t.losses), "losses", rtol=1e-10, atol=1e-12)
    assert r_np.lrs == r_t.lrs
    t_params = dict(t_model.named_parameters())
    for n, p in np_model.parameters().items():
        assert_close(p.data, t_params[n], n, rtol=1e-8, atol=1e-10)
    assert r_np.optimizer_state_bytes == r_t.optimizer_state_bytes
    # and the evaluations agree
    e_np = evaluate(np_model, task.base_heldout, max_windows=16)
    e_t = evaluate(t_model, task.base_heldout, max_windows=16)
    assert e_np["accuracy"] == e_t["accuracy"]
    assert e_np["loss"] == pytest.approx(e_t["loss"], rel=1e-10)


def test_numpy_and_torch_lora_training_agree_in_float64(task, tmp_path):
    pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_ref import LoRAConfig
    from lowrank_ref.inject import inject
    from lowrank_ref.io import load_adapter, save_adapter

    np_model = tiny_gpt(np.float64, seed=6)
    t_model = from_numpy(np_model)  # the same base weights, before any adapter
    inject(np_model, LoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=1)
    for n, p in np_model.parameters().items():
        if n.endswith(".B"):
            p.data = np.random.default_rng(2).normal(0, 0.1, p.shape)  # non-zero B: both factors matter
    save_adapter(np_model, tmp_path / "a.safetensors")
    load_adapter(t_model, tmp_path / "a.safetensors")  # injects the same adapters, same values
    kw = dict(steps=3, lr=1e-2, batch_size=3, weight_decay=0.01, progress=False, rng=4)
    r_np = train(np_model, task.dialect_train, **kw)
    r_t = train(t_model, task.dialect_train, **kw)
    assert_close(np.array(r_np.losses), np.array(r_t.losses), "losses", rtol=1e-10, atol=1e-12)
    t_params = dict(t_model.named_parameters())
    trained = [n for n in np_model.trainable_parameters()]
    assert trained and all(n.endswith((".A", ".B")) for n in trained)
    for n in trained:
        assert_close(np_model.parameters()[n].data, t_params[n], n, rtol=1e-8, atol=1e-10)


def test_train_dispatches_on_backend(task):
    pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy

    t_model = from_numpy(tiny_gpt())
    res = train(t_model, task.base_train, steps=2, batch_size=2, progress=False, rng=0,
                measure_memory=True)  # backend read off the model
    assert res.backend == "torch"
    assert res.peak_memory_bytes > sum(p.numel() * 4 for p in t_model.parameters())
    with pytest.raises(ValueError, match="torch model"):
        train(t_model, task.base_train, steps=1, backend="numpy", progress=False)


# -- the shipped model ----------------------------------------------------------------------
def test_shipped_model_is_small_and_knows_the_base_language_better_than_the_dialect(task):
    from lowrank_ref.models import ASSET_DIR, WEIGHTS_FILE, load_pretrained

    assert (ASSET_DIR / WEIGHTS_FILE).stat().st_size < 2 * 1024 * 1024
    model = load_pretrained()
    assert model.config.vocab_size == task.vocab_size <= 64
    base = evaluate(model, task.base_heldout, max_windows=128)
    dialect = evaluate(model, task.dialect_heldout, max_windows=128)
    assert base["accuracy"] > dialect["accuracy"] + 0.05
    assert dialect["loss"] > base["loss"] + 1.0
    # far better than guessing: the base language has been learned
    assert base["loss"] < 0.6 * np.log(task.vocab_size)


def test_load_pretrained_returns_fresh_copies_in_each_backend():
    pytest.importorskip("torch")
    import torch

    from lowrank_ref.models import load_pretrained

    a = load_pretrained()
    a.head.weight.data[...] = 0.0
    b = load_pretrained(dtype="float64")
    assert b.head.weight.data.dtype == np.float64 and np.any(b.head.weight.data != 0)
    t = load_pretrained(backend="torch", dtype=torch.float64)
    x = np.arange(16).reshape(2, 8) % 61
    assert_close(b.forward(x), t(torch.from_numpy(x)), "logits", rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="bfloat16"):
        load_pretrained(dtype="bfloat16")
    with pytest.raises(ValueError, match="known backends"):
        load_pretrained(backend="tpu")


def test_a_model_trained_on_other_data_is_refused(tmp_path):
    import json
    import shutil

    from lowrank_ref.models import ASSET_DIR, CONFIG_FILE, WEIGHTS_FILE, load_pretrained

    shutil.copy(ASSET_DIR / WEIGHTS_FILE, tmp_path / WEIGHTS_FILE)
    meta = json.loads((ASSET_DIR / CONFIG_FILE).read_text())
    meta["data_version"] = "0"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lowrank-ref pretrain"):
        load_pretrained(asset_dir=tmp_path)


def test_a_corrupt_weights_file_is_a_clear_error(tmp_path):
    import shutil

    from lowrank_ref.models import ASSET_DIR, CONFIG_FILE, WEIGHTS_FILE, load_pretrained

    shutil.copy(ASSET_DIR / CONFIG_FILE, tmp_path / CONFIG_FILE)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read model weights"):
        load_pretrained(asset_dir=tmp_path)
