r"""DoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.dora`, backward by autograd.

``y = g ⊙ (x W0ᵀ + s x Aᵀ Bᵀ) + b`` with ``g = m / ‖W0 + s B A‖`` row-wise (Liu et al. 2024,
arXiv:2402.09353). With dropout, ``x̃`` feeds the adapter only: ``dropout_correction="shared"``
(the default) rescales the undropped base output, ``y = g ⊙ (x W0ᵀ + s x̃ Aᵀ Bᵀ) + b``;
``"dropped"`` is PEFT's form, ``y = x W0ᵀ + (g − 1) ⊙ x̃ W0ᵀ + g ⊙ s x̃ Aᵀ Bᵀ + b`` (both derived
in the NumPy module). ``detach_norm=True`` takes the norm
out of the graph (``n.detach()``, the paper's §4.3); ``False`` lets autograd differentiate it.
The norm is computed without building ``W0 + s B A`` (same expansion, same dense fallback for
cancelling rows, same zero-row rule ``g_j = 0``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lora import init_lora_A
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.dora import CANCEL_FRACTION, NORM_METHODS
from lowrank_ref.config import DoRAConfig

__all__ = ["DoRALinear", "dora_row_norm"]


def dora_row_norm(W, A, B, s, w0_sq=None, method="factored"):
    r"""``n_j = ‖W0_j + s (B A)_j‖`` (out,), differentiable in ``A`` and ``B``."""
    if method == "dense":
        V = W + s * (B @ A)  # (out, in)
        return safe_sqrt((V * V).sum(dim=1))
    if method not in NORM_METHODS:
        raise ValueError(f"method must be one of {NORM_METHODS}, got {method!r}")
    if w0_sq is None:
        w0_sq = (W * W).sum(dim=1)  # ‖W0_j‖²
    cross = ((W @ A.T) * B).sum(dim=1)  # ⟨(W0 Aᵀ)_j, B_j⟩
    ba_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # ‖(B A)_j‖²
    n2 = w0_sq + 2 * s * cross + (s * s) * ba_sq
    bad = n2 < CANCEL_FRACTION * (w0_sq + (s * s) * ba_sq)
    if bool(bad.any()):  # cancellation: recompute those rows densely
        idx = bad.nonzero().squeeze(1)
        Vb = W[idx] + s * (B[idx] @ A)
        n2 = n2.index_put((idx,), (Vb * Vb).sum(dim=1))
    return safe_sqrt(n2)


def safe_sqrt(n2):
    r"""``√n2`` where ``n2 > 0``, 0 elsewhere, with gradient 0 where ``n2 ≤ 0``.

    ``torch.sqrt`` has derivative ``1/(2√n2)``, infinite at 0, and autograd multiplies it by the
    zero that ``torch.where`` sends back to a dead row: ``0 · ∞ = NaN``. Taking the root of 1 on
    dead rows (the inner ``where``) keeps every intermediate finite; the outer ``where`` then
    gives the zero-norm rule's value, 0, and its gradient, 0 (the NumPy reference's rule)."""
    live = n2 > 0
    one = torch.ones_like(n2)
    return torch.where(live, torch.sqrt(torch.where(live, n2, one)), torch.zeros_like(n2))


class DoRALinear(AdapterLinear):
    """A frozen ``torch.nn.Linear`` as magnitude ``m`` times the direction of ``W0 + s B A``.

    Same config and constructor parameters as ``lowrank_ref.adapters.DoRALinear``;
    ``A (r, in)``, ``B (out, r)``, ``m (out,)`` are ``nn.Parameter``s."""

    CONFIG = DoRAConfig

    def __init__(self, base: nn.Linear, config: DoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        W = self.w0()  # the float weight, or W̃0 dequantised (QDoRA: m starts at ‖W̃0_j‖)
        r, dtype, device = config.r, self.weight_dtype, self._base_device()
        g = generator_from(rng, device="cpu")
        A = init_lora_A(r, self.in_features, config.init, g)  # as LoRALinear: kaiming or gaussian
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))  # (r, in)
        self.B = nn.Parameter(torch.zeros((self.out_features, r), device=device, dtype=dtype))  # B = 0
        w0_sq = (W.detach().double() ** 2).sum(dim=1)
        zero = (w0_sq == 0).nonzero().squeeze(1).tolist()
        if zero:
            warnings.warn(f"base weight rows {zero[:10]} are all zero: DoRA's direction is undefined "
                          "there, so those rows keep their bias and never train", RuntimeWarning, stacklevel=2)
        self.m = nn.Parameter(w0_sq.sqrt().to(dtype))  # (out,) m = ‖W0_j‖
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.norm_method = "factored"
        self._w0_sq_cache = (None, None, None)

    def _w0_sq(self) -> torch.Tensor:
        """``‖W0_j‖²``, cached while the frozen base weight keeps its storage and version.

        The key is ``(data_ptr, _version, dtype)`` and the tensor object: an in-place edit bumps
        ``_version`` and a new tensor changes the object, so either recomputes; unlike the NumPy
        layer, no ``clear_norm_cache()`` is needed. (A 4-bit base is dequantised afresh for
        each call, so its ``‖W̃0_j‖²`` is recomputed each time.)"""
        W0 = self.w0()
        key = (W0.data_ptr(), W0._version, W0.dtype)
        k, ref, val = self._w0_sq_cache
        if k == key and ref is W0 and not W0.requires_grad:
            return val
        val = (W0.detach() ** 2).sum(dim=1)
        self._w0_sq_cache = (key, W0, val)
        return val

    def weight_norm(self) -> torch.Tensor:
        """``n = ‖W0 + s B A‖`` row-wise (out,), differentiable in ``A``, ``B``."""
        return dora_row_norm(self.w0().detach(), self.A, self.B, self.scaling,
                             w0_sq=self._w0_sq(), method=self.norm_method)

    def _row_scale(self, n):
        live = n > 0
        return torch.where(live, self.m / torch.where(live, n, torch.ones_like(n)), torch.zeros_like(n))

    def row_scale(self) -> torch.Tensor:
        return self._row_scale(self.weight_norm())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        W0 = self.w0()
        V = W0.double() + self.scaling * (self.B.double() @ self.A.double())  # (out, in)
        n = torch.linalg.vector_norm(V, dim=1)
        live = n > 0
        g = torch.where(live, self.m.double() / torch.where(live, n, torch.ones_like(n)), torch.zeros_like(n))
        return (g[:, None] * V).to(W0.dtype)  # W' = (m/n) ⊙ V

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        W0 = self.w0()
        return (self.merged_weight().double() - W0.double()).to(W0.dtype)

    def _forward(self, x):
        W0 = self.w0()  # the float weight, or W̃0 rebuilt from 4 bits for this call
        n = self.weight_norm()
        if self.config.detach_norm:
            n = n.detach()  # §4.3: the norm is a constant for the backward pass
        g = self._row_scale(n)  # g = m / n   (out,)
        s = self.scaling
        dropping = self.training and self.config.dropout > 0
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        xd = self.dropout(x2) if dropping else x2  # x̃
        dropped = dropping and self.config.dropout_correction == "dropped"
        ut = (xd if dropped else x2) @ W0.T  # u = x W0ᵀ ("shared") or x̃ W0ᵀ ("dropped")   (N, out)
        z = torch.addmm(ut, xd @ self.A.T, self.B.T, alpha=s)  # z = u + s x̃ Aᵀ Bᵀ (one fused op)
        b = self.base.bias
        y = z * g if b is None else torch.addcmul(b, z, g)  # g ⊙ z + b (the bias is not rescaled)
        if dropped:
            y = y + (x2 @ W0.T - ut)  # PEFT's form: the base sees the undropped input
        return y.reshape(*lead, self.out_features)
