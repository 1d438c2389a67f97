"""The one writer of generated data folders (synth and augment): one layout, atomic, and an
overwrite that replaces factlab's own files only."""

from __future__ import annotations

from pathlib import Path

import pytest

from factlab.data.augment import augment_facts, write_augmented
from factlab.data.corpus import load_documents
from factlab.data.render import Fact
from factlab.data.synth import synth_world, write_world
from factlab.data.writer import DOCS_AS_FILES_MAX, write_data_folder
from factlab.errors import FactlabError

DOCS = [{"id": f"d{i}", "text": f"Document {i}."} for i in range(5)]
FACTS = [Fact("Marta Ilvane", "works_at", "Velmora Works", "f1"), Fact("Jonas Perl", "works_at", "Edda Press", "f2"),
         Fact("Oda Renn", "works_at", "Quill Yards", "f3")]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def failing_write_bytes(monkeypatch, after: int, exc: BaseException):
    """Path.write_bytes raises `exc` on its call number `after` + 1 (a Ctrl-C or a full disk mid-write)."""
    real, calls = Path.write_bytes, [0]

    def write_bytes(self, data):
        calls[0] += 1
        if calls[0] > after:
            raise exc
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_write_leaves_nothing_new_and_the_old_folder_as_it_was(tmp_path, monkeypatch, exc):
    fresh = tmp_path / "new" / "out"  # its parent is made by the writer, and removed again
    old = tmp_path / "old"
    write_data_folder(old, DOCS, {"qa.jsonl": "{}\n", "manifest.json": "{}\n"})
    (old / "notes.txt").write_text("mine")
    before = tree(old)
    failing_write_bytes(monkeypatch, 3, exc)
    with pytest.raises(type(exc)):
        write_data_folder(fresh, DOCS, {"qa.jsonl": "{}\n"})
    with pytest.raises(type(exc)):
        write_data_folder(old, DOCS[:2], {"probes.jsonl": "{}\n"}, overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()
    assert tree(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folder left


def test_one_layout_at_every_size_and_overwrite_replaces_only_own_files(tmp_path):
    many = [{"id": f"d{i}", "text": f"Document {i}."} for i in range(DOCS_AS_FILES_MAX + 1)]
    docs = write_data_folder(tmp_path / "big", many, {})
    assert docs == tmp_path / "big" / "docs" and [p.name for p in docs.iterdir()] == ["corpus.jsonl"]
    assert load_documents([docs]) == [d["text"] for d in many]

    out = tmp_path / "out"
    write_data_folder(out, DOCS, {"qa.jsonl": "{}\n", "select-probes.jsonl": "{}\n"})
    with pytest.raises(FactlabError, match="not empty"):
        write_data_folder(out, DOCS, {"qa.jsonl": "{}\n"})
    (out / "notes.txt").write_text("mine")
    write_data_folder(out, DOCS[:2], {"qa.jsonl": "[]\n"}, overwrite=True)
    assert sorted(tree(out)) == ["docs/d0.txt", "docs/d1.txt", "notes.txt", "qa.jsonl"]  # stale own files gone
    assert (out / "qa.jsonl").read_text() == "[]\n"
    with pytest.raises(ValueError, match="OWN_NAMES"):
        write_data_folder(tmp_path / "x", DOCS, {"other.json": "{}"})


def test_synth_and_augment_write_through_the_one_writer(tmp_path):
    """A world overwritten by an augmented set (and back) leaves no file of the other."""
    out = tmp_path / "out"
    write_world(synth_world(12, seed=0), out)
    write_augmented(augment_facts(FACTS, phrasings=2, heldout_phrasings=2), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["docs", "manifest.json", "probes.jsonl", "qa.jsonl",
                                                     "select-probes.jsonl"]
    assert all(p.name.startswith("s0") for p in (out / "docs").iterdir())
    write_world(synth_world(12, seed=0), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["docs", "facts.jsonl", "probes.jsonl", "qa.jsonl", "world.json"]
