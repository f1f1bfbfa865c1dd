"""Data: a text file becomes a file of token ids (uint16) in one streaming pass, whatever the text's size.

    python prepare.py --data input.txt --out_dir out --init_from 124M    # tokens.bin ahead of training
    python train.py --data input.txt --out_dir out --init_from 124M      # finds it made, and trains

The text is read a piece at a time and encoded in chunks. A chunk is cut only between two characters that
GPT-2's pre-tokenizer can never put into one pre-token, so the ids are exactly those of encoding the whole
text at once. The last 10 % of the ids are held out for validation.
"""
import codecs
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

from encoder import byte_level_encoder
from errors import GPT2Error
from files import discard, disk_space_for, write_text_atomically

READ_BYTES = 1 << 20  # how much of the file is read at a time
VALIDATION_SHARE = 0.1

# The classes that encoder.PRETOKEN_PATTERN tells characters apart by: \s, \p{L}, \p{N} and all the others.
OTHER, WHITESPACE, LETTER, NUMBER = 0, 1, 2, 3
CHAR_CLASS = regex.compile(r"(\s)|(\p{L})|(\p{N})")


def char_class(char):
    match = CHAR_CLASS.match(char)
    return match.lastindex if match else OTHER


def last_safe_cut(text, start=1):
    """The largest i in [start, len(text)) where text[:i] and text[i:] encoded apart give the ids of text, else 0.

    GPT-2's pre-tokens are contractions ('s 't 're 've 'm 'll 'd: an apostrophe, then letters), runs of one class
    (letters, numbers or other symbols) with at most one space in front, and runs of whitespace. So two neighbouring
    characters can share a pre-token only if they are of one class, or the first is whitespace (" word"; and
    "\\s+(?!\\S)" leaves a run's last space to the word after it), or an apostrophe comes before a letter. Between
    any other two a pre-token ends, and the pattern matches alike whether the text stops there or goes on with
    whitespace or a character of another class: text[:i] encodes alone as it does within text.
    """
    for i in range(len(text) - 1, max(start, 1) - 1, -1):
        before, after = char_class(text[i - 1]), char_class(text[i])
        if before not in (WHITESPACE, after) and not (text[i - 1] == "'" and after == LETTER):
            return i
    return 0


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


def read_utf8(source, text_path, read_bytes=READ_BYTES, bar=None, translate_newlines=False):
    """The UTF-8 text of the binary file source, read_bytes at a time -> iterator of pieces of text.

    bar: a progress bar to advance by the bytes of each piece once it has been used. translate_newlines: \\r\\n
    and \\r become \\n, as Python's text files read them.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")()
    if translate_newlines:
        utf8 = io.IncrementalNewlineDecoder(utf8, translate=True)
    n_read = 0
    while piece := read_piece(source, read_bytes, text_path):
        yield decode_utf8(utf8, piece, n_read, text_path)
        n_read += len(piece)
        if bar is not None:
            bar.update(len(piece))
    yield decode_utf8(utf8, b"", n_read, text_path)  # b"": a character left unfinished is an error


def read_piece(source, n_bytes, text_path):  # the next n_bytes (fewer at the end) of source, a binary file
    try:
        return source.read(n_bytes)
    except OSError as e:
        raise GPT2Error(f"cannot read {text_path} ({e.strerror})") from None


def encode_pieces(pieces, encoder, max_uncut=None):
    """The ids of the text that pieces of text make up -> iterator of lists of ids, which joined are exactly
    encoder.encode of the whole text.

    The text is encoded a chunk at a time, cut only where last_safe_cut allows: memory holds a piece plus the
    longest stretch with nowhere to cut (a run of letters, say), never the whole text. max_uncut bounds that
    stretch too, for a text that may never offer a cut (/dev/zero is one endless run of NULs): a stretch longer
    than max_uncut characters is encoded as it stands, and only there may the ids differ from the whole text's.
    """
    pending = ""
    for piece in pieces:
        n_old = len(pending)
        pending += piece
        # a cut can only have appeared where this piece begins or in it: the text before had none
        cut = last_safe_cut(pending, n_old)
        if not cut and max_uncut is not None and len(pending) > max_uncut:
            cut = len(pending)
        yield encoder.encode(pending[:cut])
        pending = pending[cut:]
    yield encoder.encode(pending)


def decode_utf8(utf8, piece, offset, text_path):
    """The text of piece, the bytes of text_path from offset on, through the incremental decoder utf8."""
    n_held = len(utf8.getstate()[0])  # bytes of a character that the previous piece began
    try:
        return utf8.decode(piece, final=not piece)
    except UnicodeDecodeError as e:
        at = offset - n_held + e.start
        raise GPT2Error(f"{text_path} is not valid UTF-8 text ({e.reason} at byte {at}): save it as UTF-8") from None


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
    encoder = byte_level_encoder() if init_from == SCRATCH else load_model(init_from, models_dir)[0]
    with one_run_in(out_dir):
        make_out_dir(out_dir)
        n_tokens = len(prepare(data, encoder, out_dir))
    print(f"{n_tokens:,} tokens of {data} in {out_dir / 'tokens.bin'}: train.py --data {data} --out_dir {out_dir} "
          "uses them", file=sys.stderr)


if __name__ == "__main__":
    from cli import run_cli  # here, not at the top: gpt2.py imports this file, and argparse is no model's

    run_cli(main)
