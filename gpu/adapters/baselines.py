r"""The torch twins of :mod:`lowrank_ref.adapters.baselines`: full fine-tuning and BitFit
(Ben Zaken et al. 2021) as ``requires_grad`` switches on any ``torch.nn.Module``."""

from __future__ import annotations

from lowrank_ref.adapters.baselines import BitFitConfig, FullFinetuneConfig

__all__ = ["full_finetune", "bitfit", "FullFinetuneConfig", "BitFitConfig"]


def full_finetune(model, config=None, rng=None) -> int:
    """Every parameter trainable; returns the trainable count."""
    from lowrank_gpu.inject import set_trainable

    return set_trainable(model, "all")


def bitfit(model, config=None, rng=None) -> int:
    """Only parameters named ``...bias`` trainable; returns the trainable count (0 raises)."""
    from lowrank_gpu.inject import set_trainable

    if not any(n.rsplit(".", 1)[-1] == "bias" for n, _ in model.named_parameters()):
        raise ValueError("bitfit: the model has no bias parameters, so nothing would train")
    return set_trainable(model, "bias")
