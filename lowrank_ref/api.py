r"""``adapt(base, config, backend=...)``: one config, the same layer in any backend."""

from __future__ import annotations

from lowrank_ref.registry import check_backend, get_method, method_for_config

__all__ = ["adapt"]


def adapt(base, config, backend: str = "numpy", method: str | None = None, rng=None, quantize=None, **kwargs):
    """Wrap ``base`` (a ``lowrank_ref.nn.Linear`` or a ``torch.nn.Linear``) with the adapter that
    ``config`` describes, in ``backend``: ``"numpy"``, ``"torch"``, ``"cuda"`` or ``"cupy"``.

    The method comes from the registry: ``type(config)``, or ``method`` when the config is of a
    parent class (``method="qlora"`` takes a ``LoRAConfig``). A method with shared state
    (``SPEC.shared``) gets it built for this one layer. A NumPy base given to a torch backend is
    copied into a ``torch.nn.Linear`` (same dtype). ``"cupy"`` builds the NumPy layer and moves its
    arrays (the base's included) onto the GPU, where the same array code runs on CuPy arrays (for a
    whole model: :func:`lowrank_ref.nn.module.to_array_module`).

    ``quantize="nf4"`` (or ``"fp4"``, ``"int4"``; with ``blocksize=64``, ``double_quant=True``)
    stores the base in 4 bits before the adapter wraps it, as :func:`lowrank_ref.inject.inject`
    does: ``adapt(linear, DoRAConfig(...), quantize="nf4")`` is one QDoRA layer.
    """
    backend = check_backend(backend)
    spec = get_method(method) if method is not None else method_for_config(config)
    if not spec.is_layer:  # whole-model modes (full fine-tuning, BitFit) are not layers
        raise ValueError(f"method {spec.name!r} is a whole-model mode, not a layer: "
                         f"use lowrank_ref.inject.inject(model, method={spec.name!r})")
    from lowrank_ref.inject import base_quant

    kwargs = dict(kwargs)
    quant = base_quant(quantize, kwargs)  # takes blocksize/double_quant only when quantize is given
    config = spec.coerce_config(config, kwargs)
    if backend in ("numpy", "cupy"):
        from lowrank_ref.backend import require_cupy
        from lowrank_ref.inject import NUMPY

        cp = require_cupy() if backend == "cupy" else None
        layer = NUMPY.build_layer(spec, base, config, rng=rng, quantize=quant, **kwargs)
        if cp is not None:
            from lowrank_ref.nn.module import to_array_module

            to_array_module(layer, cp)  # parameters and every frozen array (4-bit codes, projections)
        return layer
    from lowrank_ref.backend import torch_device

    device = torch_device(backend)
    import lowrank_gpu
    from lowrank_gpu.inject import TORCH

    tbase = lowrank_gpu.nn.as_torch_linear(base, device=device)
    return TORCH.build_layer(spec, tbase, config, rng=rng, quantize=quant, **kwargs).to(device)
