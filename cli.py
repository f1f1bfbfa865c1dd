"""The command line of every script, built from its main function: python gpt2.py "prompt" --top_p 0.9.

main's signature gives the arguments and their types, its docstring's Args: section the help. Every value
reaches main exactly as typed, and each mistake is one line on stderr, never a traceback.
"""
import argparse
import difflib
import inspect
import math
import os
import re
import signal
import sys
import types
import typing
import warnings

import numpy as np

from allocator import keep_freed_memory
from errors import GPT2Error


def run_cli(main):
    """Run main as a command line, with every value exactly as typed (see cli_parser).

    Each mistake ends the run with one line on stderr: a command line that cannot be honoured with status 2, a
    GPT2Error with status 1, speaking of flags (--top_p) where the Python API speaks of arguments (top_p). Each
    warning is one line too. Ctrl-C exits with 130, as shells expect of an interrupted program; a reader that closes
    the output early (| head) ends the run quietly, as if by SIGPIPE.
    """
    parser, positionals = cli_parser(main)
    flags = set(inspect.signature(main).parameters) - set(positionals)
    shown = set()

    def show_once(message, *_):  # a warning the early checks gave is not repeated when the work runs the same checks
        text = f"warning: {speaking_of_flags(message, flags)}"
        if text not in shown:
            shown.add(text)
            print(text, file=sys.stderr)

    # "always", and show_once deciding: the filter's own "once" forgets what it showed whenever a library that is
    # imported later (urllib3, say) adds a filter
    warnings.showwarning = show_once
    warnings.simplefilter("always")
    np.seterr(all="ignore")  # damaged weights are reported as the NaN they produce, not as numpy's warnings
    keep_freed_memory()  # each step's temporaries reuse the last step's memory instead of faulting in fresh pages
    try:
        arguments = parse_command_line(parser, sys.argv[1:])
        values = [arguments.pop(name) for name in positionals]
        main(*values, **arguments)
    except GPT2Error as e:
        sys.exit(f"error: {speaking_of_flags(e, flags)}")
    except MemoryError as e:  # numpy's says how much it asked for: "Unable to allocate 3.7 GiB for an array ..."
        sys.exit(f"error: out of memory{f' ({e})' if str(e) else ''}: ask for less (a smaller model, batch or "
                 "context), or free memory by closing other programs")
    except PermissionError as e:  # a file or folder this user may not read or write, wherever the work met it
        sys.exit(f"error: {e.filename or 'a file'}: {e.strerror}: give this user access to it, or name another")
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except BrokenPipeError:
        # stdout goes nowhere from now on, so that the flush at exit cannot fail a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


class CommandLineParser(argparse.ArgumentParser):
    """argparse's parser, with one-line errors; flags lists its flags, to suggest one for a mistyped flag."""

    def __init__(self, **options):
        self.flags = []  # before argparse's own __init__, which adds --help
        super().__init__(**options)

    def add_argument(self, *names, **options):
        action = super().add_argument(*names, **options)
        self.flags += action.option_strings
        return action

    def error(self, message):  # one line, instead of argparse's usage block
        # argparse takes a value that begins with - (--stop ---) for a flag, and says the flag before it has none
        if flag := re.fullmatch(r"argument (--\w+): expected one argument", message):
            message = f"{flag[1]} needs a value; give one that begins with - as {flag[1]}=VALUE"
        self.exit(2, f"error: {message} (see --help)\n")


def cli_parser(main):
    """The parser of main's command line -> (parser, the names of the positional arguments).

    main's positional-only parameters become positional arguments and its other parameters --flags named as the
    parameters are. A flag's value is read as the type of its default, or of its annotation where the default is
    None (top_k: int | None = None) or where there is none, which makes the flag required (data: str); a bool is a
    switch (--name, or --no_name when it defaults to True); a tuple annotation makes a flag that may be given more
    than once. The help text is the Args: section of main's docstring, and the default where there is one.
    Abbreviations are refused: --temp is not taken for --temperature.
    """
    summary, helps = docstring_parts(main.__doc__)
    parser = CommandLineParser(description=summary, allow_abbrev=False)
    positionals = []
    for name, parameter in inspect.signature(main).parameters.items():
        default, value_type = parameter.default, cli_value_type(parameter)
        required = default is inspect.Parameter.empty
        shown = "" if required or default in (None, "", ()) or isinstance(default, bool) else f" (default: {default})"
        help_text = (helps.get(name, "") + shown).replace("%", "%%")  # argparse %-formats help
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            positionals.append(name)
            parser.add_argument(name, nargs="?", default=default, metavar=name.upper(), help=help_text)
        elif value_type is bool:
            parser.add_argument(f"--no_{name}" if default else f"--{name}", dest=name,
                                action="store_false" if default else "store_true", help=help_text)
        elif typing.get_origin(value_type) is tuple:  # tuple[str, ...]: each use adds one
            item_type = typing.get_args(value_type)[0]
            parser.add_argument(f"--{name}", action="append", default=list(default), type=VALUE_READERS[item_type],
                                metavar=METAVARS[item_type], help=help_text)
        else:
            parser.add_argument(f"--{name}", default=None if required else default, required=required,
                                type=VALUE_READERS[value_type], metavar=METAVARS[value_type], help=help_text)
    return parser, positionals


def docstring_parts(doc):  # -> (its first paragraph, {argument: the help text its Args: section gives})
    summary, _, rest = inspect.cleandoc(doc or "").partition("\n\n")
    args_section = rest.partition("Args:\n")[2]
    helps = {match[1]: " ".join(match[2].split())
             for match in re.finditer(r"^ {4}(\w+): (.*(?:\n {8,}.*)*)", args_section, re.MULTILINE)}
    return summary, helps


def cli_value_type(parameter):  # the type of a parameter's values: its annotation without None, else its default's
    if parameter.annotation is inspect.Parameter.empty:
        return type(parameter.default)
    if typing.get_origin(parameter.annotation) in (types.UnionType, typing.Union):  # int | None
        return next(a for a in typing.get_args(parameter.annotation) if a is not type(None))
    return parameter.annotation


def whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text):  # a finite float: nan and inf are never a setting
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


MAX_FLAGS_LISTED = 8  # an unknown flag's hint lists a command's flags if it has no more than this

VALUE_READERS = {int: whole_number, float: number, str: str}
METAVARS = {int: "INT", float: "NUMBER", str: "TEXT"}


def parse_command_line(parser, argv):  # -> {parameter name: value}, or the parser's one-line error
    for position, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # Python keeps bytes that are not UTF-8 as lone surrogates
            parser.error(f"command-line argument {position} ({os.fsencode(arg)!r}) is not valid UTF-8: give text "
                         "in UTF-8")
    arguments, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(unknown_argument(parser, extras[0]))
    # a flag given more than once arrives as a list: make it the tuple its annotation says
    return {name: tuple(value) if isinstance(value, list) else value for name, value in vars(arguments).items()}


def unknown_argument(parser, extra):  # what to say of the first argument the parser could not place
    if not extra.startswith("-"):
        return f"unexpected argument {extra!r}: quote a text that holds spaces, so that it is one argument"
    typed = extra.partition("=")[0]
    if typed in parser.flags:
        return f"{typed} came after --, which makes every argument after it text: put the flags before --"
    matches = [flag for flag in parser.flags if flag.startswith("--" + typed.lstrip("-"))]
    matches = matches or difflib.get_close_matches(typed, parser.flags, n=2)
    flags = [flag for flag in parser.flags if flag.startswith("--") and flag != "--help"]
    if matches:
        hint = f"did you mean {' or '.join(matches)}?"
    elif len(flags) <= MAX_FLAGS_LISTED:
        hint = f"{parser.prog} takes {', '.join(flags)}; a text that begins with - goes after --"
    else:
        hint = "a text that begins with - goes after --"
    return f"unknown flag {typed} ({hint})"


def speaking_of_flags(message, flags):  # the text of a GPT2Error or GPT2Warning, each argument it names as its flag
    text = str(message)
    for name in getattr(message, "arguments", ()):
        if name in flags:
            text = re.sub(rf"(?<![\w-]){name}\b", f"--{name}", text)
    return text
