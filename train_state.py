"""A training run's folder (train.py's out_dir): its checkpoint saved so that a kill at any moment leaves a whole
one, loaded back for --resume exactly as it was, and the log of every step.

A checkpoint is the model in Hugging Face's layout (a model folder gpt2.py loads), AdamW's two moments, and the
step, random state and flags of the run.
"""
import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

import gpt2
from checkpoint import load_safetensors, save_safetensors
from errors import GPT2Error
from files import disk_space_for, fsync, json_lines, lock_holder, locked, write_text_atomically
from params import hf_name, leaves, tree_map
from utils import (SAVED, checked_once, load_encoder_hparams_and_params, params_from_tensors, read_verified_marker,
                   save_hf_folder, write_verified_marker)

MODEL_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
CHECKPOINT_FILES = (*MODEL_FILES, "optimizer.safetensors", "train_state.json")
SAVING = ".saving"  # a checkpoint being written; one found at start was cut short by a kill, and is deleted
# SAVED, from utils.py (whose loader tells how to finish one): a whole checkpoint being moved into out_dir; one
# found at start has its move finished
LOG = "log.jsonl"
# the flags that make the model what it is: a run can only be resumed with the same ones
MODEL_FLAGS = ("init_from", "n_layer", "n_head", "n_embd", "block_size")


def refuse_to_overwrite(out_dir):
    if any((out_dir / name).exists() for name in (*CHECKPOINT_FILES, SAVED)):
        raise GPT2Error(f"{out_dir} already holds a model: set resume to continue training it, "
                        "or give another out_dir", arguments=("resume", "out_dir"))


def make_out_dir(out_dir):
    """Create out_dir if needed and make sure files can be written in it."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise cannot_write_in(out_dir, e) from None
    shutil.rmtree(out_dir / SAVING, ignore_errors=True)


def cannot_write_in(out_dir, error):
    return GPT2Error(f"cannot write in out_dir {out_dir} ({error.strerror}): give a folder you can write to",
                     arguments=("out_dir",))


@contextlib.contextmanager
def one_run_in(out_dir):
    """out_dir, created if needed and locked for the whole run (flock on the folder): a second run on it is refused
    at once, naming the process that holds it, before either reads or writes anything there. A folder this run
    created is removed if the run fails and leaves it empty."""
    try:
        out_dir.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise cannot_write_in(out_dir, e) from None
    if not out_dir.is_dir():
        raise GPT2Error(f"out_dir {out_dir} is a file, not a folder: give a folder", arguments=("out_dir",))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(out_dir, wait=False))
        except BlockingIOError:
            holder = lock_holder(out_dir)
            raise GPT2Error(f"out_dir {out_dir} is in use by {f'process {holder}' if holder else 'another process'} "
                            "(a training run, or prepare.py): wait for it to end, or give another out_dir",
                            arguments=("out_dir",)) from None
        except OSError as e:
            raise GPT2Error(f"cannot lock out_dir {out_dir} ({e.strerror}): give a folder on a file system that has "
                            "locks (flock)", arguments=("out_dir",)) from None
        try:
            yield
        except BaseException:
            if created:
                with contextlib.suppress(OSError):  # only if empty
                    out_dir.rmdir()
            raise


def writable(tree):  # the loader's arrays are read-only memory maps, maybe non-C-contiguous views: copy them
    return tree_map(lambda a: np.array(a, dtype=np.float32, order="C"), tree)


def save_checkpoint(out_dir, hparams, params, encoder, optimizer, rng, flags):
    """Save the model, AdamW's state, the step, the random state and the flags, so that a kill at any moment
    leaves out_dir with one whole checkpoint: this one or the one before.

    Each file is written atomically, but a kill between two files would still mix two checkpoints. So the files
    are written into out_dir/.saving; renaming that folder to .saved is the commit point; then the files are
    moved into out_dir one by one. A run that starts and finds .saving deletes it (the previous checkpoint is
    still whole in out_dir), and one that finds .saved finishes moving its files (finish_interrupted_save).
    """
    saving = out_dir / SAVING
    shutil.rmtree(saving, ignore_errors=True)
    try:
        saving.mkdir()
        save_hf_folder(saving, hparams, params, encoder)
        moments = {f"{name}.{hf_name(path)}": array for name in ("m", "v") for path, array in leaves(optimizer[name])}
        save_safetensors(saving / "optimizer.safetensors", moments, crc32=True)
        state = {"step": optimizer["step"], "rng": rng.bit_generator.state, "flags": flags}
        write_text_atomically(saving / "train_state.json", json.dumps(state, indent=2) + "\n")
        for path in saving.iterdir():
            fsync(path)  # every byte on disk before the commit
        fsync(saving)
    except Exception:  # a full disk, say: the checkpoint before this one is still whole in out_dir
        shutil.rmtree(saving, ignore_errors=True)
        raise
    os.replace(saving, out_dir / SAVED)  # the commit point
    finish_interrupted_save(out_dir)


def finish_interrupted_save(out_dir):
    """Move the files of a committed checkpoint (out_dir/.saved) into out_dir, if there is one."""
    saved = out_dir / SAVED
    if not saved.is_dir():
        return
    try:
        for path in sorted(saved.iterdir()):
            os.replace(path, out_dir / path.name)
        saved.rmdir()
        fsync(out_dir)
    except OSError as e:
        raise GPT2Error(f"cannot finish saving the checkpoint in {out_dir} ({e.strerror}): "
                        "make the folder writable and run again") from None


def load_checkpoint(out_dir):
    """(encoder, hparams, params, optimizer, rng, flags) of the checkpoint in out_dir, each checked, the CRC-32s of
    its weights and moments once per file; the arrays are read-only maps of the files (writable copies them)."""
    missing = [name for name in CHECKPOINT_FILES if not (out_dir / name).is_file()]
    if len(missing) == len(CHECKPOINT_FILES):
        raise GPT2Error(f"{out_dir} holds no checkpoint to continue: run without resume to start training",
                        arguments=("resume",))
    fix = "continue from a whole checkpoint, or run without resume to start again in another out_dir"
    fix_names = ("resume", "out_dir")
    if missing:
        raise GPT2Error(f"the checkpoint in {out_dir} lacks {', '.join(missing)}: {fix}", arguments=fix_names)
    verified = read_verified_marker(out_dir)
    restore = "restore it from a copy, or run without resume to start again in another out_dir"
    for name, key in (("model.safetensors", "checkpoint"), ("optimizer.safetensors", "optimizer")):
        verified = checked_once(out_dir / name, verified, key, restore, fix_names)
    write_verified_marker(out_dir, verified)  # both passed: the loader below finds the weights vouched for
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=out_dir, fast_layout=False)
    state_path = out_dir / "train_state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        step, flags = state["step"], state["flags"]
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        if not gpt2.is_int(step) or step < 0 or not isinstance(flags, dict):
            raise ValueError("a step or flags that no run saves")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise GPT2Error(f"{state_path} is damaged ({e}): {fix}", arguments=fix_names) from None
    optimizer_path = out_dir / "optimizer.safetensors"
    tensors = load_safetensors(optimizer_path)
    optimizer = {"step": step}
    for name in ("m", "v"):
        moment = {key.removeprefix(f"{name}."): t for key, t in tensors.items() if key.startswith(f"{name}.")}
        moment = params_from_tensors(moment, hparams, hf_name, optimizer_path, out_dir / "config.json")
        optimizer[name] = moment
    return encoder, hparams, params, optimizer, rng, flags


def check_same_model(saved_flags, flags, out_dir):
    for name in MODEL_FLAGS:
        # a folder's path as it was typed: model/ is the model the run started from as much as model is
        same = (os.path.normpath(str(saved_flags.get(name))) == os.path.normpath(str(flags[name]))
                if name == "init_from" else saved_flags.get(name) == flags[name])
        if not same:
            raise GPT2Error(f"the run in {out_dir} was started with {name} {saved_flags.get(name)}, not "
                            f"{flags[name]}: continue it with the settings it was started with", arguments=(name,))


def open_log(path, step):  # -> the JSON-lines log, open for appending, keeping only the lines of steps before step
    kept = []
    with contextlib.suppress(FileNotFoundError):
        for line, entry in json_lines(path.read_bytes()):
            with contextlib.suppress(TypeError, KeyError):  # a value that is not a step's entry, which no run writes
                if entry["step"] < step:
                    kept.append(line.decode("utf-8") + "\n")
    write_text_atomically(path, "".join(kept))
    # unbuffered: a write the disk has no room for fails there and then, and leaves nothing to fail again at close
    return open(path, "ab", buffering=0)


def write_log(log, entry):
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    with disk_space_for(log.name, len(line)):
        log.write(line)
