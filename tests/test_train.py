"""train.py end to end: exact resumption (after a stop, Ctrl-C, or a kill at any point of a save), the trained
model in gpt2.py and in Hugging Face transformers, gradient accumulation, and every bad input through the CLI."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2
import train
import train_state
import utils
from backward import loss_and_grads
from conftest import (OFFLINE, ROOT, assert_clean_error, default_sigint, files, flip_byte, run_script,
                      tiny_run_args, train_in_process)
from params import leaves, tree_map
from errors import GPT2Error
from utils import load_encoder_hparams_and_params

CONTROL_CHARACTERS = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # but tab and newline
STATE_FILES = ("model.safetensors", "optimizer.safetensors")


def saved_state(out_dir):  # -> what must be equal for two runs to be the same: weights, moments, step, rng
    state = json.loads((out_dir / "train_state.json").read_text())
    return {name: (out_dir / name).read_bytes() for name in STATE_FILES} | {"step": state["step"], "rng": state["rng"]}


def losses(out_dir):  # -> the training loss of each step in the log
    entries = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [(entry["step"], entry["loss"]) for entry in entries if "loss" in entry]


def test_a_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, training_text):
    train_in_process(training_text, tmp_path / "whole", max_iters=6)
    train_in_process(training_text, tmp_path / "parts", max_iters=3)
    train_in_process(training_text, tmp_path / "parts", max_iters=6, resume=True)
    assert saved_state(tmp_path / "parts") == saved_state(tmp_path / "whole")  # bit for bit
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6


def ctrl_c_after_three_steps(training_text, out_dir, **flags):  # -> the train.py process, its stdout and stderr
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                                *map(str, tiny_run_args(training_text, out_dir, **flags))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE,
                               preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while len(losses(out_dir) if (out_dir / "log.jsonl").exists() else []) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    return process, *process.communicate(timeout=120)


def test_ctrl_c_saves_exits_130_and_the_run_resumes_exactly(tmp_path, training_text):
    out_dir = tmp_path / "interrupted"
    process, stdout, stderr = ctrl_c_after_three_steps(training_text, out_dir, max_iters=100_000)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped by Ctrl-C" in stdout
    step = saved_state(out_dir)["step"]
    assert step >= 3

    train_in_process(training_text, out_dir, max_iters=step + 2, resume=True)
    train_in_process(training_text, tmp_path / "whole", max_iters=step + 2)
    assert saved_state(out_dir) == saved_state(tmp_path / "whole")


def test_ctrl_c_in_the_last_evaluation_stops_nothing_and_the_run_ends_finished(tmp_path, training_text):
    # the evaluation after the last step is long enough (eval_iters) for the signal to arrive during it
    out_dir = tmp_path / "finished"
    process, stdout, stderr = ctrl_c_after_three_steps(training_text, out_dir, max_iters=3, eval_interval=100,
                                                       eval_iters=2000)
    assert process.returncode == 0, stderr
    assert stdout.endswith(f"saved step 3 in {out_dir}: generate with python gpt2.py --model_dir {out_dir}\n")
    assert saved_state(out_dir)["step"] == 3


class Killed(BaseException):
    """What a kill does to the code that saves: it stops there, and no except or cleanup of ours runs."""


SAVE_CHECKPOINT, REPLACE = train_state.save_checkpoint, os.replace  # the real ones, before any test patches them


def killing_save(monkeypatch, kill_at):  # -> train.save_checkpoint, but killed at its kill_at-th rename

    def killed_replace(source, target):
        killed_replace.n_renames += 1
        if killed_replace.n_renames == kill_at:
            raise Killed
        REPLACE(source, target)

    def save(*args):
        killed_replace.n_renames = 0
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed_replace)
            SAVE_CHECKPOINT(*args)

    return save


def checkpoint_files(out_dir):  # -> {name: bytes} of the checkpoint's files
    return {name: (out_dir / name).read_bytes() for name in train_state.CHECKPOINT_FILES}


def test_a_save_killed_at_any_rename_leaves_the_old_checkpoint_before_the_commit_and_the_new_after(
        tmp_path, trained, monkeypatch):
    # Every file is written under a temporary name and renamed: a kill between any two renames, or while a file
    # is written (which leaves a temporary file behind), is a kill at one of the renames.
    encoder, hparams, params, optimizer, rng, flags = train_state.load_checkpoint(trained)
    newer_params = tree_map(lambda a: a + 1, params)
    newer_optimizer = {"step": optimizer["step"] + 1, "m": tree_map(np.negative, optimizer["m"]), "v": optimizer["v"]}
    newer = tmp_path / "newer"
    newer.mkdir()
    train_state.save_checkpoint(newer, hparams, newer_params, encoder, newer_optimizer, rng, flags)
    old, new = checkpoint_files(trained), checkpoint_files(newer)

    found, kill_at = [], 0
    while not found or found[-1] != "finished":
        kill_at += 1
        out_dir = tmp_path / f"killed-at-{kill_at}"
        shutil.copytree(trained, out_dir)
        try:
            killing_save(monkeypatch, kill_at)(out_dir, hparams, newer_params, encoder, newer_optimizer, rng, flags)
            found.append("finished")  # kill_at is past the save's last rename
        except Killed:
            train_state.finish_interrupted_save(out_dir)  # what --resume does first, and a fresh run refuses to overwrite
            train_state.make_out_dir(out_dir)  # and what both do before writing
            found.append("old" if checkpoint_files(out_dir) == old else "new" if checkpoint_files(out_dir) == new
                         else "mixed")
        assert not (out_dir / train_state.SAVING).exists() and not (out_dir / train_state.SAVED).exists()
        assert not [p.name for p in out_dir.iterdir() if p.name not in (*train_state.CHECKPOINT_FILES, *files(trained))]
    n_written = len(train_state.CHECKPOINT_FILES)  # each file renamed into .saving, then the commit, then each moved
    assert found == ["old"] * (n_written + 1) + ["new"] * n_written + ["finished"], found


def test_a_killed_first_save_is_redone_by_the_same_command_or_finished_by_resume(tmp_path, training_text,
                                                                                monkeypatch):
    train_in_process(training_text, tmp_path / "whole", max_iters=2)
    n_renames = 2 * len(train_state.CHECKPOINT_FILES) + 1
    for kill_at in (2, n_renames - 2):  # before the commit, and after it while the files are being moved
        out_dir = tmp_path / f"killed-at-{kill_at}"
        monkeypatch.setattr(train, "save_checkpoint", killing_save(monkeypatch, kill_at))
        with pytest.raises(Killed):
            train_in_process(training_text, out_dir, max_iters=2)
        monkeypatch.setattr(train, "save_checkpoint", SAVE_CHECKPOINT)
        if kill_at < n_renames // 2:
            train_in_process(training_text, out_dir, max_iters=2)
        else:
            with pytest.raises(GPT2Error, match="already holds a model: set resume"):
                train_in_process(training_text, out_dir, max_iters=2)
            train_in_process(training_text, out_dir, max_iters=2, resume=True)
        assert saved_state(out_dir) == saved_state(tmp_path / "whole")


def test_trained_model_loads_in_gpt2_and_in_transformers_with_equal_logits(trained):
    from transformers import GPT2LMHeadModel

    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=str(trained))
    assert hparams == dict(n_vocab=257, n_ctx=16, n_embd=32, n_head=2, n_layer=2)
    reference = GPT2LMHeadModel.from_pretrained(str(trained)).eval()
    ids = encoder.encode("To be, 或不 😀")[: hparams["n_ctx"]]  # a full context, ending inside the emoji
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(gpt2.gpt2(ids, **params, n_head=hparams["n_head"]) - expected).max() <= 1e-5


def test_gpt2_cli_generates_from_a_trained_model_starting_at_its_own_endoftext(trained):
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=str(trained))
    for prompt, ids in (("To be", encoder.encode("To be")), ("", [256])):  # 256: <|endoftext|> of 257 tokens
        result = run_script("gpt2.py", prompt, "--model_dir", trained, "--n_tokens_to_generate", 12)
        assert result.returncode == 0, result.stderr
        expected = gpt2.generate(ids, params, hparams["n_head"], 12, endoftext_id=encoder.encoder["<|endoftext|>"])
        assert result.stdout == encoder.decode(expected) + "\n"


def test_fine_tuning_gpt2_saves_a_model_that_gpt2_and_transformers_load_alike(tmp_path, training_text, models_dir,
                                                                             fixture_model, tiktoken_gpt2):
    from transformers import GPT2LMHeadModel

    out_dir = tmp_path / "finetuned"
    shape_defaults = dict(n_layer=4, n_head=4, n_embd=128)  # the release has its own shape
    train_in_process(training_text, out_dir, init_from="124M", models_dir=str(models_dir), max_iters=2,
                     eval_iters=1, sample_tokens=4, **shape_defaults)  # models_dir's 124M is the "tiny" fixture
    _, release_hparams, release_params = fixture_model("tiny")
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=str(out_dir))
    assert hparams == release_hparams and len(encoder.encoder) == 50257
    assert np.fromfile(out_dir / "tokens.bin", np.uint16).tolist() == tiktoken_gpt2.encode_ordinary(
        training_text.read_text(encoding="utf-8"))
    assert all(np.any(trained != released) for (_, trained), (_, released) in zip(leaves(params),
                                                                                 leaves(release_params)))
    ids = encoder.encode("Whether 'tis nobler in the mind to suffer")
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(str(out_dir)).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(gpt2.gpt2(ids, **params, n_head=hparams["n_head"]) - expected).max() <= 1e-4


def test_an_evaluation_prints_its_sample_with_control_characters_escaped():
    report = {"train_loss": 1.5, "val_loss": 2.25, "sample": "a\x1b[2Jb\x07\r\x9b\tc\nd"}
    assert train.evaluation_lines(3, report) == "step 3: train loss 1.5000, val loss 2.2500\na\\x1b[2Jb\\x07\\x0d\\x9b\tc\nd"


def test_the_samples_train_prints_show_control_characters_escaped_and_the_log_keeps_them_exact(tmp_path,
                                                                                                training_text, capsys):
    train_in_process(training_text, tmp_path / "out", sample_tokens=64)
    shown = capsys.readouterr().out
    entries = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    reports = [entry for entry in entries if "sample" in entry]
    # the barely trained byte-level model samples bytes almost at random: control characters among them
    assert any(re.search(CONTROL_CHARACTERS, report["sample"]) for report in reports)
    assert all(train.evaluation_lines(report["step"], report) in shown for report in reports)
    assert not re.search(CONTROL_CHARACTERS, shown)


@pytest.fixture(scope="module")
def trained_encoder(trained):
    return load_encoder_hparams_and_params(model_dir=str(trained))[0]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=200))
def test_a_byte_level_model_round_trips_any_utf8_text_through_its_encoder(trained_encoder, text):
    encoder = trained_encoder
    ids = encoder.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert encoder.decode(ids) == text


def test_gradient_accumulation_averages_the_micro_batches(trained):
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir=str(trained))
    params, n_head = train_state.writable(params), hparams["n_head"]
    tokens = np.array(encoder.encode("Now is the winter of our discontent made glorious summer " * 10))
    loss_value, grads = train.mean_loss_and_grads(tokens, params, n_head, 3, 16, 2, np.random.default_rng(7))
    # the same two micro-batches as one batch of 6: the mean over all rows is the mean of the two means
    rng = np.random.default_rng(7)
    (x1, y1), (x2, y2) = train.get_batch(tokens, 3, 16, rng), train.get_batch(tokens, 3, 16, rng)
    expected_loss, expected = loss_and_grads(np.concatenate([x1, x2]), np.concatenate([y1, y2]), params, n_head)
    assert abs(loss_value - expected_loss) <= 1e-6 * abs(expected_loss)
    for (path, grad), (_, want) in zip(leaves(grads), leaves(expected)):
        assert np.abs(grad - want).max() <= 1e-6 + 1e-5 * np.abs(want).max(), path


# ------------------------------------------------------------------------------------------------------------
# Bad input through the real command line: one line on stderr, a non-zero exit, nothing half-written


# what a failed run may leave: a whole token cache, the record of the files whose CRCs passed, and the log of what
# it did
MAY_CHANGE = {"tokens.bin", "tokens.json", utils.VERIFIED_MARKER, "log.jsonl"}


@pytest.fixture()
def bad_input(tmp_path, training_text):
    """bad_input(*extra args, **flags) -> the result of train.py on the tiny run with the extra arguments, having
    checked that out_dir ends as it began: absent, or with the same checkpoint, apart from MAY_CHANGE."""

    def run(*args, data=training_text, out_dir=tmp_path / "out", **flags):
        before = files(out_dir)
        result = run_script("train.py", *tiny_run_args(data, out_dir, **flags), *args)
        after = files(out_dir)
        if before is None:
            assert not after or set(after) <= MAY_CHANGE, sorted(after)
        else:
            assert set(after) - set(before) <= MAY_CHANGE, sorted(after)
            assert {name: after[name] for name in set(before) - MAY_CHANGE} == {
                name: before[name] for name in set(before) - MAY_CHANGE}
        return result

    return run


@pytest.mark.parametrize("flag, value", [("learning_rate", 0), ("learning_rate", "nan"), ("batch_size", 0)])
def test_a_learning_rate_or_batch_size_no_run_could_use_is_refused(bad_input, flag, value):
    assert_clean_error(bad_input(**{flag: value}), f"--{flag}", str(value))


@pytest.mark.parametrize("flag, value, words", [
    ("learning_rate", -1e-3, ["learning_rate", "> 0"]), ("learning_rate", float("inf"), ["learning_rate", "finite"]),
    ("n_embd", 33, ["n_embd", "n_head (2)"]),
    ("beta2", 1, ["beta2", "[0, 1)"]), ("max_iters", -5, ["max_iters", ">= 0"]), ("resume", 1, ["resume"]),
    ("n_layer", 2.0, ["n_layer", "whole number"]), ("grad_clip", float("nan"), ["grad_clip", "finite"]),
])
def test_every_flag_is_checked_before_anything_is_loaded_or_written(tmp_path, training_text, flag, value, words):
    with pytest.raises(GPT2Error) as error:
        train_in_process(training_text, tmp_path / "out", **{flag: value})
    assert all(word in str(error.value) for word in words), error.value  # the API speaks of arguments, not flags
    assert flag in error.value.arguments and "--" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_missing_or_empty_data_file_is_refused(bad_input, tmp_path):
    assert_clean_error(bad_input(data=tmp_path / "absent.txt"), "absent.txt", "--data")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_clean_error(bad_input(data=tmp_path / "empty.txt"), "empty.txt", "empty")


def test_invalid_utf8_is_refused(bad_input, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("To be, or not to be: ".encode() * 20 + "café".encode("latin-1"))
    assert_clean_error(bad_input(data=tmp_path / "latin1.txt"), "latin1.txt", "UTF-8", "byte 423")


def test_data_shorter_than_a_block_and_a_token_in_each_part_is_refused(bad_input, tmp_path):
    (tmp_path / "short.txt").write_text("Brevity is the soul of wit." * 5)  # 135 tokens: 13 for validation
    assert_clean_error(bad_input(data=tmp_path / "short.txt"), "135 tokens", "validation", "13", "--block_size")


def test_a_block_size_above_the_initial_models_context_is_refused(bad_input, trained):
    # trained has a context of 16; the shape flags belong to models from scratch, so they stay at their defaults
    result = bad_input("--init_from", trained, n_layer=4, n_head=4, n_embd=128, block_size=32)
    assert_clean_error(result, "--block_size 32", "16")


def test_shape_flags_with_init_from_are_refused(bad_input, trained):
    assert_clean_error(bad_input("--init_from", trained), "--n_layer", "--init_from")


def test_an_unwritable_out_dir_is_refused(bad_input, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    assert_clean_error(bad_input(out_dir=tmp_path / "a_file" / "out"), "--out_dir", "a_file")


def test_resume_without_a_checkpoint_is_refused(bad_input, tmp_path, training_text):
    assert_clean_error(bad_input("--resume"), "no checkpoint", "without --resume")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GPT2Error, match="no checkpoint to continue"):
        train_in_process(training_text, tmp_path / "empty", resume=True)


DAMAGE = {  # name -> (what it does to a copy of a checkpoint, words the error names)
    "truncated model": (lambda out_dir: os.truncate(out_dir / "model.safetensors", 1000), ["model.safetensors"]),
    "garbled state": (lambda out_dir: (out_dir / "train_state.json").write_text('{"step": 4, "rng": '),
                      ["train_state.json", "damaged"]),
    "missing optimizer": (lambda out_dir: (out_dir / "optimizer.safetensors").unlink(),
                          ["optimizer.safetensors", "lacks"]),
    "foreign rng": (lambda out_dir: (out_dir / "train_state.json").write_text(json.dumps(
        json.loads((out_dir / "train_state.json").read_text()) | {"rng": {"bit_generator": "MT19937"}})),
                    ["train_state.json", "damaged"]),
}


@pytest.mark.parametrize("damage", ["truncated model", "garbled state"])
def test_resume_from_a_damaged_checkpoint_is_refused(bad_input, trained, tmp_path, damage):
    shutil.copytree(trained, tmp_path / "out")
    damage_it, words = DAMAGE[damage]
    damage_it(tmp_path / "out")
    assert_clean_error(bad_input("--resume"), *words)


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_damage_to_a_checkpoint_is_a_clear_error_on_resume(trained, tmp_path, training_text, damage):
    shutil.copytree(trained, tmp_path / "out")
    damage_it, words = DAMAGE[damage]
    damage_it(tmp_path / "out")
    with pytest.raises(GPT2Error) as error:
        train_in_process(training_text, tmp_path / "out", resume=True)
    assert all(word in str(error.value) for word in words), error.value


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_resume_refuses_a_checkpoint_file_with_a_flipped_byte_naming_it_and_changing_nothing(name, trained, tmp_path,
                                                                                              training_text):
    out_dir = shutil.copytree(trained, tmp_path / "out")
    flip_byte(out_dir / name, (out_dir / name).stat().st_size - 3)  # in the last tensor, whose CRC is checked last
    before = files(out_dir)
    result = run_script("train.py", *tiny_run_args(training_text, out_dir, max_iters=8), "--resume")
    assert result.returncode == 1
    assert_clean_error(result, f"{out_dir / name} is damaged", "fails its CRC-32 check", "restore it from a copy",
                       "without --resume", "another --out_dir")
    assert files(out_dir) == before


def test_gpt2_refuses_a_trained_model_with_a_flipped_byte_though_it_loaded_it_before(trained, tmp_path):
    out_dir = shutil.copytree(trained, tmp_path / "out")
    assert run_script("gpt2.py", "To be", "--model_dir", out_dir, "--n_tokens_to_generate", 1).returncode == 0
    weights = out_dir / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 3)
    result = run_script("gpt2.py", "To be", "--model_dir", out_dir, "--n_tokens_to_generate", 1)
    assert result.returncode == 1
    assert_clean_error(result, f"{weights} is damaged", "CRC-32", "restore it from a copy")


def test_a_checkpoints_crcs_are_checked_once_per_file(trained, tmp_path, monkeypatch):
    out_dir = shutil.copytree(trained, tmp_path / "out")
    checked, damaged_tensor = [], utils.damaged_tensor
    monkeypatch.setattr(utils, "damaged_tensor", lambda path: checked.append(path.name) or damaged_tensor(path))
    for _ in range(2):
        train_state.load_checkpoint(out_dir)
        load_encoder_hparams_and_params(model_dir=out_dir)
    assert checked == ["model.safetensors", "optimizer.safetensors"]
    encoder, hparams, params, optimizer, rng, flags = train_state.load_checkpoint(out_dir)
    train_state.save_checkpoint(out_dir, hparams, params, encoder, optimizer, rng, flags)  # new files: checked anew
    train_state.load_checkpoint(out_dir)
    assert checked == ["model.safetensors", "optimizer.safetensors"] * 2


def test_init_from_that_is_neither_a_size_nor_a_folder_lists_the_sizes(bad_input):
    result = bad_input("--init_from", "999M", n_layer=4, n_head=4, n_embd=128)
    assert_clean_error(result, "--init_from 999M is neither a GPT-2 size (124M, 355M, 774M, 1558M) nor a model folder")


def test_a_fresh_run_into_a_finished_one_and_a_resume_with_another_model_are_refused(bad_input, trained, tmp_path):
    shutil.copytree(trained, tmp_path / "out")
    assert_clean_error(bad_input(), "already holds a model", "--resume")
    assert_clean_error(bad_input("--resume", block_size=8), "--block_size", "16", "8")


def test_resume_takes_the_init_from_folder_however_its_path_is_written(trained, tmp_path, training_text):
    fine_tune = dict(init_from=str(trained), n_layer=4, n_head=4, n_embd=128)  # the shape is the folder's
    train_in_process(training_text, tmp_path / "tuned", max_iters=2, **fine_tune)
    train_in_process(training_text, tmp_path / "tuned", max_iters=4, resume=True, **fine_tune | {"init_from": f"{trained}/"})
    assert saved_state(tmp_path / "tuned")["step"] == 4


def test_fine_tuning_into_the_folder_it_starts_from_is_refused(fixture_model, tmp_path, training_text):
    # the folder would hold the model it started from in OpenAI's layout and the new one in Hugging Face's
    model_dir = tmp_path / "model"
    shutil.copytree(fixture_model("tiny")[0], model_dir)
    with pytest.raises(GPT2Error, match="init_from and out_dir are the same folder"):
        train_in_process(training_text, model_dir / ".", init_from=str(model_dir), n_layer=4, n_head=4, n_embd=128)
    assert not (model_dir / "model.safetensors").exists()


def test_sample_tokens_0_prints_each_evaluations_losses_alone(tmp_path, training_text, capsys):
    train_in_process(training_text, tmp_path / "out", sample_tokens=0)
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("step ")] == printed[1:-1] and len(printed) == 5


def test_a_loss_that_becomes_nan_stops_training_and_keeps_the_last_good_checkpoint(bad_input, trained, tmp_path):
    shutil.copytree(trained, tmp_path / "out")  # saved at step 4
    # a learning rate of 1e30 (the cosine's peak far away) throws the weights past float32's range in one step
    result = bad_input("--resume", learning_rate=1e30, lr_decay_iters=10_000, max_iters=10)
    assert_clean_error(result, "nan", "step 5", "last good checkpoint, step 4", "--learning_rate")
