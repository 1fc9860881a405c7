r"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA on a base weight stored in NF4.

Forward (PyTorch layout, ``W0 (out, in)``), QLoRA Eq. 5 in this project's names:

.. math::
    y = x\,\tilde W_0^\top + b + s\,(\tilde x A^\top) B^\top, \qquad
    \tilde W_0 = \operatorname{dequant}\big(\operatorname{NF4}(W_0)\big)
              = t_{c} \cdot \hat a_{b},

with ``A (r, in)``, ``B (out, r)``, ``s = α/r``, ``x̃ = x ⊙ M`` (dropout on the LoRA branch). The
base weight is *stored* in 4 bits (the codes ``c``, two per byte) with its block scales
(double-quantised: :math:`\hat a_b = \mathrm{dyn}[q_b]\,a^{(2)} + \text{offset}`), and
*computed* in the compute dtype (float32 here, bf16 on a GPU): :math:`\tilde W_0` is rebuilt for
the matmul and dropped right after, in the forward and again in the backward. No float copy of
``W0`` is kept: the layer does not hold a reference to the ``Linear`` it was built from.

Backward, for upstream :math:`\bar y` and :math:`h = \tilde x A^\top`: the same as LoRA's with
:math:`\tilde W_0` in place of :math:`W_0`,

.. math::
    \bar B = s\,\bar y^\top h, \qquad \bar h = s\,\bar y B, \qquad \bar A = \bar h^\top \tilde x,
    \qquad \bar x = \bar y\,\tilde W_0 + (\bar h A) \odot M .

The quantised weight and the bias are frozen: no gradient reaches them (the paper: "gradients
are only computed with respect to the adapter weights"; :math:`\partial E/\partial X` is still
needed to flow to earlier layers, which is why ``W̃0`` is dequantised in the backward too).

Merging, defined here. ``merge()`` computes :math:`W = \tilde W_0 + \Delta W` (float64 sum,
rounded once to float32) and keeps it *as float*: the merged layer is a plain float32 Linear
(4 bytes per weight while merged), and its output equals the unmerged layer's up to rounding.
The NF4 storage is untouched, so ``unmerge()`` drops the float weight and the quantised state is
exactly what it was, bit for bit. What one must *not* do silently is re-quantise the merged
weight to NF4 to keep the 4-bit footprint: :func:`requantize_merged` does it explicitly and
:func:`merge_requant_error` measures what it costs. The NF4 rounding error of :math:`\tilde W_0
+ \Delta W` is about as large as the rounding error of :math:`W_0` itself, so an update
:math:`\Delta W` that is small compared with the NF4 step is largely lost (chapter 03 measures it).
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear, check_base
from lowrank_ref.adapters.lora import init_lora_A
from lowrank_ref.config import LoRAConfig
from lowrank_ref.nn.linear import check_last_dim
from lowrank_ref.nn.module import Module, Parameter, check_finite
from lowrank_ref.quant.blockwise import NF4Tensor, check_blocksize, quantize_4bit

__all__ = ["NF4Linear", "QLoRALinear", "QLoRAInt4Linear", "qlora_forward", "qlora_backward", "requantize_merged",
           "merge_requant_error"]


class NF4Linear(Module):
    r"""A frozen linear layer whose weight is stored in NF4: ``y = x W̃ᵀ + b``.

    Holds ``qweight`` (an :class:`~lowrank_ref.quant.blockwise.NF4Tensor`, not a Parameter: it is
    not trainable and not a float array) and ``bias`` (a frozen Parameter or None). Backward
    returns ``x̄ = ȳ W̃`` and gives no gradient to anything.
    """

    def __init__(self, qweight: NF4Tensor, bias=None):
        super().__init__()
        if not isinstance(qweight, NF4Tensor) or len(qweight.shape) != 2:
            raise TypeError("qweight must be a 2-D NF4Tensor (out, in)")
        self.qweight = qweight
        self.bias = None if bias is None else Parameter(np.array(bias), trainable=False)
        if self.bias is not None and self.bias.shape != (qweight.shape[0],):
            raise ValueError(f"bias must have shape ({qweight.shape[0]},), got {self.bias.shape}")

    @classmethod
    def from_linear(cls, linear, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4") -> NF4Linear:
        """Quantise a :class:`~lowrank_ref.nn.Linear`'s weight (the ``Linear`` is not kept)."""
        linear = check_base(linear)
        q = quantize_4bit(linear.weight.data, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        b = None if linear.bias is None else linear.bias.data.astype(np.float32)
        return cls(q, b)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def dequantized_weight(self, dtype=np.float32) -> np.ndarray:
        """``W̃ (out, in)`` in ``dtype``: rebuilt on each call, never stored."""
        W = self.qweight.dequantize()
        return W if W.dtype == dtype else W.astype(dtype)

    def forward(self, x):
        x = check_last_dim(x, self.in_features)
        self._cache = x.shape
        y = x @ self.dequantized_weight(x.dtype).T  # (..., out)
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dy):
        self._pop_cache()
        return dy @ self.dequantized_weight(dy.dtype)  # x̄ = ȳ W̃   (..., in)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qweight!r}"


def qlora_forward(x, qweight: NF4Tensor, b, A, B, s: float, mask=None):
    r"""``y = x W̃0ᵀ + b + s (x̃ Aᵀ) Bᵀ`` with ``W̃0`` dequantised for this call only.

    Returns ``(y (..., out), cache)``; the cache holds the NF4 tensor, not ``W̃0``.
    """
    xd = x if mask is None else x * mask  # x̃ = x ⊙ M
    h = xd @ A.T  # (..., r)
    W = qweight.dequantize()  # W̃0 (out, in), float32, transient
    if W.dtype != x.dtype:
        W = W.astype(x.dtype)
    y = x @ W.T  # (..., out)
    del W
    if b is not None:
        y += b
    y += (s * h) @ B.T  # + s x̃ Aᵀ Bᵀ
    return y, (xd, h, qweight, A, B, s, mask)


def qlora_backward(dy, cache):
    r"""Return ``(x̄, {"A": Ā, "B": B̄})``; ``W̃0`` is dequantised again for ``x̄ = ȳ W̃0 + ...``."""
    xd, h, qweight, A, B, s, mask = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dB = dy2.T @ h.reshape(-1, h.shape[-1])  # (out, r)
    dB *= s  # B̄ = s ȳᵀ h
    dh = dy @ B  # (..., r)
    dh *= s  # h̄ = s ȳ B
    dA = dh.reshape(-1, dh.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])  # Ā = h̄ᵀ x̃   (r, in)
    dxd = dh @ A  # (..., in)
    if mask is not None:
        dxd *= mask
    W = qweight.dequantize()
    if W.dtype != dy.dtype:
        W = W.astype(dy.dtype)
    dx = dy @ W  # ȳ W̃0   (..., in)
    dx += dxd  # x̄ = ȳ W̃0 + (h̄ A) ⊙ M
    return dx, {"A": dA, "B": dB}


class QLoRALinear(AdapterLinear):
    r"""LoRA on an NF4-stored base: trainable ``A (r, in)``, ``B (out, r)``; ``W0`` in 4 bits.

    Args:
        base: the pretrained :class:`~lowrank_ref.nn.Linear`. Its weight is quantised; the layer
            keeps no reference to ``base`` (drop yours and its float weight is freed).
        config: a :class:`~lowrank_ref.config.LoRAConfig` (``init`` "kaiming" or "gaussian").
        blocksize: NF4 block size (64, the paper's).
        double_quant: double-quantise the block scales (QLoRA's default; 4.127 bits/param).
        rng: a ``numpy.random.Generator`` or an int seed, for the init and dropout masks.

    ``A``, ``B`` and the bias are float32 (the compute dtype); ``astype(np.float64)`` switches
    compute to float64 (for gradcheck) and leaves the NF4 storage as it is.
    """

    CONFIG = LoRAConfig
    QUANT_TYPE = "nf4"  # the 4-bit data type of the base weight

    def __init__(self, base, config: LoRAConfig | None = None, blocksize: int | None = None,
                 double_quant: bool | None = None, rng=None):
        from lowrank_ref.adapters.qlora import as_qlora_config

        config = as_qlora_config(config, self.qlora_config(), blocksize, double_quant)
        blocksize, double_quant = config.blocksize, config.double_quant
        if config.init == "pissa":
            raise ValueError("QLoRALinear supports init 'kaiming' or 'gaussian'; PiSSA on a quantised "
                             "base needs its residual quantised after the split (not provided)")
        check_base(base)
        blocksize = check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
        # everything is checked; now build (quantising W0 is the only expensive step)
        nf4_base = NF4Linear.from_linear(base, blocksize=blocksize, double_quant=double_quant,
                                         quant_type=config.quant_type)
        Module.__init__(self)
        self.base = nf4_base  # the only copy of W0: 4-bit codes + scales
        self.config = config
        self._w0_backup = None  # unused: merging keeps the NF4 storage untouched
        self._merged_W: np.ndarray | None = None
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        dtype = np.float32
        self.A = Parameter(init_lora_A(config.r, self.in_features, config.init, self.rng, dtype))  # (r, in)
        self.B = Parameter(np.zeros((self.out_features, config.r), dtype=dtype))  # (out, r), B = 0

    # properties ---------------------------------------------------------------------------
    @classmethod
    def qlora_config(cls):
        """The config class of this layer (QLoRAConfig; QLoRAInt4Config for the int4 base)."""
        from lowrank_ref.adapters.qlora import QLoRAConfig, QLoRAInt4Config

        return QLoRAInt4Config if cls.QUANT_TYPE == "int4" else QLoRAConfig

    @property
    def blocksize(self) -> int:
        return self.base.qweight.blocksize

    @property
    def double_quant(self) -> bool:
        return self.base.qweight.double_quant

    @property
    def qweight(self) -> NF4Tensor:
        return self.base.qweight

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s · B A, shape (out, in)."""
        return self.scaling * (self.B.data @ self.A.data)

    def _delta_weight_f64(self) -> np.ndarray:
        return self.scaling * (self.B.data.astype(np.float64) @ self.A.data.astype(np.float64))

    def dequantized_weight(self) -> np.ndarray:
        """``W̃0`` (out, in) float32, rebuilt from NF4."""
        return self.base.dequantized_weight(np.float32)

    def merged_weight(self) -> np.ndarray:
        """``W̃0 + ΔW`` summed in float64, rounded once to float32."""
        return (self.dequantized_weight().astype(np.float64) + self._delta_weight_f64()).astype(np.float32)

    # merging ------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged_W is not None

    def merge(self) -> None:
        """Keep ``W̃0 + ΔW`` as a float32 weight (4 bytes/param while merged); NF4 untouched."""
        if self.merged:
            raise ValueError("QLoRALinear is already merged; call unmerge() first")
        W = self.merged_weight()
        check_finite("merged weight", W)
        self._merged_W = W

    def unmerge(self) -> None:
        """Drop the float merged weight; the NF4 storage was never changed."""
        if not self.merged:
            raise ValueError("QLoRALinear is not merged; there is nothing to unmerge")
        self._merged_W = None

    # the computation ----------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_last_dim(x, self.in_features)
        b = None if self.base.bias is None else self.base.bias.data
        if self.merged:
            self._cache = ("merged",)
            y = x @ self._merged_W.astype(x.dtype, copy=False).T
            return y if b is None else y + b
        mask = None
        p = self.config.dropout
        if self.training and p > 0:
            mask = (self.rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
        y, cache = qlora_forward(x, self.base.qweight, b, self.A.data, self.B.data, self.scaling, mask)
        self._cache = cache
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self.merged:
            self._pop_cache()
            raise RuntimeError("QLoRALinear is merged (inference only): unmerge() before training")
        dx, grads = qlora_backward(dy, self._pop_cache())
        self.A.accumulate(grads["A"])
        self.B.accumulate(grads["B"])
        return dx

    def memory_bytes(self) -> dict:
        """Bytes held: the NF4 base, the bias, the adapter, and a merged float weight if any."""
        return {"base_nf4": self.base.qweight.nbytes,
                "bias": 0 if self.base.bias is None else self.base.bias.data.nbytes,
                "adapter": self.A.data.nbytes + self.B.data.nbytes,
                "merged_float": 0 if self._merged_W is None else self._merged_W.nbytes}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.config}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, merged={self.merged}")


class QLoRAInt4Linear(QLoRALinear):
    """The same layer with the base in uniform symmetric int4 (one absmax per block) instead of
    NF4: same storage, same bytes per weight; the ``lora_int4`` row of ``compare``."""

    QUANT_TYPE = "int4"


def requantize_merged(layer: QLoRALinear) -> NF4Tensor:
    """NF4 of ``W̃0 + ΔW`` (same block size and double quantisation): what "merge into the 4-bit
    model" produces. Explicit on purpose; the layer is not changed."""
    q = layer.base.qweight
    return quantize_4bit(layer.merged_weight(), blocksize=q.blocksize, double_quant=q.double_quant,
                         quant_type=q.quant_type)


def merge_requant_error(layer: QLoRALinear) -> dict:
    r"""What re-quantising after a merge costs, measured in float64.

    Returns:
        ``delta_norm``: :math:`\|\Delta W\|_F`;
        ``requant_err``: :math:`\|Q(\tilde W_0 + \Delta W) - (\tilde W_0 + \Delta W)\|_F`;
        ``update_lost``: :math:`\|(Q(\tilde W_0+\Delta W) - \tilde W_0) - \Delta W\|_F / \|\Delta W\|_F`,
        the fraction of the learned update that the re-quantised model does not carry
        (0: kept exactly; about 1 or more: the update is drowned in rounding);
        ``output_err_merged`` / ``output_err_requant``: relative error of ``x Wᵀ`` on a random
        ``x`` against the unmerged layer, for the float merge and for the re-quantised one.
    """
    W0t = layer.dequantized_weight().astype(np.float64)
    dW = layer.delta_weight().astype(np.float64)
    Wm = layer.merged_weight().astype(np.float64)
    Wq = requantize_merged(layer).dequantize().astype(np.float64)
    dn = float(np.linalg.norm(dW))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, layer.in_features))
    ref = x @ (W0t + dW).T
    rn = max(float(np.linalg.norm(ref)), 1e-300)
    return {
        "delta_norm": dn,
        "requant_err": float(np.linalg.norm(Wq - Wm)),
        "update_lost": float(np.linalg.norm((Wq - W0t) - dW) / max(dn, 1e-300)),
        "output_err_merged": float(np.linalg.norm(x @ Wm.T - ref) / rn),
        "output_err_requant": float(np.linalg.norm(x @ Wq.T - ref) / rn),
    }
