"""optim.py against PyTorch: torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and torch's learning-rate schedulers."""
import numpy as np
import pytest
import torch

from backward import loss_and_grads
from errors import GPT2Error
from conftest import hf_gpt2, torch_adamw
from optim import CHUNK, adamw_init, adamw_step, clip_grad_norm, learning_rate_at
from params import hf_name, leaves, tree_map

SCHEDULE = dict(learning_rate=1e-3, warmup_iters=3, lr_decay_iters=7, min_lr=1e-4)  # ten steps see all three phases


def torch_schedule(optimizer, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    # nanoGPT's schedule out of torch's own parts: a linear warmup from lr / (warmup + 1), a cosine down to min_lr,
    # then min_lr for good
    schedulers = torch.optim.lr_scheduler
    return schedulers.SequentialLR(optimizer, [
        schedulers.LinearLR(optimizer, 1 / (warmup_iters + 1), warmup_iters / (warmup_iters + 1), warmup_iters - 1),
        schedulers.CosineAnnealingLR(optimizer, lr_decay_iters - warmup_iters, min_lr),
        schedulers.ConstantLR(optimizer, min_lr / learning_rate, total_iters=10**9),
    ], milestones=[warmup_iters, lr_decay_iters])


def test_learning_rate_at_equals_torchs_warmup_cosine_floor_schedule():
    settings = dict(learning_rate=6e-4, warmup_iters=10, lr_decay_iters=50, min_lr=6e-5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings["learning_rate"])
    scheduler = torch_schedule(optimizer, **settings)
    for step in range(70):
        assert learning_rate_at(step, **settings) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        optimizer.step()
        scheduler.step()
    assert learning_rate_at(10, **settings) == 6e-4 and learning_rate_at(50, **settings) == 6e-5


def test_ten_adamw_steps_with_clipping_warmup_and_decay_equal_torch(training_reference):
    hparams, initial, _ = training_reference("byte")
    n_head, weight_decay = hparams["n_head"], 1.0  # decay this strong moves weights by 1e-4 per step
    max_norm = 1.5  # the gradient norms of these batches go from 1.7 down to 1.35: some steps are clipped, some not
    params = tree_map(lambda a: np.array(a, np.float32, order="C"), initial)
    state = adamw_init(params)
    model = hf_gpt2(hparams, initial).train()  # its own copy; dropout is 0
    named = list(model.named_parameters())
    optimizer = torch_adamw(named, weight_decay, SCHEDULE["learning_rate"])
    scheduler = torch_schedule(optimizer, **SCHEDULE)
    rng = np.random.default_rng(0)
    clipped = 0
    for step in range(10):
        inputs, targets = rng.integers(0, hparams["n_vocab"], (2, 2, hparams["n_ctx"]))

        model.zero_grad()
        labels = torch.tensor(targets)
        expected_loss = model(input_ids=torch.tensor(inputs), labels=labels, shift_labels=labels).loss
        expected_loss.backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        optimizer.step()

        ours_loss, grads = loss_and_grads(inputs, targets, params, n_head)
        norm = clip_grad_norm(grads, max_norm)
        learning_rate = learning_rate_at(step, **SCHEDULE)
        assert learning_rate == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        adamw_step(params, grads, state, learning_rate, weight_decay=weight_decay)
        scheduler.step()

        assert abs(ours_loss - expected_loss.item()) <= 1e-5 * expected_loss.item(), step
        assert norm == pytest.approx(expected_norm, rel=1e-5), step
        clipped += norm > max_norm
    assert state["step"] == 10 and 0 < clipped < 10  # clipping was exercised, and so were unclipped steps
    theirs = {name.removeprefix("transformer."): p.detach().numpy() for name, p in named}
    moved = 0.0
    for (path, p), (_, p0) in zip(leaves(params), leaves(initial)):
        assert p.dtype == np.float32 and np.abs(p - theirs[hf_name(path)]).max() <= 1e-5, path
        moved = max(moved, np.abs(p - p0).max())
    assert moved > 1e-3  # the steps moved the weights far more than the tolerance


def test_adamw_step_equals_torch_across_chunk_edges():
    # tensors longer than one chunk of the in-place update, of lengths no chunk divides, one decayed (2-D)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(333, 777)).astype(np.float32),
              "b": rng.normal(size=2 * CHUNK + 5).astype(np.float32)}
    assert all(a.size > CHUNK and a.size % CHUNK for a in params.values())
    theirs = {name: torch.nn.Parameter(torch.tensor(a)) for name, a in params.items()}
    optimizer = torch_adamw(list(theirs.items()), weight_decay=0.1, lr=1e-2)
    state = adamw_init(params)
    for step in range(3):
        grads = {name: rng.normal(size=a.shape).astype(np.float32) * 1e-3 for name, a in params.items()}
        for name, p in theirs.items():
            p.grad = torch.tensor(grads[name])
        optimizer.step()
        adamw_step(params, grads, state, 1e-2, weight_decay=0.1)
    for name, p in theirs.items():
        assert np.abs(params[name] - p.detach().numpy()).max() <= 1e-6, name
        assert np.abs(state["m"][name] - optimizer.state[p]["exp_avg"].numpy()).max() <= 1e-9, name
        assert np.abs(state["v"][name] - optimizer.state[p]["exp_avg_sq"].numpy()).max() <= 1e-12, name


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0])
def test_clip_grad_norm_equals_torch(max_norm):
    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(40, 30)).astype(np.float32), "b": [rng.normal(size=70).astype(np.float32)]}
    theirs = [torch.nn.Parameter(torch.zeros(g.shape)) for _, g in leaves(grads)]
    for p, (_, g) in zip(theirs, leaves(grads)):
        p.grad = torch.tensor(g)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm else float("inf")).item()
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(expected, rel=1e-6) and norm > 0.5
    for p, (_, g) in zip(theirs, leaves(grads)):
        assert np.abs(g - p.grad.numpy()).max() <= 1e-7


def test_adamw_step_refuses_params_it_cannot_update_in_place():
    frozen = np.zeros((3, 4), np.float32)
    frozen.flags.writeable = False
    for params in ({"w": frozen}, {"w": np.zeros((4, 3), np.float32).T}):
        grads = tree_map(np.ones_like, params)
        with pytest.raises(GPT2Error, match="np.array"):
            adamw_step(params, grads, adamw_init(params), 1e-3)
