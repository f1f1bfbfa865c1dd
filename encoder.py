"""GPT-2's byte-level BPE tokenizer: text to OpenAI's token ids and back.

Text is cut into pre-tokens by a regex, each pre-token's UTF-8 bytes are spelled as printable
characters, and neighbouring symbols are merged in the order the merges were learned (vocab.bpe).
"""
import json
import math
import operator
import os

import regex

# Contractions, runs of letters, of digits, of other symbols (each taking one leading space), then
# whitespace. "\s+(?!\S)" leaves the last space of a run to start the next word, so " world" stays
# one token whatever precedes it.
PRETOKEN_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# How many pre-tokens' ids an Encoder remembers: far more than a language's common words, and bounded, so
# that encoding a text of any size (prepare.py streams gigabytes) keeps its memory bounded.
CACHE_SIZE = 1 << 17


def bytes_to_unicode() -> dict[int, str]:
    """Each of the 256 byte values -> a printable character that stands for it in encoder.json and vocab.bpe.

    Printable bytes stand for themselves; whitespace and control bytes are moved past U+00FF, because
    vocab.bpe separates its tokens with spaces and newlines and so cannot hold them literally.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """symbols with every occurrence of pair joined into one symbol, scanning left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i] == pair[0] and i + 1 < len(symbols) and symbols[i + 1] == pair[1]:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE tokens of one pre-token (already spelled in byte characters).

    Each round merges the adjacent pair learned earliest, as training did. Merging all its occurrences
    in one round is safe: a merge only creates pairs of later rank, none of which could have gone first.
    """
    symbols = list(word)
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        symbols = merge_pair(symbols, pair)
    return symbols


class Encoder:
    """One vocabulary (token string <-> id), its merge ranks, and a cache of the BPE of each pre-token seen."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {i: token for token, i in encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        # Text repeats its words, so most pre-tokens are looked up here instead of merged again.
        self.cache: dict[str, tuple[int, ...]] = {}
        # Checked now so that a vocab.json and merges.txt from different tokenizers fail on load,
        # not with a KeyError halfway through some later text.
        missing = [t for t in [*self.byte_encoder.values(), *(a + b for a, b in merges)] if t not in encoder]
        if missing:
            raise ValueError(
                f"{len(missing)} tokens made by the byte table or the merges are not in the vocabulary, e.g. {missing[0]!r}"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of text, equal to tiktoken's gpt2 encode_ordinary.

        "<|endoftext|>" in text is ordinary text here, as in OpenAI's original encoder: the special
        token (id 50256) only gets in by its id, never from a user's string.
        """
        return [i for pretoken in PRETOKEN_PATTERN.findall(text) for i in self._encode_pretoken(pretoken)]

    def _encode_pretoken(self, pretoken: str) -> tuple[int, ...]:
        if pretoken not in self.cache:
            if len(self.cache) >= CACHE_SIZE:
                self.cache.clear()
            word = "".join(self.byte_encoder[b] for b in pretoken.encode("utf-8"))
            self.cache[pretoken] = tuple(self.encoder[token] for token in bpe(word, self.bpe_ranks))
        return self.cache[pretoken]

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of ids; a single token may hold only part of a UTF-8 character."""
        return bytes(self.byte_decoder[char] for token_id in ids for char in self._token(token_id))

    def decode(self, ids) -> str:
        """The text of ids; bytes that are not valid UTF-8 become U+FFFD, as OpenAI's decoder does."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _token(self, token_id) -> str:
        try:
            # operator.index accepts ints and NumPy integers but not 3.0, which would find token 3.
            return self.decoder[operator.index(token_id)]
        except (TypeError, KeyError):
            raise ValueError(f"token id {token_id!r} is not in the vocabulary of {len(self.decoder)} tokens") from None


def byte_level_encoder() -> Encoder:
    """The tokenizer for training from scratch: one token per byte and no merges, then <|endoftext|> (257 ids).

    The 256 byte tokens are GPT-2's own first 256 vocabulary entries, numbered as GPT-2 numbers them, and
    <|endoftext|> comes last as in GPT-2: any text in any language encodes, and a model trained with it is
    saved (vocab.json, an empty merges.txt) and loaded by the same code as GPT-2.
    """
    vocabulary = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    return Encoder(vocabulary | {"<|endoftext|>": len(vocabulary)}, [])


def read_merges(vocab_bpe_path) -> list[tuple[str, str]]:
    """The merges of vocab.bpe (or Hugging Face's identical merges.txt), in rank order."""
    with open(vocab_bpe_path, encoding="utf-8") as f:
        # split("\n"), not splitlines(): the latter would also split at characters such as U+0085.
        lines = f.read().split("\n")
    if lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    bad = next((m for m in merges if len(m) != 2 or not all(m)), None)
    if bad is not None:
        raise ValueError(f"{vocab_bpe_path}: a merge must be two tokens separated by one space, got {' '.join(bad)!r}")
    return merges


def read_vocab(encoder_json_path) -> dict[str, int]:
    """The token -> id mapping of encoder.json (Hugging Face: vocab.json)."""
    with open(encoder_json_path, encoding="utf-8") as f:
        try:
            encoder = json.load(f)
        except RecursionError:  # brackets nested deeper than Python recurses: no vocabulary looks like that
            raise ValueError(f"{encoder_json_path}: its JSON is nested too deeply") from None
    if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
        raise ValueError(f"{encoder_json_path}: expected a JSON object of token -> integer id")
    return encoder


def load_encoder(encoder_json_path, vocab_bpe_path) -> Encoder:
    """The Encoder of an encoder.json and a vocab.bpe (Hugging Face: vocab.json and merges.txt)."""
    return Encoder(read_vocab(encoder_json_path), read_merges(vocab_bpe_path))


def get_encoder(model_size: str, models_dir) -> Encoder:
    """The Encoder stored with a downloaded model, as in picoGPT: models_dir/model_size/{encoder.json,vocab.bpe}."""
    model_dir = os.path.join(models_dir, model_size)
    return load_encoder(os.path.join(model_dir, "encoder.json"), os.path.join(model_dir, "vocab.bpe"))
