"""The loss and every gradient of backward.py, held against Hugging Face's GPT2LMHeadModel and PyTorch autograd.

Both sides compute in float32. Every gradient tensor must be within 1e-5 of autograd's, absolute, element by
element: the gradients here are up to about 0.4 in size, and float32 keeps 7 digits, so sums over a few hundred
positions honestly differ by about 1e-6 (the largest difference seen is 1.4e-6), ten times inside the bound.
"""
import json

import numpy as np
import pytest
import torch

import backward
from backward import loss, loss_and_grads
from errors import GPT2Error
from conftest import GRAD_ATOL, GRADIENT_CASES as CASES, LOSS_RTOL, batch, torch_loss_and_grads
from params import hf_name, layout, leaves, tree_map

@pytest.mark.parametrize("in_parts_of_batch", [True, False], ids=["batch in parts", "batch whole"])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_equal_pytorch_autograd(case, in_parts_of_batch, training_reference, blas_threads):
    name, n_batch, n_seq, n_ids = CASES[case]
    blas_threads(2)  # on two threads: the batch's rows in parts, or the batch whole and its passes' rows in parts
    hparams, params, model = training_reference(name)
    inputs, targets = batch(hparams, n_batch, n_seq, n_ids)
    expected_loss, expected = torch_loss_and_grads(model, inputs, targets)

    ours_loss, grads = loss_and_grads(inputs, targets, params, hparams["n_head"], in_parts_of_batch)
    assert isinstance(ours_loss, float)
    assert abs(ours_loss - expected_loss) <= LOSS_RTOL * expected_loss
    assert tree_map(np.shape, grads) == layout(hparams)
    assert {hf_name(path) for path, _ in leaves(grads)} == set(expected)
    for path, grad in leaves(grads):
        assert grad.dtype == np.float32 and grad.flags.c_contiguous, path
        assert np.abs(grad - expected[hf_name(path)]).max() <= GRAD_ATOL, path
    assert loss(inputs, targets, params, hparams["n_head"], in_parts_of_batch) == ours_loss


def test_a_batch_goes_the_way_measured_fastest_here_and_the_measuring_call_gives_that_ways_result(
        pinned_cache, training_reference, blas_threads):
    blas_threads(2)
    hparams, params, _ = training_reference("byte")
    inputs, targets = batch(hparams, 4, 64)
    measured_loss, measured = loss_and_grads(inputs, targets, params, hparams["n_head"])
    (task, way), = json.loads(pinned_cache.read_text())["fastest"].items()
    assert task == "loss and gradients, batch 4 x 64, 2 layers 64 wide, 257 tokens, 2 threads"
    again_loss, again = loss_and_grads(inputs, targets, params, hparams["n_head"], in_parts_of_batch=way == "parts")
    assert measured_loss == again_loss
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(leaves(measured), leaves(again)))


@pytest.mark.parametrize("why", ["one thread", "one row", "too little memory for a second part's gradients"])
def test_a_batch_that_cannot_go_in_parts_goes_whole_without_measuring(why, pinned_cache, training_reference,
                                                                     blas_threads, monkeypatch):
    hparams, params, _ = training_reference("byte")
    blas_threads(1 if why == "one thread" else 2)
    gradient_bytes = sum(a.nbytes for _, a in leaves(params))
    monkeypatch.setattr(backward, "available_bytes", lambda: 2 * gradient_bytes - 1 if why.startswith("too") else None)
    inputs, targets = batch(hparams, 1 if why == "one row" else 4, 64)
    loss_and_grads(inputs, targets, params, hparams["n_head"])
    assert "fastest" not in json.loads(pinned_cache.read_text())


def test_tied_wte_gradient_is_the_embeddings_part_plus_the_projections(training_reference):
    hparams, params, model = training_reference("tiny")
    inputs, targets = batch(hparams, 2, 16, n_ids=5)  # each of 5 ids fed in about 6 times
    _, grads = loss_and_grads(inputs, targets, params, hparams["n_head"])

    # autograd with wte's two uses cut apart: the embedding lookup as a leaf of its own, the projection as wte
    wte = model.transformer.wte.weight
    looked_up = wte.detach()[torch.tensor(inputs)].requires_grad_()
    labels = torch.tensor(targets)
    out = model(inputs_embeds=looked_up, labels=labels, shift_labels=labels)
    projection_part, dlooked_up = torch.autograd.grad(out.loss, [wte, looked_up])
    embedding_part = torch.zeros_like(wte).index_add_(0, torch.tensor(inputs).flatten(), dlooked_up.flatten(0, 1))

    assert model.lm_head.weight is wte
    # both parts large against the tolerance: leaving out either, or keeping one row per repeated id, would show
    assert projection_part.abs().max() > 100 * GRAD_ATOL and embedding_part.abs().max() > 100 * GRAD_ATOL
    assert np.abs(grads["wte"] - (projection_part + embedding_part).numpy()).max() <= GRAD_ATOL


def test_read_only_and_transposed_params_give_the_same_gradients(training_reference):
    # the loader hands out read-only memory maps, and weight matrices may be views of transposed storage
    hparams, params, _ = training_reference("wide")
    inputs, targets = batch(hparams, 2, 16, seed=1)
    expected_loss, expected = loss_and_grads(inputs, targets, params, hparams["n_head"])

    def read_only_view(a):
        view = np.asfortranarray(a) if a.ndim == 2 else a.copy()
        view.flags.writeable = False
        return view

    frozen = tree_map(read_only_view, params)
    assert not frozen["blocks"][0]["attn"]["c_attn"]["w"].flags.c_contiguous
    ours_loss, grads = loss_and_grads(inputs, targets, frozen, hparams["n_head"])
    assert ours_loss == pytest.approx(expected_loss, rel=1e-6)
    for (path, grad), (_, want) in zip(leaves(grads), leaves(expected)):
        assert grad.flags.c_contiguous and np.abs(grad - want).max() <= GRAD_ATOL, path


def test_loss_and_grads_leave_params_and_ids_untouched(training_reference):
    hparams, params, _ = training_reference("tiny")
    before = tree_map(np.copy, params)
    inputs, targets = batch(hparams, 2, 8)
    ids_before = inputs.copy(), targets.copy()
    loss_and_grads(inputs, targets, params, hparams["n_head"])
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(leaves(params), leaves(before)))
    assert np.array_equal(inputs, ids_before[0]) and np.array_equal(targets, ids_before[1])


@pytest.mark.parametrize("inputs, targets, message", [
    (np.zeros((2, 33), int), np.zeros((2, 33), int), "context holds 32"),
    (np.zeros((2, 8), int), np.zeros((2, 7), int), "one shape"),
    (np.zeros(8, int), np.zeros(8, int), "one shape"),
    (np.full((1, 4), 50257), np.zeros((1, 4), int), "inputs must be token ids from 0 to 50256"),
    (np.zeros((1, 4), int), np.full((1, 4), -1), "targets must be token ids"),
    (np.zeros((1, 4)), np.zeros((1, 4), int), "inputs must be token ids"),
])
def test_a_bad_batch_is_a_clear_error(inputs, targets, message, training_reference):
    hparams, params, _ = training_reference("tiny")
    for fn in (loss, loss_and_grads):
        with pytest.raises(GPT2Error, match=message):
            fn(inputs, targets, params, hparams["n_head"])


def test_a_way_of_the_batch_that_is_not_true_false_or_none_is_a_clear_error(training_reference):
    hparams, params, _ = training_reference("tiny")
    inputs, targets = batch(hparams, 2, 8)
    for fn in (loss, loss_and_grads):
        with pytest.raises(GPT2Error, match="in_parts_of_batch must be True, False or None .*got 'parts'"):
            fn(inputs, targets, params, hparams["n_head"], in_parts_of_batch="parts")


def test_gelu_and_its_gradient_are_as_accurate_as_pytorchs_own_in_float32():
    # from far left (where exp(-2u) would overflow) to far right, against Hugging Face's gelu_new in float64
    import warnings

    from transformers.activations import NewGELUActivation

    from backward import gelu_backward, gelu_forward

    x = np.linspace(-30, 30, 100_001, dtype=np.float32)

    def hugging_face(dtype):  # -> gelu_new(x), its gradient
        tx = torch.tensor(x, dtype=dtype, requires_grad=True)
        y = NewGELUActivation()(tx)
        y.backward(torch.ones_like(tx))
        return y.detach().double().numpy(), tx.grad.double().numpy()

    (exact, exact_grad), (theirs, their_grad) = hugging_face(torch.float64), hugging_face(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow
        y, exp_2u = gelu_forward(x)
        grad = gelu_backward(np.ones_like(x), x, exp_2u)
    assert y.dtype == grad.dtype == np.float32
    assert np.abs(y - exact).max() <= 2 * np.abs(theirs - exact).max() <= 2e-6
    assert np.abs(grad - exact_grad).max() <= 2 * np.abs(their_grad - exact_grad).max() <= 2e-6
