r"""Memory accounting from first principles: where the bytes of a fine-tuning run go.

Two kinds of numbers:

* **computed** (:func:`bits_per_param`, :func:`llama_memory`): bytes from shapes and storage
  formats, no arrays allocated. Reproduces QLoRA's headline figures (Dettmers et al. 2023,
  arXiv:2305.14314): 4.127 bits per parameter with double quantisation (§3), and a 65B model
  fine-tuned in under 48 GB where 16-bit full fine-tuning needs more than 780 GB (abstract).
* **measured** (:func:`optimizer_state_by_rank`, :func:`measure_step_memory`): the bytes of the
  arrays that actually exist, and the peak of a training step by :mod:`tracemalloc` (NumPy
  reports its allocations to it).

The 65B shapes are LLaMA-65B's (Touvron et al. 2023, arXiv:2302.13971, Table 2: dimension 8192,
80 layers; SwiGLU hidden size 22016 and vocabulary 32000 from the released configuration). The
QLoRA setting: every linear layer of the blocks in NF4 with double quantisation, LoRA ``r = 64``
on all of them (§4 "LoRA r = 64 ... on all linear layers"), adapters and their gradients in
bf16, Adam's two moments in float32 (paged), embeddings and output layer kept in bf16.
Activations are left out of the totals (they depend on batch and sequence length; gradient
checkpointing keeps them small); :func:`llama_memory` reports the headroom that remains.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

__all__ = ["bits_per_param", "LLAMA_65B", "llama_memory", "full_finetune_bytes",
           "optimizer_state_by_rank", "measure_step_memory"]

GB = 1e9
GIB = 2**30  # a "48 GB" GPU holds 48 GiB (an A6000 or A40: 48 × 2³⁰ bytes)

LLAMA_65B = {"d": 8192, "layers": 80, "ffn": 22016, "vocab": 32000}  # Touvron et al. 2023


def bits_per_param(blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256) -> float:
    r"""Storage bits per weight of block-wise 4-bit quantisation (large-tensor limit).

    ``4 + 32/B`` plain; ``4 + 8/B + 32/(B·B₂)`` double-quantised: 4.5 and 4.127 at ``B = 64``,
    ``B₂ = 256`` (QLoRA §3).
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def _linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    d, f = cfg["d"], cfg["ffn"]
    # per block: q, k, v, o (d -> d); gate and up (d -> f); down (f -> d)
    return [(d, d)] * 4 + [(d, f), (d, f), (f, d)]


def llama_memory(cfg: dict | None = None, r: int = 64, blocksize: int = 64, double_quant: bool = True,
                 budget_gb: float = 48.0) -> dict:
    r"""QLoRA's memory for a LLaMA-shaped model, by component, in bytes (see the module docstring).

    Returns ``{"params", "base_nf4", "embeddings_bf16", "norms_bf16", "lora_bf16",
    "lora_grads_bf16", "adam_fp32", "total", "headroom_for_activations"}`` (bytes) and
    ``"lora_params"``. ``budget_gb`` is the card's size as sold, in GiB (a "48 GB" card holds
    48 × 2³⁰ bytes), so the headroom is ``budget_gb · 2³⁰ − total``.
    """
    cfg = LLAMA_65B if cfg is None else cfg
    shapes = _linear_shapes(cfg)
    L, d, V = cfg["layers"], cfg["d"], cfg["vocab"]
    n_linear = L * sum(i * o for i, o in shapes)
    n_embed = 2 * V * d  # input embedding and output layer (not tied in LLaMA)
    n_norm = (2 * L + 1) * d
    n_lora = L * sum(r * (i + o) for i, o in shapes)  # A (r, in) + B (out, r) per linear
    out = {
        "params": n_linear + n_embed + n_norm,
        "lora_params": n_lora,
        "base_nf4": n_linear * bits_per_param(blocksize, double_quant) / 8,
        "embeddings_bf16": 2 * n_embed,
        "norms_bf16": 2 * n_norm,
        "lora_bf16": 2 * n_lora,
        "lora_grads_bf16": 2 * n_lora,
        "adam_fp32": 8 * n_lora,  # m and v, float32
    }
    out["total"] = sum(v for k, v in out.items() if k not in ("params", "lora_params"))
    out["headroom_for_activations"] = budget_gb * GIB - out["total"]
    return out


def full_finetune_bytes(n_params: int, master_weights: bool = True) -> float:
    """Mixed-precision full fine-tuning with Adam, activations aside: bf16 weights (2) + bf16
    gradients (2) + float32 m and v (8) + the float32 master copy of the weights that the
    optimizer updates (4; Micikevicius et al. 2018, arXiv:1710.03740) = 16 bytes per parameter.
    ``master_weights=False`` drops the master copy: 12 bytes, which is what QLoRA's ">780 GB" for
    65B counts."""
    return (16.0 if master_weights else 12.0) * n_params


def optimizer_state_by_rank(ranks=(1, 2, 4, 8, 16, 32), d_in: int = 64, d_out: int = 64,
                            n_layers: int = 4, seed: int = 0) -> list[dict]:
    """Measured optimizer-state bytes of LoRA layers as the rank grows: SGD, SGD with momentum,
    Adam, 8-bit Adam (``state_bytes()`` after one step, i.e. the arrays that exist).

    The state depends only on the trainable tensors, so each layer is its LoRA factors as float32
    Parameters, ``A (r, in)`` and ``B (out, r)`` (this package sits under the adapters and does
    not build their layers)."""
    from lowrank_ref.nn.module import Parameter
    from lowrank_ref.optim import SGD, Adam, Adam8bit

    rows = []
    rng = np.random.default_rng(seed)
    for r in ranks:
        params = {}
        for i in range(n_layers):
            params[f"{i}.A"] = Parameter(rng.uniform(-1, 1, (r, d_in)).astype(np.float32))  # (r, in)
            params[f"{i}.B"] = Parameter(rng.uniform(-1, 1, (d_out, r)).astype(np.float32))  # (out, r)
        row = {"r": int(r), "trainable": sum(p.size for p in params.values())}
        for key, make in (("sgd", lambda ps: SGD(ps, lr=0.1)),
                          ("sgd_momentum", lambda ps: SGD(ps, lr=0.1, momentum=0.9)),
                          ("adam", lambda ps: Adam(ps, lr=1e-3)),
                          ("adam8bit", lambda ps: Adam8bit(ps, lr=1e-3, min_8bit_size=0))):
            opt = make(params)
            for p in params.values():
                p.grad = np.ones_like(p.data)
            saved = {n: p.data.copy() for n, p in params.items()}
            opt.step()
            row[key] = int(opt.state_bytes())
            for n, p in params.items():  # leave the layers as they were for the next optimizer
                p.data, p.grad = saved[n], None
        rows.append(row)
    return rows


def measure_step_memory(model, x, loss_grad, optimizer) -> dict:
    r"""Peak bytes allocated during one training step (forward, backward, optimizer step), by
    :mod:`tracemalloc`, on top of what exists before; plus the bytes the model holds.

    Args:
        model: a NumPy module with ``forward``/``backward``.
        x: its input; ``loss_grad(y) -> dy``: the gradient of the loss at the output.
        optimizer: a :class:`lowrank_ref.optim.Optimizer` over the trainable parameters.
    """
    from lowrank_ref.train import model_bytes

    held = model_bytes(model)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    y = model.forward(x)
    model.backward(loss_grad(y))
    optimizer.step()
    optimizer.zero_grad()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"model_bytes": int(held), "step_peak_bytes": int(peak - base),
            "optimizer_state_bytes": int(optimizer.state_bytes())}
