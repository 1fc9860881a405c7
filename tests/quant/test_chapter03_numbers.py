"""Numbers chapter 03 states, recomputed: NF4 code usage after block-wise absmax, the memory of
full fine-tuning with and without master weights, and the headroom of a 48 GiB card."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ref.experiments.qlora_experiments import nf4_code_usage
from lowrank_ref.quant import memory


def test_nf4_codes_are_not_used_equally_after_blockwise_absmax():
    u = nf4_code_usage(n=1 << 20)
    share = u["share"]
    assert share.sum() == pytest.approx(1.0)
    # the end codes are rare, the codes next to zero common (chapter: 1.85 / 1.72 % and ~9 %)
    assert 0.015 < share[0] < 0.022 and 0.015 < share[15] < 0.022
    assert 0.085 < share[6] < 0.10 and 0.08 < share[7] < 0.095
    assert share[[0, 15]].max() < 0.3 * share[5:10].min()
    assert round(u["entropy_bits"], 2) == 3.88  # of 4 bits
    # each block's maximum sits on an end code: at least 1/64 of the values
    assert share[0] + share[15] >= u["end_share_by_construction"]


def test_each_blocks_maximum_lands_on_an_end_code():
    from lowrank_ref.quant import quantize_nf4

    x = np.random.default_rng(1).standard_normal(64 * 50).astype(np.float32)
    codes = quantize_nf4(x, blocksize=64).codes().reshape(50, 64)
    at_max = codes[np.arange(50), np.abs(x.reshape(50, 64)).argmax(axis=1)]
    assert set(at_max.tolist()) <= {0, 15}


def test_full_finetuning_memory_with_and_without_master_weights():
    n = memory.llama_memory()["params"]
    assert memory.full_finetune_bytes(n, master_weights=False) == 12 * n
    assert round(memory.full_finetune_bytes(n, master_weights=False) / 1e9) == 783  # ">780 GB"
    assert memory.full_finetune_bytes(n) == 16 * n
    assert round(memory.full_finetune_bytes(n) / 1e12, 2) == 1.04  # TB


def test_headroom_of_a_48_gib_card():
    m = memory.llama_memory()
    assert m["headroom_for_activations"] == 48 * 2**30 - m["total"]
    assert round(m["total"] / 1e9, 1) == 44.1
    assert round(m["headroom_for_activations"] / 1e9, 1) == 7.5
    assert round(m["headroom_for_activations"] / 2**30, 1) == 7.0
