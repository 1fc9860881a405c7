r"""The two baselines every parameter-efficient method is measured against.

* **Full fine-tuning**: every parameter of the model trains. The upper bound on what the data
  can teach, and the cost (gradients and optimizer state for every weight) that LoRA avoids.
* **BitFit** (Ben Zaken, Ravfogel & Goldberg 2021, arXiv:2106.10199): only the bias terms train
  (every parameter named ``bias``: the linear layers' and the LayerNorms' shifts), everything else
  is frozen. For a linear layer ``y = x W^T + b`` that is ``out`` trainable scalars against
  ``out · in``. A model built without biases (such as the GPT's ``head``) gains nothing there.

These are whole-model modes, not layers: each takes a model (and, as every ``SPEC.model_fn``
does, the mode's config and an rng, unused here), sets which parameters train, and returns how
many scalars now train. They are registered as the methods ``"full"`` and
``"bitfit"``, so ``inject(model, method="bitfit")`` applies them like any other method.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_ref.registry import CompareRow, MethodSpec, PerBackend

__all__ = ["full_finetune", "bitfit", "FullFinetuneConfig", "BitFitConfig", "SPEC"]


@dataclass(frozen=True)
class FullFinetuneConfig:
    """Full fine-tuning has no hyper-parameters of its own (the optimizer's are elsewhere)."""

    def replace(self, **changes):
        if changes:
            raise ValueError(f"FullFinetuneConfig has no fields; got {sorted(changes)}")
        return self


@dataclass(frozen=True)
class BitFitConfig:
    """BitFit has no hyper-parameters of its own: the bias terms train, nothing else."""

    def replace(self, **changes):
        if changes:
            raise ValueError(f"BitFitConfig has no fields; got {sorted(changes)}")
        return self


def full_finetune(model, config=None, rng=None) -> int:
    """Make every parameter of ``model`` trainable; return the trainable count."""
    from lowrank_ref.inject import set_trainable

    return set_trainable(model, "all")


def bitfit(model, config=None, rng=None) -> int:
    """Make only parameters named ``...bias`` trainable; return the trainable count (0 raises)."""
    from lowrank_ref.inject import _is_torch_module, set_trainable

    if _is_torch_module(model):
        from lowrank_gpu.adapters.baselines import bitfit as torch_bitfit

        return torch_bitfit(model)
    if not any(n.rsplit(".", 1)[-1] == "bias" for n in model.parameters()):
        raise ValueError("bitfit: the model has no bias parameters, so nothing would train")
    return set_trainable(model, "bias")


SPEC = (
    MethodSpec(
        name="full", config=FullFinetuneConfig,
        model_fn=PerBackend("lowrank_ref.adapters.baselines:full_finetune",
                            "lowrank_gpu.adapters.baselines:full_finetune"),
        description="full fine-tuning: every parameter trains",
        compare={"full": CompareRow(None, targets=(), lr=1e-3, order=0)},
    ),
    MethodSpec(
        name="bitfit", config=BitFitConfig,
        model_fn=PerBackend("lowrank_ref.adapters.baselines:bitfit", "lowrank_gpu.adapters.baselines:bitfit"),
        description="BitFit, Ben Zaken et al. 2021: only the bias terms train",
        compare={"bitfit": CompareRow(None, targets=(), lr=3e-2, order=10)},
    ),
)
