"""PEFT's DoRA (``LoraConfig(use_dora=True)``) as an independent oracle for DoRALinear, float64:
the same init (m = ‖W0‖ row-wise), and with the same A, B, m the same forward and the same
gradients of A, B, m and x. PEFT detaches the weight norm (``peft/tuners/lora/dora.py``), so it is
compared with ``detach_norm=True``; ``detach_norm=False`` is shown to differ from it in Ā, B̄.
In training with dropout PEFT recomputes the base output on the dropped input: that is
``dropout_correction="dropped"``, compared with the same mask; the default ``"shared"`` differs
from it there (and only there).

peft is not a dependency: without it this file is skipped, with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close, fixed_mask

import lowrank_ref as lr
from lowrank_ref.adapters.dora import dora_backward, dora_forward

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="peft is not installed (an oracle only, not a dependency)")

R, ALPHA = 4, 6.0
RTOL, ATOL = TOL["float64"]


class One(torch.nn.Module):
    def __init__(self, inn=7, out=5):
        super().__init__()
        self.q = torch.nn.Linear(inn, out)

    def forward(self, x):
        return self.q(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_dora_matches_our_layers(rslora):
    rng = np.random.default_rng(0)
    model = One().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
    W, b = model.q.weight.detach().numpy().copy(), model.q.bias.detach().numpy().copy()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True, use_rslora=rslora,
                                                    lora_dropout=0.0, target_modules=["q"]))
    pl = pm.base_model.model.q
    cfg = lr.DoRAConfig(r=R, alpha=ALPHA, rslora=rslora, detach_norm=True)
    assert pl.scaling["default"] == pytest.approx(cfg.scaling)
    m_peft = pl.lora_magnitude_vector["default"].weight
    assert_close(m_peft, np.linalg.norm(W, axis=1), "PEFT's initial m = ‖W0_j‖", RTOL, ATOL)

    A, B = rng.standard_normal((R, 7)), 0.5 * rng.standard_normal((5, R))  # non-zero ΔW
    m = np.linalg.norm(W, axis=1) * rng.uniform(0.5, 1.5, 5)  # m ≠ n
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(torch.from_numpy(A))
        pl.lora_B["default"].weight.copy_(torch.from_numpy(B))
        m_peft.copy_(torch.from_numpy(m))
    x = rng.standard_normal((2, 3, 7))
    dy = rng.standard_normal((2, 3, 5))
    xt = torch.from_numpy(x).requires_grad_(True)
    y_peft = pm(xt)
    (y_peft * torch.from_numpy(dy)).sum().backward()

    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=0)
    layer.A.data, layer.B.data, layer.m.data = A.copy(), B.copy(), m.copy()
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0)
    with torch.no_grad():
        for k, v in (("A", A), ("B", B), ("m", m)):
            getattr(tl, k).copy_(torch.from_numpy(v))
    y_np = layer.forward(x)
    dx_np = layer.backward(dy)
    xt2 = torch.from_numpy(x).requires_grad_(True)
    y_t = tl(xt2)
    (y_t * torch.from_numpy(dy)).sum().backward()

    peft_grads = {"A": pl.lora_A["default"].weight.grad, "B": pl.lora_B["default"].weight.grad, "m": m_peft.grad}
    assert_close(y_np, y_peft, "y: numpy vs peft", RTOL, ATOL)
    assert_close(y_t, y_peft, "y: torch vs peft", RTOL, ATOL)
    assert_close(dx_np, xt.grad, "x̄: numpy vs peft", RTOL, ATOL)
    assert_close(xt2.grad, xt.grad, "x̄: torch vs peft", RTOL, ATOL)
    for k, g in peft_grads.items():
        assert_close(getattr(layer, k).grad, g, f"{k}̄: numpy vs peft", 1e-9, 1e-11)
        assert_close(getattr(tl, k).grad, g, f"{k}̄: torch vs peft", 1e-9, 1e-11)
    assert pl.base_layer.weight.grad is None

    # the exact gradient is a different gradient: PEFT does not compute it
    exact = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=R, alpha=ALPHA, rslora=rslora,
                                                                                detach_norm=False), rng=0)
    exact.A.data, exact.B.data, exact.m.data = A.copy(), B.copy(), m.copy()
    exact.forward(x)
    exact.backward(dy)
    assert not np.allclose(exact.A.grad, peft_grads["A"].numpy())



def test_peft_dora_with_dropout_is_the_dropped_form():
    rng = np.random.default_rng(1)
    model = One().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
    W, b = model.q.weight.detach().numpy().copy(), model.q.bias.detach().numpy().copy()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True, lora_dropout=0.3,
                                                    target_modules=["q"]))
    pl = pm.base_model.model.q
    A, B = rng.standard_normal((R, 7)), 0.5 * rng.standard_normal((5, R))
    m = np.linalg.norm(W, axis=1) * rng.uniform(0.5, 1.5, 5)
    x = rng.standard_normal((2, 3, 7))
    dy = rng.standard_normal((2, 3, 5))
    mask = (rng.random(x.shape) >= 0.3) / 0.7
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(torch.from_numpy(A))
        pl.lora_B["default"].weight.copy_(torch.from_numpy(B))
        pl.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    pl.lora_dropout["default"] = fixed_mask(torch.from_numpy(mask))
    pm.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    y_peft = pm(xt)
    (y_peft * torch.from_numpy(dy)).sum().backward()
    peft_grads = {"A": pl.lora_A["default"].weight.grad, "B": pl.lora_B["default"].weight.grad,
                  "m": pl.lora_magnitude_vector["default"].weight.grad}

    outs = {}
    for c in ("dropped", "shared"):
        cfg = lr.DoRAConfig(r=R, alpha=ALPHA, dropout=0.3, dropout_correction=c)
        layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=0)
        layer.A.data, layer.B.data, layer.m.data = A.copy(), B.copy(), m.copy()
        y, cache = dora_forward(x, layer._params_dict(), cfg, mask=mask)
        dx, grads = dora_backward(dy, cache)
        tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0)
        with torch.no_grad():
            for k, v in (("A", A), ("B", B), ("m", m)):
                getattr(tl, k).copy_(torch.from_numpy(v))
        tl.train()
        tl.dropout = fixed_mask(torch.from_numpy(mask.reshape(-1, 7)))
        xt2 = torch.from_numpy(x).requires_grad_(True)
        y_t = tl(xt2)
        (y_t * torch.from_numpy(dy)).sum().backward()
        outs[c] = (y, dx, grads, y_t, xt2.grad, {k: getattr(tl, k).grad for k in ("A", "B", "m")})
    y, dx, grads, y_t, dx_t, tgrads = outs["dropped"]
    assert_close(y, y_peft, "y: numpy 'dropped' vs peft (train, dropout)", RTOL, ATOL)
    assert_close(y_t, y_peft, "y: torch 'dropped' vs peft (train, dropout)", RTOL, ATOL)
    assert_close(dx, xt.grad, "x̄: numpy 'dropped' vs peft", RTOL, ATOL)
    assert_close(dx_t, xt.grad, "x̄: torch 'dropped' vs peft", RTOL, ATOL)
    for k, g in peft_grads.items():
        assert_close(grads[k], g, f"{k}̄: numpy 'dropped' vs peft", 1e-9, 1e-11)
        assert_close(tgrads[k], g, f"{k}̄: torch 'dropped' vs peft", 1e-9, 1e-11)
    # the default form is another (cheaper) function of the mask: it differs from PEFT's in training
    assert not np.allclose(outs["shared"][0], y_peft.detach().numpy())
    assert not np.allclose(outs["shared"][3].detach().numpy(), y_peft.detach().numpy())
    # in eval both are PEFT's output
    pm.eval()
    y_eval = pm(torch.from_numpy(x)).detach().numpy()
    for c in ("dropped", "shared"):
        layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b),
                                       lr.DoRAConfig(r=R, alpha=ALPHA, dropout=0.3, dropout_correction=c), rng=0)
        layer.A.data, layer.B.data, layer.m.data = A.copy(), B.copy(), m.copy()
        assert_close(layer.eval().forward(x), y_eval, f"eval y ({c}) vs peft", RTOL, ATOL)
