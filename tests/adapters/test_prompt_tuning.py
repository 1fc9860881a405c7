"""Prompt tuning's own math: a prompt made of token-table rows is exactly those tokens written in
front of the input (logits of the input's positions equal, for both backends, with the plain
model run on the longer sequence); the init from text tokenises with the built-in tokenizer and
repeats to k; the three inits in both backends from one seed; the context it takes (block_size - k,
``max_input_length``; train and evaluate use it; generate crops to it); P's gradient is the sum
over the batch of the first k positions' (against torch autograd); bad input (k < 1, k >= block_size,
unknown words, an input longer than the context, a second inject) is a named error of the same
kind in both backends with the model unchanged. The generic checks (gradcheck of the whole model,
NumPy = torch, merge refused, save/load) are the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters.prompt_tuning import SPEC, prompt_init
from lowrank_ref.data.tokenizer import default_tokenizer
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig

torch = pytest.importorskip("torch")
from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402

BACKENDS = ["numpy", "torch"]
V = default_tokenizer().vocab_size  # the built-in vocabulary, so init_text can be tokenised
CFG = GPTConfig(vocab_size=V, block_size=10, n_layer=2, n_head=2, d_model=8)
IDX = np.random.default_rng(3).integers(0, V, (2, 5))


def _gpt(backend, seed=0):
    model = GPT(CFG, rng=np.random.default_rng(seed), dtype=np.float64)
    return model if backend == "numpy" else from_numpy(model)


def _run(model, idx):
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(idx))).numpy()
    return model.forward(idx)


def _prompt_P(model):
    P = model.prompt.P
    return P.detach().numpy() if hasattr(P, "detach") else P.data


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_of_token_rows_is_those_tokens_written_in_front(backend):
    # init="vocab" copies k rows of the token table: the prompted model must then compute exactly
    # what the plain model computes on [those ids; idx], at the input's positions
    model = _gpt(backend)
    inject(model, lr.PromptTuningConfig(k=3, init="vocab"), rng=5)
    table = _gpt("numpy").tok_emb.weight.data
    P = _prompt_P(model)
    ids = [int(np.flatnonzero((table == row).all(axis=1))[0]) for row in P]  # which rows it copied
    longer = np.concatenate([np.tile(ids, (IDX.shape[0], 1)), IDX], axis=1)  # (B, k+T)
    plain = _run(_gpt(backend), longer)[:, 3:]
    assert_close(_run(model, IDX), plain, "prompted logits vs the tokens written out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_from_text_tokenises_and_repeats_to_k(backend):
    text = "the cat sleeps"
    ids = default_tokenizer().encode(text)
    model = _gpt(backend)
    inject(model, lr.PromptTuningConfig(k=5, init="text", init_text=text), rng=0)
    table = _gpt("numpy").tok_emb.weight.data
    want = table[[ids[0], ids[1], ids[2], ids[0], ids[1]]]  # repeated to k = 5, as PEFT's TEXT
    np.testing.assert_array_equal(_prompt_P(model), want)
    cut = _gpt(backend)
    inject(cut, lr.PromptTuningConfig(k=2, init="text", init_text=text), rng=0)
    np.testing.assert_array_equal(_prompt_P(cut), table[ids[:2]])  # cut to k = 2


@pytest.mark.parametrize("init", ["random", "vocab", "text"])
def test_one_seed_gives_one_prompt_in_both_backends(init):
    cfg = lr.PromptTuningConfig(k=4, init=init, init_text="the dog" if init == "text" else "")
    got = {}
    for backend in BACKENDS:
        model = _gpt(backend)
        inject(model, cfg, rng=11)
        got[backend] = _prompt_P(model)
    np.testing.assert_array_equal(got["numpy"], got["torch"])


def test_random_init_has_the_configured_scale():
    P = prompt_init(lr.PromptTuningConfig(k=400, init_std=0.02), np.zeros((V, 16)), np.random.default_rng(0))
    assert P.shape == (400, 16)
    assert abs(P.std() - 0.02) < 0.001 and abs(P.mean()) < 0.001  # 6400 draws: std of the std ~ 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_prompt_takes_k_positions_of_the_context(backend):
    model = _gpt(backend)
    assert model.max_input_length == CFG.block_size
    inject(model, lr.PromptTuningConfig(k=4), rng=0)
    assert model.max_input_length == CFG.block_size - 4
    ok = np.zeros((1, CFG.block_size - 4), dtype=np.int64)
    assert _run(model, ok).shape == (1, CFG.block_size - 4, V)  # logits for the input only
    with pytest.raises(ValueError, match=r"block_size - k = 6.*prompt of k=4 tokens"):
        _run(model, np.zeros((1, CFG.block_size - 3), dtype=np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_evaluate_and_generate_use_the_shorter_context(backend):
    model = _gpt(backend)
    inject(model, lr.PromptTuningConfig(k=4), rng=0)
    tokens = np.random.default_rng(0).integers(0, V, 200)
    res = lr.train.train(model, tokens, steps=2, lr=1e-2, batch_size=2, warmup=0, progress=False)
    assert len(res.losses) == 2
    ev = lr.train.evaluate(model, tokens, max_windows=3)
    assert ev["tokens"] == 3 * (CFG.block_size - 4)  # windows of block_size - k tokens
    idx = np.zeros((1, 8), dtype=np.int64)  # longer than the 6 the prompt leaves: generate crops
    out = model.generate(idx if backend == "numpy" else torch.from_numpy(idx), 2, rng=0, temperature=0)
    assert tuple(out.shape) == (1, 10)


def test_the_prompt_gradient_is_the_batch_sum_of_its_positions_and_matches_autograd():
    model = _gpt("numpy")
    inject(model, lr.PromptTuningConfig(k=3), rng=1)
    tmodel = _gpt("torch")
    inject(tmodel, lr.PromptTuningConfig(k=3), rng=1)
    w = np.random.default_rng(2).standard_normal((*IDX.shape, V))
    model.forward(IDX)
    model.backward(w)
    y = tmodel(torch.from_numpy(IDX))
    (y * torch.from_numpy(w)).sum().backward()
    assert_close(model.prompt.P.grad, tmodel.prompt.P.grad.numpy(), "P.grad numpy vs autograd")
    # only the prompt trains: every weight of the model stays without a gradient
    assert set(model.trainable_parameters()) == {"prompt.P"}
    assert all(p.grad is None for n, p in model.parameters().items() if n != "prompt.P")
    # the gradient of one row equals that row's share: row 0 alone gives part of the sum
    one = _gpt("numpy")
    inject(one, lr.PromptTuningConfig(k=3), rng=1)
    one.forward(IDX[:1])
    one.backward(w[:1])
    two = _gpt("numpy")
    inject(two, lr.PromptTuningConfig(k=3), rng=1)
    two.forward(IDX[1:])
    two.backward(w[1:])
    assert_close(one.prompt.P.grad + two.prompt.P.grad, model.prompt.P.grad, "P̄ = Σ_b")


def _bad(backend, cfg):
    model = _gpt(backend)
    before = {n: (p.detach().numpy().copy() if hasattr(p, "detach") else p.data.copy())
              for n, p in (model.named_parameters() if backend == "torch" else model.parameters().items())}
    flags = ([p.requires_grad for p in model.parameters()] if backend == "torch"
             else [p.trainable for p in model.parameters().values()])
    with pytest.raises(ValueError) as e:
        inject(model, cfg, rng=0)
    assert getattr(model, "prompt", None) is None
    now = ([p.requires_grad for p in model.parameters()] if backend == "torch"
           else [p.trainable for p in model.parameters().values()])
    assert now == flags, "a failed inject changed what trains"
    for n, p in (model.named_parameters() if backend == "torch" else model.parameters().items()):
        np.testing.assert_array_equal(p.detach().numpy() if hasattr(p, "detach") else p.data, before[n])
    return str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_named_error_and_changes_nothing(backend):
    assert "at most 9" in _bad(backend, lr.PromptTuningConfig(k=10))  # k = block_size: no room left
    assert "init_text" in _bad(backend, lr.PromptTuningConfig(k=2, init="text", init_text="the zebra"))
    model = _gpt(backend)
    inject(model, lr.PromptTuningConfig(k=2), rng=0)
    with pytest.raises(ValueError, match="already has a 'prompt'"):
        inject(model, lr.PromptTuningConfig(k=2), rng=0)
    with pytest.raises(ValueError, match="not mergeable"):
        model.prompt.merge()


def test_bad_configs():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        lr.PromptTuningConfig(k=0)
    with pytest.raises(TypeError, match="k must be a positive integer"):
        lr.PromptTuningConfig(k=2.5)
    with pytest.raises(ValueError, match="init must be one of"):
        lr.PromptTuningConfig(init="words")
    with pytest.raises(ValueError, match="non-empty init_text"):
        lr.PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="only read with init='text'"):
        lr.PromptTuningConfig(init_text="the cat")
    with pytest.raises(ValueError, match="init_std must be > 0"):
        lr.PromptTuningConfig(init_std=0)


def test_the_compare_row_uses_no_linear_targets():
    row = SPEC.compare["prompt_tuning"]
    assert row.targets == () and row.config.k >= 1 and not SPEC.mergeable and not SPEC.is_layer


def test_the_train_command_refuses_a_window_the_prompt_leaves_no_room_for(tmp_path, capsys):
    from lowrank_ref.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "prompt_tuning", "--steps", "1", "--batch-size", "2", "--out", str(out), "--quiet"])
    assert e.value.code == 2
    assert "--block-size 32: --method prompt_tuning leaves the model 24 positions" in capsys.readouterr().err
    assert not out.exists()
