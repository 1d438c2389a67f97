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

from factlab.errors import interrupt_pending, raise_if_interrupted


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
    (even one a finalizer swallowed, see errors.catch_interrupts) stops the commit here.

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
