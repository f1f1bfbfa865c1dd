"""The params tree: the one place that says which arrays a GPT-2 has, what each is named and its shape.

A model is a nested dict named as OpenAI's checkpoint names its tensors: "model/h3/attn/c_attn/w" is
params["blocks"][3]["attn"]["c_attn"]["w"]. The loaders, the training code, the tests and the benchmark all
take names and shapes from layout() and walk trees with the helpers below, instead of spelling them out again.
"""
import math

import numpy as np

from errors import GPT2Error

# Our name for each hyperparameter -> its key in OpenAI's hparams.json, and in Hugging Face's config.json.
OPENAI_HPARAMS = {"n_vocab": "n_vocab", "n_ctx": "n_ctx", "n_embd": "n_embd", "n_head": "n_head", "n_layer": "n_layer"}
HF_HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd", "n_head": "n_head",
              "n_layer": "n_layer"}


def layout(hparams):  # -> the params tree with each array's shape where the array goes
    n_embd = hparams["n_embd"]

    def linear(n_in, n_out):  # w is [n_in, n_out]: a row of activations times w, as in linear(x, w, b)
        return {"w": (n_in, n_out), "b": (n_out,)}

    def norm():  # a layer norm's gain and bias
        return {"g": (n_embd,), "b": (n_embd,)}

    def block():
        return {
            "ln_1": norm(),
            "attn": {"c_attn": linear(n_embd, 3 * n_embd), "c_proj": linear(n_embd, n_embd)},
            "ln_2": norm(),
            "mlp": {"c_fc": linear(n_embd, 4 * n_embd), "c_proj": linear(4 * n_embd, n_embd)},
        }

    return {
        "wte": (hparams["n_vocab"], n_embd),  # token embeddings, also the output projection (tied)
        "wpe": (hparams["n_ctx"], n_embd),  # position embeddings
        "blocks": [block() for _ in range(hparams["n_layer"])],
        "ln_f": norm(),
    }


def checked_hparams(config, path, keys):
    """Our five hyperparameters out of config, read from the file at path (keys: our name -> the file's key),
    each a positive int, n_embd a multiple of n_head: the hyperparameters that layout() can build a tree of."""
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


def leaves(tree, path=()):  # -> iterator of (path, leaf); a path is a tuple of dict keys and block numbers
    if isinstance(tree, dict):
        for key, branch in tree.items():
            yield from leaves(branch, (*path, key))
    elif isinstance(tree, list):
        for i, branch in enumerate(tree):
            yield from leaves(branch, (*path, i))
    else:
        yield path, tree


def tree_map(fn, tree, *others):  # fn(leaf, *the others' leaves at the same path) at every leaf, same layout
    if isinstance(tree, dict):
        return {key: tree_map(fn, branch, *(other[key] for other in others)) for key, branch in tree.items()}
    if isinstance(tree, list):
        return [tree_map(fn, branch, *(other[i] for other in others)) for i, branch in enumerate(tree)]
    return fn(tree, *others)


def paths(tree, path=()):  # -> the same layout with each leaf replaced by its path
    if isinstance(tree, dict):
        return {key: paths(branch, (*path, key)) for key, branch in tree.items()}
    if isinstance(tree, list):
        return [paths(branch, (*path, i)) for i, branch in enumerate(tree)]
    return path


def openai_name(path):  # ("blocks", 3, "attn", "c_attn", "w") -> "model/h3/attn/c_attn/w"
    if path[0] == "blocks":
        path = (f"h{path[1]}", *path[2:])
    return "/".join(["model", *path])


HF_SUFFIXES = {"g": "weight", "w": "weight", "b": "bias"}  # a layer norm's gain and a conv's weight alike


def hf_name(path):  # ("blocks", 3, "ln_1", "g") -> "h.3.ln_1.weight", ("wte",) -> "wte.weight"
    if path[0] == "blocks":
        path = ("h", *path[1:])
    if len(path) == 1:  # the embeddings are modules of their own in Hugging Face's GPT2Model
        return f"{path[0]}.weight"
    return ".".join([*map(str, path[:-1]), HF_SUFFIXES[path[-1]]])


def init_params(hparams, seed=0):  # -> a params tree of GPT-2's initial weights, float32
    # GPT-2's scheme, as nanoGPT and minGPT follow it: every weight and embedding normal with std 0.02, biases 0,
    # layer norms the identity; the projections that add into the residual stream are scaled by 1/sqrt(2 n_layer),
    # since each block adds two of them and the stream's variance would otherwise grow with depth
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * hparams["n_layer"])

    def init(shape, path):
        if path[-1] == "g":
            return np.ones(shape, np.float32)
        if path[-1] == "b":
            return np.zeros(shape, np.float32)
        std = residual_std if path[-2:] == ("c_proj", "w") else 0.02
        return rng.standard_normal(shape, np.float32) * np.float32(std)

    shapes = layout(hparams)
    return tree_map(init, shapes, paths(shapes))
