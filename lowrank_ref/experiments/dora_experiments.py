r"""Chapter 02's measurements: DoRA, the "double LoRA" reading of it, rsLoRA over ranks, and
layer-wise targets.

* :class:`DoubleLoRALinear`: the construction some write-ups call DoRA, two low-rank updates
  ``s1 B1 A1 + s2 B2 A2``. It is one LoRA of rank ``r1 + r2``:
  ``s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] [A1; A2]``; with ``s1 = s2 = s`` the factors are just
  stacked, the gradients are stacked too, and any element-wise optimizer (SGD, Adam, AdamW) takes
  the same steps. :meth:`DoubleLoRALinear.as_lora` gives that single LoRA.
* :func:`magnitude_direction`: the paper's §3 analysis (Liu et al. 2024, arXiv:2402.09353, Fig. 2):
  per output row, how far the length moved (``ΔM``) and how far the direction turned (``ΔD``).
* :func:`rank_sweep`, :func:`double_lora_vs_lora_vs_dora`, :func:`layerwise_targets`,
  :func:`magnitude_direction_run`: the runs on the built-in task behind the chapter's tables.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import LoRALinear, init_lora_A
from lowrank_ref.config import LoRAConfig
from lowrank_ref.nn.module import Parameter

__all__ = ["DoubleLoRALinear", "magnitude_direction"]


class DoubleLoRALinear(AdapterLinear):
    r"""``y = x W0ᵀ + b + s1 (x A1ᵀ) B1ᵀ + s2 (x A2ᵀ) B2ᵀ``: two LoRA branches on one base.

    ``A_i (r_i, in)``, ``B_i (out, r_i)``, ``s_i`` from ``config_i`` (each inits as LoRA does:
    ``A_i`` random, ``B_i = 0``). Backward, per branch ``i`` with ``h_i = x A_iᵀ``:
    ``B̄_i = s_i ȳᵀ h_i``, ``Ā_i = s_i (ȳ B_i)ᵀ x``, and ``x̄ = ȳ W0 + Σ_i s_i (ȳ B_i) A_i``.
    No dropout (this is a teaching construction)."""

    def __init__(self, base, config1: LoRAConfig, config2: LoRAConfig, rng=None):
        for name, c in (("config1", config1), ("config2", config2)):
            if not isinstance(c, LoRAConfig) or c.dropout != 0 or c.init == "pissa":
                raise TypeError(f"{name} must be a LoRAConfig without dropout or PiSSA init, got {c!r}")
        super().__init__(base, config1)
        self.config2 = config2
        rng = np.random.default_rng() if rng is None else rng
        dtype = base.weight.data.dtype
        self.A1 = Parameter(init_lora_A(config1.r, self.in_features, config1.init, rng, dtype))  # (r1, in)
        self.B1 = Parameter(np.zeros((self.out_features, config1.r), dtype=dtype))  # (out, r1)
        self.A2 = Parameter(init_lora_A(config2.r, self.in_features, config2.init, rng, dtype))  # (r2, in)
        self.B2 = Parameter(np.zeros((self.out_features, config2.r), dtype=dtype))  # (out, r2)

    def _branches(self):
        return ((self.A1, self.B1, self.config.scaling), (self.A2, self.B2, self.config2.scaling))

    def delta_weight(self) -> np.ndarray:
        r"""``ΔW = s1 B1 A1 + s2 B2 A2`` (out, in): rank ≤ r1 + r2."""
        return sum(s * (B.data @ A.data) for A, B, s in self._branches())

    def _forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in): 2-D products go to BLAS
        y = x @ self.base.weight.data.T  # (N, out)
        if self.base.bias is not None:
            y += self.base.bias.data
        hs = []
        for A, B, s in self._branches():
            h = x @ A.data.T  # (N, r_i)
            y += (s * h) @ B.data.T  # + s_i x A_iᵀ B_iᵀ
            hs.append(h)
        self._cache = (x, lead, hs)
        return y.reshape(*lead, self.out_features)

    def _backward(self, dy):
        x2, lead, hs = self._pop_cache()  # x2 (N, in)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dx = dy2 @ self.base.weight.data  # ȳ W0
        for (A, B, s), h in zip(self._branches(), hs):
            dh = s * (dy2 @ B.data)  # h̄_i = s_i ȳ B_i   (N, r_i)
            B.accumulate(s * (dy2.T @ h))  # B̄_i = s_i ȳᵀ h_i
            A.accumulate(dh.T @ x2)  # Ā_i = h̄_iᵀ x
            dx += dh @ A.data
        return dx.reshape(*lead, self.in_features)

    def as_lora(self, alpha: float | None = None) -> LoRALinear:
        r"""The single LoRA of rank ``r1 + r2`` with the same ``ΔW``: ``A = [A1; A2]``,
        ``B = [s1 B1, s2 B2] / s``, where ``s`` is the new layer's scaling (``alpha`` defaults to
        ``s1 · (r1 + r2)``, so that ``s = s1`` and, when ``s1 = s2``, ``B = [B1, B2]``)."""
        r = self.config.r + self.config2.r
        s1, s2 = self.config.scaling, self.config2.scaling
        alpha = s1 * r if alpha is None else alpha
        cfg = LoRAConfig(r=r, alpha=alpha)
        from lowrank_ref.nn.linear import Linear

        b = None if self.base.bias is None else self.base.bias.data
        single = LoRALinear(Linear.from_arrays(self.base.weight.data, b), cfg, rng=np.random.default_rng(0))
        s = cfg.scaling
        single.A.data = np.concatenate([self.A1.data, self.A2.data], axis=0)  # [A1; A2]   (r, in)
        single.B.data = np.concatenate([self.B1.data * (s1 / s), self.B2.data * (s2 / s)], axis=1)  # (out, r)
        return single


def magnitude_direction(W0: np.ndarray, W: np.ndarray):
    r"""The paper's §3 measures between a pretrained weight and a fine-tuned one, row by row.

    With ``M_j = ‖W_j‖`` the length of output row j (over the input axis):

    .. math::
        \Delta M = \tfrac{1}{\text{out}} \textstyle\sum_j |M_j - M_{0,j}|, \qquad
        \Delta D = \tfrac{1}{\text{out}} \textstyle\sum_j \big(1 - \cos(W_j, W_{0,j})\big).

    (The paper writes ``W`` as ``(d, k)`` and takes column norms; its columns are our rows.)
    Returns ``(ΔM, ΔD)`` as floats.
    """
    W0 = np.asarray(W0, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    n0, n = np.linalg.norm(W0, axis=1), np.linalg.norm(W, axis=1)
    dM = float(np.mean(np.abs(n - n0)))
    cos = np.sum(W * W0, axis=1) / np.maximum(n * n0, np.finfo(np.float64).tiny)
    dD = float(np.mean(1.0 - cos))
    return dM, dD
