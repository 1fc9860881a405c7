"""PiSSA init: the output is unchanged at init, s·B·A is the best rank-r approximation of W0
(Eckart–Young), the factors split √(Σ_r/s) evenly, NumPy and torch agree, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters.pissa import pissa_decompose
from lowrank_ref.gradcheck import gradcheck


@given(out=st.integers(1, 8), inn=st.integers(1, 8), r=st.integers(1, 8), alpha=st.floats(0.5, 32),
       rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_output_unchanged_at_init(out, inn, r, alpha, rslora, seed):
    r = min(r, out, inn)
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((out, inn)), rng.standard_normal(out)
    x = rng.standard_normal((3, inn))
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        base = lr.nn.Linear.from_arrays(W.astype(dtype), b.astype(dtype))
        layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=r, alpha=alpha, rslora=rslora, init="pissa"))
        scale = np.abs(x) @ np.abs(W).T + np.abs(b)  # a bound on the size of each output entry
        err = np.abs(layer.forward(x.astype(dtype)) - (x @ W.T + b))
        assert np.all(err <= tol * scale + tol), (dtype, float(err.max()))


def test_principal_part_and_residual(rng):
    W = rng.standard_normal((7, 5))
    r, s = 2, 3.0
    A, B, W_res = pissa_decompose(W, r, s)
    sigma = np.linalg.svd(W, compute_uv=False)
    # s B A is the best rank-r approximation: the residual holds exactly the minor singular values
    assert np.linalg.matrix_rank(B @ A) == r
    assert_close(np.linalg.svd(W_res, compute_uv=False)[: 5 - r], sigma[r:], "σ(W_res)", rtol=1e-10)
    assert_close(np.linalg.norm(W - s * B @ A) ** 2, np.sum(sigma[r:] ** 2), "Eckart–Young", rtol=1e-10)
    # √(Σ_r/s) on both sides: A Aᵀ = Bᵀ B = diag(Σ_r / s)
    assert_close(A @ A.T, np.diag(sigma[:r] / s), "A Aᵀ", atol=1e-12)
    assert_close(B.T @ B, np.diag(sigma[:r] / s), "Bᵀ B", atol=1e-12)
    assert_close(W_res + s * B @ A, W, "W_res + s B A", atol=1e-12)


def test_lora_pissa_layer_writes_the_residual_and_trains(rng):
    W = rng.standard_normal((6, 4))
    base = lr.nn.Linear.from_arrays(W, rng.standard_normal(6))
    W_copy = W.copy()
    layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=2, alpha=4, init="pissa"), rng=rng)
    assert np.array_equal(W, W_copy)  # the caller's array is untouched
    _, _, W_res = pissa_decompose(W, 2, 2.0)
    assert np.array_equal(layer.base.weight.data, W_res)
    assert np.any(layer.B.data) and not base.weight.trainable
    gradcheck(layer, rng.standard_normal((3, 4))).raise_if_failed()
    layer.merge()
    layer.unmerge()
    assert np.array_equal(layer.base.weight.data, W_res)  # unmerge restores the residual bit for bit


def test_bad_input():
    base = lr.nn.Linear.from_arrays(np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"r <= min\(out, in\) = 3"):
        pissa_decompose(base.weight.data, 4, 1.0)
    with pytest.raises(ValueError, match="positive scaling"):
        pissa_decompose(base.weight.data, 2, 0.0)


torch = pytest.importorskip("torch")


@given(out=st.integers(1, 9), inn=st.integers(1, 9), r=st.integers(1, 9), alpha=st.floats(0.5, 32),
       rslora=st.booleans(), dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numpy_and_torch_agree(out, inn, r, alpha, rslora, dtype, seed):
    """Same A, B (same signs, same √(Σ_r/s) split) and W_res in both backends, and the torch LoRA
    layer with init="pissa" starts as the base. The singular vectors are defined (up to the sign
    that fix_svd_signs settles) only where the top r + 1 singular values are apart, so examples
    with a relative gap under 1e-3 are skipped; there a float64 SVD's vectors move by ≲ 1e-13."""
    from hypothesis import assume

    import lowrank_gpu as lg
    from lowrank_gpu.adapters.pissa import pissa_decompose as t_pissa

    r = min(r, out, inn)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, inn)).astype(dtype)
    sv = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    gaps = -np.diff(sv[: r + 1])  # σ_k − σ_{k+1} for k ≤ r (σ_{r+1} decides the rank-r subspace)
    assume(gaps.size == 0 or gaps.min() > 1e-3 * sv[0])
    cfg = lr.LoRAConfig(r=r, alpha=alpha, rslora=rslora, init="pissa")
    A, B, W_res = pissa_decompose(W, r, cfg.scaling)
    tA, tB, tW = t_pissa(torch.from_numpy(W), r, cfg.scaling)
    tol = {"float64": (1e-9, 1e-11), "float32": (1e-5, 1e-6)}[dtype]
    for name, a, t in (("A", A, tA), ("B", B, tB), ("W_res", W_res, tW)):
        assert t.dtype == getattr(torch, dtype), name
        assert_close(a, t, name, *tol)
    lin = torch.nn.Linear(inn, out, dtype=getattr(torch, dtype))
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
    x = torch.from_numpy(rng.standard_normal((2, inn)).astype(dtype))
    y0 = lin(x).detach()
    layer = lg.adapters.LoRALinear(lin, cfg)
    assert_close(layer.base.weight, W_res, "torch residual", *tol)
    assert_close(layer.A, A, "torch layer A", *tol)
    # a bound on the size of each output entry's terms
    scale = float((np.abs(x.numpy()) @ np.abs(W).T).max() + np.abs(lin.bias.detach().numpy()).max())
    assert_close(layer(x), y0, "torch y at init", 0, {"float64": 1e-12, "float32": 1e-5}[dtype] * scale)


def test_a_pissa_adapter_file_reloads_onto_the_original_base(tmp_path):
    """Injecting from the file redoes the (deterministic) SVD split of the same W0, so the residual
    base is rebuilt and the saved A, B give the trained outputs exactly."""
    from lowrank_ref.inject import inject
    from lowrank_ref.io import load_adapter, save_adapter
    from lowrank_ref.nn import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=16)
    model = GPT(cfg, rng=np.random.default_rng(0)).eval()
    inject(model, lr.LoRAConfig(r=2, alpha=4, init="pissa"), targets=("q", "v"), rng=1)
    for p in model.trainable_parameters().values():  # "train": move A and B off their init
        p.data = p.data + 0.1 * np.random.default_rng(3).standard_normal(p.shape).astype(p.data.dtype)
    path = tmp_path / "pissa.safetensors"
    save_adapter(model, path)
    fresh = GPT(cfg, rng=np.random.default_rng(0)).eval()  # the original W0, not the residual
    load_adapter(fresh, path)
    idx = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 8))
    np.testing.assert_array_equal(fresh.forward(idx), model.forward(idx))
    # and the result is not trivially the base: the adapters moved the output
    plain = GPT(cfg, rng=np.random.default_rng(0)).eval()
    assert np.abs(plain.forward(idx) - model.forward(idx)).max() > 1e-3
