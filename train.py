"""Train a GPT with NumPy: a small one from scratch on a text file, or GPT-2 fine-tuned on it.

    python train.py --data input.txt --out_dir out                      # nanoGPT's baby GPT, byte-level
    python train.py --data input.txt --out_dir out --init_from 124M     # fine-tune GPT-2 (downloaded first)
    python gpt2.py --model_dir out "ROMEO:"                             # generate from what was trained

The flags and their defaults are nanoGPT's, set for its CPU "baby GPT" on Shakespeare. out_dir becomes a
model folder in Hugging Face's layout, which gpt2.py and transformers load, plus the optimizer's state, the
step and the random state, so that --resume continues exactly where a run stopped. It is saved at every
evaluation, at the end and on Ctrl-C; a kill at any moment leaves a whole checkpoint (see save_checkpoint).
"""
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import gpt2
from backward import loss, loss_and_grads
from checkpoint import load_safetensors, save_safetensors
from encoder import byte_level_encoder
from optim import adamw_init, adamw_step, clip_grad_norm, learning_rate_at
from params import hf_name, init_params, leaves, tree_map
from prepare import prepare, split
from utils import (MODEL_SIZES, GPT2Error, load_encoder_hparams_and_params, params_from_tensors, run_cli,
                   save_hf_folder, write_text_atomically)

# A checkpoint: the model in Hugging Face's layout, AdamW's two moments, and the step, random state and flags.
MODEL_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
CHECKPOINT_FILES = (*MODEL_FILES, "optimizer.safetensors", "train_state.json")
SAVING = ".saving"  # a checkpoint being written; one found at start was cut short by a kill, and is deleted
SAVED = ".saved"  # a whole checkpoint being moved into out_dir; one found at start has its move finished
LOG = "log.jsonl"
SCRATCH = "scratch"
# the flags that make the model what it is: a run can only be resumed with the same ones
MODEL_FLAGS = ("init_from", "n_layer", "n_head", "n_embd", "block_size")
SHAPE_DEFAULTS = {"n_layer": 4, "n_head": 4, "n_embd": 128}  # main's defaults, the shape of a model from scratch


def main(data: str | None = None, out_dir="out", init_from=SCRATCH, resume=False, models_dir="models",
         n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1,
         max_iters=2000, learning_rate=1e-3, decay_lr=True, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
         weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_iters=20,
         sample_tokens=200, seed=1337):
    """Train a GPT on a text file: a new one with a byte-level tokenizer, or GPT-2 fine-tuned.

    Args:
        data: the UTF-8 text file to train on; its last 10 % is held out for validation.
        out_dir: the folder for the checkpoint (a model folder gpt2.py loads), the token file and log.jsonl.
        init_from: "scratch" for a new model; 124M, 355M, 774M or 1558M for GPT-2 (downloaded into models_dir
            if missing); or a model folder in OpenAI's or Hugging Face's layout.
        resume: continue the run saved in out_dir, exactly as if it had not stopped.
        models_dir: where GPT-2's sizes are kept, as in gpt2.py.
        n_layer: transformer blocks of a new model.
        n_head: attention heads of a new model.
        n_embd: width of a new model; a multiple of n_head.
        block_size: tokens of context trained on; a new model's context, at most the context of init_from.
        batch_size: sequences per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step; their gradients are averaged.
        max_iters: optimizer steps to train for.
        learning_rate: the peak learning rate.
        decay_lr: warm up, then decay along a cosine to min_lr; off (--no_decay_lr) keeps learning_rate throughout.
        warmup_iters: steps of linear warmup.
        lr_decay_iters: the step at which the cosine reaches min_lr.
        min_lr: the learning rate at the end of the decay.
        weight_decay: AdamW's decoupled weight decay, on the weight matrices and embeddings.
        beta1: AdamW's decay of the gradient's running mean.
        beta2: AdamW's decay of the squared gradient's running mean.
        grad_clip: clip the gradients' global norm to this; 0 turns clipping off.
        eval_interval: estimate the train and validation loss every this many steps, and save.
        eval_iters: batches per loss estimate.
        sample_tokens: tokens to sample at each evaluation; 0 samples none.
        seed: seeds the new model's weights, the batches and the samples.
    """
    flags = dict(locals())
    check_flags(flags)
    data, out_dir, init_from = Path(str(data)), Path(str(out_dir)), str(init_from)
    check_text_file(data)
    if resume:
        finish_interrupted_save(out_dir)
        encoder, hparams, params, optimizer, rng, saved_flags = load_checkpoint(out_dir)
        check_same_model(saved_flags, flags, out_dir)
    else:
        refuse_to_overwrite(out_dir)
        encoder, hparams, params = initial_model(init_from, models_dir, n_layer, n_head, n_embd, block_size, seed)
        optimizer, rng = adamw_init(params), np.random.default_rng([seed, 1])
    if block_size > hparams["n_ctx"]:
        raise GPT2Error(f"block_size {block_size} is more than the {hparams['n_ctx']} positions of the context of "
                        f"init_from {init_from}: choose a block_size of at most {hparams['n_ctx']}",
                        arguments=("block_size", "init_from"))
    make_out_dir(out_dir)
    train_tokens, val_tokens = split(prepare(data, encoder, out_dir))
    for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) < block_size + 1:
            raise GPT2Error(f"{data} gives {len(train_tokens) + len(val_tokens)} tokens, so its {name} part has "
                            f"{len(tokens)}, fewer than block_size + 1 = {block_size + 1}: give a longer text "
                            "or a smaller block_size", arguments=("block_size",))

    n_head, step = hparams["n_head"], optimizer["step"]
    n_params = sum(a.size for _, a in leaves(params))
    say(f"training {n_params / 1e6:.2f}M parameters ({hparams['n_layer']} layers, {n_head} heads, "
        f"{hparams['n_embd']} wide, vocabulary {hparams['n_vocab']}) on {len(train_tokens):,} tokens of {data}, "
        f"validating on {len(val_tokens):,}; {'resuming at' if resume else 'from'} step {step}")
    log = open_log(out_dir / LOG, step if resume else 0)
    saved_step = step if resume else None
    tokens_per_step = batch_size * block_size * gradient_accumulation_steps
    # disable=None: the bar only on a terminal; a log or a pipe gets log.jsonl's lines instead
    bar = tqdm(total=max_iters, initial=min(step, max_iters), desc="training", unit="step", file=sys.stderr,
               disable=None)
    # np.errstate: a loss that overflows to NaN is caught by stop_unless_finite, which says what to do about it
    with log, bar, deferred_interrupt() as interrupted, np.errstate(all="ignore"):
        while True:
            if step % eval_interval == 0 or step == max_iters:
                report = evaluate(params, n_head, train_tokens, val_tokens, batch_size, block_size, eval_iters, seed)
                stop_unless_finite(report, step, saved_step, out_dir)
                report |= {"sample": sample(params, n_head, encoder, sample_tokens, seed, step)}
                say(f"step {step}: train loss {report['train_loss']:.4f}, val loss {report['val_loss']:.4f}\n"
                    f"{report['sample']}")
                write_log(log, {"step": step} | report)
                if step > 0 and step != saved_step:
                    save_checkpoint(out_dir, hparams, params, encoder, optimizer, rng, flags)
                    saved_step = step
            if step >= max_iters or interrupted:
                break
            lr = learning_rate
            if decay_lr:
                lr = learning_rate_at(step, learning_rate, warmup_iters, lr_decay_iters, min_lr)
            started = time.perf_counter()
            loss_value, grads = mean_loss_and_grads(train_tokens, params, n_head, batch_size, block_size,
                                                    gradient_accumulation_steps, rng)
            grad_norm = clip_grad_norm(grads, grad_clip)
            stop_unless_finite({"loss": loss_value, "gradient norm": grad_norm}, step, saved_step, out_dir)
            adamw_step(params, grads, optimizer, lr, beta1, beta2, weight_decay=weight_decay)
            seconds = time.perf_counter() - started
            write_log(log, {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                            "ms": round(seconds * 1000, 1), "tokens_per_s": round(tokens_per_step / seconds)})
            step += 1
            bar.set_postfix(loss=f"{loss_value:.4f}", tokens_per_s=f"{tokens_per_step / seconds:,.0f}")
            bar.update()
        if step != saved_step:
            save_checkpoint(out_dir, hparams, params, encoder, optimizer, rng, flags)
    how = "stopped by Ctrl-C at" if interrupted else "saved"
    say(f"{how} step {step} in {out_dir}: generate with python gpt2.py --model_dir {out_dir}")
    if interrupted:
        raise KeyboardInterrupt


def stop_unless_finite(values, step, saved_step, out_dir):
    """A GPT2Error if one of values (name -> number) is NaN or infinite: the weights are past saving, and the
    checkpoint already saved, if any, is the last good one."""
    for name, value in values.items():
        if not math.isfinite(value):
            kept = "no checkpoint was saved"
            if saved_step is not None:
                kept = f"the last good checkpoint, step {saved_step}, is kept in {out_dir}"
            raise GPT2Error(f"the {name.replace('_', ' ')} became {value} at step {step}, so training stopped and "
                            f"{kept}: try a lower learning_rate or a longer warmup_iters",
                            arguments=("learning_rate", "warmup_iters"))


def check_flags(flags):
    """A GPT2Error naming the first flag whose value no run could use, before anything is loaded or written."""
    def need(ok, name, what, *also_named):
        if not ok:
            raise GPT2Error(f"{name} must be {what}, got {flags[name]!r}", arguments=(name, *also_named))

    def finite(name):
        return gpt2.is_number(flags[name]) and math.isfinite(flags[name])

    if flags["data"] is None:
        raise GPT2Error("give the text to train on as data", arguments=("data",))
    for name in ("resume", "decay_lr"):
        need(isinstance(flags[name], bool), name, "True or False")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                 "eval_interval", "eval_iters"):
        need(gpt2.is_int(flags[name]) and flags[name] >= 1, name, "a whole number >= 1")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "seed"):
        need(gpt2.is_int(flags[name]) and flags[name] >= 0, name, "a whole number >= 0")
    need(finite("learning_rate") and flags["learning_rate"] > 0, "learning_rate", "a finite number > 0")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        need(finite(name) and flags[name] >= 0, name, "a finite number >= 0")
    for name in ("beta1", "beta2"):
        need(finite(name) and 0 <= flags[name] < 1, name, "a number in [0, 1)")
    need(flags["n_embd"] % flags["n_head"] == 0, "n_embd", f"a multiple of n_head ({flags['n_head']})", "n_head")
    if flags["init_from"] != SCRATCH:
        for name, default in SHAPE_DEFAULTS.items():
            if flags[name] != default:
                raise GPT2Error(f"{name} sets the shape of a new model, but init_from {flags['init_from']} has its "
                                f"own: drop {name}, or train from scratch", arguments=(name, "init_from"))


def check_text_file(path):
    if not path.is_file():
        raise GPT2Error(f"{path} is not a file: give the text to train on as data", arguments=("data",))
    if path.stat().st_size == 0:
        raise GPT2Error(f"{path} is empty: give a text to train on")


def initial_model(init_from, models_dir, n_layer, n_head, n_embd, block_size, seed):
    """(encoder, hparams, params) to start from: a new model with GPT-2's initialisation and the byte-level
    tokenizer, or a model loaded as gpt2.py loads it; params are writable float32 copies."""
    if init_from == SCRATCH:
        encoder = byte_level_encoder()
        hparams = dict(n_vocab=len(encoder.encoder), n_ctx=block_size, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
        return encoder, hparams, init_params(hparams, seed)
    if init_from in MODEL_SIZES:
        encoder, hparams, params = load_encoder_hparams_and_params(init_from, str(models_dir), fast_layout=False)
    else:
        encoder, hparams, params = load_encoder_hparams_and_params(model_dir=init_from, fast_layout=False)
    return encoder, hparams, writable(params)


def writable(tree):  # the loader's arrays are read-only memory maps, maybe non-C-contiguous views: copy them
    return tree_map(lambda a: np.array(a, dtype=np.float32, order="C"), tree)


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
        raise GPT2Error(f"cannot write in out_dir {out_dir} ({e.strerror}): give a folder you can write to",
                        arguments=("out_dir",)) from None
    shutil.rmtree(out_dir / SAVING, ignore_errors=True)


def get_batch(tokens, batch_size, block_size, rng):  # -> inputs, targets [batch_size, block_size] from random places
    starts = rng.integers(len(tokens) - block_size, size=batch_size)
    rows = np.stack([tokens[start : start + block_size + 1] for start in starts]).astype(np.int64)
    return rows[:, :-1], rows[:, 1:]  # each target is the token after its input


def mean_loss_and_grads(tokens, params, n_head, batch_size, block_size, n_micro, rng):
    """The loss and gradients averaged over n_micro micro-batches: one large batch's, in the memory of one small."""
    total_loss, total_grads = 0.0, None
    for _ in range(n_micro):
        loss_value, grads = loss_and_grads(*get_batch(tokens, batch_size, block_size, rng), params, n_head)
        total_loss += loss_value
        if total_grads is None:
            total_grads = grads
        else:
            for (_, total), (_, grad) in zip(leaves(total_grads), leaves(grads)):
                total += grad
    if n_micro > 1:
        for _, total in leaves(total_grads):
            total /= n_micro
    return total_loss / n_micro, total_grads


def evaluate(params, n_head, train_tokens, val_tokens, batch_size, block_size, eval_iters, seed):
    """The mean loss over eval_iters batches of each part; the same batches every time, so estimates compare."""
    report = {}
    for name, tokens in (("train_loss", train_tokens), ("val_loss", val_tokens)):
        rng = np.random.default_rng([seed, 2])
        report[name] = float(np.mean([loss(*get_batch(tokens, batch_size, block_size, rng), params, n_head)
                                      for _ in range(eval_iters)]))
    return report


def sample(params, n_head, encoder, n_tokens, seed, step):  # -> a few lines of text from the model, as nanoGPT shows
    # nanoGPT's sample.py settings: start from a newline, temperature 0.8, the 200 most likely tokens
    ids = gpt2.generate(encoder.encode("\n"), params, n_head, n_tokens, temperature=0.8,
                        top_k=min(200, len(encoder.encoder)), seed=seed + step,
                        endoftext_id=encoder.encoder.get("<|endoftext|>"))
    return encoder.decode(ids)


def say(text):  # to stdout, between the progress bar's updates, at once even into a pipe
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


@contextlib.contextmanager
def deferred_interrupt():  # -> a list that becomes true at Ctrl-C, so the loop stops between steps, not inside one
    pressed = []

    def handler(signum, frame):
        if pressed:  # a second Ctrl-C stops at once; the last checkpoint is still whole
            raise KeyboardInterrupt
        pressed.append(signum)
        tqdm.write("Ctrl-C: saving after this step (press it again to stop without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def open_log(path, step):  # -> the JSON-lines log, open for appending, keeping only the lines of steps before step
    kept = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # a line a kill cut short, say
                if json.loads(line)["step"] < step:
                    kept.append(line + "\n")
    write_text_atomically(path, "".join(kept))
    return open(path, "a", encoding="utf-8")


def write_log(log, entry):
    log.write(json.dumps(entry, ensure_ascii=False) + "\n")
    log.flush()


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
    saving.mkdir()
    save_hf_folder(saving, hparams, params, encoder)
    moments = {f"{name}.{hf_name(path)}": array for name in ("m", "v") for path, array in leaves(optimizer[name])}
    save_safetensors(saving / "optimizer.safetensors", moments)
    state = {"step": optimizer["step"], "rng": rng.bit_generator.state, "flags": flags}
    write_text_atomically(saving / "train_state.json", json.dumps(state, indent=2) + "\n")
    for path in saving.iterdir():
        fsync(path)  # every byte on disk before the commit
    fsync(saving)
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


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(out_dir):
    """(encoder, hparams, params, optimizer, rng, flags) of the checkpoint in out_dir, each checked."""
    missing = [name for name in CHECKPOINT_FILES if not (out_dir / name).is_file()]
    if len(missing) == len(CHECKPOINT_FILES):
        raise GPT2Error(f"{out_dir} holds no checkpoint to continue: run without resume to start training",
                        arguments=("resume",))
    fix = "continue from a whole checkpoint, or run without resume to start again in another out_dir"
    fix_names = ("resume", "out_dir")
    if missing:
        raise GPT2Error(f"the checkpoint in {out_dir} lacks {', '.join(missing)}: {fix}", arguments=fix_names)
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
        optimizer[name] = writable(moment)
    return encoder, hparams, writable(params), optimizer, rng, flags


def check_same_model(saved_flags, flags, out_dir):
    for name in MODEL_FLAGS:
        if saved_flags.get(name) != flags[name]:
            raise GPT2Error(f"the run in {out_dir} was started with {name} {saved_flags.get(name)}, not "
                            f"{flags[name]}: continue it with the settings it was started with", arguments=(name,))


if __name__ == "__main__":
    run_cli(main)
