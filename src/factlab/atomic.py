"""Writers that never leave half-written output: write into a temporary sibling, rename when
complete (what run folders already do with their `.partial` stage folders).

An interrupted or failing writer (Ctrl-C, a full disk, a bug) leaves the target as it was:
absent, or the previous complete version. Renames within one folder are atomic on POSIX.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator



def _new_parents(path: Path) -> list[Path]:
    """The missing ancestors of `path`, deepest first (to remove them again on failure)."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _commit_point(tmp: Path) -> None:
    """Just before a finished temporary output is renamed into place: a Ctrl-C that arrived
    (even one a finalizer swallowed, see catch_interrupts below) stops the commit here.

    FACTLAB_TEST_HOLD_COMMIT=FILE (tests only): write the temporary path into FILE and wait
    here, so that a test can interrupt a writer at a point it controls, not after a sleep."""
    hold = os.environ.get("FACTLAB_TEST_HOLD_COMMIT")
    if hold:
        import time

        Path(hold).write_text(str(tmp), encoding="utf-8")
        end = time.monotonic() + 120
        while time.monotonic() < end and not interrupt_pending():
            time.sleep(0.01)
    raise_if_interrupted()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically, on
    any exception (KeyboardInterrupt included) it is removed, with any parent folder made for it."""
    target = Path(target)
    made = _new_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield tmp
        _commit_point(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `target` through a temporary sibling (see staged_file)."""
    with staged_file(target) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return Path(target)


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success its contents become `target`.

    A missing or empty `target` is replaced by the folder in one rename. An existing non-empty
    `target` (an overwrite the caller allowed) gets each top-level entry of the new folder
    swapped in by name; entries the writer did not produce are left alone. On any exception the
    temporary folder (and any parent made for it) is removed and `target` is untouched."""
    target = Path(target)
    made = _new_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        tmp.mkdir()  # inside the try: an interrupt right after it still removes the folder
        yield tmp
        _commit_point(tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.rename(tmp, target)
            return
        for entry in sorted(tmp.iterdir()):
            _remove(target / entry.name)
            os.rename(entry, target / entry.name)
        tmp.rmdir()
    except BaseException:
        _remove(tmp)
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise


# --- Ctrl-C that a finalizer swallowed ------------------------------------------------------
# Python raises KeyboardInterrupt wherever the interpreter happens to be when SIGINT arrives.
# When that is a __del__ method or a weakref callback (a progress bar's, a writer's; the issue
# saw `Exception ignored in ... Group.__del__`), the exception is printed as "ignored" and the
# command carries on: `factlab export` then wrote the whole file and exited 0. So the CLI's
# handler also latches the interrupt, and every atomic writer checks the latch before it
# renames its temporary file into place (below), and the CLI after the command returns.
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
