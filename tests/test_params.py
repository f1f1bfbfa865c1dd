"""The params tree's one definition against the references' own: Hugging Face's modules and OpenAI's checkpoint."""
import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from checkpoint import load_safetensors, save_safetensors
from conftest import SHAPES
from params import hf_name, init_params, layout, leaves, openai_name, paths, tree_map
from utils import load_encoder_hparams_and_params, save_hf_folder


@pytest.mark.parametrize("name", SHAPES)
def test_layout_names_and_shapes_equal_hugging_faces_gpt2(name, hf_model):
    expected = {key.removeprefix("transformer."): tuple(value.shape) for key, value in hf_model(name).state_dict().items()
                if key != "lm_head.weight" and not key.endswith(".attn.bias")}  # tied to wte; a mask buffer
    assert {hf_name(path): shape for path, shape in leaves(layout(SHAPES[name]))} == expected


@pytest.mark.parametrize("name", SHAPES)
def test_layout_names_equal_openais_checkpoint(name, fixture_model):
    import tensorflow as tf

    model_dir, hparams, _ = fixture_model(name)
    listed = dict(tf.train.list_variables(str(model_dir / "model.ckpt")))
    ours = {openai_name(path): [1, *shape] if path[-1] == "w" else list(shape) for path, shape in leaves(layout(hparams))}
    assert ours == listed


def test_tree_map_and_paths_keep_the_layout():
    shapes = layout(SHAPES["tiny"])
    assert tree_map(lambda shape, path: path, shapes, paths(shapes)) == paths(shapes)
    assert [path for path, _ in leaves(paths(shapes))] == [path for path, _ in leaves(shapes)]


def test_init_params_follows_gpt2s_scheme():
    hparams = dict(n_vocab=1000, n_ctx=256, n_embd=128, n_head=4, n_layer=6)
    params = init_params(hparams, seed=0)
    assert tree_map(np.shape, params) == layout(hparams)
    for path, array in leaves(params):
        assert array.dtype == np.float32
        if path[-1] == "g":
            assert np.all(array == 1)
        elif path[-1] == "b":
            assert np.all(array == 0)
        else:
            std = 0.02 / np.sqrt(2 * hparams["n_layer"]) if path[-2:] == ("c_proj", "w") else 0.02
            assert abs(array.std() / std - 1) < 0.05 and abs(array.mean()) < std / 10, path
    again = init_params(hparams, seed=0)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(leaves(params), leaves(again)))
    other = init_params(hparams, seed=1)
    assert not np.array_equal(params["wte"], other["wte"])


def test_save_safetensors_is_read_by_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b.c": rng.normal(size=(7,)).astype(np.float32),
               "transposed": rng.normal(size=(4, 2)).astype(np.float32).T, "scalar": np.float32(2.5).reshape(())}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors, metadata={"step": "12", "note": "ünïcode"})
    theirs, ours = load_file(path), load_safetensors(path)
    for name, array in tensors.items():
        np.testing.assert_array_equal(theirs[name], array)
        np.testing.assert_array_equal(ours[name], array)
    with safe_open(path, "np") as f:
        assert f.metadata() == {"step": "12", "note": "ünïcode"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left behind


def test_save_hf_folder_loads_here_and_in_transformers_with_equal_logits(tmp_path, loaded_model):
    import torch
    from transformers import GPT2LMHeadModel

    import gpt2

    encoder, hparams, params = loaded_model("h12")
    save_hf_folder(tmp_path, hparams, params, encoder)
    assert json.loads((tmp_path / "config.json").read_text())["n_head"] == hparams["n_head"]
    encoder2, hparams2, params2 = load_encoder_hparams_and_params(model_dir=tmp_path)
    assert hparams2 == hparams and encoder2.encoder == encoder.encoder and encoder2.bpe_ranks == encoder.bpe_ranks
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(leaves(params), leaves(params2)))
    ids = encoder.encode("Hello, world: a test of the saved folder.")
    model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(gpt2.gpt2(ids, **params2, n_head=hparams["n_head"]), theirs, atol=1e-4, rtol=0)
