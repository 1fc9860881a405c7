r"""The checks behind the chapters' exercises (``notebooks/NN-topic-exercises.ipynb``).

Each exercise asks the learner to write one function; its check cell calls ``check_<name>(fn)``,
which runs ``fn`` on a fixed small problem, compares it with an oracle and prints what is wrong:
the tensor, the worst entry, mine against expected. The oracle is one of

* central differences of the forward (``lowrank_ref.gradcheck.check_gradients``), for a backward;
* the package's own layer or function (``LoRALinear``, ``nf4_table``, ``quantize_nf4``, ...);
* an arithmetic fact stated in the check itself (16 bytes per parameter, ...).

A check never raises: it prints a verdict and returns a :class:`CheckResult` (truthy when it
passed), so a notebook with unfinished exercises still runs to the end. ``CHECKS`` lists, per
chapter, the exercise names in order; ``tests/test_exercises.py`` runs every solution in
``notebooks/solutions/`` through its check and shows that each check fails on the notebook's
unmodified stub.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["CheckResult", "CHECKS", "KRONECKER_CHECKS", "check", "compare"]


@dataclass
class CheckResult:
    """The verdict of one check: ``ok`` and the message that was printed."""

    name: str
    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.message}"


class Mismatch(AssertionError):
    """Raised inside a check body when the learner's value is wrong; the message says how."""


def compare(name: str, mine, expected, rtol: float = 1e-7, atol: float = 1e-10) -> None:
    """Raise :class:`Mismatch` naming the worst entry unless ``mine ≈ expected`` entrywise."""
    if mine is None:
        raise Mismatch(f"{name}: your function returned None (not written yet?)")
    expected = np.asarray(expected, dtype=np.float64)
    try:
        mine = np.asarray(mine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise Mismatch(f"{name}: cannot read your value as numbers ({e})") from None
    if mine.shape != expected.shape:
        raise Mismatch(f"{name}: shape {mine.shape}, expected {expected.shape}")
    if not np.all(np.isfinite(mine)):
        raise Mismatch(f"{name}: contains NaN or inf")
    err = np.abs(mine - expected)
    allowed = atol + rtol * np.abs(expected)
    if mine.size and not np.all(err <= allowed):
        i = np.unravel_index(int(np.argmax(err / allowed)), err.shape)
        where = tuple(int(k) for k in i)
        raise Mismatch(f"{name}: worst at {where}: mine={mine[i]:+.8e} expected={expected[i]:+.8e} "
                       f"(|diff| {err[i]:.2e}; {int(np.sum(err > allowed))} of {err.size} entries off)")


def _unpack(out, n: int, what: str):
    if out is None:
        raise Mismatch(f"your function returned None (not written yet?); expected {what}")
    if n == 1:
        return out
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise Mismatch(f"expected a tuple {what}, got {type(out).__name__}")
    return tuple(out)


def _gradcheck(loss, arrays: dict, analytic: dict, tag: str) -> None:
    """Central differences (the package's checker) against the learner's gradients."""
    from lowrank_ref.gradcheck import check_gradients

    for k, v in analytic.items():
        if v is None:
            raise Mismatch(f"{k}: your function returned None for this gradient")
        if np.shape(v) != arrays[k].shape:
            raise Mismatch(f"{k}: shape {np.shape(v)}, expected {arrays[k].shape} (the shape of {k})")
    report = check_gradients(loss, arrays, analytic)
    if not report.ok:
        bad = "\n  ".join(str(r) for r in report.results if not r.ok)
        raise Mismatch(f"{tag} disagrees with central differences:\n  {bad}")


def check(name: str, fn: Callable, body: Callable[[Callable], str], verbose: bool = True) -> CheckResult:
    """Run ``body(fn)``; print and return the verdict. ``body`` returns a success message."""
    if not callable(fn):
        res = CheckResult(name, False, f"expected a function, got {type(fn).__name__}")
    else:
        try:
            res = CheckResult(name, True, body(fn) or "correct")
        except NotImplementedError:
            res = CheckResult(name, False, "not written yet (it raises NotImplementedError)")
        except Mismatch as e:
            res = CheckResult(name, False, str(e))
        except Exception as e:  # the learner's code crashed: say where, keep the notebook going
            res = CheckResult(name, False, f"your function raised {type(e).__name__}: {e}")
    if verbose:
        print(res)
    return res


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- chapter 00: the toolkit


def _linear_body(fn):
    rng = _rng(0)
    x = rng.standard_normal((2, 3, 4))  # (B, T, in): leading axes the gradient must sum over
    W = rng.standard_normal((5, 4))  # (out, in)
    b = rng.standard_normal(5)
    w = rng.standard_normal((2, 3, 5))  # the loss is sum(y ⊙ w), so ȳ = w
    dx, dW, db = _unpack(fn(w.copy(), x.copy(), W.copy()), 3, "(dx, dW, db)")
    _gradcheck(lambda: float(np.sum((x @ W.T + b) * w)), {"x": x, "W": W, "b": b},
               {"x": dx, "W": dW, "b": db}, "linear_backward")
    return "dx, dW and db agree with central differences in every entry"


def check_linear_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy (..., out), x (..., in), W (out, in)) -> (dx, dW, db)`` for ``y = x Wᵀ + b``."""
    return check("linear_backward", fn, _linear_body, verbose)


def _layernorm_parts(rng):
    x = rng.standard_normal((2, 3, 6))
    gamma = 1 + 0.3 * rng.standard_normal(6)  # away from γ = 1, β = 0, where wrong formulas hide
    beta = 0.3 * rng.standard_normal(6)
    w = rng.standard_normal((2, 3, 6))
    return x, gamma, beta, w


def _ln_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    rho = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rho
    return xhat * gamma + beta, xhat, rho


def _layernorm_body(fn):
    x, gamma, beta, w = _layernorm_parts(_rng(1))
    _, xhat, rho = _ln_forward(x, gamma, beta)
    dx, dg, db = _unpack(fn(w.copy(), xhat, rho, gamma.copy()), 3, "(dx, dgamma, dbeta)")
    _gradcheck(lambda: float(np.sum(_ln_forward(x, gamma, beta)[0] * w)),
               {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dg, "beta": db},
               "layernorm_backward")
    return "dx, dgamma and dbeta agree with central differences in every entry"


def check_layernorm_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy, xhat, rho, gamma) -> (dx, dgamma, dbeta)`` for ``y = γ ⊙ x̂ + β`` (last axis)."""
    return check("layernorm_backward", fn, _layernorm_body, verbose)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softmax_body(fn):
    rng = _rng(2)
    z = rng.standard_normal((3, 5))
    w = rng.standard_normal((3, 5))
    dz = _unpack(fn(_softmax(z), w.copy()), 1, "dz")
    _gradcheck(lambda: float(np.sum(_softmax(z) * w)), {"z": z}, {"z": dz}, "softmax_backward")
    return "dz agrees with central differences (and you never built the T×T Jacobian, we hope)"


def check_softmax_backward(fn, verbose=True) -> CheckResult:
    """``fn(p (..., T), dp (..., T)) -> dz`` for ``p = softmax(z)`` over the last axis."""
    return check("softmax_backward", fn, _softmax_body, verbose)


def _torch_layernorm_grads(x, gamma, beta, w):
    """The same LayerNorm through PyTorch's autograd (float64), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    y = torch.nn.functional.layer_norm(xt, (x.shape[-1],), gt, bt, eps=1e-5)
    (y * torch.tensor(w)).sum().backward()
    return xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


def _broken_body(fn):
    x, gamma, beta, w = _layernorm_parts(_rng(3))
    _, xhat, rho = _ln_forward(x, gamma, beta)
    out = _unpack(fn(w.copy(), xhat, rho, gamma.copy()), 3, "(dx, dgamma, dbeta)")
    try:
        _gradcheck(lambda: float(np.sum(_ln_forward(x, gamma, beta)[0] * w)),
                   {"x": x, "gamma": gamma, "beta": beta}, dict(zip(("x", "gamma", "beta"), out)), "")
        caught_fd = False
    except Mismatch:
        caught_fd = True
    ref = _torch_layernorm_grads(x, gamma, beta, w)
    if ref is None:
        caught_torch, torch_note = None, "torch is not installed, so only central differences ran"
    else:
        caught_torch = any(not np.allclose(np.asarray(o, float), r, rtol=1e-9, atol=1e-12)
                           for o, r in zip(out, ref))
        torch_note = f"autograd {'caught' if caught_torch else 'did NOT catch'} it"
    if not caught_fd:
        raise Mismatch("central differences accept this backward: it is still right. Break it "
                       f"(drop a term of dx) and run the check again; {torch_note}")
    if caught_torch is False:
        raise Mismatch("central differences caught it but autograd did not: is your "
                       "forward the same function as torch's layer_norm?")
    return f"central differences caught it, {torch_note}: two independent oracles"


def check_broken_layernorm(fn, verbose=True) -> CheckResult:
    """Passes when ``fn`` (a deliberately *broken* LayerNorm backward) is caught by both oracles:
    central differences and PyTorch's autograd."""
    return check("broken_layernorm", fn, _broken_body, verbose)


# ---------------------------------------------------------------- chapter 01: LoRA


def _lora_layer(rng, r=3, alpha=6.0, rslora=False, n_in=5, n_out=4):
    import lowrank_ref as lr

    base = lr.nn.Linear.from_arrays(rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out))
    layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=r, alpha=alpha, rslora=rslora), rng=rng)
    layer.astype(np.float64)
    layer.B.data = rng.standard_normal(layer.B.shape)  # non-zero B: a wrong ΔW cannot hide
    return layer


def _scaling_body(fn):
    import lowrank_ref as lr

    for r, alpha, rs in [(8, 16, False), (4, 4, False), (16, 16, True), (64, 8, True), (1, 2, False)]:
        want = lr.LoRAConfig(r=r, alpha=alpha, rslora=rs).scaling
        compare(f"lora_scaling(alpha={alpha}, r={r}, rslora={rs})", fn(alpha, r, rs), want, rtol=1e-12)
    return "alpha/r, and alpha/sqrt(r) with rsLoRA, as LoRAConfig.scaling"


def check_lora_scaling(fn, verbose=True) -> CheckResult:
    """``fn(alpha, r, rslora) -> s``."""
    return check("lora_scaling", fn, _scaling_body, verbose)


def _lora_forward_body(fn):
    rng = _rng(4)
    layer = _lora_layer(rng)
    x = rng.standard_normal((2, 3, 5))
    y = fn(x.copy(), layer.base.weight.data.copy(), layer.base.bias.data.copy(),
           layer.A.data.copy(), layer.B.data.copy(), layer.scaling)
    compare("y", y, layer.forward(x))
    return "equals LoRALinear.forward (r=3, alpha=6, a 3-D input)"


def check_lora_forward(fn, verbose=True) -> CheckResult:
    """``fn(x (..., in), W (out, in), b (out,), A (r, in), B (out, r), s) -> y (..., out)``."""
    return check("lora_forward", fn, _lora_forward_body, verbose)


def _lora_backward_body(fn):
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 5))
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    A, B = rng.standard_normal((3, 5)), rng.standard_normal((4, 3))
    s, w = 2.0, rng.standard_normal((2, 3, 4))
    dx, dA, dB = _unpack(fn(w.copy(), x.copy(), W.copy(), A.copy(), B.copy(), s), 3, "(dx, dA, dB)")
    _gradcheck(lambda: float(np.sum((x @ W.T + b + s * (x @ A.T) @ B.T) * w)),
               {"x": x, "A": A, "B": B}, {"x": dx, "A": dA, "B": dB}, "lora_backward")
    return "dx, dA and dB agree with central differences in every entry"


def check_lora_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy, x, W, A, B, s) -> (dx, dA, dB)``; ``W`` and ``b`` are frozen."""
    return check("lora_backward", fn, _lora_backward_body, verbose)


def _lora_merge_body(fn):
    rng = _rng(6)
    layer = _lora_layer(rng, r=2, alpha=5.0)
    W = layer.base.weight.data.copy()
    merged = fn(W.copy(), layer.A.data.copy(), layer.B.data.copy(), layer.scaling)
    layer.merge()
    compare("merged W", merged, layer.base.weight.data)
    return "equals the weight LoRALinear.merge() writes"


def check_lora_merge(fn, verbose=True) -> CheckResult:
    """``fn(W, A, B, s) -> W'``: the merged weight."""
    return check("lora_merge", fn, _lora_merge_body, verbose)


def _lora_count_body(fn):
    import lowrank_ref as lr

    rng = _rng(7)
    for n_in, n_out, r in [(5, 4, 3), (64, 64, 8), (64, 256, 4), (768, 768, 1)]:
        base = lr.nn.Linear(n_in, n_out, rng=rng)
        layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=r, alpha=2 * r), rng=rng)
        got = fn(n_in, n_out, r)
        if got != layer.num_trainable_parameters():
            raise Mismatch(f"lora_params({n_in}, {n_out}, {r}) = {got!r}, expected "
                           f"{layer.num_trainable_parameters()} (LoRALinear's trainable count)")
    return "matches LoRALinear.num_trainable_parameters() on four shapes"


def check_lora_params(fn, verbose=True) -> CheckResult:
    """``fn(in_features, out_features, r) -> int``: LoRA's trainable parameters on one layer."""
    return check("lora_params", fn, _lora_count_body, verbose)


# ---------------------------------------------------------------- chapter 02: DoRA


def _dora_row_norm_body(fn):
    import lowrank_ref as lr

    rng = _rng(8)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((4, 6)), None)  # out=4 ≠ in=6: axes matter
    layer = lr.adapters.DoRALinear(base, lr.DoRAConfig(r=2, alpha=3.0), rng=rng)
    layer.astype(np.float64)
    layer.B.data = rng.standard_normal(layer.B.shape)
    n = fn(base.weight.data.copy(), layer.A.data.copy(), layer.B.data.copy(), layer.scaling)
    compare("n", n, layer.weight_norm())
    return "equals DoRALinear.weight_norm(): one norm per output row, over the input axis"


def check_dora_row_norm(fn, verbose=True) -> CheckResult:
    """``fn(W0 (out, in), A, B, s) -> n (out,)``: ``n_j = ‖W0_j + s (B A)_j‖``."""
    return check("dora_row_norm", fn, _dora_row_norm_body, verbose)


def _dora_weight(V, m, n=None):
    n = np.sqrt((V * V).sum(1)) if n is None else n
    return (m / n)[:, None] * V  # W' = diag(m / ‖V_j‖) V


def _dora_grad_body(detach):
    def body(fn):
        rng = _rng(9 if detach else 10)
        V = rng.standard_normal((4, 6))
        m = 1 + rng.random(4)
        G = rng.standard_normal((4, 6))  # ∂L/∂W' for L = sum(W' ⊙ G)
        dV, dm = _unpack(fn(G.copy(), V.copy(), m.copy()), 2, "(dV, dm)")
        n0 = np.sqrt((V * V).sum(1))
        if detach:  # the norm is a constant n0: only the direct path
            loss = lambda: float(np.sum(_dora_weight(V, m, n0) * G))  # noqa: E731
        else:
            loss = lambda: float(np.sum(_dora_weight(V, m) * G))  # noqa: E731
        _gradcheck(loss, {"V": V, "m": m}, {"V": dV, "m": dm}, "the DoRA norm gradient")
        return ("dV and dm agree with central differences" +
                (" (the norm held constant)" if detach else " (through the norm: the projection term)"))
    return body


def check_dora_norm_backward(fn, verbose=True) -> CheckResult:
    """``fn(G, V, m) -> (dV, dm)`` for ``W' = diag(m/‖V_j‖) V`` and ``G = ∂L/∂W'`` (exact gradient)."""
    return check("dora_norm_backward", fn, _dora_grad_body(False), verbose)


def check_dora_detached_backward(fn, verbose=True) -> CheckResult:
    """``fn(G, V, m) -> (dV, dm)`` with the norm ``‖V_j‖`` treated as a constant (``detach_norm``)."""
    return check("dora_detached_backward", fn, _dora_grad_body(True), verbose)


# ---------------------------------------------------------------- chapter 03: quantisation


def _nf4_body(fn):
    from lowrank_ref.quant import nf4_table

    t = fn()
    compare("NF4 levels", t, nf4_table(), rtol=0, atol=1e-6)
    return "the 16 levels equal lowrank_ref.quant.nf4_table() to 1e-6 (float32 rounding aside)"


def check_nf4_table(fn, verbose=True) -> CheckResult:
    """``fn() -> 16 sorted levels`` built from normal quantiles (the asymmetric 8 + 7 + 0 recipe)."""
    return check("nf4_table", fn, _nf4_body, verbose)


def _absmax_body(fn):
    from lowrank_ref.quant import nf4_table, quantize_nf4

    rng = _rng(11)
    x = rng.standard_normal(64 * 8 + 32).astype(np.float32)  # 8 full blocks and a partial one
    table = nf4_table()
    out = _unpack(fn(x.copy(), table.copy(), 64), 2, "(codes, absmax)")
    codes, absmax = out
    q = quantize_nf4(x, blocksize=64)
    compare("absmax", absmax, q.absmax, rtol=1e-6, atol=0)
    codes = np.asarray(codes)
    if codes.shape != (x.size,):
        raise Mismatch(f"codes: shape {codes.shape}, expected {(x.size,)} (one code per value)")
    want = q.codes().astype(np.int64)
    off = np.flatnonzero(codes.astype(np.int64) != want)
    if off.size:
        # a value on (within rounding of) the midpoint between two levels may go either way
        u = x / np.repeat(q.absmax, 64)[: x.size]
        mids = (table[1:] + table[:-1]) / 2
        near = np.min(np.abs(u[off, None] - mids[None, :]), axis=1) < 1e-6
        if not np.all(near):
            i = int(off[~near][0])
            raise Mismatch(f"codes: {int(np.sum(~near))} of {x.size} differ; first at [{i}]: x={x[i]:+.5f}, "
                           f"x/absmax={u[i]:+.5f}, mine={int(codes[i])} expected={int(want[i])} "
                           f"(level {table[want[i]]:+.4f})")
    return "absmax per block and the nearest-level codes equal quantize_nf4's"


def check_absmax_quantize(fn, verbose=True) -> CheckResult:
    """``fn(x (n,), table (16,), blocksize) -> (codes (n,) ints, absmax (n_blocks,))``."""
    return check("absmax_quantize", fn, _absmax_body, verbose)


def _bits_body(fn):
    from lowrank_ref.quant import quantize_nf4

    # the arithmetic QLoRA §3 states: 4 + 32/64 = 4.5, and 4 + 8/64 + 32/(64·256) ≈ 4.127
    compare("bits_per_param(64, False)", fn(64, False, 256), 4.5, rtol=1e-12)
    compare("bits_per_param(64, True, 256)", fn(64, True, 256), 4 + 8 / 64 + 32 / (64 * 256), rtol=1e-12)
    x = np.random.default_rng(12).standard_normal(64 * 256 * 4).astype(np.float32)
    for bs, dq in [(32, False), (128, True), (64, True)]:
        q = quantize_nf4(x, blocksize=bs, double_quant=dq)
        compare(f"bits_per_param({bs}, {dq}, 256)", fn(bs, dq, 256), q.bits_per_param, rtol=1e-3)
    return "matches QLoRA's 4.5 and 4.127, and the bits a real NF4 tensor stores"


def check_bits_per_param(fn, verbose=True) -> CheckResult:
    """``fn(blocksize, double_quant, blocksize2) -> bits per weight`` (large-tensor limit)."""
    return check("bits_per_param", fn, _bits_body, verbose)


def _full_ft_body(fn):
    # bf16 weight 2 + bf16 gradient 2 + fp32 master weight 4 + Adam's fp32 m and v 8 = 16 bytes
    for n in (1, 1000, 65_000_000_000):
        compare(f"full_finetune_bytes({n})", fn(n), 16 * n, rtol=1e-12)
    return "16 bytes per parameter: 1.04 TB for 65B parameters, before activations"


def check_full_finetune_bytes(fn, verbose=True) -> CheckResult:
    """``fn(n_params) -> bytes`` of mixed-precision full fine-tuning with Adam (no activations)."""
    return check("full_finetune_bytes", fn, _full_ft_body, verbose)


# ---------------------------------------------------------------- chapter 04: the comparison


def _gpt_count_body(fn):
    import lowrank_ref as lr
    from lowrank_ref.inject import inject

    cases = [(dict(d_model=64, n_layer=2), 8, ("q", "v")),
             (dict(d_model=32, n_layer=3, mlp_ratio=2), 4, ("q", "k", "v", "o", "fc", "proj")),
             (dict(d_model=16, n_layer=1), 2, ("fc",))]
    for kw, r, targets in cases:
        cfg = lr.nn.GPTConfig(vocab_size=11, block_size=8, n_head=4, **kw)
        model = lr.nn.GPT(cfg, rng=_rng(13))
        inject(model, lr.LoRAConfig(r=r, alpha=2 * r), targets=targets, rng=0)
        want = model.num_trainable_parameters()
        got = fn(cfg, r, targets)
        if got != want:
            raise Mismatch(f"{kw}, r={r}, targets={targets}: yours {got!r}, expected {want} "
                           "(what inject() makes trainable)")
    return "matches what inject() makes trainable, on three model sizes and target sets"


def check_lora_gpt_params(fn, verbose=True) -> CheckResult:
    """``fn(cfg: GPTConfig, r, targets) -> int``: LoRA's trainable parameters in the GPT."""
    return check("lora_gpt_params", fn, _gpt_count_body, verbose)


def _adam_bytes_body(fn):
    import lowrank_ref as lr
    from lowrank_ref.optim import Adam

    rng = _rng(14)
    for n_in, n_out in [(5, 4), (16, 3)]:
        layer = lr.nn.Linear(n_in, n_out, rng=rng)  # float32
        opt = Adam(layer.parameters())
        y = layer.forward(rng.standard_normal((2, n_in)).astype(np.float32))
        layer.backward(np.ones_like(y))
        opt.step()
        measured = opt.state_bytes() + sum(p.grad.nbytes for p in layer.parameters().values())
        n = layer.num_trainable_parameters()
        compare(f"adam_training_bytes({n})", fn(n), measured, rtol=0, atol=0.5)
    return "matches the gradient and Adam state a real float32 step allocates"


def check_adam_training_bytes(fn, verbose=True) -> CheckResult:
    """``fn(n_trainable) -> bytes`` of float32 gradients plus Adam's two moments."""
    return check("adam_training_bytes", fn, _adam_bytes_body, verbose)


# ---------------------------------------------------------------- chapter 05: changing the product


def _loha_factors(rng, out=5, n_in=6, r=3):
    """Random non-zero LoHa factors: A1, A2 (r, in), B1, B2 (out, r)."""
    return (rng.standard_normal((r, n_in)), rng.standard_normal((r, n_in)),
            rng.standard_normal((out, r)), rng.standard_normal((out, r)))


def _face_split_body(fn):
    A1, A2, B1, B2 = _loha_factors(_rng(50))
    KA, KB = _unpack(fn(A1.copy(), A2.copy(), B1.copy(), B2.copy()), 2, "(K_A, K_B)")
    # the fact: K_B K_A equals the Hadamard product of the two low-rank products
    r = A1.shape[0]
    compare("K_A", KA, np.stack([np.kron(A1[:, j], A2[:, j]) for j in range(A1.shape[1])], axis=1))
    compare("K_B", KB, np.stack([np.kron(B1[i], B2[i]) for i in range(B1.shape[0])]))
    compare("K_B @ K_A", np.asarray(KB) @ np.asarray(KA), (B1 @ A1) * (B2 @ A2))
    return f"K_A (r², in) = ({r * r}, {A1.shape[1]}) and K_B (out, r²) = ({B1.shape[0]}, {r * r}); K_B K_A = (B1A1)⊙(B2A2)"


def check_face_split(fn, verbose=True) -> CheckResult:
    """``fn(A1, A2, B1, B2) -> (K_A (r², in), K_B (out, r²))`` with ``(p, q) -> p r + q``."""
    return check("face_split", fn, _face_split_body, verbose)


def _loha_forward_body(fn):
    rng = _rng(51)
    A1, A2, B1, B2 = _loha_factors(rng)
    x, s = rng.standard_normal((4, 6)), 1.5
    z = fn(x.copy(), A1.copy(), A2.copy(), B1.copy(), B2.copy(), s)
    compare("z = x ΔWᵀ", z, x @ (s * (B1 @ A1) * (B2 @ A2)).T)
    return "z = s (x K_Aᵀ) K_Bᵀ equals x ΔWᵀ through the dense ΔW"


def check_loha_factorised_forward(fn, verbose=True) -> CheckResult:
    """``fn(x (N, in), A1, A2, B1, B2, s) -> z (N, out)``: LoHa's branch without building ΔW."""
    return check("loha_factorised_forward", fn, _loha_forward_body, verbose)


def _loha_backward_body(fn):
    rng = _rng(52)
    A1, A2, B1, B2 = _loha_factors(rng)
    x, s = rng.standard_normal((4, 6)), 1.5
    w = rng.standard_normal((4, 5))  # the loss is sum(z ⊙ w), so z̄ = w
    out = _unpack(fn(w.copy(), x.copy(), A1.copy(), A2.copy(), B1.copy(), B2.copy(), s), 5,
                  "(dx, dA1, dA2, dB1, dB2)")
    names = ("x", "A1", "A2", "B1", "B2")
    arrays = dict(zip(names, (x, A1, A2, B1, B2)))
    _gradcheck(lambda: float(np.sum(x @ (s * (B1 @ A1) * (B2 @ A2)).T * w)), arrays, dict(zip(names, out)),
               "loha_backward")
    return "dx, dA1, dA2, dB1 and dB2 agree with central differences in every entry"


def check_loha_backward(fn, verbose=True) -> CheckResult:
    """``fn(dz (N, out), x, A1, A2, B1, B2, s) -> (dx, dA1, dA2, dB1, dB2)`` for ``z = x ΔWᵀ``."""
    return check("loha_backward", fn, _loha_backward_body, verbose)


def _loha_rank_body(fn):
    rows = []
    for out, n_in, r in ((48, 64, 1), (48, 64, 2), (48, 64, 4), (48, 64, 7), (10, 30, 4), (30, 10, 5)):
        got = fn(out, n_in, r)
        if got is None:
            raise Mismatch("your function returned None (not written yet?)")
        try:
            loha, lora = (int(v) for v in got)
        except (TypeError, ValueError):
            raise Mismatch(f"expected (loha_rank, lora_rank) as two integers, got {got!r}") from None
        # the facts: generic rank min(r², in, out) for LoHa at r; min(2r, in, out) for LoRA at 2r
        want = (min(r * r, out, n_in), min(2 * r, out, n_in))
        if (loha, lora) != want:
            raise Mismatch(f"out={out}, in={n_in}, r={r}: you gave (loha, lora) = {(loha, lora)}, expected {want}")
        rows.append(f"r={r}: {loha} vs {lora}")
    return "generic ranks at equal parameters, " + "; ".join(rows)


def check_loha_rank(fn, verbose=True) -> CheckResult:
    """``fn(out, in, r) -> (rank of LoHa at r, rank of LoRA at 2r)`` for random (generic) factors."""
    return check("loha_rank", fn, _loha_rank_body, verbose)


CHECKS: dict[str, list[tuple[str, Callable]]] = {
    "00-toolkit": [("linear_backward", check_linear_backward),
                   ("layernorm_backward", check_layernorm_backward),
                   ("softmax_backward", check_softmax_backward),
                   ("broken_layernorm_backward", check_broken_layernorm)],
    "01-lora": [("lora_scaling", check_lora_scaling), ("lora_forward", check_lora_forward),
                ("lora_backward", check_lora_backward), ("lora_merge", check_lora_merge),
                ("lora_params", check_lora_params)],
    "02-dora": [("dora_row_norm", check_dora_row_norm),
                ("dora_detached_backward", check_dora_detached_backward),
                ("dora_norm_backward", check_dora_norm_backward)],
    "03-qlora": [("nf4_table", check_nf4_table), ("absmax_quantize", check_absmax_quantize),
                 ("bits_per_param", check_bits_per_param),
                 ("full_finetune_bytes", check_full_finetune_bytes)],
    "04-compare": [("lora_gpt_params", check_lora_gpt_params),
                   ("adam_training_bytes", check_adam_training_bytes)],
    "05-products": [("face_split", check_face_split), ("loha_factorised_forward", check_loha_factorised_forward),
                    ("loha_backward", check_loha_backward), ("loha_rank", check_loha_rank)],
}


# ---------------------------------------------------------------- chapter 07: DyLoRA and SoRA
# (chapter 07 §7; these checks are not yet cells of notebooks/07-rank-exercises.ipynb, so they are
# listed in DRAFT_CHECKS, run by tests/test_exercises_dylora_sora.py, not in CHECKS)


def _dylora_layer(rng, r=4, alpha=6.0):
    import lowrank_ref as lr

    W, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    layer = lr.adapters.DyLoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DyLoRAConfig(r=r, alpha=alpha), rng=0)
    layer.A.data = rng.standard_normal(layer.A.shape)
    layer.B.data = rng.standard_normal(layer.B.shape)  # away from B = 0
    return layer


def _dylora_forward_body(fn):
    rng = _rng(70)
    layer = _dylora_layer(rng)
    x = rng.standard_normal((2, 3, 5))
    for b in (1, 3, 4):
        layer.set_rank(b)
        y = fn(x.copy(), layer.base.weight.data.copy(), layer.base.bias.data.copy(), layer.A.data.copy(),
               layer.B.data.copy(), 6.0, b)
        compare(f"y at rank b={b}", y, layer.forward(x))
    return "equals DyLoRALinear.forward at ranks 1, 3 and 4 of 4 (scale α/b)"


def check_dylora_forward(fn, verbose=True) -> CheckResult:
    """``fn(x, W, b0, A (r, in), B (out, r), alpha, b) -> y``: the rank-b forward, scale α/b."""
    return check("dylora_forward", fn, _dylora_forward_body, verbose)


def _soft_threshold_body(fn):
    from lowrank_ref.adapters.sora import soft_threshold

    xi = 0.25
    x = np.array([-2.0, -0.4, -0.25, -0.1, 0.0, 0.1, 0.3, 0.49, 0.51, 3.0])  # 0.3, 0.49: inside (ξ, 2ξ)
    compare("T_ξ(x)", fn(x.copy(), xi), soft_threshold(x, xi), rtol=1e-12, atol=1e-14)
    return "sign(x) max(|x| − ξ, 0), also in (ξ, 2ξ), where the reference code's masks give 0"


def check_soft_threshold(fn, verbose=True) -> CheckResult:
    """``fn(x, xi) -> T_ξ(x)`` elementwise."""
    return check("soft_threshold", fn, _soft_threshold_body, verbose)


def _sora_backward_body(fn):
    rng = _rng(71)
    x = rng.standard_normal((2, 3, 5))
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    A, g, B = rng.standard_normal((3, 5)), rng.standard_normal(3), rng.standard_normal((4, 3))
    s, w = 1.5, rng.standard_normal((2, 3, 4))
    dx, dA, dg, dB = _unpack(fn(w.copy(), x.copy(), W.copy(), A.copy(), g.copy(), B.copy(), s), 4,
                             "(dx, dA, dg, dB)")
    _gradcheck(lambda: float(np.sum((x @ W.T + b + s * ((x @ A.T) * g) @ B.T) * w)),
               {"x": x, "A": A, "g": g, "B": B}, {"x": dx, "A": dA, "g": dg, "B": dB}, "sora_backward")
    return "dx, dA, dg and dB agree with central differences in every entry"


def check_sora_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy, x, W, A, g, B, s) -> (dx, dA, dg, dB)``; ``W`` and ``b`` are frozen."""
    return check("sora_backward", fn, _sora_backward_body, verbose)


def _sora_prune_body(fn):
    rng = _rng(72)
    A, B = rng.standard_normal((5, 6)), rng.standard_normal((4, 5))
    g = np.array([0.7, 0.0, -1.2, 0.0, 0.05])
    A2, B2 = _unpack(fn(A.copy(), g.copy(), B.copy()), 2, "(A_pruned, B_pruned)")
    A2, B2 = np.asarray(A2, dtype=np.float64), np.asarray(B2, dtype=np.float64)
    if A2.shape != (3, 6) or B2.shape != (4, 3):
        raise Mismatch(f"three gates are non-zero: expected A' (3, 6) and B' (4, 3), got {A2.shape} and {B2.shape}")
    compare("B' A' (the pruned update)", B2 @ A2, B @ np.diag(g) @ A)
    return "a rank-3 LoRA with B' A' = B diag(g) A: the same outputs at the same scale"


def check_sora_prune(fn, verbose=True) -> CheckResult:
    """``fn(A (r, in), g (r,), B (out, r)) -> (A', B')`` keeping the ranks whose gate is non-zero."""
    return check("sora_prune", fn, _sora_prune_body, verbose)


DRAFT_CHECKS: dict[str, list[tuple[str, Callable]]] = {
    "07-dylora-sora": [("dylora_forward", check_dylora_forward), ("soft_threshold", check_soft_threshold),
                       ("sora_backward", check_sora_backward), ("sora_prune", check_sora_prune)],
}


# ---------------------------------------------------------------- chapter 05: KronA and LoKr
# (kept as their own block, KRONECKER_CHECKS, until chapter 05's exercise notebook takes them in)


def _kron_problem(rng):
    C = rng.standard_normal((3, 2))  # (p, m): out = p·q = 12, in = m·n = 10
    D = rng.standard_normal((4, 5))  # (q, n)
    x = rng.standard_normal((6, 10))  # (N, m·n)
    return x, C, D


class _NoKron:
    """Within the block, ``np.kron`` raises: the exercise must not build C ⊗ D."""

    def __enter__(self):
        self.saved = np.kron

        def refuse(*a, **k):
            raise Mismatch("your function called np.kron: apply C ⊗ D through the reshape identity instead")

        np.kron = refuse

    def __exit__(self, *exc):
        np.kron = self.saved


def _kron_matvec_body(fn):
    x, C, D = _kron_problem(_rng(50))
    with _NoKron():
        y = fn(x.copy(), C.copy(), D.copy())
    compare("x (C ⊗ D)ᵀ", y, x @ np.kron(C, D).T)
    return "equals x @ np.kron(C, D).T without forming the Kronecker product"


def check_kron_matvec(fn, verbose=True) -> CheckResult:
    """``fn(x (N, m·n), C (p, m), D (q, n)) -> x (C ⊗ D)ᵀ (N, p·q)``, without ``np.kron``."""
    return check("kron_matvec", fn, _kron_matvec_body, verbose)


def _kron_backward_body(fn):
    x, C, D = _kron_problem(_rng(51))
    w = _rng(52).standard_normal((6, 12))  # the loss is sum(y ⊙ w), so ȳ = w
    with _NoKron():
        out = _unpack(fn(w.copy(), x.copy(), C.copy(), D.copy()), 3, "(dx, dC, dD)")
    _gradcheck(lambda: float(np.sum((x @ np.kron(C, D).T) * w)), {"x": x, "C": C, "D": D},
               dict(zip(("x", "C", "D"), out)), "kron_backward")
    return "dx, dC and dD agree with central differences in every entry"


def check_kron_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy (N, p·q), x (N, m·n), C, D) -> (dx, dC, dD)`` for ``y = x (C ⊗ D)ᵀ``."""
    return check("kron_backward", fn, _kron_backward_body, verbose)


def _lokr_factorization_body(fn):
    from lowrank_ref.adapters.lokr import factorization

    cases = [(256, -1), (128, -1), (127, -1), (250, -1), (360, 8), (1024, 16), (16, 16), (12, 4),
             (16, 8), (768, -1), (96, 5), (1, -1)]
    for dim, f in cases:
        got = fn(dim, f)
        want = factorization(dim, f)
        if got is None or tuple(got) != want:
            raise Mismatch(f"lokr_factorization({dim}, {f}) = {got!r}, expected {want} (PEFT's rule)")
    return f"PEFT's pairs on all {len(cases)} cases, the unsorted ones included"


def check_lokr_factorization(fn, verbose=True) -> CheckResult:
    """``fn(dim, factor) -> (m, n)``: PEFT's ``factorization`` rule."""
    return check("lokr_factorization", fn, _lokr_factorization_body, verbose)


def _lokr_params_body(fn):
    import lowrank_ref as lr

    rng = _rng(53)
    cases = [(64, 64, 2, False, -1), (64, 64, 4, False, -1), (64, 64, 2, True, -1), (64, 64, 15, False, 2),
             (768, 768, 8, False, -1), (768, 3072, 4, True, 16), (10, 12, 1, False, 4)]
    for n_in, n_out, r, both, f in cases:
        base = lr.nn.Linear(n_in, n_out, rng=rng)
        layer = lr.adapters.LoKrLinear(base, lr.LoKrConfig(r=r, decompose_both=both, decompose_factor=f), rng=rng)
        got = fn(n_in, n_out, r, both, f)
        if got != layer.num_trainable_parameters():
            raise Mismatch(f"lokr_params({n_in}, {n_out}, r={r}, decompose_both={both}, factor={f}) = {got!r}, "
                           f"expected {layer.num_trainable_parameters()} (LoKrLinear's trainable count)")
    return f"LoKrLinear's trainable count on all {len(cases)} layers (full and low-rank blocks)"


def check_lokr_params(fn, verbose=True) -> CheckResult:
    """``fn(in, out, r, decompose_both, factor) -> int``: a LoKr layer's trainable parameters."""
    return check("lokr_params", fn, _lokr_params_body, verbose)


KRONECKER_CHECKS: dict[str, list[tuple[str, Callable]]] = {
    "05-kronecker": [("kron_matvec", check_kron_matvec), ("kron_backward", check_kron_backward),
                     ("lokr_factorization", check_lokr_factorization), ("lokr_params", check_lokr_params)],
}


# ---------------------------------------------------------------- chapter 08: serving many adapters
# (a block of its own: the chapter's checks are added to CHECKS below, after the table above)


def _bgmv_body(fn):
    rng = _rng(80)
    out, inp, K, R = 5, 4, 4, 3
    W0, b = rng.standard_normal((out, inp)), rng.standard_normal(out)
    ranks = {1: 2, 2: 3, 3: 1}  # slot 0 is the base (zeros); ranks below R are zero-padded
    A_all, B_all = np.zeros((K, R, inp)), np.zeros((K, out, R))
    s, g = np.zeros(K), np.ones((K, out))
    for k, r in ranks.items():
        A_all[k, :r], B_all[k, :, :r] = rng.standard_normal((r, inp)), rng.standard_normal((out, r))
        s[k], g[k] = 0.5 + k, rng.uniform(0.5, 1.5, out)
    slots = np.array([2, 0, 3, 1, 2, 0])
    x = rng.standard_normal((len(slots), 2, inp))  # (N, T, in)
    mine = fn(x.copy(), W0.copy(), b.copy(), A_all.copy(), B_all.copy(), s.copy(), g.copy(), slots.copy())
    # the oracle: each row through its own dense adapted weight g ⊙ (W0 + s B A)
    expected = np.stack([x[i] @ (g[k][:, None] * (W0 + s[k] * B_all[k] @ A_all[k])).T + b
                         for i, k in enumerate(slots)])
    compare("y", mine, expected)
    return "every row equals x_i (g ⊙ (W0 + s B A))ᵀ + b with its own adapter (the base for slot 0)"


def check_bgmv_rows(fn, verbose=True) -> CheckResult:
    """``fn(x (N, T, in), W0, b, A_all (K, R, in), B_all (K, out, R), s (K,), g (K, out), slots (N,))``
    ``-> y (N, T, out)``: the gather kernel, ``y_i = g[k_i] ⊙ (x_i W0ᵀ + s[k_i] (x_i A[k_i]ᵀ) B[k_i]ᵀ) + b``."""
    return check("bgmv_rows", fn, _bgmv_body, verbose)


def _dora_scale_body(fn):
    from lowrank_ref.adapters.dora import DoRAConfig, DoRALinear
    from lowrank_ref.nn.linear import Linear
    from lowrank_ref.serve import adapter_factors

    rng = _rng(81)
    W0 = rng.standard_normal((5, 6))
    layer = DoRALinear(Linear.from_arrays(W0), DoRAConfig(r=2, alpha=3), rng=rng)
    layer.B.data = rng.standard_normal(layer.B.data.shape)  # as if trained: n ≠ ‖W0‖
    layer.m.data = layer.m.data * rng.uniform(0.5, 1.5, 5)
    args = (W0.copy(), layer.A.data.copy(), layer.B.data.copy(), float(layer.scaling), layer.m.data.copy())
    compare("g", fn(*args), adapter_factors(layer, "dora")["g"])
    # the zero-norm rule: a row with W0_j + s (BA)_j = 0 gets g_j = 0
    A = rng.standard_normal((2, 6))
    B = rng.standard_normal((5, 2))
    W1 = W0.copy()
    W1[3] = -1.5 * (B @ A)[3]  # row 3 of V = W0 + 1.5 BA is zero
    compare("g (a zero-norm row)", fn(W1, A, B, 1.5, np.ones(5))[3], 0.0)
    return "g = m / ‖W0 + s B A‖ row by row (the norm of the adapted weight, not of W0), 0 where it is 0"


def check_dora_serving_scale(fn, verbose=True) -> CheckResult:
    """``fn(W0 (out, in), A, B, s, m (out,)) -> g (out,)``: DoRA's frozen row scale for serving."""
    return check("dora_serving_scale", fn, _dora_scale_body, verbose)


CHECKS["08-serving"] = [("bgmv_rows", check_bgmv_rows), ("dora_serving_scale", check_dora_serving_scale)]


def show(fn) -> None:
    """Print a function's source (to look at a solution or a package function from a notebook)."""
    print(inspect.getsource(fn))


# ---------------------------------------------------------------- chapter 07: adapting the rank
# (a block of its own, appended to CHECKS below, so other chapters' edits above do not collide)


def _adalora_backward_body(fn):
    rng = _rng(71)
    x = rng.standard_normal((2, 3, 5))
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    P, E, Q = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((3, 5))
    s, w = 1.5, rng.standard_normal((2, 3, 4))
    dx, dP, dE, dQ = _unpack(fn(w.copy(), x.copy(), W.copy(), P.copy(), E.copy(), Q.copy(), s), 4,
                             "(dx, dP, dE, dQ)")
    _gradcheck(lambda: float(np.sum((x @ W.T + b + s * ((x @ Q.T) * E) @ P.T) * w)),
               {"x": x, "P": P, "E": E, "Q": Q}, {"x": dx, "P": dP, "E": dE, "Q": dQ}, "adalora_backward")
    return "dx, dP, dE and dQ agree with central differences in every entry"


def check_adalora_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy, x, W, P, E, Q, s) -> (dx, dP, dE, dQ)`` for ``y = x Wᵀ + b + s ((x Qᵀ) ⊙ E) Pᵀ``."""
    return check("adalora_backward", fn, _adalora_backward_body, verbose)


def _orth_reg_grad_body(fn):
    rng = _rng(72)
    P, Q = rng.standard_normal((6, 3)), rng.standard_normal((3, 5))
    out = _unpack(fn(P.copy(), Q.copy()), 3, "(R, dP, dQ)")
    R, dP, dQ = out
    from lowrank_ref.adapters.adalora import orth_reg

    compare("R", np.asarray(R, dtype=float), np.asarray(orth_reg(P, Q)[0]))
    _gradcheck(lambda: float(orth_reg(P, Q)[0]), {"P": P, "Q": Q}, {"P": dP, "Q": dQ}, "orth_reg gradient")
    return "R = ‖QQᵀ − I‖_F + ‖PᵀP − I‖_F and its gradients agree with central differences"


def check_orth_reg_grad(fn, verbose=True) -> CheckResult:
    """``fn(P (out, r), Q (r, in)) -> (R, dR/dP, dR/dQ)`` for the plain (unsquared) norms."""
    return check("orth_reg_grad", fn, _orth_reg_grad_body, verbose)


def _triplet_scores_body(fn):
    from lowrank_ref.adapters.adalora import AdaLoRAConfig, AdaLoRALinear, RankAllocator
    from lowrank_ref.nn.linear import Linear

    rng = _rng(73)
    cfg = AdaLoRAConfig(init_r=4, target_r=2, beta1=0.8, beta2=0.7, total_step=10)
    layer = AdaLoRALinear(Linear.from_arrays(rng.standard_normal((5, 6))), cfg, rng=rng)
    alloc = RankAllocator({"l": layer})
    Ibar = {n: np.zeros(getattr(layer, n).data.shape) for n in "PEQ"}
    Ubar = {n: np.zeros(getattr(layer, n).data.shape) for n in "PEQ"}
    for step in range(3):  # three steps of values and gradients, the EMAs carried over
        vals = {n: rng.standard_normal(getattr(layer, n).data.shape) for n in "PEQ"}
        grads = {n: rng.standard_normal(v.shape) for n, v in vals.items()}
        for n in "PEQ":
            getattr(layer, n).data, getattr(layer, n).grad = vals[n].copy(), grads[n].copy()
        alloc.update_ipt()
        out = _unpack(fn({n: v.copy() for n, v in vals.items()}, {n: g.copy() for n, g in grads.items()},
                         Ibar, Ubar, 0.8, 0.7), 3, "(S, Ibar, Ubar)")
        S, Ibar, Ubar = out
        compare(f"S after step {step}", np.asarray(S), alloc.triplet_scores()["l"])
    return "S = s(E) + mean_j s(Q_ij) + mean_j s(P_ji), with s = Ī·Ū, equals the allocator's over three steps"


def check_triplet_scores(fn, verbose=True) -> CheckResult:
    """``fn(values, grads, Ibar, Ubar, beta1, beta2) -> (S (r,), new Ibar, new Ubar)``; dicts keyed
    ``"P"``, ``"E"``, ``"Q"``."""
    return check("triplet_scores", fn, _triplet_scores_body, verbose)


def _budget_body(fn):
    from lowrank_ref.adapters.adalora import AdaLoRAConfig, budget_schedule

    for kw in (dict(tinit=5, tfinal=10, deltaT=3, total_step=60), dict(tinit=0, tfinal=0, deltaT=1, total_step=17)):
        cfg = AdaLoRAConfig(init_r=6, target_r=2, **kw)
        for step in range(cfg.total_step + 1):
            got = _unpack(fn(step, 60, 20, cfg.tinit, cfg.tfinal, cfg.deltaT, cfg.total_step), 2, "(budget, mask)")
            want = budget_schedule(step, 60, 20, cfg)
            if (int(got[0]), bool(got[1])) != want:
                raise Mismatch(f"step {step} with {kw}: yours {got}, expected {want}")
    return "budget and masking flag right at every step of two schedules"


def check_budget_schedule(fn, verbose=True) -> CheckResult:
    """``fn(step, b0, bT, tinit, tfinal, deltaT, total_step) -> (budget, mask_now)``."""
    return check("budget_schedule", fn, _budget_body, verbose)


CHECKS["07-rank"] = [("adalora_backward", check_adalora_backward), ("orth_reg_grad", check_orth_reg_grad),
                     ("triplet_scores", check_triplet_scores), ("budget_schedule", check_budget_schedule)]


# ---------------------------------------------------------------- chapter 06: sharing weights
# (a block of its own: its checks and its CHECKS entry, so that other chapters' blocks merge apart)
def _vera_parts(rng, n_in=5, n_out=4, r=3):
    x = rng.standard_normal((2, 3, n_in))
    W, b0 = rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    A, B = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    d, b = rng.standard_normal(r), rng.standard_normal(n_out)
    return x, W, b0, A, B, d, b


def _vera_y(x, W, b0, A, B, d, b):
    return x @ W.T + b0 + (((x @ A.T) * d) @ B.T) * b


def _vera_backward_body(fn):
    rng = _rng(61)
    x, W, b0, A, B, d, b = _vera_parts(rng)
    w = rng.standard_normal((2, 3, 4))
    dx, dd, db = _unpack(fn(w.copy(), x.copy(), W.copy(), A.copy(), B.copy(), d.copy(), b.copy()), 3,
                         "(dx, dd, db)")
    _gradcheck(lambda: float(np.sum(_vera_y(x, W, b0, A, B, d, b) * w)),
               {"x": x, "d": d, "b": b}, {"x": dx, "d": dd, "b": db}, "vera_backward")
    return "dx, dd and db agree with central differences in every entry (a 3-D input)"


def check_vera_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy, x, W, A, B, d, b) -> (dx, dd, db)`` for ``y = x Wᵀ + b0 + ((x Aᵀ) ⊙ d) Bᵀ ⊙ b``."""
    return check("vera_backward", fn, _vera_backward_body, verbose)


def _tied_body(fn):
    rng = _rng(62)
    n_in, n_out, r, L = 5, 4, 3, 3
    A, B = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    xs = [rng.standard_normal((6, n_in)) for _ in range(L)]
    us = [rng.standard_normal(r) for _ in range(L)]
    vs = [rng.standard_normal(n_out) for _ in range(L)]
    ws = [rng.standard_normal((6, n_out)) for _ in range(L)]
    dA = fn([w.copy() for w in ws], [x.copy() for x in xs], A.copy(), B.copy(), [u.copy() for u in us],
            [v.copy() for v in vs])

    def loss():  # every layer uses the one A: the loss sums over them
        return float(sum(np.sum((((x @ A.T) * u) @ B.T) * v * w) for x, u, v, w in zip(xs, us, vs, ws)))

    _gradcheck(loss, {"A": A}, {"A": dA}, "tied_A_grad")
    return f"the gradient of the A shared by {L} layers agrees with central differences"


def check_tied_A_grad(fn, verbose=True) -> CheckResult:
    """``fn(dys, xs, A, B, us, vs) -> dA``: lists over the layers that share ``A``."""
    return check("tied_A_grad", fn, _tied_body, verbose)


def _vera_count_body(fn):
    import lowrank_ref as lr
    from lowrank_ref.inject import inject
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    for d_model, n_layer, r, targets in [(8, 2, 4, ("q", "v")), (8, 1, 16, ("q", "fc")), (16, 2, 256, ("v", "proj"))]:
        cfg = GPTConfig(vocab_size=11, block_size=4, n_layer=n_layer, n_head=2, d_model=d_model)
        model = GPT(cfg, rng=_rng(63))
        want = inject(model, lr.VeRAConfig(r=r), targets=targets).trainable_params
        shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
                  if type(m).__name__ == "VeRALinear"]
        got = fn(r, shapes)
        if got != want:
            raise Mismatch(f"vera_params(r={r}, {shapes}) = {got!r}, expected {want} (what inject trains)")
    return "matches what inject(VeRAConfig) trains on three models"


def check_vera_params(fn, verbose=True) -> CheckResult:
    """``fn(r, shapes: [(out, in), ...]) -> int``: VeRA's trained numbers over those layers."""
    return check("vera_params", fn, _vera_count_body, verbose)


CHECKS["06-sharing"] = [("vera_backward", check_vera_backward), ("tied_A_grad", check_tied_A_grad),
                        ("vera_params", check_vera_params)]


# ---------------------------------------------------------------- chapter 09: the baselines
# (a block of its own, appended to CHECKS below; tests/test_exercises.py runs it with the rest)


def _ssf_merge_body(fn):
    import lowrank_ref as lr

    rng = _rng(90)
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    layer = lr.adapters.SSFLinear(lr.nn.Linear.from_arrays(W.copy(), b.copy()), lr.SSFConfig())
    layer.gamma.data = rng.uniform(-2, 2, 4)
    layer.beta.data = rng.standard_normal(4)
    out = _unpack(fn(W.copy(), b.copy(), layer.gamma.data.copy(), layer.beta.data.copy()), 2, "(W', b')")
    x = rng.standard_normal((5, 3))
    y = layer.forward(x)
    compare("W'", out[0], layer.merged_weight())
    compare("b'", out[1], layer.merged_bias())
    compare("x W'ᵀ + b'", x @ np.asarray(out[0], dtype=np.float64).T + np.asarray(out[1], dtype=np.float64), y)
    return "W' and b' equal SSFLinear's merge, and x W'ᵀ + b' is the SSF layer's output"


def check_ssf_merge(fn, verbose=True) -> CheckResult:
    """``fn(W (out, in), b (out,), gamma (out,), beta (out,)) -> (W', b')``: SSF folded into the linear."""
    return check("ssf_merge", fn, _ssf_merge_body, verbose)


def _adapter_backward_body(fn):
    rng = _rng(91)
    h = rng.standard_normal((6, 5))  # the base layer's output h = x W0ᵀ + b, (N, out)
    Wd, bd = rng.standard_normal((3, 5)), rng.standard_normal(3)  # (m, out), (m,)
    Wu, bu = rng.standard_normal((5, 3)), rng.standard_normal(5)  # (out, m), (out,)
    w = rng.standard_normal((6, 5))  # the loss is sum(y ⊙ w), so ȳ = w

    def y_of():
        return h + np.maximum(h @ Wd.T + bd, 0) @ Wu.T + bu  # ReLU adapter

    out = _unpack(fn(w.copy(), h.copy(), Wd.copy(), bd.copy(), Wu.copy()), 5, "(dh, dW_down, db_down, dW_up, db_up)")
    _gradcheck(lambda: float(np.sum(y_of() * w)), {"h": h, "W_down": Wd, "b_down": bd, "W_up": Wu, "b_up": bu},
               dict(zip(("h", "W_down", "b_down", "W_up", "b_up"), out)), "adapter_backward")
    return "every gradient, the skip connection's share of dh included, agrees with central differences"


def check_adapter_backward(fn, verbose=True) -> CheckResult:
    """``fn(dy, h, W_down, b_down, W_up) -> (dh, dW_down, db_down, dW_up, db_up)`` for the ReLU
    adapter ``y = h + relu(h W_downᵀ + b_down) W_upᵀ + b_up``."""
    return check("adapter_backward", fn, _adapter_backward_body, verbose)


def _adapter_params_body(fn):
    import lowrank_ref as lr

    rng = _rng(92)
    for d_in, d, m in [(4, 5, 2), (64, 64, 8), (256, 64, 1), (64, 256, 64)]:
        layer = lr.adapters.HoulsbyLinear(lr.nn.Linear(d_in, d, rng=rng), lr.HoulsbyConfig(bottleneck=m), rng=rng)
        got = fn(d, m)
        if got != layer.num_trainable_parameters():
            raise Mismatch(f"adapter_params({d}, {m}) = {got!r}, expected {layer.num_trainable_parameters()} "
                           "(HoulsbyLinear's trainable count)")
    return "matches HoulsbyLinear.num_trainable_parameters() on four shapes"


def check_adapter_params(fn, verbose=True) -> CheckResult:
    """``fn(d, m) -> int``: a Houlsby adapter's trainable parameters around a layer of width ``d``."""
    return check("adapter_params", fn, _adapter_params_body, verbose)


CHECKS["09-baselines"] = [("ssf_merge", check_ssf_merge), ("adapter_backward", check_adapter_backward),
                          ("adapter_params", check_adapter_params)]


# ---------------------------------------------------------------- chapter 08: HyperLoRA
# (a block of its own, appended to CHECKS below, so other chapters' edits above do not collide)


def _hyper_backward_body(fn):
    from lowrank_ref.adapters.hyperlora import hyper_generate, hyper_generate_backward

    rng = _rng(95)
    d_t, d_m, d_l, hidden, r, inn, out = 3, 2, 2, 5, 2, 4, 3
    P = {"T": rng.standard_normal((2, d_t)), "M": rng.standard_normal(d_m), "e": rng.standard_normal(d_l),
         "W1": rng.standard_normal((hidden, d_t + d_m + d_l)), "b1": rng.standard_normal(hidden),
         "H_A": rng.standard_normal((r * inn, hidden)), "h_A": rng.standard_normal(r * inn),
         "H_B": rng.standard_normal((out * r, hidden)), "h_B": rng.standard_normal(out * r)}
    c = np.array([1])
    _, _, cache = hyper_generate(c, P, r, inn, out)
    dA, dB = rng.standard_normal((1, r, inn)), rng.standard_normal((1, out, r))
    want = hyper_generate_backward(dA, dB, cache)
    z = cache.z[0]
    mine = fn(z.copy(), P["W1"].copy(), P["b1"].copy(), P["H_A"].copy(), P["h_A"].copy(), P["H_B"].copy(),
              P["h_B"].copy(), dA[0].copy(), dB[0].copy())
    if not isinstance(mine, dict):
        raise Mismatch(f"return a dict of gradients, got {type(mine).__name__}")
    for k in ("H_A", "h_A", "H_B", "h_B", "W1", "b1"):
        compare(k, mine.get(k), want[k])
    compare("z", mine.get("z"), np.concatenate([want["T"][1], want["M"], want["e"]]))
    return "the heads, SiLU, the trunk and z: every gradient matches the package's hyper_generate_backward"


def check_hyper_backward(fn, verbose=True) -> CheckResult:
    """``fn(z, W1, b1, H_A, h_A, H_B, h_B, dA (r, in), dB (out, r)) -> {"H_A", "h_A", "H_B", "h_B",
    "W1", "b1", "z"}``: HyperLoRA's backward for one condition, from Ā and B̄ down to the input z."""
    return check("hyper_backward", fn, _hyper_backward_body, verbose)


CHECKS["08-multitask"] = [("hyper_backward", check_hyper_backward)]


# ---------------------------------------------------------------- chapter 08: MTL-LoRA and LoRA MoE
# (a block of its own at the end, so other chapters' edits above do not collide)


def _mtl_mixing_body(fn):
    from lowrank_ref.adapters.multitask_lora import mixing_weights, task_up_projections

    rng = _rng(82)
    T, n, out, r, tau = 3, 4, 5, 2, 0.3
    B, w = rng.standard_normal((n, out, r)), rng.standard_normal((T, n))
    G = rng.standard_normal((T, out, r))  # B̄_t, as the per-task backward hands it on
    dB, dw = _unpack(fn(G.copy(), B.copy(), w.copy(), tau), 2, "(dB, dw)")
    # the loss whose gradient this is: L = Σ_t ⟨B̄_t, B_t(w, B)⟩ with B̄_t held fixed
    _gradcheck(lambda: float(np.sum(G * task_up_projections(B, mixing_weights(w, tau)))), {"B": B, "w": w},
               {"B": dB, "w": dw}, "mtl_mixing_grad")
    return "B̄_i = Σ_t π_ti B̄_t and w̄_t = π_t ⊙ (π̄_t − ⟨π_t, π̄_t⟩)/τ agree with central differences"


def check_mtl_mixing_grad(fn, verbose=True) -> CheckResult:
    """``fn(dBt (T, out, r), B (n, out, r), w (T, n), tau) -> (dB (n, out, r), dw (T, n))``: the
    backward of ``B_t = Σ_i softmax(w_t/τ)_i B_i`` (MTL-LoRA's task up-projections)."""
    return check("mtl_mixing_grad", fn, _mtl_mixing_body, verbose)


def _topk_gates_body(fn):
    from lowrank_ref.adapters.lora_moe import router_gates

    rng = _rng(83)
    z, dg = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    for k in (5, 2, 1):
        dz = fn(dg.copy(), z.copy(), k)
        _gradcheck(lambda k=k: float(np.sum(router_gates(z, k) * dg)), {"z": z}, {"z": dz},
                   f"topk_gates_backward (k={k})")
        dropped = router_gates(z, k) == 0
        compare(f"z̄ of the dropped logits (k={k})", np.asarray(dz)[dropped], np.zeros(int(dropped.sum())))
    return "z̄ = g ⊙ (ḡ − ⟨g, ḡ⟩) on each token's kept logits, 0 on the dropped ones, for k = 5 (dense), 2, 1"


def check_topk_gates_backward(fn, verbose=True) -> CheckResult:
    """``fn(dg (N, E), z (N, E), k) -> dz (N, E)``: the backward of the top-k router gates
    (softmax over each row's k largest logits, 0 elsewhere)."""
    return check("topk_gates_backward", fn, _topk_gates_body, verbose)


def _balance_grad_body(fn):
    rng = _rng(84)
    g = rng.uniform(0.05, 1.0, (7, 4))
    g /= g.sum(axis=1, keepdims=True)  # gates: each row sums to 1
    value, dg = _unpack(fn(g.copy()), 2, "(value, dg)")
    imp = g.sum(axis=0)
    compare("cv²", value, np.var(imp) / np.mean(imp) ** 2)

    def cv2():
        i = g.sum(axis=0)
        return float(np.var(i) / np.mean(i) ** 2)

    _gradcheck(cv2, {"g": g}, {"g": dg}, "balance_loss_grad")
    one = np.zeros((4, 4))
    one[:, 1] = 1.0
    compare("cv² when every token picks expert 1", _unpack(fn(one), 2, "(value, dg)")[0], 3.0)
    return "cv²(I) = var(I)/mean(I)² and its gradient agree (and one busy expert of 4 gives cv² = E − 1 = 3)"


def check_balance_loss_grad(fn, verbose=True) -> CheckResult:
    """``fn(g (N, E)) -> (cv², dcv²/dg (N, E))``: the load-balancing term of a mixture of LoRA
    experts, ``I = Σ_n g_n``, ``cv² = var(I)/mean(I)²`` (population variance), and its gradient."""
    return check("balance_loss_grad", fn, _balance_grad_body, verbose)


CHECKS["08-mtl-moe"] = [("mtl_mixing_grad", check_mtl_mixing_grad), ("topk_gates_backward", check_topk_gates_backward),
                        ("balance_loss_grad", check_balance_loss_grad)]
