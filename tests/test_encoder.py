"""encoder.py against tiktoken's gpt2 encoding, built offline from the same encoder.json and vocab.bpe."""
import json
import random
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoder import Encoder, bytes_to_unicode, get_encoder, load_encoder

N_VOCAB = 50257
ENDOFTEXT_ID = 50256
# The example from the issue, with OpenAI's ids for it.
KNOWN_TEXT, KNOWN_IDS = "Not all heroes wear capes.", [3673, 477, 10281, 5806, 1451, 274, 13]

MIXED_TEXTS = {
    "english": "Not all heroes wear capes. It's what they'll do, we've seen, I'm sure you'd agree: DON'T PANIC!",
    "contractions": "'s 't 're 've 'm 'll 'd 'S 'T 'RE ''s x's y'all rock'n'roll ’s",
    "chinese": "我能吞下玻璃而不伤身体。自然语言处理，简称NLP。",
    "japanese": "私はガラスを食べられます。それは私を傷つけません。カタカナとひらがな、漢字。",
    "korean_arabic_hebrew_hindi": "나는 유리를 먹을 수 있어요. أنا قادر على أكل الزجاج. אני יכול לאכול זכוכית. मैं काँच खा सकता हूँ।",
    "code": "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    else:\n        return {'a': [1, 2, 3]}\n\n\n",
    "emoji": "Family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵🏳️‍🌈, skin tones 👍🏽👋🏿, keycap 1️⃣, hearts ❤️🧡💛 😀😀😀",
    "combining_marks": "cafe\u0301 n\u0303 Z\u0351\u0362a\u0340\u0358l\u0315\u035dg\u0489o\u0321 a\u030a\u0327 \u0915\u094d\u0937",
    "numbers": "3.14159 1,000,000 12345678901234567890 -42 1e-9 0x1F ½ ² Ⅻ ٣٤٥ 2023-11-23T18:02:00Z",
    "whitespace_runs": "a  b   c    d\n\ne\n\n\n   f \t\t g\r\n h \u00a0 i\u3000j      \n\n  ",
    "control_characters": "\x00\x01\x1b[31mred\x1b[0m\x7f\x85\u200b\u200e\ufeff\x0b\x0c end",
    "endoftext_as_text": "first<|endoftext|>second <|endoftext|> third<|endoftext|>",
    "leading_and_trailing_spaces": "   leading and trailing   ",
}


@pytest.fixture(scope="module")
def enc(vocab_dir):
    return load_encoder(vocab_dir / "encoder.json", vocab_dir / "vocab.bpe")


def assert_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, text):
    ids = enc.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert enc.decode(ids) == text


def test_known_sentence_encodes_to_openais_ids(enc, tiktoken_gpt2):
    assert tiktoken_gpt2.encode_ordinary(KNOWN_TEXT) == KNOWN_IDS
    assert enc.encode(KNOWN_TEXT) == KNOWN_IDS
    assert enc.decode(KNOWN_IDS) == KNOWN_TEXT


@pytest.mark.parametrize("text", MIXED_TEXTS.values(), ids=MIXED_TEXTS.keys())
def test_mixed_text_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, text):
    assert_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, text)


@pytest.mark.parametrize("text", MIXED_TEXTS.values(), ids=MIXED_TEXTS.keys())
def test_decode_bytes_of_each_token_concatenate_to_the_utf8_of_the_text(enc, text):
    ids = enc.encode(text)
    assert b"".join(enc.decode_bytes([i]) for i in ids) == text.encode("utf-8")
    assert enc.decode_bytes(ids) == text.encode("utf-8")


# codec="utf-8" leaves out lone surrogates, which are str but have no UTF-8 form.
any_text = st.text(st.characters(codec="utf-8"), max_size=300)
# Few characters, so runs of whitespace, apostrophes and digits meet letters often.
whitespace_heavy_text = st.text(" \t\n\r\x0b\x0c\u00a0\u3000'a1.é", max_size=60)
# Random id lists decoded by the tiktoken_gpt2: words the vocab knows (long merges), split UTF-8
# characters (as U+FFFD) and "<|endoftext|>" as text.
vocab_ids = st.lists(st.integers(0, N_VOCAB - 1), max_size=40)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(any_text, whitespace_heavy_text))
def test_random_text_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, text):
    assert_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, text)


@settings(max_examples=300, deadline=None)
@given(ids=vocab_ids)
def test_text_made_of_vocab_tokens_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, ids):
    assert_encodes_like_tiktoken_and_decodes_back(enc, tiktoken_gpt2, tiktoken_gpt2.decode(ids))


@settings(max_examples=300, deadline=None)
@given(ids=vocab_ids)
def test_any_ids_decode_like_tiktoken_including_partial_characters(enc, tiktoken_gpt2, ids):
    assert enc.decode_bytes(ids) == tiktoken_gpt2.decode_bytes(ids)
    assert enc.decode(ids) == tiktoken_gpt2.decode(ids)


@pytest.mark.parametrize("token_id", [N_VOCAB, -1, -N_VOCAB, 3.0, "3"])
def test_decoding_an_id_outside_the_vocab_raises_value_error(enc, token_id):
    with pytest.raises(ValueError, match=f"token id {token_id!r} is not in the vocabulary of {N_VOCAB} tokens"):
        enc.decode([token_id])


def test_every_vocab_token_maps_to_the_same_bytes_as_tiktoken(enc, tiktoken_gpt2):
    assert len(enc.decoder) == N_VOCAB
    assert {i: enc.decode_bytes([i]) for i in range(N_VOCAB)} == {
        i: tiktoken_gpt2.decode_single_token_bytes(i) for i in range(N_VOCAB)
    }


def test_byte_table_is_a_bijection_onto_printable_non_space_characters(enc):
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in table.values())
    assert {enc.byte_decoder[char]: char for char in table.values()} == table


def test_decode_accepts_numpy_integer_ids_as_sampling_returns_them(enc):
    assert enc.decode(np.array(KNOWN_IDS, dtype=np.int64)) == KNOWN_TEXT
    assert enc.decode_bytes([np.int32(i) for i in KNOWN_IDS]) == KNOWN_TEXT.encode("utf-8")


@pytest.mark.parametrize("bad_id", [-1, N_VOCAB, 10**12, 3.0, "3", None])
def test_decode_of_an_id_outside_the_vocab_raises_value_error_naming_it(enc, bad_id):
    with pytest.raises(ValueError, match=re.escape(f"token id {bad_id!r} ")):
        enc.decode([1, bad_id])


def test_endoftext_in_text_encodes_as_ordinary_text_like_tiktoken(enc, tiktoken_gpt2):
    text = "Hello<|endoftext|>world"
    ids = enc.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ENDOFTEXT_ID not in ids
    assert enc.decode([ENDOFTEXT_ID]) == tiktoken_gpt2.decode([ENDOFTEXT_ID]) == "<|endoftext|>"


def test_a_megabyte_of_varied_text_encodes_like_tiktoken(vocab_dir, tiktoken_gpt2):
    # Random vocab tokens give ~60k distinct pre-tokens: the BPE itself is exercised, not just the cache.
    rng = random.Random(0)
    pieces = [tiktoken_gpt2.decode([i]) for i in rng.choices(range(N_VOCAB), k=170_000)]
    text = "".join(pieces)[:1_000_000]
    fresh = load_encoder(vocab_dir / "encoder.json", vocab_dir / "vocab.bpe")
    assert fresh.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_runs_of_tens_of_thousands_of_letters_with_nowhere_to_cut_encode_like_tiktoken(enc, tiktoken_gpt2):
    # each run is one pre-token, merged thousands of times: the way a run of DNA or of base64 letters is
    rng = np.random.default_rng(0)
    for letters in ("abcdefghijklmnopqrstuvwxyz", "ACGT", "a"):
        text = "".join(rng.choice(list(letters), 30_000))
        assert enc.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_get_encoder_reads_the_model_folder_like_picogpt(vocab_dir, tmp_path):
    shutil.copytree(vocab_dir, tmp_path / "124M")
    assert get_encoder("124M", tmp_path).encode(KNOWN_TEXT) == KNOWN_IDS


def test_load_encoder_reads_hugging_face_vocab_json_and_merges_txt(vocab_dir, tmp_path):
    shutil.copyfile(vocab_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copyfile(vocab_dir / "vocab.bpe", tmp_path / "merges.txt")
    hf = load_encoder(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert hf.encode(KNOWN_TEXT) == KNOWN_IDS


def test_missing_tokenizer_file_raises_os_error(vocab_dir, tmp_path):
    with pytest.raises(OSError):
        load_encoder(tmp_path / "encoder.json", vocab_dir / "vocab.bpe")
    with pytest.raises(OSError):
        get_encoder("124M", tmp_path)


def corrupt_copy(vocab_dir, tmp_path, encoder_json=None, vocab_bpe=None):
    """Paths to copies of the tokenizer files, with either file's text replaced."""
    paths = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    for path, text in zip(paths, (encoder_json, vocab_bpe)):
        if text is None:
            shutil.copyfile(vocab_dir / path.name, path)
        else:
            path.write_text(text, encoding="utf-8")
    return paths


def test_encoder_json_that_is_not_a_token_to_id_object_raises_value_error(vocab_dir, tmp_path):
    for text in ('{"a": 1', '["a", "b"]', '{"a": "1"}'):
        with pytest.raises(ValueError):
            load_encoder(*corrupt_copy(vocab_dir, tmp_path, encoder_json=text))


def test_merge_line_that_is_not_two_tokens_raises_value_error_naming_the_file(vocab_dir, tmp_path):
    vocab_bpe = (vocab_dir / "vocab.bpe").read_text(encoding="utf-8") + "a b c\n"
    with pytest.raises(ValueError, match="vocab.bpe.*'a b c'"):
        load_encoder(*corrupt_copy(vocab_dir, tmp_path, vocab_bpe=vocab_bpe))


def test_merges_that_make_tokens_missing_from_the_vocab_raise_value_error(vocab_dir, tmp_path):
    assert "ĠtheĠthe" not in json.loads((vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    vocab_bpe = (vocab_dir / "vocab.bpe").read_text(encoding="utf-8") + "Ġthe Ġthe\n"
    with pytest.raises(ValueError, match="ĠtheĠthe"):
        load_encoder(*corrupt_copy(vocab_dir, tmp_path, vocab_bpe=vocab_bpe))


@pytest.mark.parametrize("new_id", [50257, -1, 0], ids=["past-the-end", "negative", "taken"])
def test_vocab_whose_ids_do_not_number_its_tokens_from_0_raises_value_error(vocab_dir, tmp_path, new_id):
    encoder = json.loads((vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    encoder["<|endoftext|>"] = new_id  # was 50256, the last: now that id is unused
    with pytest.raises(ValueError, match="ids must number its 50257 tokens from 0 to 50256, each once"):
        load_encoder(*corrupt_copy(vocab_dir, tmp_path, encoder_json=json.dumps(encoder)))


def test_encoder_built_directly_from_a_tiny_vocab_merges_by_rank():
    # Two merges that compete for the middle "b": the earlier one (rank 0) must win.
    encoder = {char: i for i, char in enumerate(bytes_to_unicode().values())} | {"bc": 256, "ab": 257}
    tiny = Encoder(encoder, ["b c", "a b"])
    assert tiny.encode("abc") == [encoder["a"], 256]
    assert tiny.encode("ab") == [257]
    assert tiny.decode(tiny.encode("abc ab")) == "abc ab"
