"""Loading model folders: both layouts give the checkpoint's exact weights, and every bad file is a clear error."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import download
import fast_layout
import utils
from checkpoint import mapped_file, read_tf_index
from params import leaves, openai_name
from conftest import ROOT, SHAPES, flip_byte, make_params, tf_variables, write_openai_checkpoint
from errors import GPT2Error
from utils import load_encoder_hparams_and_params

DATA = "model.ckpt.data-00000-of-00001"


def copy_model(source, destination):
    """A private copy of a model folder, without the files a previous load may have left in it."""
    ignored = shutil.ignore_patterns(utils.VERIFIED_MARKER, fast_layout.FAST_LAYOUT_FILE, ".download.lock")
    shutil.copytree(source, destination, ignore=ignored)
    return destination


def assert_same_params(loaded, expected):
    """Same tensor names, shapes and float32 bits (as TF names; conv weights compared in their stored [1, nx, nf])."""
    loaded, expected = tf_variables(loaded), tf_variables(expected)
    assert loaded.keys() == expected.keys()
    for name, array in loaded.items():
        assert array.dtype == np.float32, name
        assert array.shape == expected[name].shape, name
        assert np.array_equal(array.view(np.uint32), expected[name].view(np.uint32)), name


def hf_state(model):
    """Hugging Face's own tensor names and values for a GPT2LMHeadModel, without the transformer. prefix."""
    return {name.removeprefix("transformer."): tensor.numpy() for name, tensor in model.state_dict().items()}


def add_tokenizer(model_dir, vocab_dir):
    shutil.copyfile(vocab_dir / "encoder.json", model_dir / "vocab.json")
    shutil.copyfile(vocab_dir / "vocab.bpe", model_dir / "merges.txt")


@pytest.fixture
def checkpoint_loads(monkeypatch):
    """(verify_crc, tensors returned) for each call the loader makes to load_tf_checkpoint."""
    calls = []
    real_load = utils.load_tf_checkpoint

    def spy(prefix, names=None, verify_crc=False):
        tensors = real_load(prefix, names, verify_crc)
        calls.append((verify_crc, tensors))
        return tensors

    monkeypatch.setattr(utils, "load_tf_checkpoint", spy)
    return calls


def crc_passes(checkpoint_loads):
    return [verify_crc for verify_crc, _ in checkpoint_loads]


@pytest.fixture
def tiny_dir(fixture_model, tmp_path):
    return copy_model(fixture_model("tiny")[0], tmp_path / "tiny")


def load_error(**kwargs):
    with pytest.raises(GPT2Error) as info:
        load_encoder_hparams_and_params(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_fixture_loads_bit_for_bit(name, fixture_model, tmp_path, checkpoint_loads):
    import tensorflow as tf

    model_dir = copy_model(fixture_model(name)[0], tmp_path / name)
    _, hparams, params = fixture_model(name)

    encoder, loaded_hparams, loaded = load_encoder_hparams_and_params(model_dir=str(model_dir))

    assert loaded_hparams == hparams
    assert len(encoder.encoder) == hparams["n_vocab"]
    assert len(loaded["blocks"]) == hparams["n_layer"]
    n_embd = hparams["n_embd"]
    assert loaded["wte"].shape == (hparams["n_vocab"], n_embd)
    assert loaded["wpe"].shape == (hparams["n_ctx"], n_embd)
    block = loaded["blocks"][0]
    assert block["attn"]["c_attn"]["w"].shape == (n_embd, 3 * n_embd)
    assert block["mlp"]["c_fc"]["w"].shape == (n_embd, 4 * n_embd)
    assert block["mlp"]["c_proj"]["w"].shape == (4 * n_embd, n_embd)
    assert_same_params(loaded, params)
    checkpoint = str(model_dir / "model.ckpt")
    assert {name for name, _ in tf.train.list_variables(checkpoint)} == tf_variables(loaded).keys()
    for tf_name, array in tf_variables(loaded).items():
        assert np.array_equal(array, tf.train.load_variable(checkpoint, tf_name)), tf_name
    # Zero-copy: each array is a plain view of the memory-mapped fast-layout file the first load wrote, not a copy
    # and not an np.memmap, whose hooks would run on every product
    assert crc_passes(checkpoint_loads) == [True]
    for _, array in leaves(loaded):
        assert type(array) is np.ndarray
        assert os.path.samefile(mapped_file(array), model_dir / fast_layout.FAST_LAYOUT_FILE)


def test_a_models_dir_folder_loads_as_its_hparams_say_without_downloading(fixture_model, tmp_path, monkeypatch):
    copy_model(fixture_model("tiny")[0], tmp_path / "124M")
    monkeypatch.setattr(download, "download_gpt2_files", lambda *a, **k: pytest.fail("nothing is missing"))
    _, hparams, params = load_encoder_hparams_and_params("124M", str(tmp_path))
    assert hparams == SHAPES["tiny"]
    assert_same_params(params, fixture_model("tiny")[2])


def test_a_models_dir_folder_in_hugging_faces_layout_loads_as_it_is_without_downloading(fixture_model, tiny_dir,
                                                                                          tmp_path, monkeypatch):
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=tiny_dir, fast_layout=False)
    utils.save_hf_folder(tmp_path / "124M", hparams, params, encoder)
    monkeypatch.setattr(download, "download_gpt2_files", lambda *a, **k: pytest.fail("a whole model is there"))
    assert_same_params(load_encoder_hparams_and_params("124M", str(tmp_path))[2], fixture_model("tiny")[2])


def test_a_folder_holding_a_whole_model_in_each_layout_is_refused(tiny_dir):
    # as when train.py saved into the OpenAI-layout folder it fine-tuned: which model is meant cannot be told
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=tiny_dir, fast_layout=False)
    utils.save_hf_folder(tiny_dir, hparams, params, encoder)
    assert "holds a whole model in OpenAI's and in Hugging Face's layout" in load_error(model_dir=tiny_dir)


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("layer_norm_epsilon", 0.1),
                                        ("tie_word_embeddings", False), ("scale_attn_weights", False)])
def test_a_config_json_that_changes_gpt_2s_arithmetic_is_refused_naming_the_key(key, value, hf_model, vocab_dir,
                                                                                tmp_path):
    save_file(hf_state(hf_model("tiny")), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_model("tiny").config.to_dict() | {key: value}))
    add_tokenizer(tmp_path, vocab_dir)
    assert f"sets {key} to {value!r}" in load_error(model_dir=tmp_path)


def test_a_config_json_of_more_layers_than_the_checkpoint_has_tensors_is_refused_at_once(hf_model, vocab_dir,
                                                                                         tmp_path):
    save_file(hf_state(hf_model("tiny")), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_model("tiny").config.to_dict() | {"n_layer": 10**8}))
    add_tokenizer(tmp_path, vocab_dir)
    assert "fewer than the 100000000 layers config.json gives" in load_error(model_dir=tmp_path)


def params_checksum(params):
    """A digest of every tensor's name and float32 bytes, to compare params across processes."""
    digest = hashlib.sha256()
    for name, array in sorted(tf_variables(params).items()):
        digest.update(name.encode() + np.ascontiguousarray(array, np.float32).tobytes())
    return digest.hexdigest()


def test_loading_needs_no_tensorflow(fixture_model, tmp_path):
    model_dir = copy_model(fixture_model("wide")[0], tmp_path / "wide")
    script = (
        "import sys\n"
        "sys.modules['tensorflow'] = None  # any import of TensorFlow now fails\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from test_loading import params_checksum\n"
        "from utils import load_encoder_hparams_and_params\n"
        f"print(params_checksum(load_encoder_hparams_and_params(model_dir={str(model_dir)!r})[2]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == params_checksum(fixture_model("wide")[2])


def test_hugging_face_save_pretrained_loads_the_same_params(fixture_model, hf_model, vocab_dir, tmp_path):
    _, hparams, params = fixture_model("h12")
    hf_model("h12").save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    add_tokenizer(tmp_path, vocab_dir)

    _, loaded_hparams, loaded = load_encoder_hparams_and_params(model_dir=tmp_path)

    assert loaded_hparams == hparams
    assert_same_params(loaded, params)


def test_safetensors_without_prefix_and_with_tied_head_and_mask_buffers(fixture_model, hf_model, vocab_dir, tmp_path):
    _, hparams, params = fixture_model("tiny")
    state = hf_state(hf_model("tiny"))
    assert not any(name.startswith("transformer.") for name in state)
    n_ctx = hparams["n_ctx"]
    # What older checkpoints also hold: the tied head and each block's constant causal mask.
    state["lm_head.weight"] = params["wte"]
    state["h.0.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
    state["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_model("tiny").config.to_json_file(tmp_path / "config.json")
    add_tokenizer(tmp_path, vocab_dir)

    _, _, loaded = load_encoder_hparams_and_params(model_dir=tmp_path)

    assert_same_params(loaded, params)


def test_float16_safetensors_load_as_the_rounded_values(fixture_model, hf_model, vocab_dir, tmp_path):
    _, _, params = fixture_model("tiny")
    state = {name: array.astype(np.float16) for name, array in hf_state(hf_model("tiny")).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_model("tiny").config.to_json_file(tmp_path / "config.json")
    add_tokenizer(tmp_path, vocab_dir)

    _, _, loaded = load_encoder_hparams_and_params(model_dir=tmp_path)

    rounded = {name: array.astype(np.float16).astype(np.float32) for name, array in tf_variables(params).items()}
    assert not all(np.array_equal(rounded[name], array) for name, array in tf_variables(params).items())
    for name, array in tf_variables(loaded).items():
        assert array.dtype == np.float32 and np.array_equal(array, rounded[name]), name


def test_a_safetensors_file_missing_a_tensor_names_it(hf_model, vocab_dir, tmp_path):
    state = hf_state(hf_model("tiny"))
    del state["ln_f.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_model("tiny").config.to_json_file(tmp_path / "config.json")
    add_tokenizer(tmp_path, vocab_dir)
    assert "ln_f.bias" in load_error(model_dir=tmp_path)


def test_a_config_json_without_vocab_size_names_the_key(hf_model, vocab_dir, tmp_path):
    save_file(hf_state(hf_model("tiny")), str(tmp_path / "model.safetensors"))
    config = hf_model("tiny").config.to_dict()
    del config["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    add_tokenizer(tmp_path, vocab_dir)
    message = load_error(model_dir=tmp_path)
    assert "config.json" in message and "vocab_size" in message


HPARAMS_PROBLEMS = {
    "empty": ("", "is empty"),
    "not JSON": ('{"n_vocab": 50257,', "not valid JSON"),
    "not an object": ("[50257, 32, 64, 4, 2]", "JSON list"),
    "key missing": (dict(n_vocab=50257, n_ctx=32, n_embd=64, n_layer=2), "has no 'n_head'"),
    "zero": (dict(SHAPES["tiny"], n_layer=0), "'n_layer' must be a positive whole number"),
    "a string": (dict(SHAPES["tiny"], n_ctx="32"), "'n_ctx' must be a positive whole number"),
    "a bool": (dict(SHAPES["tiny"], n_head=True), "'n_head' must be a positive whole number"),
    "heads don't divide": (dict(SHAPES["tiny"], n_head=5), "must be divisible by 'n_head'"),
    "n_embd disagrees with the tensors": (
        dict(SHAPES["tiny"], n_embd=32), "tensor model/wte has shape [50257, 64], but hparams.json implies [50257, 32]"
    ),
    "n_ctx disagrees with the tensors": (
        dict(SHAPES["tiny"], n_ctx=64), "tensor model/wpe has shape [32, 64], but hparams.json implies [64, 64]"
    ),
    "too many layers": (dict(SHAPES["tiny"], n_layer=3), "lacks 12 tensors that hparams.json implies, e.g. model/h2/"),
    "too few layers": (
        dict(SHAPES["tiny"], n_layer=1), "has 12 tensors that hparams.json doesn't imply, e.g. model/h1/"
    ),
    "n_vocab disagrees with encoder.json": (dict(SHAPES["tiny"], n_vocab=50000), "vocabulary of 50000 tokens but"),
}


@pytest.mark.parametrize("problem", HPARAMS_PROBLEMS)
def test_bad_hparams_json_is_a_clear_error(problem, tiny_dir):
    content, expected = HPARAMS_PROBLEMS[problem]
    (tiny_dir / "hparams.json").write_text(content if isinstance(content, str) else json.dumps(content))
    message = load_error(model_dir=tiny_dir)
    assert expected in message and "hparams.json" in message


def test_missing_hparams_json_is_named(tiny_dir):
    (tiny_dir / "hparams.json").unlink()
    assert "lacks hparams.json" in load_error(model_dir=tiny_dir)


def test_missing_hparams_json_in_a_models_dir_folder_is_named(tiny_dir, monkeypatch):
    model_dir = tiny_dir.parent / "models" / "124M"
    shutil.move(tiny_dir, model_dir)
    (model_dir / "hparams.json").unlink()
    # As if the download had stopped short of hparams.json.
    monkeypatch.setattr(download, "download_gpt2_files", lambda *a, **k: None)
    assert "hparams.json is missing" in load_error(model_size="124M", models_dir=model_dir.parent)


def test_corrupt_encoder_json_is_a_clear_error(tiny_dir):
    (tiny_dir / "encoder.json").write_text('{"!": 0, ')
    message = load_error(model_dir=tiny_dir)
    assert "tokenizer" in message and "encoder.json" in message


def test_a_truncated_data_file_is_a_clear_error(tiny_dir):
    data = tiny_dir / DATA
    os.truncate(data, data.stat().st_size // 2)
    message = load_error(model_dir=tiny_dir)
    assert "truncated" in message and DATA in message


def test_a_crc_mismatch_is_caught_on_first_load(tiny_dir):
    entry = read_tf_index(tiny_dir / "model.ckpt")["model/wpe"]
    flip_byte(tiny_dir / DATA, entry.offset + entry.size // 2)
    message = load_error(model_dir=tiny_dir)
    assert "'model/wpe' fails its CRC32C check" in message and DATA in message and "download" in message
    assert not (tiny_dir / utils.VERIFIED_MARKER).exists()


@pytest.mark.parametrize("how", ["edited in place", "replaced by another file"])
def test_a_data_file_changed_after_verification_is_verified_again(how, tiny_dir):
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert (tiny_dir / utils.VERIFIED_MARKER).exists()
    entry = read_tf_index(tiny_dir / "model.ckpt")["model/h1/mlp/c_fc/w"]
    data = tiny_dir / DATA
    if how == "edited in place":
        flip_byte(data, entry.offset + 7)
    else:
        shutil.copyfile(data, tiny_dir / "download")
        flip_byte(tiny_dir / "download", entry.offset + 7)
        os.replace(tiny_dir / "download", data)
    assert "'model/h1/mlp/c_fc/w' fails its CRC32C check" in load_error(model_dir=tiny_dir)


def test_flipped_bytes_in_the_index_are_a_clear_error(tiny_dir):
    index = tiny_dir / "model.ckpt.index"
    flip_byte(index, index.stat().st_size // 3)
    message = load_error(model_dir=tiny_dir)
    assert "model.ckpt.index" in message and "damaged" in message


def test_the_crc_pass_runs_once_until_the_data_changes(tiny_dir, checkpoint_loads):
    marker = tiny_dir / utils.VERIFIED_MARKER
    assert not marker.exists()
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert crc_passes(checkpoint_loads) == [True] and marker.exists()
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert crc_passes(checkpoint_loads) == [True, False]
    # Same bytes, but a new file (as after a re-download): verified again, then trusted again.
    shutil.copyfile(tiny_dir / DATA, tiny_dir / "download")
    os.replace(tiny_dir / "download", tiny_dir / DATA)
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert crc_passes(checkpoint_loads) == [True, False, True, False]


def test_a_garbled_marker_means_verify_again(tiny_dir, checkpoint_loads):
    (tiny_dir / utils.VERIFIED_MARKER).write_text("not json")
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert crc_passes(checkpoint_loads) == [True]


def test_a_marker_that_cannot_be_written_does_not_stop_loading(fixture_model, tiny_dir):
    # A folder entry in the way makes writing the marker fail, as in a read-only model folder.
    (tiny_dir / f"{utils.VERIFIED_MARKER}.{os.getpid()}").mkdir()
    _, _, params = load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert_same_params(params, fixture_model("tiny")[2])
    assert not (tiny_dir / utils.VERIFIED_MARKER).exists()


def test_check_tensors_refuses_other_dtypes(fixture_model):
    _, hparams, params = fixture_model("tiny")
    tensors = dict(tf_variables(params), **{"model/wpe": params["wpe"].astype(np.float64)})
    with pytest.raises(GPT2Error, match="tensor model/wpe is float64, not float32"):
        utils.params_from_tensors(tensors, hparams, openai_name, "model.ckpt.index", Path("hparams.json"), conv_axis=True)


def test_an_unknown_model_size_lists_the_valid_ones(tmp_path):
    message = load_error(model_size="7B", models_dir=tmp_path)
    assert "'7B'" in message and all(size in message for size in utils.MODEL_SIZES)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_neither_layout_says_what_it_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    message = load_error(model_dir=tmp_path)
    assert all(name in message for name in ("hparams.json", DATA, "config.json", "model.safetensors", "merges.txt"))


def test_a_folder_holding_only_a_save_train_py_did_not_finish_says_how_to_finish_it(tmp_path):
    (tmp_path / utils.SAVED).mkdir()
    (tmp_path / utils.SAVED / "model.safetensors").write_bytes(b"committed, not yet moved")
    message = load_error(model_dir=tmp_path)
    assert "a checkpoint whose save train.py did not finish" in message
    assert f"python train.py --resume --out_dir {tmp_path} --data TEXT" in message


def test_a_missing_model_dir_is_a_clear_error(tmp_path):
    assert "does not exist" in load_error(model_dir=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# The fast layout: a copy of the checkpoint beside it with every linear weight stored transposed


@pytest.fixture
def fast_layout_loads(monkeypatch):
    """verify_crc of each call the loader makes to load_safetensors for the fast-layout file."""
    calls = []
    real_load = fast_layout.load_safetensors

    def spy(path, verify_crc=False):
        if Path(path).name == fast_layout.FAST_LAYOUT_FILE:
            calls.append(verify_crc)
        return real_load(path, verify_crc)

    monkeypatch.setattr(fast_layout, "load_safetensors", spy)
    return calls


def assert_fast_layout(params, model_dir):
    """Every array a plain ndarray view of the fast-layout file; each weight [n_in, n_out] the transpose of a stored
    [n_out, n_in]."""
    for path, array in leaves(params):
        assert type(array) is np.ndarray, path
        assert os.path.samefile(mapped_file(array), model_dir / fast_layout.FAST_LAYOUT_FILE), path
        assert (array.T if path[-1] == "w" else array).flags.c_contiguous, path


@pytest.mark.parametrize("checkpoint_format", ["OpenAI's TF checkpoint", "Hugging Face's safetensors"])
def test_the_fast_layout_holds_the_checkpoints_names_shapes_and_values(checkpoint_format, fixture_model, hf_model,
                                                                      vocab_dir, tmp_path):
    source_dir, _, params = fixture_model("h12")
    if checkpoint_format == "OpenAI's TF checkpoint":
        model_dir = copy_model(source_dir, tmp_path / "h12")
    else:
        model_dir = tmp_path
        hf_model("h12").save_pretrained(model_dir)
        add_tokenizer(model_dir, vocab_dir)
    for _ in ("the load that writes it", "a load that finds it"):
        _, _, loaded = load_encoder_hparams_and_params(model_dir=model_dir)
        assert_same_params(loaded, params)
        assert_fast_layout(loaded, model_dir)


def test_the_fast_layout_is_checked_once_then_trusted(tiny_dir, fast_layout_loads):
    load_encoder_hparams_and_params(model_dir=tiny_dir)  # written from the checkpoint just verified: not checked
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert fast_layout_loads == [False, False]
    (tiny_dir / utils.VERIFIED_MARKER).unlink()
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert fast_layout_loads == [False, False, True, False]


def test_a_new_checkpoint_gets_a_new_fast_layout(tiny_dir):
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    new_params = make_params(SHAPES["tiny"], seed=7)
    write_openai_checkpoint(tiny_dir, SHAPES["tiny"], new_params)
    _, _, loaded = load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert_same_params(loaded, new_params)
    assert_fast_layout(loaded, tiny_dir)


FAST_LAYOUT_DAMAGE = ["a byte flipped in a new copy", "a byte flipped, then the marker lost", "truncated",
                      "a garbled header", "deleted"]


@pytest.mark.parametrize("damage", FAST_LAYOUT_DAMAGE)
def test_a_damaged_fast_layout_is_noticed_and_written_again(damage, tiny_dir, fixture_model, fast_layout_loads):
    load_encoder_hparams_and_params(model_dir=tiny_dir)
    fast_file = tiny_dir / fast_layout.FAST_LAYOUT_FILE
    if damage == "a byte flipped in a new copy":  # as a restore from a backup would put it back
        shutil.copyfile(fast_file, tiny_dir / "copy")
        flip_byte(tiny_dir / "copy", fast_file.stat().st_size - 5)
        os.replace(tiny_dir / "copy", fast_file)
    elif damage == "a byte flipped, then the marker lost":
        flip_byte(fast_file, fast_file.stat().st_size - 5)
        (tiny_dir / utils.VERIFIED_MARKER).unlink()
    elif damage == "truncated":
        os.truncate(fast_file, fast_file.stat().st_size // 2)
    elif damage == "a garbled header":
        flip_byte(fast_file, 20)
    else:
        fast_file.unlink()
    _, _, loaded = load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert_same_params(loaded, fixture_model("tiny")[2])
    assert_fast_layout(loaded, tiny_dir)
    _, _, loaded = load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert fast_layout_loads[-1] is False  # the file written again is trusted from then on


def test_a_folder_the_fast_layout_cannot_be_written_to_loads_in_the_checkpoints_layout(tiny_dir, fixture_model):
    # A folder entry in the way makes writing the file fail, as in a read-only model folder or on a full disk.
    (tiny_dir / f"{fast_layout.FAST_LAYOUT_FILE}.{os.getpid()}").mkdir()
    _, _, loaded = load_encoder_hparams_and_params(model_dir=tiny_dir)
    assert_same_params(loaded, fixture_model("tiny")[2])
    assert not (tiny_dir / fast_layout.FAST_LAYOUT_FILE).exists()
    assert all(os.path.samefile(mapped_file(array), tiny_dir / DATA) for _, array in leaves(loaded))
