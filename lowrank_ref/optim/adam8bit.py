r"""8-bit Adam: both moments stored block-wise in 8 bits (Dettmers et al. 2022, arXiv:2110.02861).

The update is Adam's (:mod:`lowrank_ref.optim.adam`, torch's arrangement). Only the *storage* of
the two moments changes: between steps, ``m`` and ``v`` live as 8-bit codes plus one float32
absmax per block of 256 values (the paper's block-wise quantisation, §2.1):

.. math::
    \text{each step:}\quad m = \mathrm{deq}(q_m),\; v = \mathrm{deq}(q_v) \;\to\;
    \text{Adam update in float32} \;\to\; q_m = Q_{\text{dyn}}(m),\; q_v = Q_{\text{udyn}}(v),

with the signed dynamic map for ``m`` (it changes sign) and the unsigned one for ``v`` (never
negative), as bitsandbytes does (``dynamic`` / ``udynamic``). State per parameter: 2 bytes per
value plus ``2·4/256`` for the scales, against 8 bytes for float32 Adam: ``8/(2 + 8/256)`` =
3.94x less.

Tensors smaller than ``min_8bit_size`` values (4096, bitsandbytes' default) keep float32 moments:
for them the scales and the rounding cost more than they save.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.optim.adam import Adam, adam_direction
from lowrank_ref.quant.blockwise import dequantize_blockwise, quantize_blockwise
from lowrank_ref.quant.tables import dynamic_map

__all__ = ["Adam8bit"]


class Adam8bit(Adam):
    """``Adam8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, blocksize=256,
    min_8bit_size=4096)``. State: ``exp_avg_q``/``exp_avg_absmax`` and ``exp_avg_sq_q``/
    ``exp_avg_sq_absmax`` (uint8 codes, float32 scales), or float32 moments for small tensors."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, blocksize: int = 256, min_8bit_size: int = 4096):
        for name, v, lo in (("blocksize", blocksize, 1), ("min_8bit_size", min_8bit_size, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.blocksize = int(blocksize)
        self.min_8bit_size = int(min_8bit_size)
        self._signed = dynamic_map(signed=True)
        self._unsigned = dynamic_map(signed=False)

    def dequantized_state(self, name: str) -> dict:
        """``{"exp_avg": m, "exp_avg_sq": v}`` as float32 arrays (decoded, for inspection)."""
        st = self.state[name]
        if "exp_avg" in st:
            return {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        shape = st["shape"]
        m = dequantize_blockwise(st["exp_avg_q"], st["exp_avg_absmax"], self._signed, self.blocksize)
        v = dequantize_blockwise(st["exp_avg_sq_q"], st["exp_avg_sq_absmax"], self._unsigned, self.blocksize)
        return {"exp_avg": m.reshape(shape), "exp_avg_sq": v.reshape(shape)}

    def _update(self, name, param, grad, state):
        grad = self._decay(param, grad).astype(np.float32, copy=False)
        if param.data.size < self.min_8bit_size:  # small tensor: float32 moments
            d = adam_direction(grad, state, self.betas, self.eps, self.lr)
            param.data = (param.data + d).astype(param.data.dtype, copy=False)
            return
        if not state:
            state["step"] = 0
            state["shape"] = grad.shape
            work = {}
        else:
            work = {"step": state["step"], **self.dequantized_state(name)}
        d = adam_direction(grad, work, self.betas, self.eps, self.lr)  # the float32 Adam step
        state["step"] = work["step"]
        qm, am = quantize_blockwise(work["exp_avg"], self._signed, self.blocksize)  # m -> 8 bits
        qv, av = quantize_blockwise(work["exp_avg_sq"], self._unsigned, self.blocksize)  # v -> 8 bits
        state.update(exp_avg_q=qm, exp_avg_absmax=am, exp_avg_sq_q=qv, exp_avg_sq_absmax=av)
        param.data = (param.data + d).astype(param.data.dtype, copy=False)
