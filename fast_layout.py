"""The fast layout: a copy of a checkpoint beside it, with every linear layer's weight stored transposed.

A decode step multiplies one row by each weight; stored [n_out, n_in], each weight is read along its rows, the
order OpenBLAS reads fastest (docs/loading.md has the measurements). The copy is written once, atomically, with a
CRC-32 per tensor and the stamp of the checkpoint files it was made from; it is rebuilt when they change or it is
damaged, and params hand out its arrays transposed back, so they keep the checkpoint's names, shapes and meaning.
"""
import json

from checkpoint import load_safetensors, safetensors_metadata, save_safetensors
from errors import GPT2Error
from files import files_stamp
from params import leaves, openai_name, paths, tree_map

FAST_LAYOUT_FILE = "fast-layout.safetensors"


def in_fast_layout(model_dir, params, stamp, verified):
    """(params as views of model_dir's fast-layout file, verified with the file's entry) for a checkpoint whose
    files have the given stamp; verified: the files whose CRCs passed before (the .verified marker's contents).

    The file is written from params when it is missing, damaged or made from other checkpoint files; if it cannot
    be written (a read-only folder, a full disk), params and verified are returned as they are.
    """
    fast_file = model_dir / FAST_LAYOUT_FILE
    wanted = {openai_name(path): weights_transposed(path, array) for path, array in leaves(params)}
    source = json.dumps(stamp)
    stored = fast_layout_tensors(fast_file, wanted, source, verified)
    if stored is None:
        try:
            save_safetensors(fast_file, wanted, metadata={"checkpoint": source}, crc32=True)
        except (OSError, GPT2Error):  # GPT2Error: a full disk, the temporary already removed
            return params, verified
        stored = load_safetensors(fast_file)
    # each weight back as [n_in, n_out], the transpose of the stored [n_out, n_in]: a view, not a copy
    params = tree_map(lambda path: weights_transposed(path, stored[openai_name(path)]), paths(params))
    return params, dict(verified, fast_layout=files_stamp([fast_file]))


def weights_transposed(path, array):  # a tensor as the fast layout stores it, or a stored one as params hold it
    return array.T if path[-1] == "w" else array


def fast_layout_tensors(fast_file, wanted, source, verified):
    """The tensors of the fast-layout file if it holds wanted's names and shapes, was made from the checkpoint
    stamped source and passes its CRC-32 check (unless verified says it passed before); else None."""
    try:
        if safetensors_metadata(fast_file).get("checkpoint") != source:
            return None
        stored = load_safetensors(fast_file, verify_crc=verified.get("fast_layout") != files_stamp([fast_file]))
    except (GPT2Error, OSError):
        return None
    if stored.keys() != wanted.keys() or any(stored[name].shape != array.shape for name, array in wanted.items()):
        return None
    return stored
