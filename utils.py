"""Finding, downloading and reading a GPT-2 model folder into the params dict that gpt2.py runs.

A folder holds either OpenAI's release (hparams.json and a TensorFlow checkpoint) or Hugging Face's
(config.json and model.safetensors); both are checked against their hyperparameters and give the same dict.
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

from checkpoint import GPT2Error, load_safetensors, load_tf_checkpoint
from encoder import load_encoder

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

# Hugging Face's tensor names -> OpenAI's ("{i}" stands for the block number). None marks tensors the
# model doesn't need: lm_head is a copy of wte, and attn.bias/masked_bias are constant causal-mask buffers.
HF_TO_OPENAI = {
    "wte.weight": "model/wte",
    "wpe.weight": "model/wpe",
    "ln_f.weight": "model/ln_f/g",
    "ln_f.bias": "model/ln_f/b",
    "h.{i}.ln_1.weight": "model/h{i}/ln_1/g",
    "h.{i}.ln_1.bias": "model/h{i}/ln_1/b",
    "h.{i}.attn.c_attn.weight": "model/h{i}/attn/c_attn/w",
    "h.{i}.attn.c_attn.bias": "model/h{i}/attn/c_attn/b",
    "h.{i}.attn.c_proj.weight": "model/h{i}/attn/c_proj/w",
    "h.{i}.attn.c_proj.bias": "model/h{i}/attn/c_proj/b",
    "h.{i}.ln_2.weight": "model/h{i}/ln_2/g",
    "h.{i}.ln_2.bias": "model/h{i}/ln_2/b",
    "h.{i}.mlp.c_fc.weight": "model/h{i}/mlp/c_fc/w",
    "h.{i}.mlp.c_fc.bias": "model/h{i}/mlp/c_fc/b",
    "h.{i}.mlp.c_proj.weight": "model/h{i}/mlp/c_proj/w",
    "h.{i}.mlp.c_proj.bias": "model/h{i}/mlp/c_proj/b",
    "lm_head.weight": None,
    "h.{i}.attn.bias": None,
    "h.{i}.attn.masked_bias": None,
}

# Records which checkpoint bytes already passed the CRC32C check, so that only the first load pays for it.
VERIFIED_MARKER = ".verified"

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
    for layout, needed in LAYOUTS.items():
        if set(needed) <= file_names:
            return layout
    layout, needed = max(LAYOUTS.items(), key=lambda item: len(file_names & set(item[1])))
    if file_names & set(needed):
        missing = [name for name in needed if name not in file_names]
        raise GPT2Error(f"{model_dir} holds part of {layout} layout of a GPT-2 model but lacks {', '.join(missing)}: "
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
    verified = read_verified_marker(model_dir) == stamp
    tensors = load_tf_checkpoint(str(prefix), verify_crc=not verified)
    if not verified:
        write_verified_marker(model_dir, stamp)
    check_tensors(tensors, expected_shapes(hparams, conv_axes=(1,)), f"{prefix}.index", hparams_path)
    # OpenAI stored conv weights as [1, nx, nf]; indexing [0] gives a view, not a copy.
    tensors = {name: array[0] if name.endswith("/w") else array for name, array in tensors.items()}
    return encoder, hparams, nested_params(tensors, hparams["n_layer"])


def load_hf_folder(model_dir):
    """(encoder, hparams, params) of a folder in Hugging Face's layout, renamed to OpenAI's tensor names."""
    config_path = model_dir / "config.json"
    hparams = checked_hparams(read_json_object(config_path), config_path, HF_HPARAMS)
    encoder = read_tokenizer(model_dir / "vocab.json", model_dir / "merges.txt", hparams, config_path)
    renames = hf_to_openai_names(hparams["n_layer"])
    tensors = {}
    for hf_name, array in load_safetensors(str(model_dir / "model.safetensors")).items():
        name = renames.get(hf_name.removeprefix("transformer."), hf_name)  # an unknown name stays, to be reported
        if name is not None:
            tensors[name] = array
    hf_names = {name: hf_name for hf_name, name in renames.items() if name is not None}
    shapes = expected_shapes(hparams, conv_axes=())
    check_tensors(tensors, shapes, model_dir / "model.safetensors", config_path, hf_names)
    return encoder, hparams, nested_params(tensors, hparams["n_layer"])


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


def hf_to_openai_names(n_layer):
    """Hugging Face's name -> OpenAI's (None: not needed) for each tensor an n_layer model's file may hold."""
    names = {}
    for hf_name, name in HF_TO_OPENAI.items():
        for i in range(n_layer) if "{i}" in hf_name else [0]:
            names[hf_name.format(i=i)] = None if name is None else name.format(i=i)
    return names


def expected_shapes(hparams, conv_axes):
    """OpenAI's name -> shape of every tensor hparams imply; conv_axes lead each conv weight's shape."""
    n_vocab, n_ctx, n_embd = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"]
    block = {
        "ln_1/g": (n_embd,),
        "ln_1/b": (n_embd,),
        "attn/c_attn/w": (*conv_axes, n_embd, 3 * n_embd),
        "attn/c_attn/b": (3 * n_embd,),
        "attn/c_proj/w": (*conv_axes, n_embd, n_embd),
        "attn/c_proj/b": (n_embd,),
        "ln_2/g": (n_embd,),
        "ln_2/b": (n_embd,),
        "mlp/c_fc/w": (*conv_axes, n_embd, 4 * n_embd),
        "mlp/c_fc/b": (4 * n_embd,),
        "mlp/c_proj/w": (*conv_axes, 4 * n_embd, n_embd),
        "mlp/c_proj/b": (n_embd,),
    }
    shapes = {"model/wte": (n_vocab, n_embd), "model/wpe": (n_ctx, n_embd)}
    for i in range(hparams["n_layer"]):
        shapes.update({f"model/h{i}/{name}": shape for name, shape in block.items()})
    return shapes | {"model/ln_f/g": (n_embd,), "model/ln_f/b": (n_embd,)}


def check_tensors(tensors, shapes, checkpoint_path, hparams_path, file_names=None):
    """A GPT2Error unless tensors are exactly the float32 tensors of shapes; file_names: the checkpoint's own names."""
    shown = (file_names or {}).get
    hparams_name = hparams_path.name
    fix = f"the checkpoint and {hparams_name} come from different models; use files released together"
    missing = [shown(name, name) for name in shapes if name not in tensors]
    if missing:
        raise GPT2Error(
            f"{checkpoint_path} lacks {len(missing)} tensors that {hparams_name} implies, e.g. {missing[0]}: {fix}"
        )
    extra = [shown(name, name) for name in tensors if name not in shapes]
    if extra:
        raise GPT2Error(
            f"{checkpoint_path} has {len(extra)} tensors that {hparams_name} doesn't imply, e.g. {extra[0]}: {fix}"
        )
    for name, shape in shapes.items():
        array = tensors[name]
        if array.shape != shape:
            raise GPT2Error(
                f"{checkpoint_path}: tensor {shown(name, name)} has shape {list(array.shape)}, "
                f"but {hparams_name} implies {list(shape)}: {fix}"
            )
        if array.dtype != np.float32:
            raise GPT2Error(
                f"{checkpoint_path}: tensor {shown(name, name)} is {array.dtype}, not float32: "
                "convert the checkpoint to float32"
            )


def nested_params(tensors, n_layer):
    """OpenAI's flat names ("model/h3/attn/c_attn/w") -> the nested params dict, blocks as a list."""
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name, array in tensors.items():
        keys = name.removeprefix("model/").split("/")
        node = params
        if re.fullmatch(r"h\d+", keys[0]):
            node, keys = params["blocks"][int(keys[0][1:])], keys[1:]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = array
    return params


def checkpoint_stamp(prefix):
    """Name, size, inode and mtime of each checkpoint file: changes whenever a file is rewritten or replaced."""
    stamp = []
    for path in (Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001")):
        stat = path.stat()
        stamp.append([path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns])
    return stamp


def read_verified_marker(model_dir):
    try:
        return json.loads((model_dir / VERIFIED_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_verified_marker(model_dir, stamp):
    temporary = model_dir / f"{VERIFIED_MARKER}.{os.getpid()}"
    # A read-only model folder still loads; it is just verified again on every load.
    with contextlib.suppress(OSError):
        temporary.write_text(json.dumps(stamp))
        os.replace(temporary, model_dir / VERIFIED_MARKER)  # atomic: a concurrent load never reads half a marker


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
