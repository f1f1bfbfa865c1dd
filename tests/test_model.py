"""The forward pass, the key/value cache and greedy generation, held against Hugging Face transformers.

The reference model gets the fixture's original weights; ours reads them back from the TF checkpoint,
so these tests also cover the loader end to end.
"""
import threading

import numpy as np
import pytest
import torch

import gpt2
import gpt2_pico
from conftest import SHAPES


def random_ids(n, seed=0):
    return [int(i) for i in np.random.default_rng(seed).integers(0, 50256, n)]


def hf_logits(model, ids):  # [n_seq] -> [n_seq, n_vocab]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("length", ["one token", "full context"])
def test_logits_match_hugging_face(name, length, loaded_model, hf_model):
    _, hparams, params = loaded_model(name)
    ids = random_ids(1 if length == "one token" else hparams["n_ctx"])
    expected = hf_logits(hf_model(name), ids)
    for implementation in (gpt2, gpt2_pico):
        logits = implementation.gpt2(ids, **params, n_head=hparams["n_head"])
        assert logits.dtype == np.float32 and logits.shape == (len(ids), hparams["n_vocab"])
        assert np.abs(logits - expected).max() <= 1e-4, implementation.__name__


def test_a_long_prompt_runs_in_parts_on_two_threads_and_still_matches_hugging_face(loaded_model, hf_model,
                                                                                   blas_threads, monkeypatch):
    _, hparams, params = loaded_model("h12")
    ids = random_ids(hparams["n_ctx"])  # 128 positions: two parts of gpt2.MIN_PART_ROWS
    blas_threads(2)
    attention, attended_on = gpt2.causal_attention, set()
    monkeypatch.setattr(gpt2, "causal_attention",
                        lambda *args: attended_on.add(threading.get_ident()) or attention(*args))
    logits = gpt2.gpt2(ids, **params, n_head=hparams["n_head"])
    assert len(attended_on) > 1
    assert np.abs(logits - hf_logits(hf_model("h12"), ids)).max() <= 1e-4


def nan_kv_cache(*args, new_kv_cache=gpt2.new_kv_cache):
    # gpt2.new_kv_cache's cache with every position NaN until written: a read of one not written yet would show
    return [kv.fill(np.nan) or kv for kv in new_kv_cache(*args)]


def test_cached_logits_match_full_forward_at_every_step(loaded_model):
    _, hparams, params = loaded_model("h12")
    n_head, ids = hparams["n_head"], random_ids(8, seed=1)
    kv_cache = nan_kv_cache(params, n_head, 1, len(ids) + 64)
    no_pads = np.zeros(1, dtype=int)
    logits = gpt2.next_logits(np.array([ids]), no_pads, params, n_head, kv_cache, 0)[0]
    for step in range(64):
        full = gpt2.gpt2(ids, **params, n_head=n_head)[-1]
        assert np.abs(logits - full).max() <= 1e-4, step
        ids.append(int(np.argmax(full)))
        logits = gpt2.next_logits(np.array([ids[-1:]]), no_pads, params, n_head, kv_cache, len(ids) - 1)[0]


def test_cached_greedy_ids_equal_uncached_over_64_tokens(loaded_model):
    _, hparams, params = loaded_model("h12")
    prompt = random_ids(10, seed=2)
    uncached = list(prompt)
    for _ in range(64):
        uncached.append(int(np.argmax(gpt2.gpt2(uncached, **params, n_head=hparams["n_head"])[-1])))
    cached = gpt2.generate(prompt, params, hparams["n_head"], 64, stop_at_endoftext=False)
    assert cached == uncached[len(prompt):]


@pytest.mark.parametrize("name", SHAPES)
def test_greedy_generate_matches_hugging_face_generate(name, loaded_model, hf_model):
    encoder, hparams, params = loaded_model(name)
    prompt = random_ids(5, seed=3)
    n_new = hparams["n_ctx"] - len(prompt)
    with torch.no_grad():
        expected = hf_model(name).generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=encoder.encoder["<|endoftext|>"],
        )[0, len(prompt):].tolist()
    assert gpt2.generate(prompt, params, hparams["n_head"], n_new, stop_at_endoftext=False) == expected


def test_pico_generates_what_gpt2_generates(loaded_model):
    _, hparams, params = loaded_model("tiny")
    for seed, length in enumerate((1, 7, 20)):
        prompt = random_ids(length, seed=seed)
        n_new = hparams["n_ctx"] - length
        assert gpt2_pico.generate(prompt, params, hparams["n_head"], n_new) == gpt2.generate(prompt, params, hparams["n_head"], n_new)


def test_batched_rows_equal_their_single_prompt_outputs(loaded_model, monkeypatch):
    _, hparams, params = loaded_model("h12")
    monkeypatch.setattr(gpt2, "new_kv_cache", nan_kv_cache)
    n_head = hparams["n_head"]
    prompts = [random_ids(n, seed=n) for n in (1, 6, 13, 3)]
    batch = gpt2.generate_batch(prompts, params, n_head, 20, stop_at_endoftext=False)
    assert batch == [gpt2.generate(p, params, n_head, 20, stop_at_endoftext=False) for p in prompts]

    # and the first step's logits of each row, not just the choices made from them
    longest = max(map(len, prompts))
    pads = np.array([longest - len(p) for p in prompts])
    padded = np.array([[0] * pad + p for pad, p in zip(pads, prompts)])
    batched = gpt2.next_logits(padded, pads, params, n_head, nan_kv_cache(params, n_head, 4, longest), 0)
    for row, prompt in zip(batched, prompts):
        assert np.abs(row - gpt2.gpt2(prompt, **params, n_head=n_head)[-1]).max() <= 1e-4


def test_generation_past_the_context_slides_the_window(loaded_model):
    _, hparams, params = loaded_model("tiny")
    n_ctx, n_head = hparams["n_ctx"], hparams["n_head"]
    prompt = random_ids(10, seed=4)
    # the documented rule: once the tokens exceed the context, keep the last n_ctx - 1 of them
    sequence, begin = list(prompt), 0
    for _ in range(3 * n_ctx):
        if len(sequence) - begin > n_ctx:
            begin = len(sequence) - (n_ctx - 1)
        sequence.append(int(np.argmax(gpt2.gpt2(sequence[begin:], **params, n_head=n_head)[-1])))
    assert gpt2.generate(prompt, params, n_head, 3 * n_ctx, stop_at_endoftext=False) == sequence[len(prompt):]


def test_generation_stops_at_endoftext_unless_told_not_to(loaded_model):
    encoder, hparams, params = loaded_model("tiny")
    eot = encoder.encoder["<|endoftext|>"]
    n_head, prompt = hparams["n_head"], random_ids(4)
    # point <|endoftext|>'s embedding along the prompt's final state, so the model must choose it next
    # (in a copy of the weights: the other tests keep the fixture's)
    final_state = gpt2.hidden_states(np.array(prompt), np.arange(4), gpt2.causal_mask(4, 4), **params, n_head=n_head)[-1]
    params = dict(params, wte=np.array(params["wte"]))
    params["wte"][eot] = 100 * final_state / np.linalg.norm(final_state)
    assert gpt2.generate(prompt, params, n_head, 5) == []
    assert gpt2.generate(prompt, params, n_head, 5, stop_at_endoftext=False)[0] == eot
