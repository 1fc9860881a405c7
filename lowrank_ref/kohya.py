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
plain LoRA layer with that alpha (the same ΔW). Only LoRA layers are written; LoHa / LoKr keys
(``hada_w1_a``..., ``lokr_w1``...) are refused with the method named, since neither method is
registered here.

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
_SUFFIXES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
_LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w1_a",
            "lokr_w2_a", "lokr_t2", "hada_t1")


def _check_prefix(prefix) -> str:
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*", prefix):
        raise ValueError(f"prefix must be letters and digits joined by '_' (e.g. 'lora_unet'), got {prefix!r}")
    return prefix


def kohya_name(path: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``"transformer.h.0.attn.c_attn"`` -> ``"lora_transformer_h_0_attn_c_attn"``."""
    return f"{_check_prefix(prefix)}_{path.replace('.', '_')}"


def _lora_layers(model) -> dict:
    from lowrank_ref.inject import adapter_layers
    from lowrank_ref.registry import spec_of_layer

    layers = {p: layer for p, layer in adapter_layers(model).items() if p}
    if not layers:
        raise ValueError("model holds no adapter layers: inject LoRA first")
    other = sorted(f"{p} ({spec_of_layer(layer).name})" for p, layer in layers.items()
                   if spec_of_layer(layer).name != "lora")
    if other:
        raise ValueError(f"kohya files hold LoRA layers only; these are not: {', '.join(other[:5])}")
    return layers


def save_kohya(model, path, prefix: str = DEFAULT_PREFIX) -> str:
    """Write ``model``'s LoRA layers as a kohya-ss safetensors file (written to a temporary name
    and moved into place); returns ``path``."""
    from safetensors.numpy import save_file

    from lowrank_ref import io

    layers = _lora_layers(model)
    _check_prefix(prefix)
    merged = sorted(p for p, layer in layers.items() if getattr(layer, "merged", False))
    if merged:
        raise ValueError(f"layers {merged} are merged: unmerge() before saving their adapters")
    peft = io.peft_state_dict(model)
    tensors, names = {}, {}
    for p, layer in layers.items():
        name = kohya_name(p, prefix)
        if name in names:
            raise ValueError(f"layers {names[name]!r} and {p!r} both flatten to {name!r}")
        names[name] = p
        cfg = layer.config
        A = peft[io.peft_key(p, "lora", "A")]  # (r, in)
        B = peft[io.peft_key(p, "lora", "B")]  # (out, r)
        alpha = cfg.alpha * math.sqrt(cfg.r) if cfg.rslora else cfg.alpha  # kohya's α/r = our scaling
        tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(A)
        tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(B)
        tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kohya-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "ss_network_module": "networks.lora"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_kohya(model, path, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Inject LoRA into the layers a kohya-ss file names and load its tensors; returns the layer
    paths. The model is left as it was if anything in the file is wrong."""
    import json

    from safetensors.numpy import save_file

    from lowrank_ref import io

    _check_prefix(prefix)
    tensors, _ = io.read_safetensors(path)
    groups: dict = {}
    for key, arr in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix in _LYCORIS or suffix.split(".")[0] in _LYCORIS:
            raise ValueError(f"{path}: key {key!r} is a LyCORIS LoHa/LoKr tensor; only LoRA files load here")
        if suffix not in _SUFFIXES:
            raise ValueError(f"{path}: key {key!r} is not a kohya LoRA key (expected "
                             f"<name>.{', <name>.'.join(_SUFFIXES)})")
        groups.setdefault(name, {})[_SUFFIXES[suffix]] = arr
    if not groups:
        raise ValueError(f"{path}: the file holds no tensors")
    flat: dict = {}
    _, linear = io._linear_modules(model, io._backend(model, "model"))
    for p in linear:
        flat.setdefault(kohya_name(p, prefix), []).append(p)
    plan, ranks, alphas = {}, {}, {}
    for name, parts in sorted(groups.items()):
        missing = sorted({"A", "B"} - set(parts))
        if missing:
            raise ValueError(f"{path}: {name} lacks {', '.join('lora_down' if m == 'A' else 'lora_up' for m in missing)}")
        paths = flat.get(name, [])
        if len(paths) != 1:
            why = "no layer of the model" if not paths else f"several layers ({', '.join(paths)})"
            raise ValueError(f"{path}: {name} names {why} (prefix {prefix!r}; layers: "
                             f"{', '.join(sorted(kohya_name(p, prefix) for ps in flat.values() for p in ps)[:8])}...)")
        down, up = parts["A"], parts["B"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path}: {name}: lora_down {down.shape} and lora_up {up.shape} do not make (out, r) @ (r, in)")
        r = int(down.shape[0])
        alpha = parts.get("alpha")
        alpha = float(r) if alpha is None else float(np.asarray(alpha).reshape(-1)[0]) if np.asarray(alpha).size == 1 else None
        if alpha is None or not np.isfinite(alpha):
            raise ValueError(f"{path}: {name}.alpha must be one finite number")
        p = paths[0]
        plan[p] = (down, up)
        ranks[p], alphas[p] = r, alpha
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {"peft_type": "LORA", "target_modules": sorted(plan), "r": r0, "lora_alpha": a0,
              "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r0},
              "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != a0},
              "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_rslora": False}
    with tempfile.TemporaryDirectory(prefix="kohya-as-peft-") as d:
        save_file({io.peft_key(p, "lora", "A"): np.ascontiguousarray(a) for p, (a, _) in plan.items()} |
                  {io.peft_key(p, "lora", "B"): np.ascontiguousarray(b) for p, (_, b) in plan.items()},
                  os.path.join(d, io.PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(d, io.PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f)
        io.load_peft(model, d)
    return sorted(plan)
