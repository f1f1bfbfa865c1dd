"""Turning a GPT-2 model folder into the params dict that gpt2.py runs, and a params dict into a model folder.

A folder holds either OpenAI's release (hparams.json and a TensorFlow checkpoint) or Hugging Face's
(config.json and model.safetensors); both are checked against their hyperparameters and give the same dict,
whose arrays are the checkpoint's, or views of the fast-layout copy beside it (fast_layout.py) on a machine where
that layout is the faster (machine.py). A size of OpenAI's (124M, ...) that is not on disk yet is downloaded first (download.py).
"""
import contextlib
import json
import re
from pathlib import Path

import numpy as np

from checkpoint import damaged_tensor, load_safetensors, load_tf_checkpoint, save_safetensors
from encoder import load_encoder
from errors import GPT2Error
from fast_layout import in_fast_layout
from files import files_stamp, write_text_atomically
from machine import TRANSPOSED, choices
from params import HF_HPARAMS, OPENAI_HPARAMS, checked_hparams, hf_name, layout, leaves, openai_name, paths, tree_map

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
# each size's hparams.json (n_layer, n_embd, n_head; all read 50257 tokens and 1024 positions): what a size needs
# is known before it is downloaded
SIZE_HPARAMS = {size: dict(n_vocab=50257, n_ctx=1024, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
                for size, (n_layer, n_embd, n_head) in zip(MODEL_SIZES, [(12, 768, 12), (24, 1024, 16),
                                                                       (36, 1280, 20), (48, 1600, 25)])}
DEFAULT_MODEL_SIZE = "124M"

# The files each layout needs for loading (OpenAI's checkpoint and model.ckpt.meta serve only TensorFlow).
OPENAI_LAYOUT = "OpenAI's"
HF_LAYOUT = "Hugging Face's"
LAYOUTS = {
    OPENAI_LAYOUT: ("hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index", "model.ckpt.data-00000-of-00001"),
    HF_LAYOUT: ("config.json", "vocab.json", "merges.txt", "model.safetensors"),
}

# config.json's settings of the arithmetic, with the values that are GPT-2's (and Hugging Face's GPT2Config defaults,
# so a key left out means the same); a folder that sets another is refused, not run as if it were GPT-2. The first
# value is the one save_hf_folder writes; gelu_pytorch_tanh is gelu_new's formula in another implementation
GPT2_ARITHMETIC = {"model_type": ("gpt2",), "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                   "layer_norm_epsilon": (1e-5,), "tie_word_embeddings": (True,), "scale_attn_weights": (True,),
                   "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,)}

# Tensors a Hugging Face file may hold that the model doesn't need: lm_head is a copy of wte (tied), and
# attn.bias/masked_bias are constant causal-mask buffers.
HF_UNUSED = re.compile(r"lm_head\.weight|h\.\d+\.attn\.(masked_)?bias")

# Records which files already passed their CRC check (the checkpoint, the fast-layout file, a training run's
# optimizer state), so that only the first load pays for it.
VERIFIED_MARKER = ".verified"
DAMAGED_MODEL_FIX = "restore it from a copy, or save the model again (train it again, for one that train.py saved)"

# train.py's checkpoint whose save was cut short after its commit point: its files wait here to be moved into place
SAVED = ".saved"


def load_encoder_hparams_and_params(model_size=None, models_dir="models", model_dir=None, fast_layout=None):
    """(encoder, hparams, params) of the folder model_dir, or of models_dir/model_size (default 124M), downloaded if
    incomplete, and repaired if a file in it fails the check a download gets. fast_layout: whether params are views
    of the fast-layout copy (written on the first load that wants it) or the checkpoint's own arrays; None lets this
    machine's measurement decide (machine.py). False suits a caller that copies every weight anyway (training)."""
    check_model_choice(model_size, model_dir)
    if fast_layout is None:
        fast_layout = choices()["layout"] == TRANSPOSED
    if model_dir is None:
        model_size = model_size or DEFAULT_MODEL_SIZE
        model_dir = Path(models_dir) / model_size
        # a size kept in Hugging Face's layout (converted, say) loads as the folder it is, with nothing downloaded
        # beside it
        if not all((model_dir / name).is_file() for name in LAYOUTS[HF_LAYOUT]):
            return load_openai_size(model_size, model_dir, fast_layout)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "is not a folder" if model_dir.exists() else "does not exist"
        raise GPT2Error(f"model_dir {model_dir} {what}: give the folder that holds the model's files",
                        arguments=("model_dir",))
    layout = choose_layout(model_dir, {path.name for path in model_dir.iterdir() if path.is_file()})
    return (load_openai_folder if layout == OPENAI_LAYOUT else load_hf_folder)(model_dir, fast_layout)


def check_model_choice(model_size, model_dir):
    """A GPT2Error unless model_size is one of OpenAI's sizes or None, and not given together with model_dir."""
    if model_size is not None and model_dir is not None:
        raise GPT2Error("give model_size or model_dir, not both: model_dir loads that folder, whatever its size",
                        arguments=("model_size", "model_dir"))
    if model_dir is not None and not str(model_dir):  # Path("") would be the current folder
        raise GPT2Error("model_dir must be a folder's path, got ''", arguments=("model_dir",))
    if model_size is not None and model_size not in MODEL_SIZES:
        raise GPT2Error(f"model_size must be one of {', '.join(MODEL_SIZES)}, got {model_size!r}",
                        arguments=("model_size",))


def load_openai_size(model_size, model_dir, fast_layout):  # -> (encoder, hparams, params), downloaded if need be
    # imported only when needed: a folder already on disk loads without paying for requests
    from download import OPENAI_FILES, download_gpt2_files

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


def choose_layout(model_dir, file_names):
    """The layout all of whose files are among file_names, else a GPT2Error saying which files are missing, or
    that both are there."""
    whole = [folder_layout for folder_layout, needed in LAYOUTS.items() if set(needed) <= file_names]
    if len(whole) > 1:  # two models, maybe different ones (train.py saved into the folder it fine-tuned, say)
        raise GPT2Error(f"{model_dir} holds a whole model in {' and in '.join(whole)} layout, and they may differ: "
                        "move one of them to a folder of its own")
    if whole:
        return whole[0]
    if (model_dir / SAVED).is_dir():
        raise GPT2Error(f"{model_dir} holds a checkpoint whose save train.py did not finish (its files wait in "
                        f"{model_dir / SAVED}): finish it by resuming the run, python train.py --resume --out_dir "
                        f"{model_dir} --data TEXT with the run's other flags, then load the folder again")
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
    if fast_layout:
        params, verified = in_fast_layout(model_dir, params, stamp, verified)
    write_verified_marker(model_dir, verified)
    return encoder, hparams, params


def load_hf_folder(model_dir, fast_layout=True):
    """(encoder, hparams, params) of a folder in Hugging Face's layout, renamed to OpenAI's tensor names; the CRC-32s
    a model.safetensors of ours records are checked once per file."""
    config_path = model_dir / "config.json"
    config = read_json_object(config_path)
    hparams = checked_hparams(config, config_path, HF_HPARAMS)
    for key, values in GPT2_ARITHMETIC.items():
        if config.get(key, values[0]) not in values:
            raise GPT2Error(f"{config_path} sets {key} to {config[key]!r}, where GPT-2 has {values[0]!r}: this program "
                            "computes GPT-2's arithmetic only; load the model with a library that implements it")
    encoder = read_tokenizer(model_dir / "vocab.json", model_dir / "merges.txt", hparams, config_path)
    weights_path = model_dir / "model.safetensors"
    tensors = {}
    for name, array in load_safetensors(str(weights_path)).items():
        name = name.removeprefix("transformer.")
        if not HF_UNUSED.fullmatch(name):
            tensors[name] = array
    params = params_from_tensors(tensors, hparams, hf_name, weights_path, config_path)
    verified = checked_once(weights_path, read_verified_marker(model_dir), "checkpoint", DAMAGED_MODEL_FIX)
    if fast_layout:
        params, verified = in_fast_layout(model_dir, params, verified["checkpoint"], verified)
    write_verified_marker(model_dir, verified)
    return encoder, hparams, params


def checked_once(path, verified, key, fix, arguments=()):
    """verified (the .verified marker's contents) with path's stamp under key, once every tensor of the
    .safetensors file at path passes the CRC-32 it records (a file that records none, as Hugging Face's, has
    nothing to check); skipped when verified already vouches for this very file. A tensor that fails is a GPT2Error
    that names the file and says fix, which names arguments."""
    stamp = files_stamp([path])
    if verified.get(key) != stamp:
        damaged = damaged_tensor(path)
        if damaged is not None:
            raise GPT2Error(f"{path} is damaged: tensor {damaged!r} fails its CRC-32 check, so it is not the file "
                            f"that was saved: {fix}", arguments=arguments)
    return dict(verified, **{key: stamp})


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
    if hparams["n_layer"] > len(tensors):  # each layer has tensors: a config of 10**8 layers is refused before its
        # layout is built, which would take minutes and gigabytes
        raise GPT2Error(f"{checkpoint_path} holds {len(tensors)} tensors, fewer than the {hparams['n_layer']} layers "
                        f"{hparams_path.name} gives: the checkpoint and {hparams_path.name} come from different "
                        "models; use files released together")
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


def checkpoint_stamp(prefix):  # changes whenever a checkpoint file is rewritten or replaced
    return files_stamp([Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001")])


def read_verified_marker(model_dir):  # -> {"checkpoint": stamp, "fast_layout": stamp}, the files whose CRCs passed
    try:
        verified = json.loads((model_dir / VERIFIED_MARKER).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return verified if isinstance(verified, dict) else {}


def write_verified_marker(model_dir, verified):
    # A read-only model folder still loads; it is just verified again on every load.
    if verified != read_verified_marker(model_dir):
        with contextlib.suppress(OSError, GPT2Error):  # GPT2Error: a full disk
            write_text_atomically(model_dir / VERIFIED_MARKER, json.dumps(verified))


def save_hf_folder(model_dir, hparams, params, encoder):
    """Write a model folder in Hugging Face's layout (config.json, vocab.json, merges.txt, model.safetensors),
    which this loader and transformers' GPT2LMHeadModel.from_pretrained both read; each file atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["GPT2LMHeadModel"]} | {key: values[0] for key, values in GPT2_ARITHMETIC.items()}
    config |= {theirs: hparams[ours] for ours, theirs in HF_HPARAMS.items()}
    if "<|endoftext|>" in encoder.encoder:
        config["bos_token_id"] = config["eos_token_id"] = encoder.encoder["<|endoftext|>"]
    write_text_atomically(model_dir / "config.json", json.dumps(config, indent=2) + "\n")
    write_text_atomically(model_dir / "vocab.json", json.dumps(encoder.encoder, ensure_ascii=False))
    merges = "".join(f"{merge}\n" for merge in encoder.bpe_ranks)
    write_text_atomically(model_dir / "merges.txt", "#version: 0.2\n" + merges)
    # "format": transformers 4 refuses a file whose metadata lacks it, as the CRCs' would otherwise
    save_safetensors(model_dir / "model.safetensors", {hf_name(path): array for path, array in leaves(params)},
                     metadata={"format": "pt"}, crc32=True)
