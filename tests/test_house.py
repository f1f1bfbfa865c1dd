"""The house rules that keep the code readable: what the learning files import, how long a function may grow, the
README's size, and every flag of every script documented with the default its --help shows."""
import ast
import importlib
import re
import subprocess
import sys

import pytest

from cli import cli_parser
from conftest import ROOT

MAX_FUNCTION_LINES = 50
MAX_README_BYTES = 12_000
HEAVY_MODULES = ("requests", "urllib3", "argparse")
SCRIPTS = sorted(path.name for path in ROOT.glob("*.py")  # the files that run their main as a command line
                 if re.search(r"^ +run_cli\(main\)$", path.read_text(), re.MULTILINE))


@pytest.mark.parametrize("module", ["gpt2_pico", "train_pico", "backward", "optim", "gpt2"])
def test_the_model_and_the_learning_files_import_only_numpy_and_the_standard_library(module):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {module}; "
            f"print([name for name in {HEAVY_MODULES!r} if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_greedy_generation_from_the_api_loads_no_progress_bars_and_no_random_numbers(fixture_model):
    # what a program that only generates greedily never uses stays out of its memory: tqdm (3 MiB), NumPy's random
    # module and the hashing it loads (5 MiB), and prepare.py's
    model_dir, _, _ = fixture_model("tiny")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from gpt2 import generate; "
            "from utils import load_encoder_hparams_and_params; "
            f"_, hparams, params = load_encoder_hparams_and_params(model_dir={str(model_dir)!r}); "
            "generate([1, 2, 3], params, hparams['n_head'], 4); "
            "print([name for name in ('tqdm', 'numpy.random', 'hashlib', 'prepare') if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_function_outside_the_tests_is_longer_than_fifty_lines():
    long_functions = []
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.lineno} {node.name} ({n_lines} lines)")
    assert long_functions == []


def test_the_readme_is_a_front_door_of_at_most_twelve_kilobytes():
    assert len((ROOT / "README.md").read_bytes()) <= MAX_README_BYTES


def documented_flags(script):  # -> {flag: its default as docs/cli.md's table for script gives it}
    text = (ROOT / "docs" / "cli.md").read_text()
    section = re.search(rf"^## {re.escape(script)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, f"docs/cli.md has no section ## {script}"
    return {match[1]: match[2].strip().strip("`") for match in re.finditer(r"^\| `(--\w+)` \| ([^|]*) \|",
                                                                             section[1], re.MULTILINE)}


def same_value(documented, shown):  # numbers compare as numbers: 1e-3 in the docs is 0.001 in --help
    try:
        return float(documented) == float(shown)
    except ValueError:
        return documented == shown


def test_the_scripts_with_a_command_line_are_all_checked():
    assert {"gpt2.py", "gpt2_pico.py", "train.py", "bench.py", "shakespeare.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_every_script_is_documented_with_the_default_its_help_shows(script):
    parser, _ = cli_parser(importlib.import_module(script.removesuffix(".py")).main)
    documented = documented_flags(script)
    for action in parser._actions:
        for flag in action.option_strings:
            if flag in ("-h", "--help"):
                continue
            assert flag in documented, f"docs/cli.md does not document {script} {flag}"
            shown = re.search(r"\(default: ([^)]*)\)\.?$", action.help or "")
            if action.required:
                assert documented[flag] == "(required)", flag
            elif action.nargs == 0:  # a switch
                assert documented[flag] == "off", flag
            elif shown:
                assert same_value(documented[flag], shown[1]), (flag, documented[flag], shown[1])
            else:
                assert documented[flag] == "none", flag
