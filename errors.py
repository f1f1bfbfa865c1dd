"""The one kind of user-facing error, and the one kind of warning: what is wrong and what to do about it.

Every layer raises these, from the file formats up to the command line, which prints the message as one line.
This file imports nothing, so that any file can import it without pulling anything else in.
"""


class _NamesArguments:
    """arguments: the Python arguments the message names (top_p, ...); the command line shows them as its flags."""

    def __init__(self, message, arguments=()):
        super().__init__(message)
        self.arguments = tuple(arguments)


class GPT2Error(_NamesArguments, Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""


class GPT2Warning(_NamesArguments, UserWarning):
    """An option that will have no effect, and why."""
