"""Finding, downloading and reading a GPT-2 model folder into the params dict that gpt2.py runs.

A folder holds either OpenAI's release (hparams.json and a TensorFlow checkpoint) or Hugging Face's
(config.json and model.safetensors); both are checked against their hyperparameters and give the same dict,
whose arrays are views of the fast-layout copy that the first load writes beside the checkpoint.
"""
import argparse
import contextlib
import ctypes
import difflib
import fcntl
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import types
import typing
import warnings
from pathlib import Path

import numpy as np
import requests
import urllib3
from tqdm import tqdm

from checkpoint import (GPT2Error, GPT2Warning, check_protobuf, load_safetensors, load_tf_checkpoint, parse_tf_index,
                        read_tf_index, safetensors_metadata, save_safetensors)
from encoder import load_encoder, read_merges, read_vocab
from params import hf_name, layout, leaves, openai_name, paths, tree_map

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
DEFAULT_MODEL_SIZE = "124M"
OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
DATA_FILE = "model.ckpt.data-00000-of-00001"

# The files each layout needs for loading (OpenAI's checkpoint and model.ckpt.meta serve only TensorFlow).
OPENAI_LAYOUT = "OpenAI's"
HF_LAYOUT = "Hugging Face's"
LAYOUTS = {
    OPENAI_LAYOUT: ("hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index", "model.ckpt.data-00000-of-00001"),
    HF_LAYOUT: ("config.json", "vocab.json", "merges.txt", "model.safetensors"),
}

# Our name for each hyperparameter -> its key in hparams.json, and in Hugging Face's config.json.
OPENAI_HPARAMS = {"n_vocab": "n_vocab", "n_ctx": "n_ctx", "n_embd": "n_embd", "n_head": "n_head", "n_layer": "n_layer"}
HF_HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd", "n_head": "n_head",
              "n_layer": "n_layer"}

# Tensors a Hugging Face file may hold that the model doesn't need: lm_head is a copy of wte (tied), and
# attn.bias/masked_bias are constant causal-mask buffers.
HF_UNUSED = re.compile(r"lm_head\.weight|h\.\d+\.attn\.(masked_)?bias")

# Records which files already passed their CRC32C check (the checkpoint, the fast-layout file), so that only
# the first load pays for it.
VERIFIED_MARKER = ".verified"

# A copy of the checkpoint beside it, written on the first load, with every linear layer's weight stored
# transposed: [n_out, n_in], so that a decode step, which multiplies one row by each weight, reads each along
# its rows, the order OpenBLAS reads fastest (README.md, Loading, has the measurements).
FAST_LAYOUT_FILE = "fast-layout.safetensors"

# Seconds to connect, and without a byte before a connection counts as stalled. With the retries below, a mirror
# that stops answering is given up within a minute: 3 x (5 + 12) + 1.5 s.
DOWNLOAD_TIMEOUT = (5, 12)
RETRY_DELAYS = (0.5, 1.0)  # seconds before the second and third try: enough for a blip, quick to give up
CHUNK_BYTES = 1 << 20


def load_encoder_hparams_and_params(model_size=None, models_dir="models", model_dir=None, fast_layout=True):
    """(encoder, hparams, params) of the folder model_dir, or of models_dir/model_size (default 124M), downloaded if
    incomplete, and repaired if a file in it fails the check a download gets. fast_layout=False hands out the
    checkpoint's own arrays and writes no fast-layout copy: for a caller that copies every weight anyway (training)."""
    check_model_choice(model_size, model_dir)
    if model_dir is None:
        model_size = model_size or DEFAULT_MODEL_SIZE
        model_dir = Path(models_dir) / model_size
        if not all((model_dir / name).is_file() for name in OPENAI_FILES):
            download_gpt2_files(model_size, model_dir)
        try:
            return load_openai_folder(model_dir, fast_layout)
        except GPT2Error:
            # An earlier version kept what a mirror sent unchecked (a login page saved as hparams.json): download
            # again the files that fail their check, if any is the cause
            if not download_gpt2_files(model_size, model_dir, recheck=True):
                raise
            return load_openai_folder(model_dir, fast_layout)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GPT2Error(f"model folder {model_dir} does not exist: give the folder that holds the model's files")
    layout = choose_layout(model_dir, {path.name for path in model_dir.iterdir() if path.is_file()})
    return (load_openai_folder if layout == OPENAI_LAYOUT else load_hf_folder)(model_dir, fast_layout)


def check_model_choice(model_size, model_dir):
    """A GPT2Error unless model_size is one of OpenAI's sizes or None, and not given together with model_dir."""
    if model_size is not None and model_dir is not None:
        raise GPT2Error("give model_size or model_dir, not both: model_dir loads that folder, whatever its size",
                        arguments=("model_size", "model_dir"))
    if model_size is not None and model_size not in MODEL_SIZES:
        raise GPT2Error(f"model_size must be one of {', '.join(MODEL_SIZES)}, got {model_size!r}",
                        arguments=("model_size",))


def choose_layout(model_dir, file_names):
    """The layout all of whose files are among file_names, else a GPT2Error saying which files are missing."""
    for folder_layout, needed in LAYOUTS.items():
        if set(needed) <= file_names:
            return folder_layout
    folder_layout, needed = max(LAYOUTS.items(), key=lambda item: len(file_names & set(item[1])))
    if file_names & set(needed):
        missing = [name for name in needed if name not in file_names]
        raise GPT2Error(f"{model_dir} holds part of {folder_layout} layout of a GPT-2 model but lacks {', '.join(missing)}: "
                        "add them")
    raise GPT2Error(
        f"{model_dir} holds no GPT-2 model: expected OpenAI's files ({', '.join(LAYOUTS[OPENAI_LAYOUT])}) "
        f"or Hugging Face's ({', '.join(LAYOUTS[HF_LAYOUT])})"
    )


def load_openai_folder(model_dir, fast_layout=True):
    """(encoder, hparams, params) of a folder in OpenAI's layout; the CRCs are checked once per checkpoint."""
    hparams_path = model_dir / "hparams.json"
    hparams = checked_hparams(read_json_object(hparams_path), hparams_path, OPENAI_HPARAMS)
    encoder = read_tokenizer(model_dir / "encoder.json", model_dir / "vocab.bpe", hparams, hparams_path)
    prefix = model_dir / "model.ckpt"
    stamp = checkpoint_stamp(prefix)
    verified = read_verified_marker(model_dir)
    tensors = load_tf_checkpoint(str(prefix), verify_crc=verified.get("checkpoint") != stamp)
    # OpenAI stored conv weights as [1, n_in, n_out]; indexing [0] gives a view, not a copy.
    params = params_from_tensors(tensors, hparams, openai_name, f"{prefix}.index", hparams_path, conv_axis=True)
    params = tree_map(lambda w: w[0] if w.ndim == 3 else w, params)
    verified = dict(verified, checkpoint=stamp)
    if not fast_layout:
        write_verified_marker(model_dir, verified)
        return encoder, hparams, params
    return encoder, hparams, in_fast_layout(model_dir, params, stamp, verified)


def load_hf_folder(model_dir, fast_layout=True):
    """(encoder, hparams, params) of a folder in Hugging Face's layout, renamed to OpenAI's tensor names."""
    config_path = model_dir / "config.json"
    hparams = checked_hparams(read_json_object(config_path), config_path, HF_HPARAMS)
    encoder = read_tokenizer(model_dir / "vocab.json", model_dir / "merges.txt", hparams, config_path)
    tensors = {}
    for name, array in load_safetensors(str(model_dir / "model.safetensors")).items():
        name = name.removeprefix("transformer.")
        if not HF_UNUSED.fullmatch(name):
            tensors[name] = array
    params = params_from_tensors(tensors, hparams, hf_name, model_dir / "model.safetensors", config_path)
    if not fast_layout:
        return encoder, hparams, params
    stamp = files_stamp([model_dir / "model.safetensors"])
    return encoder, hparams, in_fast_layout(model_dir, params, stamp, read_verified_marker(model_dir))


def in_fast_layout(model_dir, params, stamp, verified):
    """params as views of model_dir's fast-layout file, a copy of the checkpoint whose files have the given stamp.

    The file is written from params when it is missing, damaged or made from other checkpoint files; if it cannot
    be written (a read-only folder, a full disk), params are returned as they are. verified: the marker's
    contents, with the checkpoint's entry if its CRCs just passed; the fast-layout file's are added to it.
    """
    fast_file = model_dir / FAST_LAYOUT_FILE
    wanted = {openai_name(path): weights_transposed(path, array) for path, array in leaves(params)}
    source = json.dumps(stamp)
    stored = fast_layout_tensors(fast_file, wanted, source, verified)
    if stored is None:
        try:
            save_safetensors(fast_file, wanted, metadata={"checkpoint": source}, crc32=True)
        except OSError:
            write_verified_marker(model_dir, verified)
            return params
        stored = load_safetensors(fast_file)
    write_verified_marker(model_dir, dict(verified, fast_layout=files_stamp([fast_file])))
    # each weight back as [n_in, n_out], the transpose of the stored [n_out, n_in]: a view, not a copy
    return tree_map(lambda path: weights_transposed(path, stored[openai_name(path)]), paths(params))


def weights_transposed(path, array):  # a tensor as the fast layout stores it, or a stored one as params hold it
    return array.T if path[-1] == "w" else array


def fast_layout_tensors(fast_file, wanted, source, verified):
    """The tensors of the fast-layout file if it holds wanted's names and shapes, was made from the checkpoint
    stamped source and passes its CRC-32 check (unless verified says it passed before); else None."""
    try:
        if safetensors_metadata(fast_file).get("checkpoint") != source:
            return None
        stored = load_safetensors(fast_file, verify_crc=verified.get("fast_layout") != files_stamp([fast_file]))
    except (GPT2Error, OSError):
        return None
    if stored.keys() != wanted.keys() or any(stored[name].shape != array.shape for name, array in wanted.items()):
        return None
    return stored


def read_json_object(path):
    """The JSON object in the file at path; any other content is a GPT2Error."""
    fix = f"replace it with the {path.name} released with the model"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GPT2Error(f"{path} is missing: put the {path.name} released with the model there") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GPT2Error(f"cannot read {path} ({e}): {fix}") from None
    if not text.strip():
        raise GPT2Error(f"{path} is empty: {fix}")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise GPT2Error(f"{path} is not valid JSON ({e}): {fix}") from None
    except RecursionError:  # brackets nested deeper than Python recurses: no hyperparameters look like that
        raise GPT2Error(f"{path} is not valid JSON (it is nested too deeply): {fix}") from None
    if not isinstance(value, dict):
        raise GPT2Error(f"{path} holds a JSON {type(value).__name__}, not an object of hyperparameters: {fix}")
    return value


def checked_hparams(config, path, keys):
    """Our five hyperparameters out of config (keys: our name -> the file's key), each a positive int."""
    fix = f"replace {path.name} with the one released with the model"
    hparams = {}
    for ours, theirs in keys.items():
        if theirs not in config:
            raise GPT2Error(f"{path} has no {theirs!r}: {fix}")
        value = config[theirs]
        if type(value) is not int or value <= 0:  # type(), because True is an int too
            raise GPT2Error(f"{path}: {theirs!r} must be a positive whole number, not {value!r}: {fix}")
        hparams[ours] = value
    if hparams["n_embd"] % hparams["n_head"]:
        raise GPT2Error(
            f"{path}: {keys['n_embd']!r} ({hparams['n_embd']}) must be divisible by {keys['n_head']!r} "
            f"({hparams['n_head']}), since each head takes an equal share: {fix}"
        )
    return hparams


def read_tokenizer(vocab_path, merges_path, hparams, hparams_path):
    """The Encoder of vocab_path and merges_path, checked to have the vocabulary size hparams say."""
    try:
        encoder = load_encoder(str(vocab_path), str(merges_path))
    except (OSError, ValueError) as e:
        raise GPT2Error(
            f"cannot read the tokenizer in {vocab_path} and {merges_path} ({e}): "
            "replace them with the files released with the model"
        ) from None
    if len(encoder.encoder) != hparams["n_vocab"]:
        raise GPT2Error(
            f"{hparams_path} gives a vocabulary of {hparams['n_vocab']} tokens but {vocab_path} has "
            f"{len(encoder.encoder)}: they come from different models; use the files released together"
        )
    return encoder


def params_from_tensors(tensors, hparams, file_name, checkpoint_path, hparams_path, conv_axis=False):
    """The params tree of tensors (the checkpoint's name -> array; file_name(path) gives that name), checked to
    hold exactly the float32 tensors hparams imply; conv_axis: each weight has a leading axis of size 1."""
    shapes = layout(hparams)
    expected = {}
    for path, shape in leaves(shapes):
        # OpenAI saved each linear layer's weight as a 1x1 convolution's, with a leading axis of size 1
        expected[file_name(path)] = (1, *shape) if conv_axis and path[-1] == "w" else shape
    check_tensors(tensors, expected, checkpoint_path, hparams_path)
    return tree_map(lambda path: tensors[file_name(path)], paths(shapes))


def check_tensors(tensors, shapes, checkpoint_path, hparams_path):
    """A GPT2Error unless tensors are exactly the float32 tensors of shapes (both keyed by the checkpoint's names)."""
    hparams_name = hparams_path.name
    fix = f"the checkpoint and {hparams_name} come from different models; use files released together"
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise GPT2Error(
            f"{checkpoint_path} lacks {len(missing)} tensors that {hparams_name} implies, e.g. {missing[0]}: {fix}"
        )
    extra = [name for name in tensors if name not in shapes]
    if extra:
        raise GPT2Error(
            f"{checkpoint_path} has {len(extra)} tensors that {hparams_name} doesn't imply, e.g. {extra[0]}: {fix}"
        )
    for name, shape in shapes.items():
        array = tensors[name]
        if array.shape != shape:
            raise GPT2Error(
                f"{checkpoint_path}: tensor {name} has shape {list(array.shape)}, "
                f"but {hparams_name} implies {list(shape)}: {fix}"
            )
        if array.dtype != np.float32:
            raise GPT2Error(
                f"{checkpoint_path}: tensor {name} is {array.dtype}, not float32: convert the checkpoint to float32"
            )


def checkpoint_stamp(prefix):
    """Name, size, inode and mtime of each checkpoint file: changes whenever a file is rewritten or replaced."""
    return files_stamp([Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001")])


def files_stamp(file_paths):
    stamp = []
    for path in file_paths:
        stat = path.stat()
        stamp.append([path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns])
    return stamp


def read_verified_marker(model_dir):  # -> {"checkpoint": stamp, "fast_layout": stamp}, the files whose CRCs passed
    try:
        verified = json.loads((model_dir / VERIFIED_MARKER).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return verified if isinstance(verified, dict) else {}


def write_verified_marker(model_dir, verified):
    # A read-only model folder still loads; it is just verified again on every load.
    if verified != read_verified_marker(model_dir):
        with contextlib.suppress(OSError):
            write_text_atomically(model_dir / VERIFIED_MARKER, json.dumps(verified))


def write_text_atomically(path, text):
    """Write text to path by way of a temporary name: a concurrent reader never sees half a file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def save_hf_folder(model_dir, hparams, params, encoder):
    """Write a model folder in Hugging Face's layout (config.json, vocab.json, merges.txt, model.safetensors),
    which this loader and transformers' GPT2LMHeadModel.from_pretrained both read; each file atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
    config |= {theirs: hparams[ours] for ours, theirs in HF_HPARAMS.items()}
    if "<|endoftext|>" in encoder.encoder:
        config["bos_token_id"] = config["eos_token_id"] = encoder.encoder["<|endoftext|>"]
    write_text_atomically(model_dir / "config.json", json.dumps(config, indent=2) + "\n")
    write_text_atomically(model_dir / "vocab.json", json.dumps(encoder.encoder, ensure_ascii=False))
    merges = "".join(f"{first} {second}\n" for first, second in encoder.bpe_ranks)
    write_text_atomically(model_dir / "merges.txt", "#version: 0.2\n" + merges)
    save_safetensors(model_dir / "model.safetensors", {hf_name(path): array for path, array in leaves(params)})


def download_gpt2_files(model_size, model_dir, base_url=None, recheck=False):
    """Download those of OpenAI's files for model_size that model_dir lacks, from {base_url}/{model_size}/, each checked
    before it takes its name; recheck: also download again each file already there that fails that check.
    -> the names downloaded."""
    base_url = (base_url or os.environ.get("GPT2_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    model_dir = Path(model_dir)
    downloaded = []
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        # Held for the whole download, so a second process waits instead of writing the same .part files;
        # afterwards it finds the files in place and fetches nothing.
        with locked(model_dir):
            # the data file last: it is checked against the index, and a mirror that sends the wrong thing is
            # caught on the small files before the large one
            for name in sorted(OPENAI_FILES, key=lambda name: name == DATA_FILE):
                path, damage = model_dir / name, None
                if path.is_file():
                    damage = recheck and download_problem(name, path, model_dir)
                    if not damage:
                        continue
                    path.unlink()
                url = f"{base_url}/{model_size}/{name}"
                try:
                    fetch(url, path, lambda part: download_problem(name, part, model_dir))
                except DownloadError as e:
                    raise GPT2Error(
                        (f"{path} was not GPT-2's {name} ({damage}), and " if damage else "") +
                        f"cannot download {url}: {e}; check the network and the mirror (GPT2_BASE_URL), then run "
                        f"again to resume, or put {', '.join(OPENAI_FILES)} in {model_dir} by hand"
                    ) from None
                if damage:
                    note(f"{path} was not GPT-2's {name} ({damage}): downloaded it again")
                downloaded.append(name)
    except OSError as e:
        raise GPT2Error(f"cannot write the model into {model_dir}: {e}") from None
    return downloaded


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on the folder itself (flock works on a directory), so no lock file is left behind."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def download_problem(name, path, model_dir):
    """Why the file at path is not OpenAI's file called name, or None. The data file is checked against the index
    in model_dir, which is downloaded before it."""
    try:
        if name == DATA_FILE:
            entries = read_tf_index(model_dir / "model.ckpt").values()
            size, expected = path.stat().st_size, max((entry.offset + entry.size for entry in entries), default=0)
            return None if size == expected else f"it has {size} bytes, the index puts its tensors in {expected}"
        data = path.read_bytes()
        if name == "checkpoint" and not data.startswith(b"model_checkpoint_path:"):
            return "it does not begin with model_checkpoint_path:"
        if name == "hparams.json":
            hparams = json.loads(data)
            if not isinstance(hparams, dict):
                return "it is not a JSON object"
            checked_hparams(hparams, path, OPENAI_HPARAMS)
        elif name == "encoder.json":
            read_vocab(path)
        elif name == "vocab.bpe":
            if not data.startswith(b"#version"):
                return "it does not begin with #version"
            read_merges(path)
        elif name == "model.ckpt.index":
            parse_tf_index(data, path)
        elif name == "model.ckpt.meta":
            check_protobuf(data)
    except RecursionError:
        return "its JSON is nested too deeply"
    except (OSError, ValueError, GPT2Error) as e:
        return str(e)
    return None


def note(message):  # a line on stderr that does not break a progress bar
    tqdm.write(message, file=sys.stderr)


class DownloadError(Exception):
    """Why a download attempt failed; transient failures (a dropped connection, a 5xx) are worth retrying.
    timed_out: the attempt waited for a mirror that did not answer, which the user should see while it happens."""

    def __init__(self, reason, transient, timed_out=False):
        super().__init__(reason)
        self.transient, self.timed_out = transient, timed_out


def fetch(url, path, problem_of):
    """Download url to path, retrying transient failures; each retry resumes from what path.part holds.
    problem_of(the complete .part) says why it is not the file wanted, or None: a file that fails is not kept."""
    for delay in (*RETRY_DELAYS, None):
        try:
            fetch_once(url, path, problem_of)
            return
        except DownloadError as e:
            if not e.transient or delay is None:
                raise
            if e.timed_out:
                note(f"{url}: {e}; trying again")
            time.sleep(delay)


def fetch_once(url, path, problem_of):
    """One attempt: append the rest of the file to path.part, then move it to path if it is complete and checks out."""
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    try:
        response = http_get(url, start)
        if response.status_code == 416 and full_size(response) == start:
            response.close()  # the .part already holds the whole file
            size = total = start
        else:
            if response.status_code == 416:  # the .part is longer than the file: rather than trust it, start over
                response.close()
                start = 0
                response = http_get(url, start)
            size, total = receive(response, part, start)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        reason, timed_out = connection_failure(e)
        raise DownloadError(reason, transient=True, timed_out=timed_out) from None
    except requests.RequestException as e:
        raise DownloadError(str(e), transient=False) from None
    if total is not None and size != total:
        raise DownloadError(f"the server sent {size} of {total} bytes", transient=True)
    problem = problem_of(part)
    if problem:
        part.unlink()
        raise DownloadError(f"what the mirror sent is not GPT-2's {path.name}: {problem}", transient=False)
    os.replace(part, path)


def receive(response, part, start):
    """Write response's body to the file part, after its first start bytes -> (the file's size, the full size the
    server gave, or None)."""
    with response:
        offset, total = body_range(response, start)
        bar = tqdm(total=total, initial=offset, desc=part.name.removesuffix(".part"), unit="B", unit_scale=True,
                   unit_divisor=1024, file=sys.stderr, disable=None)
        with open(part, "ab" if offset else "wb") as f, bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename declares the file complete
            return f.tell(), total


def connection_failure(error):  # -> (what a failed connection means in the user's words, whether it timed out)
    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {DOWNLOAD_TIMEOUT[0]} s", True
    # a stall while reading the body arrives as a ConnectionError around urllib3's ReadTimeoutError
    if isinstance(error, requests.ReadTimeout) or any(isinstance(a, urllib3.exceptions.ReadTimeoutError)
                                                      for a in error.args):
        return f"the connection stalled: no data for {DOWNLOAD_TIMEOUT[1]} s", True
    return f"the connection failed ({error})", False


def full_size(response):  # the file's size from a 416 answer's "Content-Range: bytes */SIZE", or None
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
    return int(match[1]) if match else None


def http_get(url, start):
    # identity: a compressed body would make Content-Length count other bytes than the ones written.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={start}-"} if start else {})
    return requests.get(url, headers=headers, stream=True, timeout=DOWNLOAD_TIMEOUT)


def body_range(response, start):
    """(where the response's body begins in the file, the file's full size or None) for a request from start."""
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", content_range)
        if not match or int(match[1]) != start:
            raise DownloadError(f"asked for bytes from {start}, the server sent Content-Range {content_range!r}",
                                transient=False)
        return start, int(match[2])
    if response.status_code == 200:  # the whole file, also when the server ignored the Range header
        length = response.headers.get("Content-Length")
        return 0, None if length is None else int(length)
    code = response.status_code
    raise DownloadError(f"the server answered {code} {response.reason}", transient=code >= 500)


def run_cli(main):
    """Run main as a command line, with every value exactly as typed (see cli_parser).

    Each mistake ends the run with one line on stderr: a command line that cannot be honoured with status 2, a
    GPT2Error with status 1, speaking of flags (--top_p) where the Python API speaks of arguments (top_p). Each
    warning is one line too. Ctrl-C exits with 130, as shells expect of an interrupted program; a reader that closes
    the output early (| head) ends the run quietly, as if by SIGPIPE.
    """
    parser, positionals = cli_parser(main)
    flags = set(inspect.signature(main).parameters) - set(positionals)
    warnings.showwarning = lambda message, *_: print(f"warning: {speaking_of_flags(message, flags)}", file=sys.stderr)
    warnings.simplefilter("once")  # a warning the early checks gave is not repeated when the work runs the same checks
    np.seterr(all="ignore")  # damaged weights are reported as the NaN they produce, not as numpy's warnings
    try:
        arguments = parse_command_line(parser, sys.argv[1:])
        values = [arguments.pop(name) for name in positionals]
        main(*values, **arguments)
    except GPT2Error as e:
        sys.exit(f"error: {speaking_of_flags(e, flags)}")
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except BrokenPipeError:
        # stdout goes nowhere from now on, so that the flush at exit cannot fail a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


class CommandLineParser(argparse.ArgumentParser):
    """argparse's parser, with one-line errors; flags lists its flags, to suggest one for a mistyped flag."""

    def __init__(self, **options):
        self.flags = []  # before argparse's own __init__, which adds --help
        super().__init__(**options)

    def add_argument(self, *names, **options):
        action = super().add_argument(*names, **options)
        self.flags += action.option_strings
        return action

    def error(self, message):  # one line, instead of argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def cli_parser(main):
    """The parser of main's command line -> (parser, the names of the positional arguments).

    main's positional-only parameters become positional arguments and its other parameters --flags named as the
    parameters are. A flag's value is read as the type of its default, or of its annotation where the default is
    None (top_k: int | None = None); a bool is a switch (--name, or --no_name when it defaults to True); a tuple
    annotation makes a flag that may be given more than once. The help text is the Args: section of main's
    docstring. Abbreviations are refused: --temp is not taken for --temperature.
    """
    summary, helps = docstring_parts(main.__doc__)
    parser = CommandLineParser(description=summary, allow_abbrev=False)
    positionals = []
    for name, parameter in inspect.signature(main).parameters.items():
        default, value_type = parameter.default, cli_value_type(parameter)
        shown = "" if default in (None, "", ()) or isinstance(default, bool) else f" (default: {default})"
        help_text = (helps.get(name, "") + shown).replace("%", "%%")  # argparse %-formats help
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            positionals.append(name)
            parser.add_argument(name, nargs="?", default=default, metavar=name.upper(), help=help_text)
        elif value_type is bool:
            parser.add_argument(f"--no_{name}" if default else f"--{name}", dest=name,
                                action="store_false" if default else "store_true", help=help_text)
        elif typing.get_origin(value_type) is tuple:  # tuple[str, ...]: each use adds one
            item_type = typing.get_args(value_type)[0]
            parser.add_argument(f"--{name}", action="append", default=list(default), type=VALUE_READERS[item_type],
                                metavar=METAVARS[item_type], help=help_text)
        else:
            parser.add_argument(f"--{name}", default=default, type=VALUE_READERS[value_type],
                                metavar=METAVARS[value_type], help=help_text)
    return parser, positionals


def docstring_parts(doc):  # -> (its first paragraph, {argument: the help text its Args: section gives})
    summary, _, rest = inspect.cleandoc(doc or "").partition("\n\n")
    args_section = rest.partition("Args:\n")[2]
    helps = {match[1]: " ".join(match[2].split())
             for match in re.finditer(r"^ {4}(\w+): (.*(?:\n {8,}.*)*)", args_section, re.MULTILINE)}
    return summary, helps


def cli_value_type(parameter):  # the type of a parameter's values: its annotation without None, else its default's
    if parameter.annotation is inspect.Parameter.empty:
        return type(parameter.default)
    if typing.get_origin(parameter.annotation) in (types.UnionType, typing.Union):  # int | None
        return next(a for a in typing.get_args(parameter.annotation) if a is not type(None))
    return parameter.annotation


def whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text):  # a finite float: nan and inf are never a setting
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


VALUE_READERS = {int: whole_number, float: number, str: str}
METAVARS = {int: "INT", float: "NUMBER", str: "TEXT"}


def parse_command_line(parser, argv):  # -> {parameter name: value}, or the parser's one-line error
    for position, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # Python keeps bytes that are not UTF-8 as lone surrogates
            parser.error(f"command-line argument {position} ({os.fsencode(arg)!r}) is not valid UTF-8: give text "
                         "in UTF-8")
    arguments, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(unknown_argument(parser, extras[0]))
    # a flag given more than once arrives as a list: make it the tuple its annotation says
    return {name: tuple(value) if isinstance(value, list) else value for name, value in vars(arguments).items()}


def unknown_argument(parser, extra):  # what to say of the first argument the parser could not place
    if not extra.startswith("-"):
        return f"unexpected argument {extra!r}: quote a text that holds spaces, so that it is one argument"
    typed = extra.partition("=")[0]
    if typed in parser.flags:
        return f"{typed} came after --, which makes every argument after it text: put the flags before --"
    matches = [flag for flag in parser.flags if flag.startswith("--" + typed.lstrip("-"))]
    matches = matches or difflib.get_close_matches(typed, parser.flags, n=2)
    hint = f"did you mean {' or '.join(matches)}?" if matches else "put a text that begins with - after --"
    return f"unknown flag {typed} ({hint})"


def speaking_of_flags(message, flags):  # the text of a GPT2Error or GPT2Warning, each argument it names as its flag
    text = str(message)
    for name in getattr(message, "arguments", ()):
        if name in flags:
            text = re.sub(rf"(?<![\w-]){name}\b", f"--{name}", text)
    return text


def set_blas_threads(n_threads):
    """Make NumPy's OpenBLAS use n_threads threads, though NumPy has loaded it already (OPENBLAS_NUM_THREADS is read
    only then): as threadpoolctl does, by calling the setter OpenBLAS exports, in the library this process loaded."""
    setters = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
               "scipy_openblas_set_num_threads64_")
    found = False
    for path in loaded_libraries("openblas"):
        library = ctypes.CDLL(path)
        for setter in (getattr(library, name) for name in setters if hasattr(library, name)):
            setter(n_threads)
            found = True
    if not found:
        warnings.warn(GPT2Warning("threads has no effect: this NumPy's BLAS is not OpenBLAS; set OMP_NUM_THREADS "
                                  "before starting Python instead", arguments=("threads",)))


def loaded_libraries(name_part):  # paths of the shared libraries this process has mapped whose name holds name_part
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return set()
    paths = (line.split(None, 5)[-1] for line in maps.splitlines())  # the sixth field, where a line has one
    return {path for path in paths if path.startswith("/") and name_part in Path(path).name.lower()}
