"""User-facing errors.

A ``FactlabError`` is bad input or a missing resource the user can fix. The CLI prints its
message as one line and exits with code 2, without a traceback. The message names the
problem and the fix.
"""


class FactlabError(Exception):
    """Bad input or a missing resource; the message says what is wrong and how to fix it."""

    def __init__(self, message: object = "") -> None:
        # One line, always: a key or value quoted into the message may hold a newline or tab.
        super().__init__(" ".join(str(message).split()))


# What an interrupted command kept on disk: a command registers a callable before it starts
# writing, and the CLI's Ctrl-C handler calls it for its one-line message. It lives here, in the
# lowest layer, so that every command module (cli, cli_data) can register one.
_interrupt_note: list = []


def on_interrupt(note) -> None:
    """Register a callable that returns what an interrupted command kept on disk (or None)."""
    _interrupt_note[:] = [note]


def interrupt_kept() -> str | None:
    """What the registered callable says was kept (None when nothing is registered)."""
    return _interrupt_note[0]() if _interrupt_note else None

