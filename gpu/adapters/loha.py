r"""LoHa in PyTorch: the twin of :mod:`lowrank_ref.adapters.loha`, backward by autograd.

``ΔW = s (B1 A1) ⊙ (B2 A2)`` with ``A1, A2 (r, in)``, ``B1, B2 (out, r)``, ``s = α/r``; the same
two routes (dense: build ΔW; factorised: ``x ΔWᵀ = s (x K_Aᵀ) K_Bᵀ`` through the face-splitting
identity), chosen by the same cost rule; the same init (PEFT's: ``A2 = 0``) and dropouts
(``rank_dropout`` over the rows of ΔW, rescaled by the mask's mean, an all-dropped draw switches
the branch off; ``module_dropout`` skips the branch). Wraps any ``torch.nn.Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.loha import LoHaConfig, loha_route

__all__ = ["LoHaLinear", "face_split", "draw_row_dropout"]


def draw_row_dropout(generator, out_features: int, rank_dropout: float, module_dropout: float, training: bool):
    """``(keep (out,) float64 0/1 or None, active)``: the twin of
    :func:`lowrank_ref.adapters.loha.draw_row_dropout` on a ``torch.Generator`` (not rescaled;
    an all-dropped draw is ``active = False``)."""
    if not training:
        return None, True
    if module_dropout > 0 and float(torch.rand(1, generator=generator)) < module_dropout:
        return None, False
    if rank_dropout > 0:
        keep = (torch.rand(out_features, generator=generator) > rank_dropout).double()
        if not bool(keep.any()):
            return None, False  # every row dropped: the branch is off (PEFT's rescale divides by zero)
        return keep, True
    return None, True


def face_split(A1, A2, B1, B2):
    """``(K_A (r², in), K_B (out, r²))``: column-wise Kronecker of the A's, row-wise of the B's."""
    r, n_in = A1.shape
    KA = (A1[:, None, :] * A2[None, :, :]).reshape(r * r, n_in)  # K_A[(p,q), j] = A1[p,j] A2[q,j]
    KB = (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], r * r)  # K_B[i, (p,q)] = B1[i,p] B2[i,q]
    return KA, KB


class LoHaLinear(AdapterLinear):
    """A frozen ``torch.nn.Linear`` (or a 4-bit ``QuantizedLinear``) plus ``s (B1 A1) ⊙ (B2 A2)``."""

    CONFIG = LoHaConfig

    def __init__(self, base: nn.Linear, config: LoHaConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        r, dtype, device = config.r, self.weight_dtype, self._base_device()
        self.generator = generator_from(rng, device="cpu")  # init, then the dropout draws
        g, out, n_in = self.generator, self.out_features, self.in_features

        def uniform(shape, bound):  # kaiming_uniform(a=√5) = U(±1/√fan_in)
            return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound

        B1 = uniform((out, r), 1 / math.sqrt(r))
        A1 = uniform((r, n_in), 1 / math.sqrt(n_in))
        B2 = uniform((out, r), 1 / math.sqrt(r))
        A2 = torch.zeros((r, n_in), dtype=torch.float64)  # A2 = 0 (PEFT's hada_w2_b): ΔW = 0
        self.A1 = nn.Parameter(A1.to(device=device, dtype=dtype))  # (r, in)
        self.A2 = nn.Parameter(A2.to(device=device, dtype=dtype))  # (r, in)
        self.B1 = nn.Parameter(B1.to(device=device, dtype=dtype))  # (out, r)
        self.B2 = nn.Parameter(B2.to(device=device, dtype=dtype))  # (out, r)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * ((self.B1 @ self.A1) * (self.B2 @ self.A2))  # s (B1 A1) ⊙ (B2 A2)

    def _delta_weight_f64(self) -> torch.Tensor:
        f = {n: p.detach().double() for n, p in self.adapter_parameters().items()}
        return self.scaling * ((f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"]))

    def _row_mask(self):
        """``(m or None, active)``: the rescaled row mask and whether the branch acts (training only)."""
        c = self.config
        keep, active = draw_row_dropout(self.generator, self.out_features, c.rank_dropout, c.module_dropout,
                                        self.training)
        return (None if keep is None else keep / keep.mean()), active

    def _forward(self, x):
        y = self.base(x)  # x W0ᵀ + b   (..., out)
        m, active = self._row_mask()
        if not active:
            return y
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        c = self.config
        route = c.route if c.route != "auto" else loha_route(x2.shape[0], self.in_features, self.out_features, c.r)
        if route == "dense":
            z = x2 @ self.delta_weight().T  # x ΔWᵀ   (N, out)
        else:
            KA, KB = face_split(self.A1, self.A2, self.B1, self.B2)
            z = ((x2 @ KA.T) * self.scaling) @ KB.T  # s (x K_Aᵀ) K_Bᵀ   (N, out)
        if m is not None:
            z = z * m.to(device=z.device, dtype=z.dtype)
        return y + z.view(y.shape)
