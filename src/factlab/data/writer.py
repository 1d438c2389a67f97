"""The one writer of generated data folders (``factlab data synth`` and ``factlab data augment``).

Layout: ``docs/`` holds the training corpus, one ``.txt`` per document up to
:data:`DOCS_AS_FILES_MAX` documents (easy to read), beyond that one ``docs/corpus.jsonl``
(``{"id", "text", ...}`` per line); either way ``data.corpus: OUT/docs`` loads it. Beside it, the
named JSONL / JSON files. Same rows, same bytes: keys sorted, UTF-8 unescaped, ``\\n`` line ends.

Writing goes through ``factlab.atomic.staged_dir``: everything is written into a temporary
sibling folder and moved into place once complete, so an interrupted or failing write (Ctrl-C,
a full disk, a bug) leaves the output folder as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from factlab.atomic import staged_dir
from factlab.errors import FactlabError

DOCS_AS_FILES_MAX = 200
"""Corpora with at most this many documents are written as ``docs/*.txt``; larger ones as
``docs/corpus.jsonl``."""

OWN_NAMES = ("docs", "corpus.jsonl", "qa.jsonl", "probes.jsonl", "select-probes.jsonl", "facts.jsonl",
             "world.json", "manifest.json")
"""Everything this writer (or an earlier version of it: top-level ``corpus.jsonl``) puts in a
folder; an overwrite removes the ones it does not write again, so stale files cannot mix in."""


def jsonl_text(rows: Iterable[Mapping]) -> str:
    """One JSON object per line, keys sorted, non-ASCII kept: same rows, same bytes."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def json_text(obj: Mapping) -> str:
    """An indented JSON document (summaries, manifests), keys sorted, with a final newline."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2) + "\n"


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path, or a FactlabError if it is a file, or a non-empty folder without ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FactlabError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FactlabError(f"output folder {out} is not empty; choose a new folder or pass --force to overwrite")
    return out


def write_data_folder(out: str | Path, documents: list[dict], files: Mapping[str, str],
                      overwrite: bool = False) -> Path:
    """Write ``documents`` (``{"id", "text", ...}``) into ``out/docs`` and each ``files`` entry
    (name -> text) into ``out``, atomically (see the module docstring); returns the docs folder.

    A non-empty ``out`` is refused unless ``overwrite``; then the new files replace the old
    ones, files of :data:`OWN_NAMES` not written again are removed, and anything else in the
    folder is left alone.
    """
    out = check_output_folder(out, overwrite)
    unknown = set(files) - set(OWN_NAMES)
    if unknown:  # a programming error: OWN_NAMES must list every output, or overwrites leave stale files
        raise ValueError(f"write_data_folder: {sorted(unknown)} not in OWN_NAMES")
    with staged_dir(out) as tmp:
        docs = tmp / "docs"
        docs.mkdir()
        # bytes, not text: no platform newline translation
        if len(documents) <= DOCS_AS_FILES_MAX:
            for d in documents:
                (docs / f"{d['id']}.txt").write_bytes((d["text"] + "\n").encode("utf-8"))
        else:
            (docs / "corpus.jsonl").write_bytes(jsonl_text(documents).encode("utf-8"))
        for name, text in files.items():
            (tmp / name).write_bytes(text.encode("utf-8"))
    # After the complete new set is in place: an interruption here leaves a stale extra file at
    # worst, never a folder with old files gone and new ones missing.
    for name in set(OWN_NAMES) - {"docs", *files}:
        (out / name).unlink(missing_ok=True)
    return out / "docs"
