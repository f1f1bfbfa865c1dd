"""The command lines of gpt2.py and gpt2_pico.py, end to end in a subprocess, on a fixture model.

What each run should print is computed here through the Python API on the same model folder.
"""
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import gpt2
import gpt2_pico
from conftest import ROOT
from utils import load_encoder_hparams_and_params

TURING = "Alan Turing theorized that computers would one day become"
SCRIPTS = ["gpt2.py", "gpt2_pico.py"]
# Nothing listens on port 1: a run that tries to download fails at once instead of reaching the network.
OFFLINE = dict(os.environ, GPT2_BASE_URL="http://127.0.0.1:1")


def run(script, *args, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", input=stdin, env=OFFLINE, timeout=300,
    )


def assert_clean_error(result, *words):
    """A user mistake ends in one line on stderr that names the problem, and a non-zero exit."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def model(models_dir):
    return load_encoder_hparams_and_params("124M", str(models_dir))


def continuation(model, prompt, n_tokens, **options):
    encoder, hparams, params = model
    return encoder.decode(gpt2.generate(encoder.encode(prompt), params, hparams["n_head"], n_tokens, **options))


@pytest.mark.parametrize("script", SCRIPTS)
def test_classic_command_prints_only_the_greedy_continuation(script, models_dir, model):
    result = run(script, TURING, "--n_tokens_to_generate", 8, "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == continuation(model, TURING, 8) + "\n"
    assert len(model[0].encode(result.stdout[:-1])) > 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_empty_prompt_generates_from_endoftext(script, models_dir, model):
    encoder, hparams, params = model
    result = run(script, "", "--n_tokens_to_generate", 6, "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == encoder.decode(gpt2.generate([gpt2.EOT], params, hparams["n_head"], 6)) + "\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_zero_tokens_prints_an_empty_line(script, models_dir):
    result = run(script, TURING, "--n_tokens_to_generate", 0, "--models_dir", models_dir)
    assert (result.returncode, result.stdout) == (0, "\n")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("value", [-1, "many", 2.5])
def test_bad_token_count_is_a_clear_error(script, value, models_dir):
    assert_clean_error(run(script, TURING, "--n_tokens_to_generate", value, "--models_dir", models_dir), "n_tokens_to_generate")


def test_prompt_longer_than_the_context_is_a_clear_error(models_dir):
    assert_clean_error(run("gpt2.py", " ".join(["word"] * 40), "--n_tokens_to_generate", 1, "--models_dir", models_dir), "40 tokens", "32")


def test_pico_refuses_a_prompt_and_continuation_that_overflow_the_context(models_dir):
    # gpt2_pico.py has no sliding window: the tokens must fit the context
    assert_clean_error(run("gpt2_pico.py", TURING, "--n_tokens_to_generate", 30, "--models_dir", models_dir), "n_tokens_to_generate")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_model_size_is_a_clear_error(script, models_dir):
    assert_clean_error(run(script, TURING, "--model_size", "7B", "--models_dir", models_dir), "7B", "124M")


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_model_without_network_is_a_clear_error_and_leaves_no_model_file(script, tmp_path):
    result = run(script, TURING, "--models_dir", tmp_path)
    assert_clean_error(result, "127.0.0.1:1", str(tmp_path / "124M"))
    left = [p.name for p in (tmp_path / "124M").iterdir()] if (tmp_path / "124M").exists() else []
    assert all(name.endswith(".part") or name.startswith(".") for name in left), left


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("hparams_text", ["", "{not json", '{"n_vocab": 50257}', "[1, 2]"])
def test_broken_hparams_json_is_a_clear_error(script, hparams_text, models_dir, tmp_path):
    shutil.copytree(models_dir / "124M", tmp_path / "124M")
    (tmp_path / "124M" / "hparams.json").write_text(hparams_text)
    assert_clean_error(run(script, TURING, "--models_dir", tmp_path), "hparams.json")


def test_prompt_file_and_standard_input(models_dir, model, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(TURING, encoding="utf-8")
    expected = continuation(model, TURING, 5) + "\n"
    from_file = run("gpt2.py", "--prompt_file", prompt_file, "--n_tokens_to_generate", 5, "--models_dir", models_dir)
    from_stdin = run("gpt2.py", "--prompt_file", "-", "--n_tokens_to_generate", 5, "--models_dir", models_dir, stdin=TURING)
    assert from_file.stdout == from_stdin.stdout == expected
    assert_clean_error(run("gpt2.py", "--prompt_file", tmp_path / "absent.txt", "--models_dir", models_dir), "absent.txt")


def test_prompts_file_prints_each_rows_single_prompt_continuation(models_dir, model, tmp_path):
    prompts = [TURING, "Hello", "日本語", "The quick brown fox jumps over"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    result = run("gpt2.py", "--prompts_file", prompts_file, "--n_tokens_to_generate", 6, "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [{"prompt": p, "completion": continuation(model, p, 6)} for p in prompts]


def test_stop_string_ends_the_output_before_it(models_dir, model):
    full = continuation(model, TURING, 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    result = run("gpt2.py", TURING, "--n_tokens_to_generate", 12, "--stop", stop, "--models_dir", models_dir)
    assert result.stdout == full[: full.index(stop)] + "\n"


def test_sampling_with_a_seed_repeats_and_matches_the_api(models_dir, model):
    args = (TURING, "--n_tokens_to_generate", 10, "--temperature", 0.8, "--top_k", 40, "--seed", 3, "--models_dir", models_dir)
    first, second = run("gpt2.py", *args), run("gpt2.py", *args)
    assert first.stdout == second.stdout == continuation(model, TURING, 10, temperature=0.8, top_k=40, seed=3) + "\n"


def test_invalid_sampling_flag_is_a_clear_error(models_dir):
    assert_clean_error(run("gpt2.py", TURING, "--top_p", 2, "--models_dir", models_dir), "--top_p")


def test_score_file_prints_the_scores_the_api_computes(models_dir, model, tmp_path):
    encoder, hparams, params = model
    text = "GPT-2 scores every token of a text, " * 6  # longer than the fixture's context of 32
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    result = run("gpt2.py", "--score_file", tmp_path / "text.txt", "--per_token", "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    logprobs = gpt2.score(encoder.encode(text), params, hparams["n_head"])
    lines = result.stdout.splitlines()
    assert [float(line.split("\t")[1]) for line in lines[:-3]] == pytest.approx(logprobs, abs=1e-6)
    assert lines[-3:] == [
        f"tokens scored: {len(logprobs)}",
        f"mean NLL: {-logprobs.mean():.6f}",
        f"perplexity: {gpt2.np.exp(-logprobs.mean()):.6f}",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_goes_to_stdout_and_lists_every_parameter_of_main(script):
    result = run(script, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    main = {"gpt2.py": gpt2.main, "gpt2_pico.py": gpt2_pico.main}[script]
    for name, parameter in inspect.signature(main).parameters.items():
        shown = name.upper() if parameter.kind is parameter.POSITIONAL_ONLY else f"--{name}"
        assert shown in result.stdout, name


def test_ctrl_c_keeps_what_was_printed_and_exits_130(models_dir):
    # past the fixture's small context the window slides forever: only Ctrl-C ends this run
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "gpt2.py"), TURING, "--n_tokens_to_generate", str(10**6), "--ignore_endoftext",
         "--models_dir", str(models_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=OFFLINE,
    )
    first = process.stdout.read1(1)  # blocks until generation is under way
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert b"Traceback" not in stderr
    assert len(first + rest) > 0


def test_batch_that_overflows_the_context_is_a_clear_error(models_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Hello\n" + " ".join(["word"] * 20) + "\n", encoding="utf-8")
    result = run("gpt2.py", "--prompts_file", prompts_file, "--n_tokens_to_generate", 13, "--models_dir", models_dir)
    assert_clean_error(result, "20 tokens", "32")


def test_empty_prompts_file_is_a_clear_error(models_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert_clean_error(run("gpt2.py", "--prompts_file", tmp_path / "empty.txt", "--models_dir", models_dir), "no prompts")
