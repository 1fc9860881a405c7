r"""Central-difference gradient checking in float64.

For a scalar loss :math:`L(\theta)` and every entry :math:`\theta_i` of every tensor checked,

.. math::
    \frac{\partial L}{\partial \theta_i} \approx \frac{L(\theta + \varepsilon e_i) - L(\theta - \varepsilon e_i)}{2\varepsilon},

whose truncation error is :math:`\tfrac{\varepsilon^2}{6} |\partial^3 L / \partial\theta_i^3|`. In
float64 with :math:`\varepsilon = 10^{-6}` that is ~1e-13 for quantities of order one, and the
rounding error, ~:math:`u |L| / \varepsilon` with :math:`u \approx 1.1 \cdot 10^{-16}`, is ~1e-10:
an analytic gradient that is right agrees to ~1e-9 and a wrong one is off by O(1). Every entry is
checked (no sampling): use small tensors.

Two entry points:

* :func:`check_gradients` — any loss function of some arrays, given their analytic gradients.
* :func:`gradcheck` — a :class:`~lowrank_ref.nn.Module`: checks the input and every trainable
  parameter of ``module.forward`` / ``module.backward`` against the loss ``sum(y * w)`` for a
  fixed random weighting ``w`` (so every output entry matters, with a different weight).

Both return a :class:`GradcheckReport` that names the worst entry: which tensor, which index,
the analytic value and the numeric one, with that entry's own absolute and relative error. The
relative error divides by ``max(|analytic|, |numeric|, atol/rtol)``: below ``atol/rtol`` (1e-3 by
default) an entry is judged by the absolute tolerance, and a relative error would only measure
how close to zero it is (an exactly-zero gradient such as the key bias's would read ``rel=1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GradcheckResult", "GradcheckReport", "check_gradients", "gradcheck", "numeric_gradient", "perturb"]


@dataclass
class GradcheckResult:
    """The comparison for one tensor: the worst entry, by error relative to tolerance."""

    name: str
    shape: tuple
    index: tuple
    analytic: float
    numeric: float
    abs_err: float
    rel_err: float  # at that entry: abs_err / max(|analytic|, |numeric|, atol/rtol)
    ok: bool
    ratio: float = 0.0  # |analytic - numeric| / (atol + rtol·scale) at the worst entry: ok iff <= 1

    def __str__(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return (
            f"{mark} {self.name:<28} shape={str(self.shape):<12} worst at {self.index}: "
            f"analytic={self.analytic:+.8e} numeric={self.numeric:+.8e} "
            f"abs={self.abs_err:.2e} rel={self.rel_err:.2e} err/tol={self.ratio:.2g}"
        )


@dataclass
class GradcheckReport:
    results: list[GradcheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def worst(self) -> GradcheckResult:
        """The tensor whose worst entry came closest to (or went furthest past) its tolerance."""
        return max(self.results, key=lambda r: (not r.ok, r.ratio))

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.results)

    def raise_if_failed(self) -> GradcheckReport:
        if not self.ok:
            raise AssertionError("gradcheck failed:\n" + str(self))
        return self


def numeric_gradient(loss: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of ``loss()`` w.r.t. every entry of ``x``, which is perturbed in place
    (any memory layout) and restored exactly.

    The divisor is the step actually taken, ``(x+ε) - (x-ε)`` as rounded, not ``2ε``."""
    if not x.flags.writeable:
        raise ValueError("numeric_gradient perturbs x in place: it must be a writeable array")
    g = np.zeros(x.shape, dtype=np.float64)
    for i in np.ndindex(x.shape):
        old = x[i]
        xp, xm = old + eps, old - eps
        x[i] = xp
        lp = float(loss())
        x[i] = xm
        lm = float(loss())
        x[i] = old
        g[i] = (lp - lm) / float(xp - xm)  # (L(θ+ε) - L(θ-ε)) / 2ε
    return g


def _compare(name, analytic, numeric, atol, rtol) -> GradcheckResult:
    if analytic is None:
        analytic = np.zeros_like(numeric)
        name = f"{name} (no gradient)"
    analytic = np.asarray(analytic, dtype=np.float64).reshape(numeric.shape)
    err = np.abs(analytic - numeric)
    scale = np.maximum(np.abs(analytic), np.abs(numeric))
    # how far each entry is past its allowance; the worst one is reported
    allowed = np.maximum(atol + rtol * scale, np.finfo(np.float64).tiny)
    excess = err - allowed
    i = np.unravel_index(int(np.argmax(err / allowed)), numeric.shape) if numeric.size else ()
    floor = atol / rtol if rtol > 0 else np.finfo(np.float64).tiny
    rel = float(err[i] / max(float(scale[i]), floor)) if numeric.size else 0.0  # this entry's own
    return GradcheckResult(
        name=name,
        shape=tuple(numeric.shape),
        index=tuple(int(k) for k in i),
        analytic=float(analytic[i]) if numeric.size else 0.0,
        numeric=float(numeric[i]) if numeric.size else 0.0,
        abs_err=float(err[i]) if numeric.size else 0.0,
        rel_err=rel,
        ok=bool(np.all(excess <= 0)),
        ratio=float(err[i] / allowed[i]) if numeric.size else 0.0,
    )


def check_gradients(
    loss: Callable[[], float],
    arrays: dict[str, np.ndarray],
    analytic: dict[str, np.ndarray | None],
    eps: float = 1e-6,
    atol: float = 1e-8,
    rtol: float = 1e-5,
) -> GradcheckReport:
    """Compare ``analytic[name]`` with central differences of ``loss()`` for each ``arrays[name]``.

    ``loss`` must read the arrays (they are perturbed in place, then restored). An analytic
    gradient of ``None`` is compared as zeros and its name is marked, so a missing gradient fails.
    """
    report = GradcheckReport()
    for name, x in arrays.items():
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 arrays; {name} is {x.dtype}")
        num = numeric_gradient(loss, x, eps)
        report.results.append(_compare(name, analytic.get(name), num, atol, rtol))
    return report


def gradcheck(
    module,
    x: np.ndarray,
    *,
    params: list[str] | None = None,
    check_input: bool = True,
    rng: np.random.Generator | None = None,
    eps: float = 1e-6,
    atol: float = 1e-8,
    rtol: float = 1e-5,
) -> GradcheckReport:
    """Check ``module.backward`` against central differences of ``module.forward``.

    The loss is ``sum(forward(x) * w)`` for a fixed random ``w`` shaped like the output. Checks
    the input ``x`` (if floating and ``check_input``) and every trainable parameter (or the
    dotted names in ``params``). The module must be deterministic (eval mode, or no dropout)
    and in float64: call ``module.astype(np.float64)`` first.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    named = module.trainable_parameters() if params is None else {n: module.parameters()[n] for n in params}
    for n, p in named.items():
        if p.data.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 parameters; {n} is {p.data.dtype} "
                            "(call module.astype(np.float64))")
        p.data = np.ascontiguousarray(p.data)
    x = np.array(x, copy=True, order="C")
    floating = np.issubdtype(x.dtype, np.floating)
    if floating and x.dtype != np.float64:
        raise TypeError(f"gradcheck needs a float64 input, got {x.dtype}")

    y = module.forward(x)
    w = rng.standard_normal(np.shape(y))
    module.zero_grad()
    dx = module.backward(w.astype(y.dtype) if hasattr(y, "dtype") else w)
    analytic = {n: p.grad for n, p in named.items()}
    arrays = {n: p.data for n, p in named.items()}
    if floating and check_input:
        analytic["input"] = dx
        arrays["input"] = x

    def loss() -> float:
        out = module.forward(x)
        module._cache = None  # forward-only evaluation
        for _, m in module.named_modules():
            m._cache = None
        return float(np.sum(out * w))

    return check_gradients(loss, arrays, analytic, eps=eps, atol=atol, rtol=rtol)


def perturb(module, rng: np.random.Generator, scale: float = 0.3):
    """Add ``scale``-sized Gaussian noise to every parameter of ``module`` (in place; returns it).

    Gradients are checked away from the init's special points (LayerNorm γ = 1, β = 0, zero
    biases, LoRA's B = 0), where a wrong formula can still give the right number."""
    for p in module.parameters().values():
        p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.data.dtype)
    return module
