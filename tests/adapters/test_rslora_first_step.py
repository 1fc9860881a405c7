r"""Chapter 02 §7: what the first training step of a LoRA (``B = 0``) does to the loss, by rank.

With a linear loss ``L = ⟨w, y⟩`` the upstream gradient is ``ȳ = w`` whatever ``y`` is, and the
change of ``L`` after one step is exactly ``⟨w, Δy⟩`` (the first-order change, no remainder). At
``B = 0`` only ``B`` gets a gradient, ``B̄ = s wᵀ h`` with ``h = x Aᵀ`` (N, r), so, by hand:

- SGD: ``B = −η s wᵀ h``, ``Δy = s h Bᵀ``, ``ΔL = −η s² ‖hᵀ w‖²`` (a sum of ``r·out`` squares);
- Adam: the first update is ``−η B̄ / (|B̄| + ε) ≈ −η sign(B̄)``, ``ΔL = −η s ‖hᵀ w‖₁``.

With ``A``'s rows copies of one row up to sign, every rank-``k`` term is the same, so exactly
``−ΔL ∝ s² r`` (SGD) and ``−ΔL ∝ s r`` (Adam): ``α/r`` starves large ranks under SGD (``∝ 1/r``)
and ``α/√r`` does not; under Adam ``α/r`` is already rank-independent and ``α/√r`` grows like ``√r``.
"""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_ref as lr

RANKS = (1, 4, 16, 64)
ETA, ALPHA = 1e-3, 8.0


def first_step_loss_change(A, rslora, optimizer, seed=0):
    """One step of ``optimizer`` on a LoRA with the given ``A`` and ``B = 0``, loss ``⟨w, y⟩``;
    returns ``(L_after − L_before, s, h, w)``."""
    rng = np.random.default_rng(seed)
    out, inn = 6, A.shape[1]
    base = lr.nn.Linear.from_arrays(rng.standard_normal((out, inn)), rng.standard_normal(out))
    x = rng.standard_normal((10, inn))  # the same x and w for every rank
    w = rng.standard_normal((10, out))
    layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=A.shape[0], alpha=ALPHA, rslora=rslora), rng=rng)
    layer.A.data = A.copy()
    opt = {"sgd": lr.optim.SGD, "adam": lr.optim.Adam}[optimizer](layer.trainable_parameters(), lr=ETA)
    before = float(np.sum(w * layer.forward(x)))
    layer.backward(w)
    opt.step()
    after = float(np.sum(w * layer.forward(x)))
    return after - before, layer.scaling, x @ A.T, w


def tiled_A(r, seed=1):
    """``r`` rows, each the same random row times a random sign."""
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(9)
    return rng.choice([-1.0, 1.0], size=(r, 1)) * row


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("rslora", [False, True])
def test_first_step_loss_change_matches_the_hand_formula(optimizer, rslora):
    A = np.random.default_rng(2).standard_normal((5, 9))  # independent rows
    dL, s, h, w = first_step_loss_change(A, rslora, optimizer)
    hw = h.T @ w  # (r, out)
    expected = -ETA * s * s * np.sum(hw**2) if optimizer == "sgd" else -ETA * s * np.sum(np.abs(hw))
    assert dL < 0
    np.testing.assert_allclose(dL, expected, rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_how_the_first_step_scales_with_rank(optimizer):
    """−ΔL(r) / −ΔL(1): SGD ∝ s² r, Adam ∝ s r, for s = α/r and s = α/√r."""
    expect = {  # the rank-r loss change over the rank-1 one
        ("sgd", False): lambda r: 1 / r,  # (α/r)² r
        ("sgd", True): lambda r: 1.0,  # (α/√r)² r
        ("adam", False): lambda r: 1.0,  # (α/r) r: Adam gives back the whole factor r
        ("adam", True): lambda r: np.sqrt(r),  # (α/√r) r
    }
    for rslora in (False, True):
        d1 = first_step_loss_change(tiled_A(1), rslora, optimizer)[0]
        for r in RANKS[1:]:
            dr = first_step_loss_change(tiled_A(r), rslora, optimizer)[0]
            np.testing.assert_allclose(dr / d1, expect[optimizer, rslora](r), rtol=1e-6,
                                       err_msg=f"{optimizer}, rslora={rslora}, r={r}")


def test_the_output_change_does_not_grow_like_the_loss_change():
    """‖Δy‖ is not what scales like s² r. The SGD step's ``Δy = −η s² h hᵀ w``; with ``h`` of
    independent N(0, 1) entries (``x`` Gaussian, ``A``'s rows orthonormal) and ``N ≫ r``,
    ``hᵀh ≈ N I``, so ``‖Δy‖² ≈ N ‖hᵀw‖²``: at fixed ``s``, ``‖Δy‖`` grows like ``√r`` while
    ``−ΔL = η s² ‖hᵀw‖²`` grows like ``r``. Checked on r = 64 against r = 4 (ratios √16 = 4 and 16,
    each within a factor 1.5; ``‖hᵀw‖²`` sums 4·50 squares at r = 4, a relative spread of ~0.1)."""
    rng = np.random.default_rng(3)
    h64 = rng.standard_normal((5000, 64))  # (N, r)
    w = rng.standard_normal((5000, 50))  # (N, out)
    res = {}
    for r in (4, 64):
        h = h64[:, :r]
        res[r] = (np.linalg.norm(h @ (h.T @ w)), np.sum((h.T @ w) ** 2))  # ‖h hᵀ w‖, ‖hᵀ w‖² (s = η = 1)
    dy_ratio, dl_ratio = res[64][0] / res[4][0], res[64][1] / res[4][1]
    assert 4 / 1.5 < dy_ratio < 4 * 1.5, dy_ratio
    assert 16 / 1.5 < dl_ratio < 16 * 1.5, dl_ratio
