"""train_pico.py, the one-file trainer: its loss and every gradient against PyTorch autograd and backward.py, and a
short run from scratch that learns; and plot.py, which draws a run's log."""
import re

import numpy as np
import pytest
import torch

import backward
import plot
import train
import train_pico
from conftest import (GRAD_ATOL, GRADIENT_CASES as CASES, LOSS_RTOL, OFFLINE, TINY_RUN, assert_clean_error, batch,
                      hf_gpt2, run_script, torch_adamw, torch_loss_and_grads)
from params import hf_name, layout, leaves, paths, tree_map

# the model flags train_pico.py shares with train.py, for a model that trains in well under a second
TINY_MODEL = {name: TINY_RUN[name] for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}


def assert_loss_and_grads_equal(loss, grads, expected_loss, expected, hparams):  # expected: {path: gradient}
    assert isinstance(loss, float) and abs(loss - expected_loss) <= LOSS_RTOL * expected_loss
    assert tree_map(np.shape, grads) == layout(hparams)
    for path, grad in leaves(grads):
        assert grad.dtype == np.float32, path
        assert np.abs(grad - expected[path]).max() <= GRAD_ATOL, path


def case_with_batch(case, training_reference):  # -> hparams, params, the reference model, inputs, targets
    name, n_batch, n_seq, n_ids = CASES[case]
    hparams, params, model = training_reference(name)
    return hparams, params, model, *batch(hparams, n_batch, n_seq, n_ids)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_equal_pytorch_autograd(case, training_reference):
    hparams, params, model, inputs, targets = case_with_batch(case, training_reference)
    expected_loss, by_hf_name = torch_loss_and_grads(model, inputs, targets)
    loss, grads = train_pico.loss_and_grads(inputs, targets, params, hparams["n_head"])
    expected = {path: by_hf_name[hf_name(path)] for path, _ in leaves(grads)}
    assert_loss_and_grads_equal(loss, grads, expected_loss, expected, hparams)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_grads_equal_backward_py(case, training_reference):
    hparams, params, _, inputs, targets = case_with_batch(case, training_reference)
    expected_loss, expected = backward.loss_and_grads(inputs, targets, params, hparams["n_head"])
    loss, grads = train_pico.loss_and_grads(inputs, targets, params, hparams["n_head"])
    assert_loss_and_grads_equal(loss, grads, expected_loss, dict(leaves(expected)), hparams)


def test_adamw_steps_on_a_cosine_schedule_equal_torch_from_the_same_gradients(training_reference):
    # the same gradients, torch's: Adam moves a weight by about learning_rate * g / (|g| + eps), so where a gradient
    # is near eps, ours and torch's, equal within 1.3e-9, move it up to 2.6e-5 apart (seen on an AMD EPYC at 1e-8);
    # the gradients themselves are held against torch's by the tests above
    hparams, initial, _ = training_reference("byte")
    weight_decay = 1.0  # strong enough to show: it moves weights by 1e-3 of their size per step
    params = tree_map(np.copy, initial)
    m, v = ([np.zeros_like(p) for p in train_pico.leaves(params)] for _ in range(2))
    model = hf_gpt2(hparams, initial).train()  # its own copy; dropout is 0
    named = list(model.named_parameters())
    optimizer = torch_adamw(named, weight_decay, lr=1e-3)
    for group in optimizer.param_groups:
        group["betas"] = (0.9, 0.99)  # train_pico's, nanoGPT's for the baby GPT
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5, eta_min=1e-4)
    rng = np.random.default_rng(0)
    for step in range(5):
        inputs, targets = rng.integers(0, hparams["n_vocab"], (2, 2, hparams["n_ctx"]))
        model.zero_grad()
        labels = torch.tensor(targets)
        model(input_ids=torch.tensor(inputs), labels=labels, shift_labels=labels).loss.backward()
        by_hf_name = {name.removeprefix("transformer."): p.grad.numpy().copy() for name, p in named}
        grads = tree_map(lambda path: by_hf_name[hf_name(path)], paths(params))
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        train_pico.adamw(params, grads, m, v, step + 1, learning_rate, weight_decay=weight_decay)
    theirs = {name.removeprefix("transformer."): p.detach().numpy() for name, p in named}
    for (path, p), (_, p0) in zip(leaves(params), leaves(initial)):
        assert np.abs(p - theirs[hf_name(path)]).max() <= GRAD_ATOL, path
        assert np.abs(p - p0).max() > 100 * GRAD_ATOL, path  # every tensor moved, far beyond the tolerance


def test_a_short_run_from_scratch_lowers_the_validation_loss(training_text):
    model_flags = (a for name, value in TINY_MODEL.items() for a in (f"--{name}", value))
    result = run_script("train_pico.py", "--data", training_text, "--max_iters", 40, "--eval_interval", 20,
                        "--learning_rate", 0.01, *model_flags)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    evaluations = [re.fullmatch(r"step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})", line)
                   for line in lines[:3]]
    assert all(evaluations), result.stdout
    assert [int(m[1]) for m in evaluations] == [0, 20, 40]
    val_losses = [float(m[3]) for m in evaluations]
    assert val_losses[0] > val_losses[1] > val_losses[2]
    assert lines[3] == "" and "".join(lines[4:]).strip()  # the sample, from a newline


def test_without_data_train_pico_asks_for_it():
    assert_clean_error(run_script("train_pico.py", "--max_iters", 1), "--data")


@pytest.mark.parametrize("args, words", [
    (["--data", "{absent}"], ["absent.txt", "is not a file", "--data"]),
    (["--data", "{binary}"], ["binary.txt", "not valid UTF-8"]),
    (["--data", "{text}", "--eval_interval", 0], ["--eval_interval", "got 0"]),
    (["--data", "{text}", "--n_embd", 130], ["--n_embd", "a multiple of --n_head (4)"]),
    (["--data", "{text}", "--learning_rate", -1], ["--learning_rate", "> 0"]),
    (["--data", "{text}", "--block_size", 100_000], ["training part has", "fewer than --block_size + 1"]),
])
def test_train_pico_checks_its_flags_and_text_as_train_py_does(args, words, training_text, tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"caf\xe9\n" * 100)
    paths = {"{absent}": tmp_path / "absent.txt", "{binary}": tmp_path / "binary.txt", "{text}": training_text}
    assert_clean_error(run_script("train_pico.py", *(paths.get(a, a) if isinstance(a, str) else a for a in args)),
                       *words)


@pytest.fixture(scope="module")
def train_log(tmp_path_factory, training_text):
    """The log.jsonl of a TINY_RUN of train.py."""
    out_dir = tmp_path_factory.mktemp("plotted") / "out"
    train.main(data=str(training_text), out_dir=str(out_dir), **TINY_RUN)
    return out_dir / "log.jsonl"


def test_plot_draws_a_train_py_log_as_a_png(train_log):
    import matplotlib.image

    result = run_script("plot.py", train_log)
    assert result.returncode == 0, result.stderr
    png = train_log.with_name("loss.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (450, 800) and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, train_log):
    (tmp_path / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    without_matplotlib = OFFLINE | {"PYTHONPATH": str(tmp_path)}  # its matplotlib.py is found first, and fails
    result = run_script("plot.py", train_log, "--out", tmp_path / "loss.png", env=without_matplotlib)
    assert_clean_error(result, "pip install matplotlib")
    assert not (tmp_path / "loss.png").exists()


def test_plot_draws_the_lines_a_run_writes_and_skips_the_rest(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes('{"step": 0, "train_loss": 5.5, "val_loss": 5.6}\n{"loss": 1.0}\n{"step": 1, "val_loss": 2.0}\n'
                    '{"step": 1, "loss": {"a": 1}}\n{"step": 1, "loss": "x"}\n'
                    '{"step": 1, "loss": 4.0, "sample": "a\u2028b"}\n'.encode() + b"[" * 100_000
                    + b'\n{"step": 2, "loss": 3.5, "sample": "\xe2\x80')  # a line cut inside a character
    steps, evaluations = plot.read_log(log)
    assert [e["step"] for e in steps] == [1] and [e["step"] for e in evaluations] == [0]
    # $ is text in a title, not the start of a formula; a name without a type is a .png, and said so
    result = run_script("plot.py", log, "--title", "cost $5, $\\foo$", "--out", tmp_path / "loss")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"wrote {tmp_path / 'loss.png'}\n"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_plot_of_a_file_that_is_not_a_log_is_a_clean_error(tmp_path):
    assert_clean_error(run_script("plot.py", tmp_path / "missing.jsonl"), "missing.jsonl", "log.jsonl")
    (tmp_path / "log.jsonl").write_text('{"step": 0}\nnot json\n')
    assert_clean_error(run_script("plot.py", tmp_path / "log.jsonl"), "holds no losses")
