r"""PiSSA in PyTorch: the twin of :mod:`lowrank_ref.adapters.pissa` (same formulas, same signs).

``B = U_r √(Σ_r/s)``, ``A = √(Σ_r/s) V_rᵀ``, and the base weight becomes ``W_res = W0 − s B A``
(Meng et al. 2024, arXiv:2404.02948). The SVD runs in float64 on the weight's device.
"""

from __future__ import annotations

import torch

from lowrank_ref.adapters.pissa import check_pissa_args

__all__ = ["pissa_decompose", "pissa_init", "fix_svd_signs"]


def fix_svd_signs(U: torch.Tensor, Vh: torch.Tensor):
    """Flip each singular pair so that the largest-magnitude entry of ``U[:, k]`` is positive."""
    idx = U.abs().argmax(dim=0)  # (k,)
    sign = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    sign[sign == 0] = 1
    return U * sign, Vh * sign[:, None]


@torch.no_grad()
def pissa_decompose(W: torch.Tensor, r: int, s: float):
    """``(A (r, in), B (out, r), W_res (out, in))`` in ``W``'s dtype, ``W_res + s B A = W0``."""
    check_pissa_args(tuple(W.shape), r, s)
    W64 = W.detach().double()
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)  # W0 = U Σ Vᵀ
    U, Vh = fix_svd_signs(U[:, :r], Vh[:r])
    root = torch.sqrt(S[:r] / s)  # √(Σ_r / s)
    B = (U * root).to(W.dtype)  # (out, r)
    A = (root[:, None] * Vh).to(W.dtype)  # (r, in)
    W_res = (W64 - s * (B.double() @ A.double())).to(W.dtype)  # W0 − s B A
    return A, B, W_res


@torch.no_grad()
def pissa_init(base, config):
    """PiSSA's ``(A, B)`` for a ``torch.nn.Linear``; writes the residual into ``base.weight``."""
    A, B, W_res = pissa_decompose(base.weight, config.r, config.scaling)
    base.weight.copy_(W_res)
    return A, B
