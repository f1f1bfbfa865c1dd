"""Finding, downloading and reading a GPT-2 model folder into the params dict that gpt2.py runs.

A folder holds either OpenAI's release (hparams.json and a TensorFlow checkpoint) or Hugging Face's
(config.json and model.safetensors); both are checked against their hyperparameters and give the same dict,
whose arrays are views of the fast-layout copy that the first load writes beside the checkpoint.
"""
import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import fire
import numpy as np
import requests
from tqdm import tqdm

from checkpoint import GPT2Error, load_safetensors, load_tf_checkpoint, safetensors_metadata, save_safetensors
from encoder import load_encoder
from params import hf_name, layout, leaves, openai_name, paths, tree_map

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")

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

DOWNLOAD_TIMEOUT = (10, 60)  # seconds to connect, and to wait for each piece of the body
RETRY_DELAYS = (0.5, 1.0)  # seconds before the second and third try: enough for a blip, quick to give up
CHUNK_BYTES = 1 << 20


def load_encoder_hparams_and_params(model_size="124M", models_dir="models", model_dir=None):
    """(encoder, hparams, params) of the folder model_dir, or of models_dir/model_size, downloaded if incomplete."""
    if model_dir is None:
        if model_size not in MODEL_SIZES:
            raise GPT2Error(f"unknown model size {model_size!r}: choose one of {', '.join(MODEL_SIZES)}")
        model_dir = Path(models_dir) / model_size
        if not all((model_dir / name).is_file() for name in OPENAI_FILES):
            download_gpt2_files(model_size, model_dir)
        return load_openai_folder(model_dir)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GPT2Error(f"model folder {model_dir} does not exist: give the folder that holds the model's files")
    layout = choose_layout(model_dir, {path.name for path in model_dir.iterdir() if path.is_file()})
    return load_openai_folder(model_dir) if layout == OPENAI_LAYOUT else load_hf_folder(model_dir)


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


def load_openai_folder(model_dir):
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
    return encoder, hparams, in_fast_layout(model_dir, params, stamp, dict(verified, checkpoint=stamp))


def load_hf_folder(model_dir):
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
    except (OSError, ValueError):
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


def download_gpt2_files(model_size, model_dir, base_url=None):
    """Download those of OpenAI's files for model_size that model_dir lacks, from {base_url}/{model_size}/."""
    base_url = (base_url or os.environ.get("GPT2_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    model_dir = Path(model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".download.lock", "w") as lock:
            # Held for the whole download, so a second process waits instead of writing the same .part files;
            # afterwards it finds the files in place and fetches nothing.
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name in OPENAI_FILES:
                if (model_dir / name).is_file():
                    continue
                url = f"{base_url}/{model_size}/{name}"
                try:
                    fetch(url, model_dir / name)
                except DownloadError as e:
                    raise GPT2Error(
                        f"cannot download {url}: {e}; check the network (or GPT2_BASE_URL) and run again to resume, "
                        f"or put {', '.join(OPENAI_FILES)} in {model_dir} by hand"
                    ) from None
    except OSError as e:
        raise GPT2Error(f"cannot write the model into {model_dir}: {e}") from None


class DownloadError(Exception):
    """Why a download attempt failed; transient failures (a dropped connection, a 5xx) are worth retrying."""

    def __init__(self, reason, transient):
        super().__init__(reason)
        self.transient = transient


def fetch(url, path):
    """Download url to path, retrying transient failures; each retry resumes from what path.part holds."""
    for delay in (*RETRY_DELAYS, None):
        try:
            fetch_once(url, path)
            return
        except DownloadError as e:
            if not e.transient or delay is None:
                raise
            time.sleep(delay)


def fetch_once(url, path):
    """One attempt: append the rest of the file to path.part, then move it to path if it is complete."""
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    try:
        response = http_get(url, start)
        if response.status_code == 416:  # the .part is at least as long as the file: rather than trust it, start over
            response.close()
            start = 0
            response = http_get(url, start)
        with response:
            offset, total = body_range(response, start)
            bar = tqdm(total=total, initial=offset, desc=path.name, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr)
            with open(part, "ab" if offset else "wb") as f, bar:
                for chunk in response.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename below declares the file complete
                size = f.tell()
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        raise DownloadError(f"the connection failed ({e})", transient=True) from None
    except requests.RequestException as e:
        raise DownloadError(str(e), transient=False) from None
    if total is not None and size != total:
        raise DownloadError(f"the server sent {size} of {total} bytes", transient=True)
    os.replace(part, path)


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
    """Run main as a command line (python-fire): a GPT2Error ends it with its one line on stderr and status 1,
    Ctrl-C quietly with the status shells give an interrupted program (130)."""
    try:
        # fire reads a lone "-" as its command separator; name another one, so that "-" can mean standard input
        fire.Fire(main, command=sys.argv[1:] + ["--", "--separator=\x1f"])
    except GPT2Error as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
