"""The reference's neural-network core: every layer with a hand-written backward pass."""

from lowrank_ref.nn.activations import GELU, gelu, softmax
from lowrank_ref.nn.attention import CausalSelfAttention, ShiftedSparseAttention
from lowrank_ref.nn.embedding import Embedding
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.nn.layernorm import LayerNorm
from lowrank_ref.nn.linear import Dropout, Linear
from lowrank_ref.nn.losses import CrossEntropyLoss, cross_entropy, log_softmax
from lowrank_ref.nn.module import Module, ModuleList, Parameter
from lowrank_ref.nn.transformer import MLP, Block

__all__ = [
    "Parameter", "Module", "ModuleList", "Linear", "Dropout",
    "Embedding", "LayerNorm", "GELU", "gelu", "softmax", "CausalSelfAttention", "MLP", "Block",
    "GPT", "GPTConfig", "cross_entropy", "CrossEntropyLoss", "log_softmax",
    "ShiftedSparseAttention",
]
