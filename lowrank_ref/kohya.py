r"""kohya-ss LoRA files: ``save_kohya`` / ``load_kohya`` for a NumPy or torch model with named layers.

The kohya-ss layout (``sd-scripts``' ``networks/lora.py``, also read by LyCORIS and most
Stable-Diffusion tools) stores, per adapted layer, under a *flat* module name

    ``<prefix>_<dotted path with "." replaced by "_">``   (``lora_transformer_h_0_attn_c_attn``)

three tensors:

=====================  ===============  =============================================
key suffix             shape            here
=====================  ===============  =============================================
``.lora_down.weight``  ``(r, in)``      A
``.lora_up.weight``    ``(out, r)``     B
``.alpha``             ``()`` scalar    α, with the scaling ``α / r`` (r = rows of lora_down)
=====================  ===============  =============================================

so ``ΔW = (α / r) · up @ down``, LoRA's own scaling. An rsLoRA layer (scaling ``α / √r``) is
written with ``alpha = α·√r``, which gives the same scaling under kohya's rule; it loads back as a
plain LoRA layer with that alpha (the same ΔW).

**LyCORIS LoHa and LoKr** (``lycoris/modules/loha.py``, ``lokr.py``) use the same flat names and a
per-module ``alpha`` tensor, with the factor names PEFT also uses:

==========  ==========================================================  ============================
method      keys                                                        scale the readers apply
==========  ==========================================================  ============================
LoHa        ``hada_w1_a (out, r)`` = B₁, ``hada_w1_b (r, in)`` = A₁,    ``α / r``, r = rows of
            ``hada_w2_a`` = B₂, ``hada_w2_b`` = A₂                       ``hada_w1_b``
LoKr        ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b`` (C),              ``α / r``, r = the inner size
            ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` (B A)            of a low-rank factor; **1**
                                                                        when both factors are full
==========  ==========================================================  ============================

The LoKr exception is LyCORIS's own rule: with both factors full it forces ``alpha = lora_dim``,
so the scale is 1, and the readers (LyCORIS, ComfyUI) take no rank from a full factor. PEFT, and
this package, keep ``s = α / r`` there too (REFERENCES §2.3), so such a layer is written with ``s``
folded into ``lokr_w1`` and ``alpha = r``, and loads back with ``s = 1`` — the same ΔW. A LoKr
file loads only if PEFT's ``factorization`` rule (one ``decompose_factor`` for the whole file:
``-1``, or the size of ``C`` when it is square) rebuilds its factor shapes; a file made with
LyCORIS's sorted or unbalanced factorisation that PEFT cannot express is refused, naming the layer
and the shapes. Tucker/convolution factors (``hada_t1``, ``lokr_t2``) are refused: linear layers only.

Loading maps each flat name back to the model's linear layer whose dotted name flattens to it (two
layers flattening to one name are an error), then goes through :func:`lowrank_ref.io.load_peft`,
so the untrusted-file checks, the injection and the rollback on error are those of PEFT folders.
"""

from __future__ import annotations

import math
import os
import re
import tempfile

import numpy as np

__all__ = ["save_kohya", "load_kohya", "kohya_name", "DEFAULT_PREFIX"]

DEFAULT_PREFIX = "lora"
#: the file's key suffix -> the PEFT key suffix, per method
_KEYS = {
    "lora": {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"},
    "loha": {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "lokr": {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
}
_UNSUPPORTED = ("hada_t1", "hada_t2", "lokr_t2")  # Tucker cores of convolution layers


def _check_prefix(prefix) -> str:
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*", prefix):
        raise ValueError(f"prefix must be letters and digits joined by '_' (e.g. 'lora_unet'), got {prefix!r}")
    return prefix


def kohya_name(path: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``"transformer.h.0.attn.c_attn"`` -> ``"lora_transformer_h_0_attn_c_attn"``."""
    return f"{_check_prefix(prefix)}_{path.replace('.', '_')}"


def _adapter_layers(model) -> dict:
    """``{path: (method, layer)}``; LoRA, LoHa and LoKr layers only (others: an error naming them)."""
    from lowrank_ref.inject import adapter_layers
    from lowrank_ref.registry import spec_of_layer

    layers = {p: layer for p, layer in adapter_layers(model).items() if p}
    if not layers:
        raise ValueError("model holds no adapter layers: inject LoRA, LoHa or LoKr first")
    named = {p: (spec_of_layer(layer).name, layer) for p, layer in layers.items()}
    other = sorted(f"{p} ({m})" for p, (m, _) in named.items() if m not in _KEYS)
    if other:
        raise ValueError(f"kohya/LyCORIS files hold LoRA, LoHa and LoKr layers; these are not: {', '.join(other[:5])}")
    return named


def _to_host(a) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    from lowrank_ref.nn.module import to_host

    return to_host(a)


def save_kohya(model, path, prefix: str = DEFAULT_PREFIX) -> str:
    """Write ``model``'s LoRA, LoHa and LoKr layers as a kohya-ss / LyCORIS safetensors file
    (written to a temporary name and moved into place); returns ``path``."""
    from safetensors.numpy import save_file

    from lowrank_ref import io

    layers = _adapter_layers(model)
    _check_prefix(prefix)
    merged = sorted(p for p, (_, layer) in layers.items() if getattr(layer, "merged", False))
    if merged:
        raise ValueError(f"layers {merged} are merged: unmerge() before saving their adapters")
    peft = {k: _to_host(v) for k, v in io.peft_state_dict(model).items()}
    tensors, names, modules = {}, {}, set()
    for p, (method, layer) in layers.items():
        name = kohya_name(p, prefix)
        if name in names:
            raise ValueError(f"layers {names[name]!r} and {p!r} both flatten to {name!r}")
        names[name] = p
        cfg = layer.config
        own = {}
        for file_suffix, peft_suffix in _KEYS[method].items():
            key = f"{io.KEY_PREFIX}{p}.{peft_suffix}"
            if key in peft:
                own[file_suffix] = np.ascontiguousarray(peft[key])
        if method == "lora":
            alpha = cfg.alpha * math.sqrt(cfg.r) if cfg.rslora else cfg.alpha  # kohya's α/r = our scaling
            modules.add("networks.lora")
        elif method == "loha":
            alpha = cfg.alpha  # α / r with r = rows of hada_w1_b
            modules.add("lycoris.kohya")
        else:
            modules.add("lycoris.kohya")
            alpha = cfg.alpha
            if "lokr_w1" in own and "lokr_w2" in own:  # both full: the readers' scale is 1, fold s in
                own["lokr_w1"] = (own["lokr_w1"] * (cfg.alpha / cfg.r)).astype(own["lokr_w1"].dtype)
                alpha = float(cfg.r)
        for k, v in own.items():
            tensors[f"{name}.{k}"] = v
        tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kohya-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "ss_network_module": ",".join(sorted(modules))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _kind(path, name: str, parts: dict) -> str:
    for bad in _UNSUPPORTED:
        if bad in parts:
            raise ValueError(f"{path}: {name}.{bad} is a Tucker core of a convolution layer; "
                             "only linear layers load here")
    kinds = {m for m, keys in _KEYS.items() for k in parts if k in keys}
    unknown = sorted(k for k in parts if k != "alpha" and not any(k in keys for keys in _KEYS.values()))
    if unknown:
        raise ValueError(f"{path}: key {name}.{unknown[0]} is not a kohya LoRA or LyCORIS LoHa/LoKr key "
                         f"(expected {name}.lora_down.weight, .lora_up.weight, .hada_w1_a..., .lokr_w1..., .alpha)")
    if len(kinds) != 1:
        raise ValueError(f"{path}: {name} mixes the keys of {sorted(kinds)}" if kinds else
                         f"{path}: {name} has an alpha and no weights")
    return kinds.pop()


def _mat(path, name, parts, key):
    a = parts[key]
    if a.ndim != 2:
        raise ValueError(f"{path}: {name}.{key} must be a matrix, got shape {a.shape}")
    return a


def _alpha(path, name, parts, default):
    a = parts.get("alpha")
    if a is None:
        return float(default)
    a = np.asarray(a)
    if a.size != 1 or not np.isfinite(a.reshape(-1)[0]):
        raise ValueError(f"{path}: {name}.alpha must be one finite number")
    return float(a.reshape(-1)[0])


def _lora_entry(path, name, parts, out_in):
    missing = sorted({"lora_down.weight", "lora_up.weight"} - set(parts))
    if missing:
        raise ValueError(f"{path}: {name} lacks {', '.join(m.split('.')[0] for m in missing)}")
    down, up = _mat(path, name, parts, "lora_down.weight"), _mat(path, name, parts, "lora_up.weight")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{path}: {name}: lora_down {down.shape} and lora_up {up.shape} do not make (out, r) @ (r, in)")
    r = int(down.shape[0])
    return r, _alpha(path, name, parts, r), None


def _loha_entry(path, name, parts, out_in):
    missing = sorted(set(_KEYS["loha"]) - set(parts))
    if missing:
        raise ValueError(f"{path}: {name} lacks {', '.join(missing)}")
    w1a, w1b, w2a, w2b = (_mat(path, name, parts, k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    r = int(w1b.shape[0])
    if not (w1a.shape[1] == w2a.shape[1] == w2b.shape[0] == r):
        raise ValueError(f"{path}: {name}: the LoHa factors need one rank r (hada_w1_a {w1a.shape}, hada_w1_b "
                         f"{w1b.shape}, hada_w2_a {w2a.shape}, hada_w2_b {w2b.shape})")
    return r, _alpha(path, name, parts, r), None


def _lokr_entry(path, name, parts, out_in):
    from lowrank_ref.adapters.lokr import factorization

    def block(i):
        full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
        if full in parts:
            if a in parts or b in parts:
                raise ValueError(f"{path}: {name} has both {full} and {a}/{b}")
            return _mat(path, name, parts, full).shape, None
        if a not in parts or b not in parts:
            raise ValueError(f"{path}: {name} lacks {full} (or {a} and {b})")
        ma, mb = _mat(path, name, parts, a), _mat(path, name, parts, b)
        if ma.shape[1] != mb.shape[0]:
            raise ValueError(f"{path}: {name}: {a} {ma.shape} and {b} {mb.shape} do not multiply")
        return (ma.shape[0], mb.shape[1]), int(ma.shape[1])

    (out_l, in_m), r1 = block(1)
    (out_k, in_n), r2 = block(2)
    out, inn = out_in
    if (out_l * out_k, in_m * in_n) != (out, inn):
        raise ValueError(f"{path}: {name}: C {out_l}x{in_m} ⊗ D {out_k}x{in_n} is not the layer's ({out}, {inn})")
    ranks = {r for r in (r1, r2) if r is not None}
    if len(ranks) > 1:
        raise ValueError(f"{path}: {name}: the two low-rank factors have ranks {sorted(ranks)}; PEFT's LoKr has one r")
    factor = None
    for f in (-1, out_l if out_l == in_m else None):
        if f is not None and factorization(out, f) == (out_l, out_k) and factorization(inn, f) == (in_m, in_n):
            factor = f
            break
    if factor is None:
        raise ValueError(f"{path}: {name}: factor shapes C ({out_l}, {in_m}), D ({out_k}, {in_n}) are not what PEFT's "
                         f"factorization rule gives for ({out}, {inn}) with one decompose_factor (LyCORIS's "
                         "sorted or unbalanced factorisation)")
    if ranks:
        r = ranks.pop()
        alpha = _alpha(path, name, parts, r)  # LyCORIS: no alpha means alpha = lora_dim
    else:  # both full: scale 1, and an r for which PEFT's rule keeps both full
        r = max(out_k, in_n, out_l, in_m)
        alpha = float(r)
    return r, alpha, {"decompose_factor": factor, "decompose_both": r1 is not None}


_ENTRY = {"lora": _lora_entry, "loha": _loha_entry, "lokr": _lokr_entry}


def load_kohya(model, path, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Inject the adapters a kohya-ss LoRA or LyCORIS LoHa/LoKr file names (one method per file)
    and load its tensors; returns the layer paths. The model is left as it was if anything in the
    file is wrong."""
    import json

    from safetensors.numpy import save_file

    from lowrank_ref import io

    _check_prefix(prefix)
    tensors, _ = io.read_safetensors(path)
    groups: dict = {}
    for key, arr in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = arr
    if not groups:
        raise ValueError(f"{path}: the file holds no tensors")
    kinds = {name: _kind(path, name, parts) for name, parts in groups.items()}
    methods = sorted(set(kinds.values()))
    if len(methods) > 1:
        raise ValueError(f"{path}: the file mixes {', '.join(methods)} layers; one method per file loads here")
    method = methods[0]
    flat: dict = {}
    backend, linear = io._linear_modules(model, io._backend(model, "model"))
    for p in linear:
        flat.setdefault(kohya_name(p, prefix), []).append(p)
    plan, ranks, alphas, options = {}, {}, {}, {}
    for name, parts in sorted(groups.items()):
        paths = flat.get(name, [])
        if len(paths) != 1:
            why = "no layer of the model" if not paths else f"several layers ({', '.join(paths)})"
            raise ValueError(f"{path}: {name} names {why} (prefix {prefix!r}; layers: "
                             f"{', '.join(sorted(kohya_name(p, prefix) for ps in flat.values() for p in ps)[:8])}...)")
        p = paths[0]
        W = linear[p].weight
        out_in = (int(W.shape[0]), int(W.shape[1]))
        r, alpha, opts = _ENTRY[method](path, name, parts, out_in)
        plan[p] = {_KEYS[method][k]: v for k, v in parts.items() if k in _KEYS[method]}
        ranks[p], alphas[p] = r, alpha
        if opts:
            for k, v in opts.items():
                options.setdefault(k, set()).add(v)
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {"target_modules": sorted(plan), "r": r0,
              "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r0},
              "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != a0}}
    if method == "lora":
        config.update(peft_type="LORA", lora_alpha=a0, lora_dropout=0.0, bias="none", init_lora_weights=True,
                      use_rslora=False)
    else:
        config.update(peft_type=method.upper(), alpha=a0, rank_dropout=0.0, module_dropout=0.0, init_weights=True)
        for k, vs in options.items():
            if len(vs) > 1:
                raise ValueError(f"{path}: the layers need different {k} values {sorted(vs, key=str)}; "
                                 "PEFT's LoKr config has one for the whole file")
            config[k] = vs.pop()
    with tempfile.TemporaryDirectory(prefix="kohya-as-peft-") as d:
        save_file({f"{io.KEY_PREFIX}{p}.{k}": np.ascontiguousarray(v) for p, ts in plan.items() for k, v in ts.items()},
                  os.path.join(d, io.PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(d, io.PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f)
        io.load_peft(model, d)
    return sorted(plan)
