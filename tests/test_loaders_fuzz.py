"""Property-based: random YAML / JSONL text fed to the experiment loader, the probe loader and
the corpus and Q&A readers either loads or raises FactlabError with a one-line message, never
any other exception."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factlab.config import load_experiment
from factlab.data.corpus import read_documents
from factlab.data.sft import load_conversations
from factlab.errors import FactlabError
from factlab.evaluate.probes import load_probes

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

KEYS = ["name", "model", "seed", "output_dir", "data", "stages", "eval", "sweep", "kind", "peft", "train", "lr",
        "epochs", "max_steps", "batch_size", "targets", "layers", "r", "alpha", "method", "merge", "corpus", "qa",
        "probes", "substitute", "replay", "source", "ratio", "sampling", "n", "temperature", "repeat", "points",
        "stages.0.train.lr", "bf16", "id", "prompt", "target", "distractors", "fact", "text", "question", "answer",
        "messages", "role", "content", "system", "tune", "influence", "space", "objectives", "samples", "packing"]
SCALARS = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["cpt", "sft", "lora", "attention", "0-1", "recall", "qa", "user",
                                                     "assistant", "auto", "cosine", "t", "1e-4"]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), c,
                                                                                    max_size=6), max_leaves=25)
# Objects shaped like the real thing (known keys), plus anything else.
OBJECTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8) | VALUES


def _one_line(e: FactlabError) -> None:
    msg = str(e)
    assert msg.strip() and "\n" not in msg, repr(msg)


_TMP = Path(tempfile.mkdtemp(prefix="factlab-fuzz-"))  # one folder for the module, removed at the end
atexit.register(shutil.rmtree, _TMP, True)


def _file(suffix: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp(dir=_TMP))
    p = d / f"f{suffix}"
    p.write_bytes(data)
    return p


def _yaml_texts():
    dumped = OBJECTS.map(lambda v: yaml.safe_dump(v, allow_unicode=True))
    return st.text(max_size=200) | dumped | dumped.flatmap(
        lambda t: st.integers(0, len(t)).map(lambda i: t[:i]))  # truncated documents too


def _jsonl_texts():
    lines = st.lists(OBJECTS.map(lambda v: json.dumps(v, ensure_ascii=False)) | st.text(max_size=40), max_size=5)
    return lines.map("\n".join) | st.text(max_size=200)


@SETTINGS
@given(text=_yaml_texts(), bom=st.booleans())
def test_experiment_loader(text, bom):
    path = _file(".yaml", (("\ufeff" if bom else "") + text).encode("utf-8", "surrogatepass"))
    try:
        load_experiment(path)
    except FactlabError as e:
        _one_line(e)


@SETTINGS
@given(text=_yaml_texts(), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_experiment_loader_with_overrides(text, overrides):
    path = _file(".yaml", text.encode("utf-8", "surrogatepass"))
    try:
        load_experiment(path, overrides)
    except FactlabError as e:
        _one_line(e)


@SETTINGS
@given(text=_jsonl_texts(), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_probe_loader(text, raw, use_raw):
    path = _file(".jsonl", raw if use_raw else text.encode("utf-8", "surrogatepass"))
    try:
        load_probes(path)
    except FactlabError as e:
        _one_line(e)


@SETTINGS
@given(text=_jsonl_texts(), raw=st.binary(max_size=40), use_raw=st.booleans(), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_corpus_reader(text, raw, use_raw, suffix):
    path = _file(suffix, raw if use_raw else text.encode("utf-8", "surrogatepass"))
    try:
        read_documents([path])
    except FactlabError as e:
        _one_line(e)


@SETTINGS
@given(text=_jsonl_texts(), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_qa_reader(text, raw, use_raw):
    path = _file(".jsonl", raw if use_raw else text.encode("utf-8", "surrogatepass"))
    try:
        load_conversations(path)
    except FactlabError as e:
        _one_line(e)
