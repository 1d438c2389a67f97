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


# --- Ctrl-C that a finalizer swallowed ------------------------------------------------------
# Python raises KeyboardInterrupt wherever the interpreter happens to be when SIGINT arrives.
# When that is a __del__ method or a weakref callback (a progress bar's, a writer's; the issue
# saw `Exception ignored in ... Group.__del__`), the exception is printed as "ignored" and the
# command carries on: `factlab export` then wrote the whole file and exited 0. So the CLI's
# handler also latches the interrupt, and every atomic writer checks the latch before it
# renames its temporary file into place (factlab.atomic), and the CLI after the command returns.
_sigint_seen = False


def _on_sigint(signum, frame) -> None:
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


def catch_interrupts():
    """Install the latching SIGINT handler (and keep a swallowed interrupt's "Exception
    ignored" report off stderr); returns a function that restores what was there. Does nothing
    off the main thread or when SIGINT is not Python's default (ignored under nohup, or a test
    runner's own)."""
    import signal
    import sys
    import threading

    global _sigint_seen
    _sigint_seen = False
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return lambda: None
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # latched: the next commit point (or the CLI) raises it again
        previous_hook(unraisable)

    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = hook

    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook

    return restore


def interrupt_pending() -> bool:
    """True when a Ctrl-C arrived since catch_interrupts(), even one a finalizer swallowed."""
    return _sigint_seen


def raise_if_interrupted() -> None:
    """KeyboardInterrupt when a Ctrl-C arrived (see catch_interrupts): called before output is
    committed, so an interrupt that was swallowed still leaves nothing written."""
    if _sigint_seen:
        raise KeyboardInterrupt
