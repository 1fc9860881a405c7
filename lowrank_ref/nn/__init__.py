"""The reference's neural-network core: every layer with a hand-written backward pass."""

from lowrank_ref.nn.linear import Dropout, Linear
from lowrank_ref.nn.module import Module, ModuleList, Parameter

__all__ = ["Parameter", "Module", "ModuleList", "Linear", "Dropout"]
