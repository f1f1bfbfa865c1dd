"""GPT-2's byte-level BPE tokenizer: text to OpenAI's token ids and back.

Text is cut into pre-tokens by a regex, each pre-token's UTF-8 bytes are spelled as printable
characters, and neighbouring symbols are merged in the order the merges were learned (vocab.bpe).
"""
import heapq
import itertools
import json
import operator
import os

import regex

# Contractions, runs of letters, of digits, of other symbols (each taking one leading space), then
# whitespace. "\s+(?!\S)" leaves the last space of a run to start the next word, so " world" stays
# one token whatever precedes it.
PRETOKEN_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# A line of vocab.bpe that is not two tokens separated by one space (empty lines are skipped)
NOT_A_MERGE = regex.compile(r"^(?![^ \n]+ [^ \n]+$).+$", regex.MULTILINE)

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


def bpe(word: str, ranks: dict[str, int]) -> list[str]:
    """The BPE tokens of one pre-token (already spelled in byte characters); ranks: each merge as its line of
    vocab.bpe, the two tokens and a space between (no token holds a space) -> its rank.

    Again and again the adjacent pair learned earliest is merged, the leftmost first, as training did and tiktoken
    does. The pairs wait in a heap, so each merge costs log n: one pre-token of 100,000 letters (a run with
    nowhere to cut) takes 0.2 s, where scanning every pair for each merge took minutes.
    """
    symbols: list[str | None] = list(word)  # each a token so far; None once merged into the symbol on its left
    n = len(symbols)
    after, before = list(range(1, n + 1)), list(range(-1, n - 1))  # the live neighbours' indices (n, -1: none)
    heap = [(rank, i) for i in range(n - 1) if (rank := ranks.get(symbols[i] + " " + symbols[i + 1])) is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = after[i] if symbols[i] is not None else n
        if j == n or ranks.get(symbols[i] + " " + symbols[j]) != rank:
            continue  # a pair that a merge since took apart
        symbols[i], symbols[j] = symbols[i] + symbols[j], None
        after[i] = after[j]
        if after[j] < n:
            before[after[j]] = i
        for left, right in ((before[i], i), (i, after[i])):
            if left >= 0 and right < n and (rank := ranks.get(symbols[left] + " " + symbols[right])) is not None:
                heapq.heappush(heap, (rank, left))
    return [symbol for symbol in symbols if symbol is not None]


class Encoder:
    """One vocabulary (token string <-> id), its merge ranks, and a cache of the BPE of each pre-token seen."""

    def __init__(self, encoder: dict[str, int], merges: list[str]):
        # merges: vocab.bpe's lines in rank order, each two tokens with a space between. Kept as those lines, not
        # split into pairs of strings, GPT-2's ranks take 7 MB instead of 12, and load in half the time
        self.encoder = encoder
        self.decoder = tokens_by_id(encoder)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        # Text repeats its words, so most pre-tokens are looked up here instead of merged again.
        self.cache: dict[str, tuple[int, ...]] = {}
        # Checked now so that a vocab.json and merges.txt from different tokenizers fail on load,
        # not with a KeyError halfway through some later text.
        made = (merge.replace(" ", "") for merge in merges)
        missing = [t for t in itertools.chain(self.byte_encoder.values(), made) if t not in encoder]
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
            # operator.index accepts ints and NumPy integers but not 3.0, which would find token 3; and a
            # negative id would count from the list's end
            if operator.index(token_id) >= 0:
                return self.decoder[token_id]
        except (TypeError, IndexError):
            pass
        raise ValueError(f"token id {token_id!r} is not in the vocabulary of {len(self.decoder)} tokens")


def tokens_by_id(encoder: dict[str, int]) -> list[str]:
    """[the token of id 0, of id 1, ...]: a list, a sixth of the memory a dict from id to token takes. A ValueError
    unless the ids number the tokens from 0, each once, as the rows of the model's embedding do."""
    tokens = [None] * len(encoder)
    try:
        if min(encoder.values(), default=0) >= 0:  # a negative id would count from the list's end
            for token, i in encoder.items():
                tokens[i] = token
    except IndexError:
        pass
    if None in tokens:
        raise ValueError(f"the vocabulary's ids must number its {len(tokens)} tokens from 0 to {len(tokens) - 1}, "
                         "each once")
    return tokens


# The classes that PRETOKEN_PATTERN tells characters apart by: \s, \p{L}, \p{N} and all the others.
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


def byte_level_encoder() -> Encoder:
    """The tokenizer for training from scratch: one token per byte and no merges, then <|endoftext|> (257 ids).

    The 256 byte tokens are GPT-2's own first 256 vocabulary entries, numbered as GPT-2 numbers them, and
    <|endoftext|> comes last as in GPT-2: any text in any language encodes, and a model trained with it is
    saved (vocab.json, an empty merges.txt) and loaded by the same code as GPT-2.
    """
    vocabulary = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    return Encoder(vocabulary | {"<|endoftext|>": len(vocabulary)}, [])


def read_merges(vocab_bpe_path) -> list[str]:
    """The merges of vocab.bpe (or Hugging Face's identical merges.txt), in rank order: its lines, each two tokens
    with a space between."""
    with open(vocab_bpe_path, encoding="utf-8") as f:
        text = f.read()
    # split("\n"), not splitlines(): the latter would also split at characters such as U+0085.
    lines = text.split("\n")
    first = 1 if lines[0].startswith("#version") else 0
    bad = NOT_A_MERGE.search(text, len(lines[0]) + 1 if first else 0)
    if bad is not None:
        raise ValueError(f"{vocab_bpe_path}: a merge must be two tokens separated by one space, got {bad[0]!r}")
    return [line for line in lines[first:] if line]


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
