"""LoKr's own math: PEFT's factorization rule and the low-rank-or-full rule (hand-worked cases and
PEFT's own function), the reshape identity against ``np.kron``, gradcheck of every factor in each
layout (full D, low-rank D, decompose_both), the hand-derived backward against torch autograd,
the two inits, the rank identity rank(ΔW) = rank(C)·rank(BA) (Hypothesis), PEFT's LoKr layer as an
oracle and PEFT folders in both directions and both backends. The generic life-cycle checks are
the contract tests'."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters import LoKrLinear
from lowrank_ref.adapters.lokr import (
    factorization,
    kron_apply,
    kron_apply_backward,
    lokr_backward,
    lokr_forward,
    lokr_layout,
    lokr_shapes,
)
from lowrank_ref.gradcheck import check_gradients, gradcheck

RTOL, ATOL = TOL["float64"]


def make_layer(rng, out=8, inn=6, cfg=None, bias=True):
    """A LoKr layer with every factor random and non-zero (ΔW ≠ 0)."""
    W = rng.standard_normal((out, inn))
    b = rng.standard_normal(out) if bias else None
    layer = LoKrLinear(lr.nn.Linear.from_arrays(W, b), cfg or lr.LoKrConfig(r=1, alpha=3.0), rng=0)
    for p in layer.trainable_parameters().values():
        p.data = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
    return layer


# --- sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, f, want", [
    # REFERENCES.md §2.2 / PEFT's docstring / LyCORIS's docstring, worked by hand
    (256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)),
    (250, -1, (10, 25)), (360, 8, (8, 45)), (1024, 16, (16, 64)),
    # a dividing factor is returned unsorted (PEFT; LyCORIS would give (1, 16), (3, 4), (2, 8))
    (16, 16, (16, 1)), (12, 4, (4, 3)), (16, 8, (8, 2)),
    (6, -1, (2, 3)), (8, -1, (2, 4)), (7, 3, (1, 7)),
])
def test_factorization_cases(dim, f, want):
    assert factorization(dim, f) == want


def test_factorization_is_peft_s_for_every_small_case():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 130):
        for f in (-1, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def test_low_rank_or_full_rule():
    # 64 x 64 -> (8, 8) blocks: D low rank iff r < 4; C (decompose_both) the same
    assert lokr_layout(lr.LoKrConfig(r=3), 64, 64)[4:] == (True, False)
    assert lokr_layout(lr.LoKrConfig(r=4), 64, 64)[4:] == (True, True)
    assert lokr_layout(lr.LoKrConfig(r=3, decompose_both=True), 64, 64)[4:] == (False, False)
    assert lokr_shapes(lr.LoKrConfig(r=3, decompose_both=True), 64, 64) == {
        "w1_a": (8, 3), "w1_b": (3, 8), "w2_a": (8, 3), "w2_b": (3, 8)}
    # out 32 = (4, 8), in 8 = (2, 4): D (8, 4) low rank iff r < 4
    assert lokr_shapes(lr.LoKrConfig(r=2), 8, 32) == {"w1": (4, 2), "w2_a": (8, 2), "w2_b": (2, 4)}


# --- the reshape identity and the backward ----------------------------------------------------------
@pytest.mark.parametrize("rows", [None, 1, 3, 7, 100])
def test_kron_apply_is_x_times_kron_transposed_in_any_row_blocks(rows):
    rng = np.random.default_rng(0)
    C, D, x = rng.standard_normal((3, 2)), rng.standard_normal((4, 5)), rng.standard_normal((7, 10))
    y = kron_apply(x, C, D, rows=rows)
    assert_close(y, x @ np.kron(C, D).T, f"rows={rows}: C X Dᵀ vs x (C ⊗ D)ᵀ", RTOL, ATOL)
    base = rng.standard_normal((7, 12))
    out = base.copy()
    assert kron_apply(x, C, D, out=out, rows=rows) is out
    assert_close(out, base + y, f"rows={rows}: out= adds", RTOL, ATOL)


@pytest.mark.parametrize("rows", [None, 2, 7])
def test_kron_apply_backward_gradcheck_and_blocks_equal_the_plain_form(rows):
    rng = np.random.default_rng(1)
    C, D, x = rng.standard_normal((3, 2)), rng.standard_normal((4, 5)), rng.standard_normal((7, 10))
    w = rng.standard_normal((7, 12))
    dx, dC, dD = kron_apply_backward(w, x, C, D, rows=rows)
    report = check_gradients(lambda: float(np.sum(kron_apply(x, C, D) * w)),
                             {"x": x, "C": C, "D": D}, {"x": dx, "C": dC, "D": dD})
    assert report.ok, str(report)
    plain = kron_apply_backward(w, x, C, D, rows=None)
    for name, mine, one_block in zip(("x̄", "C̄", "D̄"), (dx, dC, dD), plain):
        assert_close(mine, one_block, f"rows={rows}: {name} vs one block", RTOL, ATOL)
    base = rng.standard_normal((7, 10))
    acc = base.copy()
    assert kron_apply_backward(w, x, C, D, dx=acc, rows=rows)[0] is acc
    assert_close(acc, base + dx, "dx= adds", RTOL, ATOL)


CFGS = {
    "low_rank_D": (8, 6, lr.LoKrConfig(r=1, alpha=3.0)),
    "full_both": (8, 6, lr.LoKrConfig(r=2, alpha=3.0)),
    "decompose_both": (64, 48, lr.LoKrConfig(r=2, alpha=5.0, decompose_both=True)),
    "factor": (12, 16, lr.LoKrConfig(r=1, alpha=2.0, decompose_factor=4)),
}


@pytest.mark.parametrize("case", list(CFGS))
def test_layer_gradcheck_every_factor(case):
    out, inn, cfg = CFGS[case]
    rng = np.random.default_rng(2)
    layer = make_layer(rng, out, inn, cfg)
    report = gradcheck(layer, rng.standard_normal((2, 3, inn)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", *lokr_shapes(cfg, inn, out)}


@pytest.mark.parametrize("case", list(CFGS))
def test_backward_matches_torch_autograd_and_dense_forward(case):
    out, inn, cfg = CFGS[case]
    rng = np.random.default_rng(3)
    layer = make_layer(rng, out, inn, cfg)
    x, w = rng.standard_normal((5, inn)), rng.standard_normal((5, out))
    f = {n: p.data for n, p in layer.trainable_parameters().items()}
    params = {"W": layer.base.weight.data, "b": layer.base.bias.data, **f}
    y, cache = lokr_forward(x, params, cfg)
    dx, grads = lokr_backward(w, cache)
    assert grads["W"] is None and grads["b"] is None
    # dense: x (W0 + s C ⊗ D)ᵀ + b, written with np.kron (not the reshape identity)
    C = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
    D = f["w2"] if "w2" in f else f["w2_a"] @ f["w2_b"]
    assert_close(y, x @ (params["W"] + cfg.alpha / cfg.r * np.kron(C, D)).T + params["b"], "y vs dense", RTOL, ATOL)
    tp = {n: torch.tensor(v, requires_grad=True) for n, v in f.items()}
    xt = torch.tensor(x, requires_grad=True)
    Ct = tp["w1"] if "w1" in tp else tp["w1_a"] @ tp["w1_b"]
    Dt = tp["w2"] if "w2" in tp else tp["w2_a"] @ tp["w2_b"]
    yt = xt @ (torch.tensor(params["W"]) + cfg.alpha / cfg.r * torch.kron(Ct, Dt)).T
    (yt * torch.tensor(w)).sum().backward()
    assert_close(dx, xt.grad, "x̄ vs autograd", RTOL, ATOL)
    for n in f:
        assert_close(grads[n], tp[n].grad, f"{n}̄ vs autograd", RTOL, ATOL)


@pytest.mark.parametrize("init, zero", [("peft", {"w1", "w1_a"}), ("lycoris", {"w2", "w2_b"})])
@pytest.mark.parametrize("decompose_both", [False, True])
def test_init_zeroes_the_documented_factor(init, zero, decompose_both):
    cfg = lr.LoKrConfig(r=2, decompose_both=decompose_both, init=init)
    layer = LoKrLinear(lr.nn.Linear.from_arrays(np.ones((64, 48))), cfg, rng=0)
    for n, p in layer.trainable_parameters().items():
        assert (not p.data.any()) == (n in zero), n
    np.testing.assert_array_equal(layer.delta_weight(), 0)
    assert set(layer.trainable_parameters()) & zero  # the zero factor is there


# --- the rank identity -----------------------------------------------------------------------------
def _rank_r(rng, shape, r):
    return rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, shape[1]))


@settings(max_examples=15, deadline=None)
@given(p=st.integers(1, 4), m=st.integers(1, 4), q=st.integers(1, 5), n=st.integers(1, 5),
       ra=st.integers(0, 4), rb=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_rank_of_kronecker_is_product_of_ranks(p, m, q, n, ra, rb, seed):
    rng = np.random.default_rng(seed)
    A, B = _rank_r(rng, (p, m), min(ra, p, m)), _rank_r(rng, (q, n), min(rb, q, n))
    rank = np.linalg.matrix_rank
    assert rank(np.kron(A, B)) == rank(A) * rank(B)
    assert rank(A) == min(ra, p, m) and rank(B) == min(rb, q, n)  # generic: the drawn ranks


@settings(max_examples=10, deadline=None)
@given(out=st.sampled_from([8, 12, 16, 24]), inn=st.sampled_from([6, 8, 16, 18]), r=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_rank_of_lokr_update_is_rank_c_times_rank_ba(out, inn, r, seed):
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, out, inn, lr.LoKrConfig(r=r, alpha=1.0))
    C, D = layer.blocks()
    rank = np.linalg.matrix_rank
    assert rank(layer.delta_weight()) == rank(C) * rank(D)
    if not layer.layout.full_d:
        assert rank(D) == r  # B A of rank r, generically


# --- bad input ----------------------------------------------------------------------------------
def test_bad_configs_name_the_argument():
    for kw, kind in [({"decompose_factor": 0}, ValueError), ({"decompose_factor": -2}, ValueError),
                     ({"decompose_factor": 2.0}, TypeError), ({"r": 0}, ValueError),
                     ({"decompose_both": 1}, TypeError), ({"init": "zeros"}, ValueError)]:
        with pytest.raises(kind, match=next(iter(kw))):
            lr.LoKrConfig(**kw)


# --- PEFT (peft.tuners.lokr) as an oracle -----------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is not installed (an oracle only, not a dependency)")


class One(torch.nn.Module):
    def __init__(self, out, inn):
        super().__init__()
        self.k = torch.nn.Linear(inn, out).double()

    def forward(self, x):
        return self.k(x)


@pytest.mark.parametrize("case", list(CFGS))
def test_peft_lokr_layer_is_ours(case):
    out, inn, cfg = CFGS[case]
    pm = peft.get_peft_model(One(out, inn), peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, target_modules=["k"],
                                                            decompose_both=cfg.decompose_both,
                                                            decompose_factor=cfg.decompose_factor))
    pl = pm.base_model.model.k
    theirs = {n.replace("lokr_", ""): p for n, p in pl.named_parameters() if "lokr_" in n and p.numel()}
    theirs = {n.split(".")[0]: p for n, p in theirs.items()}
    assert {n: tuple(p.shape) for n, p in theirs.items()} == lokr_shapes(cfg, inn, out)
    # PEFT's default init zeroes w1 / w1_a, as ours
    for n, p in theirs.items():
        assert (not p.detach().any()) == (n in ("w1", "w1_a")), n
    rng = np.random.default_rng(4)
    layer = LoKrLinear(lr.nn.Linear.from_arrays(pl.base_layer.weight.detach().numpy(),
                                                pl.base_layer.bias.detach().numpy()), cfg)
    with torch.no_grad():
        for n, p in layer.trainable_parameters().items():
            p.data = rng.standard_normal(p.shape)
            theirs[n].copy_(torch.from_numpy(p.data))
    x, w = rng.standard_normal((3, inn)), rng.standard_normal((3, out))
    xt = torch.tensor(x, requires_grad=True)
    yt = pm(xt)
    (yt * torch.tensor(w)).sum().backward()
    y = layer.forward(x)
    dx = layer.backward(w)
    assert_close(y, yt, "y vs peft", RTOL, ATOL)
    assert_close(dx, xt.grad, "x̄ vs peft", RTOL, ATOL)
    for n, p in layer.trainable_parameters().items():
        assert_close(p.grad, theirs[n].grad, f"{n}̄ vs peft", RTOL, ATOL)
    assert_close(layer.delta_weight(), pl.get_delta_weight("default"), "ΔW vs peft", RTOL, ATOL)


from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402
from lowrank_ref.inject import inject  # noqa: E402
from lowrank_ref.io import load_peft, peft_state_dict, save_peft  # noqa: E402
from lowrank_ref.nn.gpt import GPT, GPTConfig  # noqa: E402

GPT_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, d_model=8)
IDX = np.random.default_rng(5).integers(0, 13, (2, 7))
W_UP = np.random.default_rng(6).standard_normal((2, 7, 13))


def _model(backend):
    m = GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64)
    return m if backend == "numpy" else from_numpy(m)


def _fwd(model):
    return model(torch.tensor(IDX)) if isinstance(model, torch.nn.Module) else model.forward(IDX)


# q, v: 8x8 -> C (2, 2), D (4, 4); fc: 32x8 -> C (4, 2), D (8, 4); r=1 low-rank D, r=3 full D
PEFT_FOLDERS = {
    "default": dict(r=1, alpha=3, target_modules=["q", "v", "fc"]),
    "patterns": dict(r=1, alpha=2, target_modules=["q", "fc"], rank_pattern={"fc": 3}, alpha_pattern={"q": 5}),
    "decompose_both": dict(r=1, alpha=2, target_modules=["fc"], decompose_both=True, decompose_factor=8),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(PEFT_FOLDERS))
def test_peft_folder_loads_with_the_same_outputs_and_gradients(tmp_path, case, backend):
    pm = peft.get_peft_model(_model("torch"), peft.LoKrConfig(**PEFT_FOLDERS[case]))
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lokr_" in n:
                p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(p.shape)) * rng.choice([-1, 1], tuple(p.shape))))
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = _model(backend)
    info = load_peft(ours, tmp_path / "peft")
    assert info["method"] == "lokr"
    theirs, mine = pm(torch.tensor(IDX)), _fwd(ours)
    assert_close(mine, theirs, f"{case} {backend}: logits vs peft", RTOL, ATOL)
    state, peft_state = peft_state_dict(ours), peft.get_peft_model_state_dict(pm)
    assert set(state) == set(peft_state)
    if backend == "numpy":
        ours.backward(W_UP)
    else:
        (mine * torch.from_numpy(W_UP)).sum().backward()
    (theirs * torch.from_numpy(W_UP)).sum().backward()
    grads = peft_state_dict(ours, grads=True)
    peft_grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if "lokr_" in n}
    assert set(grads) == set(peft_grads)
    for k in grads:
        assert_close(grads[k], peft_grads[k], f"{case} {backend}: d{k} vs peft", RTOL, ATOL)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_save_peft_loads_in_peft_with_the_same_outputs(tmp_path, backend):
    model = _model(backend)
    inject(model, lr.LoKrConfig(r=1, alpha=3.0, decompose_both=True, decompose_factor=8, init="lycoris"),
           targets=("q", "fc"), ranks={"fc": 2}, rng=0)
    rng = np.random.default_rng(3)
    if backend == "numpy":
        for p in model.trainable_parameters().values():
            p.data = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
    else:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(p.shape)) * rng.choice([-1, 1], tuple(p.shape))))
    mine = _fwd(model)
    folder = save_peft(model, tmp_path / "ours")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(_model("torch"), str(folder)).eval()
    theirs = loaded(torch.tensor(IDX))
    assert_close(theirs, mine, f"{backend}: PeftModel.from_pretrained(save_peft) vs ours", RTOL, ATOL)
    assert float((theirs - _model("torch")(torch.tensor(IDX))).abs().max().detach()) > 1e-3
    other = _model("torch" if backend == "numpy" else "numpy")
    load_peft(other, folder)
    assert_close(_fwd(other), mine, f"save_peft({backend}) -> load_peft(other backend)", RTOL, ATOL)


def test_peft_folder_with_dropouts_loads_them(tmp_path):
    pm = peft.get_peft_model(_model("torch"), peft.LoKrConfig(r=1, target_modules=["q"], rank_dropout=0.25,
                                                             module_dropout=0.125, rank_dropout_scale=True))
    pm.save_pretrained(str(tmp_path / "peft"))
    model = _model("numpy")
    load_peft(model, tmp_path / "peft")
    cfg = model.blocks[0].attn.q.config
    assert (cfg.rank_dropout, cfg.module_dropout, cfg.rank_dropout_scale) == (0.25, 0.125, True)
    save_peft(model, tmp_path / "ours")
    back = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert (back.rank_dropout, back.module_dropout, back.rank_dropout_scale) == (0.25, 0.125, True)


# --- rank_dropout and module_dropout (REFERENCES §2.5) ---------------------------------------------
def _params(layer):
    b = None if layer.base.bias is None else layer.base.bias.data
    return {"W": layer.base.weight.data, "b": b, **layer._factors()}


@pytest.mark.parametrize("scale", [False, True])
def test_peft_rank_dropout_masks_rows_of_delta_w_ours_with_the_same_mask(scale):
    """PEFT's LoKr in training mode: ``torch.rand(1)`` (module dropout, drawn even at p = 0), then
    ``keep = torch.rand(out) > p`` over the rows of ΔW, divided by its mean only with
    rank_dropout_scale. Replaying PEFT's draws from the same seed gives the mask; our pure forward
    and backward with that mask are PEFT's."""
    out, inn, cfg = 8, 6, lr.LoKrConfig(r=1, alpha=3.0, rank_dropout=0.5, rank_dropout_scale=scale)
    pm = peft.get_peft_model(One(out, inn), peft.LoKrConfig(r=1, alpha=3.0, target_modules=["k"], rank_dropout=0.5,
                                                            rank_dropout_scale=scale))
    pl = pm.base_model.model.k
    layer = make_layer(np.random.default_rng(11), out, inn, cfg)
    layer.base.weight.data = pl.base_layer.weight.detach().numpy().copy()
    layer.base.bias.data = pl.base_layer.bias.detach().numpy().copy()
    theirs = {n.replace("lokr_", "").split(".")[0]: p for n, p in pl.named_parameters() if "lokr_" in n and p.numel()}
    with torch.no_grad():
        for n, p in layer.trainable_parameters().items():
            theirs[n].copy_(torch.from_numpy(p.data))
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((3, inn)), rng.standard_normal((3, out))
    # PEFT's mask is float32 (``.float()``), so its 1/mean carries float32 rounding (8/5 here)
    rtol, atol = (1e-6, 1e-9) if scale else (RTOL, ATOL)
    pm.train()
    for seed in range(6):
        torch.manual_seed(seed)
        torch.rand(1)
        keep = (torch.rand(out) > 0.5).double().numpy()
        if not 0 < keep.sum() < out:
            continue
        torch.manual_seed(seed)
        xt = torch.tensor(x, requires_grad=True)
        yt = pm(xt)
        (yt * torch.tensor(w)).sum().backward()
        y, cache = lokr_forward(x, _params(layer), cfg, row_mask=keep)
        dx, grads = lokr_backward(w, cache)
        assert_close(y, yt, f"seed {seed}: y vs peft", rtol, atol)
        assert_close(dx, xt.grad, f"seed {seed}: x̄ vs peft", rtol, atol)
        for n in layer.trainable_parameters():
            assert_close(grads[n], theirs[n].grad, f"seed {seed}: {n}̄ vs peft", rtol, atol)
            theirs[n].grad = None
        # what it does: rows of ΔW, i.e. output columns: dropped ones are the base's
        base = x @ layer.base.weight.data.T + layer.base.bias.data
        assert_close(y[:, keep == 0], base[:, keep == 0], "dropped rows are the base's")
        m = keep / keep.mean() if scale else keep
        assert_close(y, base + m * (x @ layer.delta_weight().T), "W0 + diag(m) ΔW")


def test_rank_dropout_backward_gradcheck_and_only_while_training():
    layer = make_layer(np.random.default_rng(13), 8, 6, lr.LoKrConfig(r=1, alpha=3.0, rank_dropout=0.5))
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1.0])
    cfg = layer.config.replace(rank_dropout_scale=True)
    x = np.random.default_rng(14).standard_normal((2, 3, 6))
    params = {n: (v.copy() if v is not None else None) for n, v in _params(layer).items()}
    w = np.random.default_rng(21).standard_normal((2, 3, 8))
    y, cache = lokr_forward(x, params, cfg, row_mask=keep)
    dx, grads = lokr_backward(w, cache)
    factors = [n for n in params if n in layer.trainable_parameters()]
    report = check_gradients(lambda: float(np.sum(lokr_forward(x, params, cfg, row_mask=keep)[0] * w)),
                             {"x": x, **{n: params[n] for n in factors}}, {"x": dx, **{n: grads[n] for n in factors}})
    assert report.ok, str(report)
    layer.eval()
    assert_close(layer.forward(x), x @ (layer.base.weight.data + layer.delta_weight()).T + layer.base.bias.data,
                 "eval: no dropout")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_row_dropped_is_the_base_not_nan(backend):
    cfg = lr.LoKrConfig(r=1, alpha=3.0, rank_dropout=0.99, rank_dropout_scale=True)
    layer = make_layer(np.random.default_rng(15), 4, 6, cfg)
    x = np.random.default_rng(16).standard_normal((2, 6))
    base = x @ layer.base.weight.data.T + layer.base.bias.data
    if backend == "torch":
        tl = lr.adapt(layer.base, cfg, backend="torch", rng=0)
        xt = torch.tensor(x, requires_grad=True)
        ys = [tl(xt) for _ in range(5)]
        sum(y.sum() for y in ys).backward()
        assert torch.isfinite(xt.grad).all()
        assert any(np.allclose(y.detach().numpy(), base) for y in ys)
        return
    ys = []
    for _ in range(5):
        ys.append(layer.forward(x))
        layer.backward(np.ones((2, 4)))
    assert any(np.array_equal(y, base) for y in ys)  # almost surely all dropped with 4 rows and p = 0.99
    assert all(np.isfinite(p.grad).all() for p in layer.trainable_parameters().values())
    with pytest.raises(ValueError, match="row_mask drops every row"):
        lokr_forward(x, _params(layer), cfg, row_mask=np.zeros(4))
    y, _ = lokr_forward(x, _params(layer), cfg.replace(rank_dropout_scale=False), row_mask=np.zeros(4))
    assert_close(y, base, "unscaled all-zero mask: the base (PEFT's LoKr default does not divide)")
    with pytest.raises(ValueError, match=r"row_mask must have shape \(4,\)"):
        lokr_forward(x, _params(layer), cfg, row_mask=np.ones(6))


def _torch_twin(layer):
    """The torch LoKr layer on the same base with the same (non-zero) factors."""
    tl = lr.adapt(layer.base, layer.config, backend="torch", rng=0)
    with torch.no_grad():
        for n, p in layer.trainable_parameters().items():
            getattr(tl, n).copy_(torch.from_numpy(p.data))
    return tl


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_module_dropout_skips_the_whole_branch_sometimes_and_never_in_eval(backend):
    cfg = lr.LoKrConfig(r=1, alpha=3.0, module_dropout=0.5)
    layer = make_layer(np.random.default_rng(17), 4, 6, cfg)
    x = np.random.default_rng(18).standard_normal((2, 6))
    W, b = layer.base.weight.data, layer.base.bias.data
    base, full = x @ W.T + b, x @ (W + layer.delta_weight()).T + b
    if backend == "torch":
        layer = _torch_twin(layer)

        def fwd():
            return layer(torch.tensor(x)).detach().numpy()
    else:
        def fwd():
            y = layer.forward(x)
            layer.backward(np.ones((2, 4)))
            return y
    outs = {"base" if np.allclose(y, base, 1e-12, 1e-12) else "full" if np.allclose(y, full) else "other"
            for y in (fwd() for _ in range(30))}
    assert outs == {"base", "full"}
    layer.eval()
    assert all(np.allclose(fwd() if backend == "numpy" else layer(torch.tensor(x)).detach().numpy(), full)
               for _ in range(5))


def test_torch_rank_dropout_rows_match_its_generator_draw():
    cfg = lr.LoKrConfig(r=1, alpha=3.0, rank_dropout=0.5)
    layer = make_layer(np.random.default_rng(19), 8, 6, cfg)
    tl = _torch_twin(layer)
    x = np.random.default_rng(20).standard_normal((3, 6))
    W, b = layer.base.weight.data, layer.base.bias.data
    D = tl.delta_weight().detach().numpy()
    for _ in range(4):
        state = tl.generator.get_state()
        y = tl(torch.tensor(x)).detach().numpy()
        tl.generator.set_state(state)
        keep = (torch.rand(8, generator=tl.generator) > 0.5).double().numpy()
        if keep.any():
            assert_close(y, x @ W.T + b + keep * (x @ D.T), "torch: W0 + diag(keep) ΔW (no rescale)")
