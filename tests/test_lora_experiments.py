"""Chapter 01's counting claims, checked a second way (tensor by tensor, and against inject)."""

from __future__ import annotations

import numpy as np

import lowrank_ref as lr
from lowrank_ref.experiments import lora_experiments as le
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig


def _bert_tensors(L=12, d=768, f=3072, V=30522, P=512, S=2):
    """Every tensor of BERT-base by shape, as Hugging Face's BertModel lists them."""
    t = [(V, d), (P, d), (S, d), (d,), (d,)]  # embeddings + their LayerNorm
    for _ in range(L):
        for _ in range(4):  # query, key, value, attention output dense
            t += [(d, d), (d,)]
        t += [(d,), (d,)]  # attention output LayerNorm
        t += [(f, d), (f,), (d, f), (d,)]  # intermediate, output dense
        t += [(d,), (d,)]  # output LayerNorm
    t += [(d, d), (d,)]  # pooler
    return t


def test_bert_base_total_is_109m_counted_tensor_by_tensor():
    tensors = _bert_tensors()
    total = sum(int(np.prod(s)) for s in tensors)
    assert total == 109_482_240
    assert le.bert_base_parameters()["total"] == total
    n_layernorms = 1 + 2 * 12  # each has a γ (a weight) and a β (a bias)
    one_d = sum(int(np.prod(s)) for s in tensors if len(s) == 1)
    assert le.bert_base_parameters()["biases"] == one_d - n_layernorms * 768


def test_bert_lora_counts():
    rows = {r["what"]: r["trainable"] for r in le.bert_lora_counts()}
    assert rows["LoRA r=1 on W_q, W_v of one layer"] == 2 * (768 + 768)
    assert rows["LoRA r=1 on W_q, W_v of all 12 layers"] == 36_864
    assert rows["LoRA r=8 on W_q, W_v of all 12 layers (the paper's RoBERTa-base setting)"] == 294_912
    # "about 5,000" is only reached by adapting a single layer (plus a task head)
    assert 3_000 < rows["LoRA r=1 on W_q, W_v of one layer + a 2-class head"] < 5_000


def test_lora_parameters_formula_matches_inject():
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=2, n_head=2, d_model=8), rng=np.random.default_rng(0))
    res = inject(model, lr.LoRAConfig(r=3, alpha=6), targets="all", rng=0)
    shapes = [model.get_submodule(n).base.weight.data.shape for n in res.replaced]
    assert le.lora_parameters(shapes, 3) == res.trainable_params == model.num_trainable_parameters()


def test_settings_quick_and_full(monkeypatch):
    monkeypatch.setenv("LOWRANK_REF_QUICK", "1")
    assert le.quick_mode() and le.settings()["quick"] and len(le.settings()["seeds"]) == 1
    monkeypatch.setenv("LOWRANK_REF_QUICK", "0")
    full = le.settings()
    assert not full["quick"] and full["steps"] >= 100


def test_summarize_groups_seeds():
    rows = [{"rule": "a", "r": 1, "trainable_params": 5, "scaling": 2.0, "target_after": v, "retained_after": v,
             "target_loss_after": v, "final_train_loss": v} for v in (0.1, 0.3)]
    (s,) = le.summarize(rows, ["rule", "r"])
    assert s["n_seeds"] == 2 and abs(s["target_after"] - 0.2) < 1e-12
    assert s["target_after_min"] == 0.1 and s["target_after_max"] == 0.3


def test_at_init_only_B_gets_a_gradient():
    """Chapter 01 §3: with B = 0, h̄ = s ȳ B = 0, so Ā = 0 at the first step; B̄ = s ȳᵀ h is not."""
    rng = np.random.default_rng(0)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((5, 7)), rng.standard_normal(5))
    layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=3, alpha=6), rng=rng)
    layer.forward(rng.standard_normal((4, 7)))
    layer.backward(rng.standard_normal((4, 5)))
    assert np.all(layer.A.grad == 0) and np.any(layer.B.grad != 0)
    layer.A.data[:] = 0  # both factors zero: nothing can ever train
    layer.zero_grad()
    layer.forward(rng.standard_normal((4, 7)))
    layer.backward(rng.standard_normal((4, 5)))
    assert np.all(layer.A.grad == 0) and np.all(layer.B.grad == 0)


def test_join_results_concatenates_runs_only():
    a = {"settings": {"steps": 1}, "bert_lora_counts": [1, 2], "targets": [{"x": 1}]}
    b = {"settings": {"steps": 1}, "bert_lora_counts": [1, 2], "targets": [{"x": 2}], "init": [{"y": 0}]}
    j = le.join_results(a, b)
    assert j["bert_lora_counts"] == [1, 2] and j["targets"] == [{"x": 1}, {"x": 2}] and j["init"] == [{"y": 0}]
