r"""Embedding: a lookup table, and the scatter-add that is its backward.

Forward, for a table :math:`E` of shape ``(V, d)`` and integer indices ``idx`` of any shape:

.. math::
    y_{\dots} = E_{\,\mathrm{idx}_{\dots}} \qquad (\text{shape } (\dots, d)).

The lookup is a matrix product with one-hot rows, :math:`y = \mathrm{onehot}(\mathrm{idx})\,E`,
so its gradient is :math:`\bar E = \mathrm{onehot}(\mathrm{idx})^\top \bar y`: row :math:`v` of
:math:`\bar E` is the sum of :math:`\bar y` over every position that looked up :math:`v`. A
token that appears twice gets both contributions, which is why the backward is a scatter-*add*
(``np.add.at``) and not an assignment (``E̅[idx] = ȳ`` would keep only the last one).
The indices are integers: they have no gradient, and ``backward`` returns ``None``.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.module import Module, Parameter, array_module

__all__ = ["Embedding", "check_indices", "scatter_add"]


def scatter_add(target, idx, values) -> None:
    """``target[idx] += values`` with repeated indices adding up (``np.add.at``); on CuPy,
    ``cupyx.scatter_add`` where its ufuncs have no ``.at``."""
    xp = array_module(target)
    if xp is np or hasattr(xp.add, "at"):
        xp.add.at(target, idx, values)
    else:  # pragma: no cover - CuPy without ufunc.at
        import cupyx

        cupyx.scatter_add(target, idx, values)



def check_indices(idx, num_embeddings: int, name: str = "idx") -> np.ndarray:
    """Return ``idx`` as an integer array with every entry in ``[0, num_embeddings)``, or raise."""
    idx = array_module(idx).asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of token ids, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_embeddings):
        raise ValueError(
            f"{name} must hold ids in [0, {num_embeddings}), got values in [{idx.min()}, {idx.max()}]"
        )
    return idx


class Embedding(Module):
    """A table ``weight`` of shape ``(num_embeddings, dim)``, initialised ``N(0, 1)`` as PyTorch's.

    ``forward(idx)``: integer ``idx (...)`` -> ``(..., dim)``. ``backward(dy)`` adds into
    ``weight.grad`` and returns ``None`` (indices have no gradient).
    """

    def __init__(self, num_embeddings: int, dim: int, rng=None, dtype=np.float32):
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        rng = np.random.default_rng() if rng is None else rng
        self.weight = Parameter(rng.standard_normal((num_embeddings, dim)).astype(dtype))

    @property
    def num_embeddings(self) -> int:
        return self.weight.data.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.data.shape[1]

    def forward(self, idx) -> np.ndarray:
        idx = check_indices(idx, self.num_embeddings)
        idx = array_module(self.weight.data).asarray(idx)  # host token ids go where the table is
        self._cache = idx
        return self.weight.data[idx]  # (..., dim)

    def backward(self, dy: np.ndarray) -> None:
        idx = self._pop_cache()
        xp = array_module(self.weight.data)
        dy = xp.asarray(dy)
        if dy.shape != idx.shape + (self.dim,):
            raise ValueError(f"dy must have shape {idx.shape + (self.dim,)}, got {dy.shape}")
        if self.weight.trainable:
            g = xp.zeros_like(self.weight.data)
            # Ē[v] = Σ_{positions p with idx_p = v} ȳ_p   (a repeated id adds, never overwrites)
            scatter_add(g, idx.reshape(-1), dy.reshape(-1, self.dim))
            self.weight.accumulate(g)
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}"
