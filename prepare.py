"""Data: a text file becomes a file of token ids (uint16) in one streaming pass, whatever the text's size.

    python prepare.py --data input.txt --out_dir out --init_from 124M    # tokens.bin ahead of training
    python train.py --data input.txt --out_dir out --init_from 124M      # finds it made, and trains

The text is read a piece at a time and encoded in chunks. A chunk is cut only between two characters that
GPT-2's pre-tokenizer can never put into one pre-token, so the ids are exactly those of encoding the whole
text at once. The last 10 % of the ids are held out for validation.
"""
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from encoder import byte_level_encoder, encode_pieces
from errors import GPT2Error
from files import discard, disk_space_for, read_utf8, write_text_atomically

READ_BYTES = 1 << 20  # how much of the file is read at a time
VALIDATION_SHARE = 0.1

def encode_file(text_path, encoder, tokens_path, read_bytes=READ_BYTES):
    """Encode the UTF-8 text of text_path into tokens_path as uint16 ids; returns how many.

    Memory holds read_bytes of text plus the longest stretch with nowhere to cut (a run of letters, say), never
    the whole file. tokens_path appears complete or not at all.
    """
    text_path, tokens_path = Path(text_path), Path(tokens_path)
    if len(encoder.encoder) > 1 << 16:
        raise GPT2Error(f"the vocabulary has {len(encoder.encoder)} tokens: token files hold ids below 65536")
    try:
        size = text_path.stat().st_size
    except OSError as e:
        raise GPT2Error(f"cannot read {text_path} ({e.strerror}): give the path of a text file") from None
    if size == 0:
        raise GPT2Error(f"{text_path} is empty: give a text to train on")
    temporary = tokens_path.with_name(f"{tokens_path.name}.part")  # a fixed name: a killed run's is overwritten
    try:
        # at most 2 bytes (one uint16) per byte of text, which the byte-level tokenizer takes exactly
        with disk_space_for(tokens_path, 2 * size, up_to=True):
            try:
                with open(text_path, "rb") as source, open(temporary, "wb") as sink:
                    n_tokens = encode_stream(source, sink, encoder, size, read_bytes, text_path)
                os.replace(temporary, tokens_path)
            finally:
                discard(temporary)
    except OSError as e:
        raise GPT2Error(f"cannot encode {text_path} into {tokens_path} ({e.strerror})") from None
    return n_tokens


def encode_stream(source, sink, encoder, size, read_bytes, text_path):
    """Encode the UTF-8 text of the open file source (size bytes, read from text_path) into sink as uint16 ids,
    read_bytes at a time, with a progress bar; returns how many."""
    n_tokens = 0
    # disable=None: a bar on a terminal only
    with tqdm(total=size, desc=f"encoding {text_path.name}", unit="B", unit_scale=True, file=sys.stderr,
              disable=None) as bar:
        for ids in encode_pieces(read_utf8(source, text_path, read_bytes, bar), encoder):
            ids = np.array(ids, dtype=np.uint16)
            sink.write(ids.data)  # not ids.tofile: its OSError on a full disk has no errno to tell it by
            n_tokens += len(ids)
    return n_tokens


def tokenizer_digest(encoder):
    """A fingerprint of the tokenizer's vocabulary and merges: token files made by another are not reused."""
    # each merge as its pair of tokens: the fingerprint token files made before the merges were kept as lines have
    merges = [merge.split(" ") for merge in encoder.bpe_ranks]
    return hashlib.sha256(json.dumps([encoder.encoder, merges]).encode()).hexdigest()


def prepare(text_path, encoder, out_dir):
    """The ids of text_path's text as a read-only uint16 array, from out_dir/tokens.bin when that was made from
    the same file (same size and time) with the same tokenizer, else encoded into it first.

    out_dir/tokens.json describes tokens.bin and is written after it: it is the commit point, so a run
    killed while encoding leaves no tokens.json (or the previous one, which no longer matches) and is redone.
    """
    text_path, out_dir = Path(text_path), Path(out_dir)
    tokens_path, stamp_path = out_dir / "tokens.bin", out_dir / "tokens.json"
    try:
        stat = text_path.stat()
    except OSError as e:
        raise GPT2Error(f"cannot read {text_path} ({e.strerror}): give the path of a text file") from None
    stamp = {"text": str(text_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "tokenizer": tokenizer_digest(encoder)}
    try:
        reusable = json.loads(stamp_path.read_text()) == stamp | {"n_tokens": tokens_path.stat().st_size // 2}
    except (OSError, ValueError):
        reusable = False
    if reusable:
        return np.memmap(tokens_path, dtype=np.uint16, mode="r")
    stamp_path.unlink(missing_ok=True)
    n_tokens = encode_file(text_path, encoder, tokens_path)
    write_text_atomically(stamp_path, json.dumps(stamp | {"n_tokens": n_tokens}))
    return np.memmap(tokens_path, dtype=np.uint16, mode="r")


def split(tokens):  # [n] -> ([n_train], [n_val]): the last 10 % is validation
    n_train = len(tokens) - int(len(tokens) * VALIDATION_SHARE)
    return tokens[:n_train], tokens[n_train:]


def main(data: str, out_dir="out", init_from="scratch", models_dir="models"):
    """Tokenize a text file into out_dir/tokens.bin ahead of training, exactly as train.py would: a run of train.py
    with the same data, out_dir and init_from finds it made.

    Args:
        data: the UTF-8 text file to tokenize.
        out_dir: the folder of the training run, where tokens.bin and tokens.json go.
        init_from: the model the run will start from, whose tokenizer is used: scratch (byte-level); 124M, 355M, 774M
            or 1558M (downloaded into models_dir if missing, as train.py would); or a model folder.
        models_dir: where GPT-2's sizes are kept, as in train.py.
    """
    from train import SCRATCH, check_init_from, check_text_file, load_model  # here: train.py imports this file
    from train_state import make_out_dir, one_run_in

    data, out_dir = Path(data), Path(out_dir)
    check_text_file(data)
    check_init_from(init_from)
    with one_run_in(out_dir):
        make_out_dir(out_dir)  # before loading: a folder it cannot write in is refused before anything is downloaded
        encoder = byte_level_encoder() if init_from == SCRATCH else load_model(init_from, models_dir)[0]
        n_tokens = len(prepare(data, encoder, out_dir))
    flags = ["--data", str(data), "--out_dir", str(out_dir)]
    for name, value, default in (("init_from", init_from, SCRATCH), ("models_dir", models_dir, "models")):
        flags += [f"--{name}", str(value)] if value != default else []
    print(f"{n_tokens:,} tokens of {data} in {out_dir / 'tokens.bin'}: {shlex.join(['python', 'train.py', *flags])} "
          "uses them", file=sys.stderr)


if __name__ == "__main__":
    from cli import run_cli  # here, not at the top: gpt2.py imports this file, and argparse is no model's

    run_cli(main)
