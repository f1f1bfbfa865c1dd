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
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import gpt2
from backward import loss, loss_and_grads
from cli import run_cli
from encoder import byte_level_encoder
from errors import GPT2Error
from memory import check_fits
from optim import adamw_init, adamw_step, clip_grad_norm, learning_rate_at
from params import init_params, leaves
from prepare import prepare, split
from train_state import (LOG, check_same_model, finish_interrupted_save, load_checkpoint, make_out_dir, one_run_in,
                         open_log, refuse_to_overwrite, save_checkpoint, writable, write_log)
from utils import MODEL_SIZES, SIZE_HPARAMS, load_encoder_hparams_and_params

SCRATCH = "scratch"
SHAPE_DEFAULTS = {"n_layer": 4, "n_head": 4, "n_embd": 128}  # main's defaults, the shape of a model from scratch


def main(data: str, out_dir="out", init_from=SCRATCH, resume=False, models_dir="models",
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
    data, out_dir = Path(str(data)), Path(str(out_dir))
    check_text_file(data)
    check_init_from(str(init_from), resume, out_dir)
    with one_run_in(out_dir):
        make_out_dir(out_dir)  # before loading: a folder it cannot write in is refused before anything is downloaded
        model, optimizer, rng = resumed_run(out_dir, flags) if resume else new_run(out_dir, flags)
        tokens = training_tokens(data, model[0], out_dir, block_size)
        say(run_summary(model, tokens, data, optimizer["step"], resume))
        interrupted = train(out_dir, model, optimizer, rng, tokens, flags, optimizer["step"] if resume else None)
    how = "stopped by Ctrl-C at" if interrupted else "saved"
    say(f"{how} step {optimizer['step']} in {out_dir}: generate with python gpt2.py --model_dir {out_dir}")
    if interrupted:
        raise KeyboardInterrupt


def new_run(out_dir, flags):  # -> ((encoder, hparams, params), optimizer, rng) of a run starting at step 0
    refuse_to_overwrite(out_dir)
    encoder, hparams, params = initial_model(str(flags["init_from"]), flags)
    return (encoder, hparams, params), adamw_init(params), np.random.default_rng([flags["seed"], 1])


def resumed_run(out_dir, flags):  # -> ((encoder, hparams, params), optimizer, rng) of the run saved in out_dir
    finish_interrupted_save(out_dir)
    encoder, hparams, params, optimizer, rng, saved_flags = load_checkpoint(out_dir)
    check_same_model(saved_flags, flags, out_dir)
    check_run_fits(hparams, flags)
    optimizer = {"step": optimizer["step"], "m": writable(optimizer["m"]), "v": writable(optimizer["v"])}
    return (encoder, hparams, writable(params)), optimizer, rng


def check_run_fits(hparams, flags):
    """A GPT2Error, before the model is copied or made, unless block_size fits its context and a training step
    fits in memory."""
    block_size, init_from = flags["block_size"], flags["init_from"]
    if block_size > hparams["n_ctx"]:
        raise GPT2Error(f"block_size {block_size} is more than the {hparams['n_ctx']} positions of the context of "
                        f"init_from {init_from}: choose a block_size of at most {hparams['n_ctx']}",
                        arguments=("block_size", "init_from"))
    check_fits(hparams, flags["batch_size"], block_size, flags["gradient_accumulation_steps"],
               shape_flags=init_from == SCRATCH)


def training_tokens(data, encoder, out_dir, block_size):  # -> (train tokens, validation tokens) of the text
    train_tokens, val_tokens = split(prepare(data, encoder, out_dir))
    check_split(data, train_tokens, val_tokens, block_size)
    return train_tokens, val_tokens


def check_split(data, train_tokens, val_tokens, block_size):  # a GPT2Error unless each part holds a batch's row
    for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) < block_size + 1:
            raise GPT2Error(f"{data} gives {len(train_tokens) + len(val_tokens)} tokens, so its {name} part has "
                            f"{len(tokens)}, fewer than block_size + 1 = {block_size + 1}: give a longer text "
                            "or a smaller block_size", arguments=("block_size",))


def run_summary(model, tokens, data, step, resume):  # -> the line that says what is about to be trained
    _, hparams, params = model
    n_params = sum(a.size for _, a in leaves(params))
    return (f"training {n_params / 1e6:.2f}M parameters ({hparams['n_layer']} layers, {hparams['n_head']} heads, "
            f"{hparams['n_embd']} wide, vocabulary {hparams['n_vocab']}) on {len(tokens[0]):,} tokens of {data}, "
            f"validating on {len(tokens[1]):,}; {'resuming at' if resume else 'from'} step {step}")


def train(out_dir, model, optimizer, rng, tokens, flags, saved_step):
    """Train from the optimizer's step to max_iters; every eval_interval steps and at the end, estimate the losses,
    show a sample and save a checkpoint. Ctrl-C stops after the current step and saves -> whether it did."""
    encoder, hparams, params = model
    n_head, max_iters = hparams["n_head"], flags["max_iters"]
    log = open_log(out_dir / LOG, saved_step or 0)
    # disable=None: the bar only on a terminal; a log or a pipe gets log.jsonl's lines instead
    bar = tqdm(total=max_iters, initial=min(optimizer["step"], max_iters), desc="training", unit="step",
               file=sys.stderr, disable=None)
    # np.errstate: a loss that overflows to NaN is caught by stop_unless_finite, which says what to do about it
    with log, bar, deferred_interrupt() as interrupted, np.errstate(all="ignore"):
        while True:
            step = optimizer["step"]
            if step % flags["eval_interval"] == 0 or step == max_iters:
                report = evaluate(params, n_head, tokens, flags)
                stop_unless_finite(report, step, saved_step, out_dir)
                report["sample"] = sample(params, n_head, encoder, flags["sample_tokens"], flags["seed"], step)
                say(evaluation_lines(step, report))
                write_log(log, {"step": step} | report)
                if step > 0 and step != saved_step:
                    save_checkpoint(out_dir, hparams, params, encoder, optimizer, rng, flags)
                    saved_step = step
            if step >= max_iters or interrupted:
                break
            entry = train_step(params, optimizer, rng, tokens[0], n_head, flags)
            # a step that made the loss NaN stops the run here, before its weights could be saved
            stop_unless_finite({"loss": entry["loss"], "gradient norm": entry["grad_norm"]}, step, saved_step, out_dir)
            write_log(log, entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tokens_per_s=f"{entry['tokens_per_s']:,}")
            bar.update()
        if optimizer["step"] != saved_step:
            save_checkpoint(out_dir, hparams, params, encoder, optimizer, rng, flags)
    return bool(interrupted) and optimizer["step"] < max_iters  # Ctrl-C in the last evaluation stopped nothing


def train_step(params, optimizer, rng, tokens, n_head, flags):
    """One optimizer step on a batch of tokens, params and the optimizer's state updated in place -> its log entry."""
    step = optimizer["step"]
    lr = flags["learning_rate"]
    if flags["decay_lr"]:
        lr = learning_rate_at(step, lr, flags["warmup_iters"], flags["lr_decay_iters"], flags["min_lr"])
    started = time.perf_counter()
    loss_value, grads = mean_loss_and_grads(tokens, params, n_head, flags["batch_size"], flags["block_size"],
                                            flags["gradient_accumulation_steps"], rng)
    grad_norm = clip_grad_norm(grads, flags["grad_clip"])
    adamw_step(params, grads, optimizer, lr, flags["beta1"], flags["beta2"], weight_decay=flags["weight_decay"])
    seconds = time.perf_counter() - started
    tokens_per_step = flags["batch_size"] * flags["block_size"] * flags["gradient_accumulation_steps"]
    return {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "ms": round(seconds * 1000, 1),
            "tokens_per_s": round(tokens_per_step / seconds)}


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
    """A GPT2Error naming the first flag whose value no run could use, before anything is loaded or written. flags:
    main's, or those of them that another trainer takes (train_pico.py's)."""
    def need(ok, name, what, *also_named):
        if not ok:
            raise GPT2Error(f"{name} must be {what}, got {flags[name]!r}", arguments=(name, *also_named))

    def finite(name):
        return gpt2.is_number(flags[name]) and math.isfinite(flags[name])

    def given(*names):
        return [name for name in names if name in flags]

    if flags["data"] is None:
        raise GPT2Error("give the text to train on as data", arguments=("data",))
    for name in given("resume", "decay_lr"):
        need(isinstance(flags[name], bool), name, "True or False")
    for name in given("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                      "eval_interval", "eval_iters"):
        need(gpt2.is_int(flags[name]) and flags[name] >= 1, name, "a whole number >= 1")
    for name in given("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "seed"):
        need(gpt2.is_int(flags[name]) and flags[name] >= 0, name, "a whole number >= 0")
    need(finite("learning_rate") and flags["learning_rate"] > 0, "learning_rate", "a finite number > 0")
    for name in given("min_lr", "weight_decay", "grad_clip"):
        need(finite(name) and flags[name] >= 0, name, "a finite number >= 0")
    for name in given("beta1", "beta2"):
        need(finite(name) and 0 <= flags[name] < 1, name, "a number in [0, 1)")
    need(flags["n_embd"] % flags["n_head"] == 0, "n_embd", f"a multiple of n_head ({flags['n_head']})", "n_head")
    if flags.get("init_from", SCRATCH) != SCRATCH:
        for name, default in SHAPE_DEFAULTS.items():
            if flags[name] != default:
                raise GPT2Error(f"{name} sets the shape of a new model, but init_from {flags['init_from']} has its "
                                f"own: drop {name}, or train from scratch", arguments=(name, "init_from"))


def check_init_from(init_from, resume=False, out_dir=None):  # out_dir: the folder the run saves into, if it does
    # a resumed run was made from init_from before: its folder need not be there any more
    if resume or init_from in (SCRATCH, *MODEL_SIZES):
        return
    if not Path(init_from).is_dir():
        raise GPT2Error(f"init_from {init_from} is neither a GPT-2 size ({', '.join(MODEL_SIZES)}) nor a model folder "
                        f"that exists: give a size, the folder of a model, or {SCRATCH} for a new model",
                        arguments=("init_from",))
    if out_dir is not None and Path(init_from).resolve() == Path(out_dir).resolve():
        raise GPT2Error(f"init_from and out_dir are the same folder, {out_dir}: the run saves a new model, and the "
                        "folder would hold two; give another out_dir", arguments=("init_from", "out_dir"))


def check_text_file(path):
    if not path.is_file():
        raise GPT2Error(f"{path} is not a file: give the text to train on as data", arguments=("data",))
    if path.stat().st_size == 0:
        raise GPT2Error(f"{path} is empty: give a text to train on")


def initial_model(init_from, flags):
    """(encoder, hparams, params) to start from: a new model with GPT-2's initialisation and the byte-level
    tokenizer, or a model loaded as gpt2.py loads it; params are writable float32 copies, made only once the run is
    known to fit (check_run_fits)."""
    if init_from == SCRATCH:
        encoder = byte_level_encoder()
        hparams = dict(n_vocab=len(encoder.encoder), n_ctx=flags["block_size"],
                       **{name: flags[name] for name in SHAPE_DEFAULTS})
        check_run_fits(hparams, flags)
        return encoder, hparams, init_params(hparams, flags["seed"])
    if init_from in MODEL_SIZES:  # checked before a download
        check_run_fits(SIZE_HPARAMS[init_from], flags)
    encoder, hparams, params = load_model(init_from, flags["models_dir"])
    check_run_fits(hparams, flags)
    return encoder, hparams, writable(params)


def load_model(init_from, models_dir):  # -> (encoder, hparams, params) of a GPT-2 size or a model folder, read-only
    if init_from in MODEL_SIZES:
        return load_encoder_hparams_and_params(init_from, str(models_dir), fast_layout=False)
    return load_encoder_hparams_and_params(model_dir=init_from, fast_layout=False)


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


def evaluate(params, n_head, tokens, flags):  # -> the mean loss of each part: {"train_loss": .., "val_loss": ..}
    # over eval_iters batches, the same ones every time, so that the estimates compare across steps
    report = {}
    for name, part in zip(("train_loss", "val_loss"), tokens):
        rng = np.random.default_rng([flags["seed"], 2])
        batches = (get_batch(part, flags["batch_size"], flags["block_size"], rng) for _ in range(flags["eval_iters"]))
        report[name] = float(np.mean([loss(*batch, params, n_head) for batch in batches]))
    return report


def sample(params, n_head, encoder, n_tokens, seed, step):  # -> a few lines of text from the model, as nanoGPT shows
    # nanoGPT's sample.py settings: start from a newline, temperature 0.8, the 200 most likely tokens
    ids = gpt2.generate(encoder.encode("\n"), params, n_head, n_tokens, temperature=0.8,
                        top_k=min(200, len(encoder.encoder)), seed=seed + step,
                        endoftext_id=encoder.encoder.get("<|endoftext|>"))
    return encoder.decode(ids)


def evaluation_lines(step, report):  # -> what an evaluation prints: the losses, then the sample
    # The sample is whatever the model makes, control characters included (ESC would restyle the terminal, or
    # whoever reads the output later): shown escaped, as gpt2.py shows text on a terminal; log.jsonl keeps it exact
    losses = f"step {step}: train loss {report['train_loss']:.4f}, val loss {report['val_loss']:.4f}"
    return f"{losses}\n{gpt2.escape_controls(report['sample'])}" if report["sample"] else losses  # sample_tokens 0


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


if __name__ == "__main__":
    run_cli(main)
