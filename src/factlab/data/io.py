"""Reading the user's text and JSONL files with one clear error per problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from factlab.errors import FactlabError


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of `path`, or a FactlabError naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise FactlabError(f"{what} {path} is a folder; give a file")
    if not path.is_file():
        # A data folder whose text is fetched, not committed (the real play), says how in FETCH.
        hint = path.parent / "FETCH"
        if hint.is_file():
            raise FactlabError(f"{what} {path} has not been fetched yet; fetch it with: {hint.read_text(encoding='utf-8').strip().replace('{folder}', str(path.parent))}")
        raise FactlabError(f"{what} {path} does not exist; check the path")
    try:
        # utf-8-sig: a BOM (written by some editors) is accepted, as in probe files
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FactlabError(f"{what} {path} is not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise FactlabError(f"{what} {path} contains NUL bytes (line {line}): it is binary, not text; give a UTF-8 text file")
    return text


def iter_jsonl(path: Path, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; FactlabError on malformed JSON."""
    text = read_text(path, what)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FactlabError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix that line") from None
        if not isinstance(obj, dict):
            raise FactlabError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        yield lineno, obj
