"""The command lines of gpt2.py and gpt2_pico.py, end to end in a subprocess, on a fixture model.

What each run should print is computed here through the Python API on the same model folder.
"""
import ast
import fcntl
import inspect
import json
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
import tty
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gpt2
import gpt2_pico
from conftest import OFFLINE, ROOT, assert_clean_error, default_sigint, run_script as run
from utils import load_encoder_hparams_and_params, save_hf_folder

TURING = "Alan Turing theorized that computers would one day become"
SCRIPTS = ["gpt2.py", "gpt2_pico.py"]


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
    assert result.stdout == encoder.decode(gpt2.generate([encoder.encoder["<|endoftext|>"]], params, hparams["n_head"], 6)) + "\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_zero_tokens_prints_an_empty_line(script, models_dir):
    result = run(script, TURING, "--n_tokens_to_generate", 0, "--models_dir", models_dir)
    assert (result.returncode, result.stdout) == (0, "\n")


def test_a_flag_the_pico_version_lacks_is_answered_with_the_flags_it_has(models_dir):
    result = run("gpt2_pico.py", "Hello", "--temperature", "0.5", "--models_dir", models_dir)
    assert result.returncode == 2
    assert_clean_error(result, "--temperature", "--n_tokens_to_generate, --model_size, --models_dir")


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


@pytest.mark.parametrize("script, hparams_text", [("gpt2.py", ""), ("gpt2.py", "{not json"),
                                                  ("gpt2.py", '{"n_vocab": 50257}'), ("gpt2.py", "[1, 2]"),
                                                  ("gpt2_pico.py", "{not json")])
def test_broken_hparams_json_is_fetched_again_and_named_when_that_fails(script, hparams_text, models_dir, tmp_path):
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
    assert_clean_error(run("gpt2.py", "--prompt_file", tmp_path / "absent.txt", "--models_dir", models_dir),
                       "--prompt_file", "absent.txt")


def test_a_prompt_files_newlines_are_read_as_python_reads_a_text_file_and_standard_inputs_are_kept(models_dir,
                                                                                                   tmp_path):
    (tmp_path / "prompt.txt").write_bytes(b"ab\r\ncd\re")
    echoed = ["--echo", "--n_tokens_to_generate", 0, "--models_dir", models_dir]
    assert run("gpt2.py", "--prompt_file", tmp_path / "prompt.txt", *echoed).stdout == "ab\ncd\ne\n"
    assert run("gpt2.py", "--prompt_file", "-", *echoed, stdin=b"ab\r\ncd\re").stdout == "ab\r\ncd\re\n"


@pytest.mark.parametrize("flag, words", [("--prompt_file", ["--prompt_file -"]), ("--prompts_file", ["--prompts_file -"]),
                                         ("--score_file", ["-"])])
def test_standard_input_that_is_not_utf8_is_one_line(flag, words, models_dir):
    # in the C.UTF-8 locale Python's own sys.stdin would turn the byte into a lone surrogate instead
    result = run("gpt2.py", flag, "-", "--models_dir", models_dir, stdin=b"caf\xe9\n")
    assert_clean_error(result, *words, "not valid UTF-8")


def test_a_model_dir_that_is_not_a_folder_is_one_line(tmp_path):
    (tmp_path / "text.txt").write_text(TURING, encoding="utf-8")
    assert_clean_error(run("gpt2.py", TURING, "--model_dir", tmp_path / "text.txt"), "--model_dir", "is not a folder")
    assert_clean_error(run("gpt2.py", TURING, "--model_dir", ""), "--model_dir", "''")  # not the current folder


def test_a_closed_standard_input_is_one_line(models_dir):
    result = subprocess.run([sys.executable, ROOT / "gpt2.py", "--prompt_file", "-", "--models_dir", models_dir],
                            capture_output=True, text=True, env=OFFLINE, preexec_fn=lambda: os.close(0), timeout=300)
    assert_clean_error(result, "--prompt_file -", "standard input is closed")


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
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=OFFLINE, preexec_fn=default_sigint,
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


# --- the text arrives as typed ------------------------------------------------------------------------------------

# python-fire read "Hello, world" as the tuple ('Hello', 'world') and "Python # the language" as Python; the
# hypothesis test below tries many more
AWKWARD_PROMPTS = ["Hello, world", "Python # the language", 'True, [1, 2], "1e3" and \\n', "-5 degrees"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_prompt_reaches_the_model_exactly_as_typed(script, models_dir, model, tmp_path):
    for prompt in AWKWARD_PROMPTS[: 2 if script == "gpt2_pico.py" else None]:
        (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
        typed = run(script, prompt, "--n_tokens_to_generate", 4, "--models_dir", models_dir)
        assert typed.returncode == 0, typed.stderr
        assert typed.stdout == continuation(model, prompt, 4) + "\n", prompt
        if script == "gpt2.py":
            from_file = run(script, "--prompt_file", tmp_path / "prompt.txt", "--n_tokens_to_generate", 4,
                            "--models_dir", models_dir)
            assert from_file.stdout == typed.stdout, prompt


FRAGMENTS = ["Hello, world", "#", " # comment", "True", "None", "1e3", "0x1F", "[1, 2]", "{'a': 1}", '"', "'",
             "\\", "\\n", "(a, b)", "--", "=", "$HOME", "*", "é", "日本", "🎉", " "]
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), TEXT), min_size=1, max_size=4).map("".join))
def test_the_cli_continues_any_text_as_the_api_does(models_dir, model, prompt):
    encoder, hparams, _ = model
    assume(len(encoder.encode(prompt)) <= hparams["n_ctx"])
    # a text that begins with - goes after --, as for every Unix tool
    args = ["--", prompt] if prompt.startswith("-") else [prompt]
    result = run("gpt2.py", "--n_tokens_to_generate", 3, "--models_dir", models_dir, *args)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == continuation(model, prompt, 3) + "\n"


def test_stop_reads_escapes_and_may_be_repeated(models_dir, model):
    full = continuation(model, TURING, 12)
    first, later = full[len(full) // 2 :][:2], full[-2:]
    # an escape written for the first stop string's first character, which is what arrives
    escaped = f"\\x{ord(first[0]):02x}" + first[1:] if ord(first[0]) < 256 else f"\\u{ord(first[0]):04x}" + first[1:]
    result = run("gpt2.py", TURING, "--n_tokens_to_generate", 12, "--stop", later, "--stop", escaped, "--models_dir",
                 models_dir)
    assert result.stdout == full[: min(full.index(first), full.index(later))] + "\n"


def test_a_stop_string_that_looks_like_a_number_is_text(models_dir, model):
    full = continuation(model, TURING, 12)
    stop = full[len(full) // 2]
    result = run("gpt2.py", TURING, "--n_tokens_to_generate", 12, "--stop", "1", "--stop", stop, "--models_dir",
                 models_dir)
    cut = min(full.index(stop), full.index("1") if "1" in full else len(full))
    assert result.stdout == full[:cut] + "\n"


@pytest.mark.parametrize("typed", ["\\n", "\\t|", "a\\\\n", "\\x41\\u00e9", "end.", "日本", "\\\\"])
def test_stop_escapes_read_as_python_reads_them(typed):
    assert gpt2.unescape(typed, "stop") == ast.literal_eval(f'"{typed}"')


def test_a_stop_escaped_as_a_surrogate_pair_is_its_character():  # as JSON writes one beyond U+FFFF
    assert gpt2.unescape("\\ud83d\\ude00", "stop") == "\U0001f600"


# --- refusing what cannot be honoured -------------------------------------------------------------------------------
# (that nothing is downloaded before these refusals is proven in test_download.py)

@pytest.mark.parametrize("script", SCRIPTS)
def test_text_that_is_not_utf8_is_refused(script, models_dir):
    result = run(script, b"caf\xe9", "--models_dir", models_dir)
    assert_clean_error(result, "UTF-8", "caf\\xe9")
    assert result.returncode == 2


def test_a_prompt_file_no_context_could_hold_is_refused_after_a_bounded_read(models_dir):
    # /dev/zero never ends: read whole, it would fill the memory
    assert_clean_error(run("gpt2.py", "--prompt_file", "/dev/zero", "--models_dir", models_dir), "--prompt_file",
                       "/dev/zero", "32 tokens")


def test_output_into_a_reader_that_closes_early_ends_quietly(models_dir):
    generator = subprocess.Popen(
        [sys.executable, str(ROOT / "gpt2.py"), TURING, "--n_tokens_to_generate", str(10**6), "--ignore_endoftext",
         "--models_dir", str(models_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=OFFLINE)
    head = subprocess.run(["head", "-c", "5"], stdin=generator.stdout, capture_output=True, timeout=120)
    generator.stdout.close()
    _, stderr = generator.communicate(timeout=120)
    assert len(head.stdout) == 5
    assert stderr == b""
    assert generator.returncode == 128 + signal.SIGPIPE  # what a shell reports for a tool that SIGPIPE stopped


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    """The fixture model in Hugging Face's layout (config.json, vocab.json, merges.txt, model.safetensors)."""
    encoder, hparams, params = model
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf_folder(folder, hparams, params, encoder)
    return folder


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit


@pytest.mark.parametrize("layout, name", [("openai", "hparams.json"), ("openai", "encoder.json"),
                                          ("hf", "config.json"), ("hf", "vocab.json"), ("hf", "model.safetensors")])
def test_json_nested_deeper_than_python_recurses_is_a_clear_error(layout, name, models_dir, hf_dir, tmp_path):
    shutil.copytree(models_dir / "124M" if layout == "openai" else hf_dir, tmp_path / "model")
    if name == "model.safetensors":  # the header is JSON: an 8-byte length, then the text
        (tmp_path / "model" / name).write_bytes(len(DEEP_JSON).to_bytes(8, "little") + DEEP_JSON.encode())
    else:
        (tmp_path / "model" / name).write_text(DEEP_JSON)
    assert_clean_error(run("gpt2.py", TURING, "--model_dir", tmp_path / "model"), name)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_damaged_weights_are_reported_as_such(value, model, tmp_path):
    encoder, hparams, params = model
    damaged = dict(params, ln_f=dict(params["ln_f"], g=np.full_like(params["ln_f"]["g"], value)))
    save_hf_folder(tmp_path / "model", hparams, damaged, encoder)
    (tmp_path / "text.txt").write_text(TURING, encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("Hello\nThe quick brown fox\n", encoding="utf-8")
    every_mode = ([TURING], [TURING, "--temperature", 1], ["--score_file", tmp_path / "text.txt"],
                  ["--prompts_file", tmp_path / "prompts.txt", "--n_tokens_to_generate", 5])
    for args in every_mode if np.isnan(value) else every_mode[:1]:
        result = run("gpt2.py", *args, "--model_dir", tmp_path / "model")
        assert_clean_error(result, "NaN", "weights are damaged")


@pytest.mark.parametrize("args, warning", [
    (["--top_k", 5, "--min_p", 0.1], "--top_k and --min_p have no effect at temperature 0"),
    (["--seed", 7], "--seed has no effect at temperature 0"),
    (["--per_token"], "--per_token has no effect without --score_file"),
])
def test_an_option_without_effect_is_one_warning_and_the_work_still_runs(args, warning, models_dir, model):
    result = run("gpt2.py", TURING, "--n_tokens_to_generate", 5, *args, "--models_dir", models_dir)
    assert result.returncode == 0
    assert result.stdout == continuation(model, TURING, 5) + "\n"
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"warning: {warning}")


@pytest.mark.parametrize("args, named", [(["--temperature", 0.7, "--stop", "."], "--temperature and --stop"),
                                         (["--top_k", 5], "--top_k")])  # not also "at temperature 0"
def test_generation_options_say_they_do_nothing_when_scoring(args, named, models_dir, tmp_path):
    (tmp_path / "text.txt").write_text(TURING, encoding="utf-8")
    result = run("gpt2.py", "--score_file", tmp_path / "text.txt", *args, "--models_dir", models_dir)
    assert result.returncode == 0 and result.stdout.startswith("tokens scored: ")
    verb = "have" if " and " in named else "has"
    assert result.stderr == f"warning: {named} {verb} no effect with --score_file, which generates nothing\n"


def test_models_dir_beside_model_dir_says_it_does_nothing(models_dir, model):
    result = run("gpt2.py", TURING, "--n_tokens_to_generate", 5, "--model_dir", models_dir / "124M", "--models_dir",
                 "elsewhere")
    assert result.stdout == continuation(model, TURING, 5) + "\n"
    assert result.stderr == "warning: --models_dir has no effect with --model_dir, which names the model's folder " \
                            "itself\n"


# --- what people expect of a generate command ----------------------------------------------------------------------

def test_seed_minus_one_draws_a_fresh_seed_that_reproduces_its_sample(models_dir, model):
    result = run("gpt2.py", TURING, "--num_samples", 2, "--temperature", 1, "--seed", -1, "--n_tokens_to_generate",
                 6, "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[1]["seed"] == rows[0]["seed"] + 1 >= 1
    again = run("gpt2.py", TURING, "--temperature", 1, "--seed", rows[1]["seed"], "--n_tokens_to_generate", 6,
                "--models_dir", models_dir)
    assert again.stdout == rows[1]["completion"] + "\n"


def test_num_samples_prints_each_sample_as_the_api_draws_it_with_seed_plus_its_index(models_dir, model):
    options = dict(temperature=1.0, top_k=50, repetition_penalty=1.3, min_p=0.05)
    result = run("gpt2.py", TURING, "--num_samples", 3, "--seed", 5, "--n_tokens_to_generate", 6, "--models_dir",
                 models_dir, *(str(part) for name, value in options.items() for part in (f"--{name}", value)))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"prompt": TURING, "seed": seed, "completion": continuation(model, TURING, 6, seed=seed, **options)}
        for seed in (5, 6, 7)
    ]


def test_echo_prints_the_prompt_before_the_continuation(models_dir, model):
    result = run("gpt2.py", TURING, "--echo", "--n_tokens_to_generate", 5, "--models_dir", models_dir)
    assert result.stdout == TURING + continuation(model, TURING, 5) + "\n"


def test_verbose_ends_with_one_line_of_counts_and_speeds_on_stderr(models_dir, model):
    result = run("gpt2.py", TURING, "--verbose", "--n_tokens_to_generate", 5, "--models_dir", models_dir)
    assert result.stdout == continuation(model, TURING, 5) + "\n"
    match = re.fullmatch(r"prompt tokens: (\d+), new tokens: (\d+), prefill: [\d.]+ tokens/s, "
                         r"decode: [\d.]+ tokens/s\n", result.stderr)
    assert match, result.stderr
    encoder, hparams, params = model
    new_ids = gpt2.generate(encoder.encode(TURING), params, hparams["n_head"], 5)
    assert (int(match[1]), int(match[2])) == (len(encoder.encode(TURING)), len(new_ids))


@pytest.mark.parametrize("n_threads", [1, 3])
def test_threads_sets_the_thread_count_of_the_blas_numpy_loaded(n_threads, models_dir):
    # threadpoolctl, not this project, reads back the count from the OpenBLAS that numpy loaded before the flag
    script = (f"import json, runpy, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              f"sys.argv = ['gpt2.py', 'Hi', '--n_tokens_to_generate', '1', '--threads', '{n_threads}', "
              f"'--models_dir', {str(models_dir)!r}]\n"
              f"runpy.run_path({str(ROOT / 'gpt2.py')!r}, run_name='__main__')\n"
              "from threadpoolctl import threadpool_info\n"
              "print(json.dumps([pool['num_threads'] for pool in threadpool_info() if pool['user_api'] == 'blas']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=OFFLINE, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [n_threads]


def run_with_a_terminal(*args, on="stderr"):
    """Run gpt2.py with stderr (or stdout) on a pseudo-terminal, as in an interactive shell, and the other stream on a
    pipe -> (stdout, stderr). The terminal is raw: what the program writes arrives unchanged (no \\r before \\n)."""
    terminal, program_end = pty.openpty()
    fcntl.ioctl(program_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100, as a terminal has
    tty.setraw(program_end)
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, on: program_end}
    process = subprocess.Popen([sys.executable, str(ROOT / "gpt2.py"), *map(str, args)], **streams, env=OFFLINE)
    os.close(program_end)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the process has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    piped = (process.stderr if on == "stdout" else process.stdout).read()
    assert process.wait(timeout=60) == 0, shown + piped
    shown, piped = shown.decode(errors="replace"), piped.decode(errors="replace")
    return (shown, piped) if on == "stdout" else (piped, shown)


@pytest.mark.parametrize("flag, name, label", [("--score_file", "text.txt", "scoring"),
                                               ("--prompts_file", "prompts.txt", "generating")])
def test_scoring_and_batches_show_a_bar_on_a_terminal_and_stdout_stays_clean(flag, name, label, models_dir, tmp_path):
    (tmp_path / name).write_text("GPT-2 scores every token of a text, " * 6 if flag == "--score_file" else
                                 "Hello\nThe quick brown fox\n", encoding="utf-8")
    args = (flag, tmp_path / name, "--models_dir", models_dir) + (("--n_tokens_to_generate", 5) if label == "generating"
                                                                   else ())
    stdout, stderr = run_with_a_terminal(*args)
    assert label in stderr and "%|" in stderr  # tqdm's bar
    piped = run("gpt2.py", *args)
    assert stdout == piped.stdout and piped.stderr == ""  # no bar when stderr is not a terminal


def test_run_cli_gives_any_main_an_exact_command_line(tmp_path):
    # what train.py and bench.py get too: flags typed by default or annotation, switches, repeatable flags, help
    (tmp_path / "toy.py").write_text(f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from cli import run_cli
from errors import GPT2Error


def main(n_layer=2, learning_rate=3e-4, out_dir: str | None = None, max_iters: int | None = None, compile=True,
         eval_only=False, tags: tuple[str, ...] = ()):
    \"\"\"Train a toy model.

    Args:
        n_layer: how many blocks.
        learning_rate: AdamW's step
            size, on two lines.
        out_dir: where checkpoints go.
        max_iters: stop after this many steps.
        compile: a switch that is on unless turned off.
        eval_only: a switch that is off unless turned on.
        tags: a label; give it as often as wanted.
    \"\"\"
    if n_layer < 1:
        raise GPT2Error(f"n_layer must be at least 1, got {{n_layer}}", arguments=("n_layer",))
    print(repr((n_layer, learning_rate, out_dir, max_iters, compile, eval_only, tags)))


run_cli(main)
""")
    toy = tmp_path / "toy.py"
    assert run(toy).stdout == repr((2, 3e-4, None, None, True, False, ())) + "\n"
    given = run(toy, "--n_layer", 4, "--learning_rate", "1e-3", "--out_dir", "1e3", "--max_iters", 10,
                "--no_compile", "--eval_only", "--tags", "a, b", "--tags", "#c")
    assert given.stdout == repr((4, 1e-3, "1e3", 10, False, True, ("a, b", "#c"))) + "\n"
    help_text = run(toy, "--help").stdout
    assert "Train a toy model." in help_text and "AdamW's step size, on two lines." in help_text
    assert "--no_compile" in help_text and "--eval_only" in help_text
    assert_clean_error(run(toy, "--n_layer", 0), "--n_layer must be at least 1")
    assert_clean_error(run(toy, "--max_iters", "1e3"), "--max_iters", "whole number")
    assert_clean_error(run(toy, "--learning_rate", "inf"), "--learning_rate")
    assert_clean_error(run(toy, "--n_lay", 3), "--n_lay", "--n_layer")


# --- inputs of any size, in bounded memory ------------------------------------------------------------------------

ADDRESS_SPACE_LIMIT = 4 << 30  # bytes: reading /dev/zero whole would pass it within seconds


def start_under_an_address_space_limit(*args):
    """Start gpt2.py with its address space limited to 4 GB, so that reading a file whole fails fast, and SIGINT's
    default disposition (Python makes it KeyboardInterrupt however the suite was launched) -> the process, its
    stdout and stderr on pipes. Skips the test where the limit cannot be set."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < ADDRESS_SPACE_LIMIT:
        pytest.skip(f"the address space is already limited to {hard} bytes")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, hard))
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    try:
        return subprocess.Popen([sys.executable, str(ROOT / "gpt2.py"), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=OFFLINE, preexec_fn=limit)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"cannot limit the address space: {e}")


def test_score_file_scores_dev_zero_as_it_reads_in_bounded_memory_until_stopped(models_dir):
    # /dev/zero is an endless run of NULs, valid UTF-8 with nowhere a cut between pre-tokens would be exact
    process = start_under_an_address_space_limit("--score_file", "/dev/zero", "--per_token", "--models_dir",
                                                 models_dir)
    try:
        lines = [process.stdout.readline() for _ in range(2000)]  # 2000 tokens: windows scored as the text arrives
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{process.pid}/status").read_text())[1])
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert all(re.fullmatch(rb'"\\u0000"\t-?\d+\.\d{6}\n', line) for line in lines), lines[-1]
    assert (process.returncode, stderr) == (130, b"")  # stopped by Ctrl-C, not by a MemoryError or a traceback
    assert peak_kib < 500 * 1024  # the process's peak resident memory: about 100 MB with the fixture model


def test_prompts_file_dev_zero_is_refused_after_a_bounded_read(models_dir):
    process = start_under_an_address_space_limit("--prompts_file", "/dev/zero", "--models_dir", models_dir)
    stdout, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout.decode(), stderr.decode())
    assert_clean_error(result, "line 1 of --prompts_file /dev/zero", "32 tokens", "shorten that line")
    assert result.stdout == ""


def test_prompts_file_of_several_batches_prints_each_batch_as_the_api_generates_it(models_dir, model, tmp_path):
    # 8 rows to a batch: rows 0-7 are one batch, sampled with the seed, and rows 8-10 the next, with seed + 1
    encoder, hparams, params = model
    prompts = [f"Prompt number {i} says" for i in range(11)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    result = run("gpt2.py", "--prompts_file", tmp_path / "prompts.txt", "--n_tokens_to_generate", 6, "--temperature",
                 1, "--seed", 9, "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    expected = []
    for seed, batch in ((9, prompts[:8]), (10, prompts[8:])):
        new_ids = gpt2.generate_batch([encoder.encode(p) for p in batch], params, hparams["n_head"], 6,
                                      temperature=1.0, seed=seed, endoftext_id=encoder.encoder["<|endoftext|>"])
        expected += [{"prompt": p, "completion": encoder.decode(ids)} for p, ids in zip(batch, new_ids)]
    assert [json.loads(line) for line in result.stdout.splitlines()] == expected


def test_a_prompts_file_line_no_context_holds_is_refused_after_the_batches_before_it_are_printed(models_dir, model,
                                                                                                tmp_path):
    prompts = [f"Prompt number {i} says" for i in range(8)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n" + "word " * 1000 + "\nnever read\n",
                                          encoding="utf-8")
    result = run("gpt2.py", "--prompts_file", tmp_path / "prompts.txt", "--n_tokens_to_generate", 3, "--models_dir",
                 models_dir)
    assert_clean_error(result, f"line 9 of --prompts_file {tmp_path / 'prompts.txt'}", "4096 characters",
                       "32 tokens")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"prompt": p, "completion": continuation(model, p, 3)} for p in prompts]


# Controls a terminal obeys: colour (ESC [), bell, carriage return, backspace, DEL, the C1 CSI and NEL; and the tab
# and newline, shown as they are (23 tokens: the fixture's context holds 32)
CONTROLS = "\x1b[31mred\x1b[0m\x07\r\x08\x7f\x9b2J\x85\tend\né"


def test_control_characters_are_escaped_on_a_terminal_and_written_exactly_into_a_pipe(models_dir, model):
    args = (CONTROLS, "--echo", "--n_tokens_to_generate", 5, "--models_dir", models_dir)
    text = CONTROLS + continuation(model, CONTROLS, 5) + "\n"
    assert run("gpt2.py", *args).stdout == text
    shown, _ = run_with_a_terminal(*args, on="stdout")
    assert shown == gpt2.escape_controls(text)
    assert shown.startswith(r"\x1b[31mred\x1b[0m\x07\x0d\x08\x7f\x9b2J\x85" + "\tend\né")
