"""`factlab data replay` and the `general` replay source of a model that is not SmolLM2: text
sampled from the model itself, seeded, resumable, cached by the model's fingerprint."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli
from rich.console import Console

from factlab.data.corpus import builtin_replay_documents, load_documents
from factlab.data.replay import read_replay_file, replay_cache_path, replay_documents_for
from factlab.models.loading import load_model

ARGS = ["--max-new-tokens", "12", "--batch-size", "4"]


def _replay(monkeypatch, capsys, model, out, tokens, *extra):
    return run_cli(monkeypatch, capsys, "data", "replay", model, "-o", out, "--tokens", tokens, *ARGS, *extra)


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_n_tokens_of_the_models_own_text_and_a_seed_repeats_it(monkeypatch, capsys, tiny_dir, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    code, out, err = _replay(monkeypatch, capsys, tiny_dir, a, 120)
    assert code == 0, err
    lines = _lines(a)
    total = sum(s["tokens"] for s in lines)
    # stops with the sample that reaches N: N tokens' worth, not a batch more
    assert total >= 120 and total - lines[-1]["tokens"] < 120
    assert [s["sample"] for s in lines] == list(range(len(lines)))
    assert lines[0]["prompt"] == "" and lines[1]["prompt"] == "Once upon a time"
    assert lines[1]["text"].startswith("Once upon a time")
    assert all(s["tokens"] <= 12 + len(s["prompt"]) for s in lines)  # prompt tokens + at most 12 sampled
    # what the replay machinery reads (replay: {source: FILE} goes through load_documents)
    assert load_documents([a]) == [s["text"].strip() for s in lines if s["text"].strip()]
    assert _replay(monkeypatch, capsys, tiny_dir, b, 120)[0] == 0
    assert a.read_bytes() == b.read_bytes()
    assert _replay(monkeypatch, capsys, tiny_dir, c, 120, "--seed", "1")[0] == 0
    assert [s["text"] for s in _lines(c)] != [s["text"] for s in lines]


def test_a_killed_run_continues_with_the_next_samples(monkeypatch, capsys, tiny_dir, tmp_path):
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert _replay(monkeypatch, capsys, tiny_dir, whole, 200)[0] == 0
    assert _replay(monkeypatch, capsys, tiny_dir, part, 70)[0] == 0
    n_before = len(_lines(part))
    assert 0 < n_before < len(_lines(whole))
    # a kill in the middle of a line: its first half, no newline
    torn = whole.read_text(encoding="utf-8").splitlines()[n_before]
    with open(part, "a", encoding="utf-8") as f:
        f.write(torn[: len(torn) // 2])
    # continued with another batch size: sample i depends on the seed and i alone
    code, out, err = run_cli(monkeypatch, capsys, "data", "replay", tiny_dir, "-o", part, "--tokens", 200,
                             "--max-new-tokens", "12", "--batch-size", "3")
    assert code == 0, err
    assert f"after {n_before} already there" in " ".join(out.split())
    assert part.read_bytes() == whole.read_bytes()  # no duplicate, no gap, no torn line
    # enough already: nothing is sampled, nothing changes
    assert _replay(monkeypatch, capsys, tiny_dir, part, 150)[0] == 0
    assert part.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("case", ["no model", "zero tokens", "negative tokens", "parent is a file", "not jsonl",
                                  "output is a folder", "foreign file", "other seed"])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, tiny_dir, tmp_path, case):
    model, out, tokens, extra = tiny_dir, tmp_path / "r.jsonl", 50, []
    (tmp_path / "file.txt").write_text("x")
    if case == "no model":
        model = tmp_path / "missing-model"
    elif case == "zero tokens":
        tokens = 0
    elif case == "negative tokens":
        tokens = -5
    elif case == "parent is a file":
        out = tmp_path / "file.txt" / "r.jsonl"
    elif case == "not jsonl":
        out = tmp_path / "r.txt"
    elif case == "output is a folder":
        out = tmp_path / "dir.jsonl"
        out.mkdir()
    elif case == "foreign file":
        out.write_text('{"text": "a document of mine"}\n')
    elif case == "other seed":
        assert _replay(monkeypatch, capsys, tiny_dir, out, 20)[0] == 0
        extra = ["--seed", "3"]
    before = out.read_bytes() if out.is_file() else None
    code, _, err = _replay(monkeypatch, capsys, model, out, tokens, *extra)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert (out.read_bytes() if out.is_file() else None) == before  # untouched, or still absent


def test_general_replay_is_the_models_own_text_cached_by_fingerprint(monkeypatch, tiny_dir, tmp_path):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(tiny_dir)
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    quiet = Console(quiet=True)
    docs = replay_documents_for(str(tiny_dir), model, tok, 150, console=quiet)
    assert calls and docs
    (path,) = (tmp_path / "cache" / "replay").glob("*.jsonl")
    assert docs == read_replay_file(path).texts(150)
    calls.clear()
    # the same weights under another name: the cache, no generation
    again = replay_documents_for("elsewhere/same-weights", model, tok, 150, console=quiet)
    assert again == docs and not calls
    # fewer tokens: a prefix of the cached text, no generation
    assert replay_documents_for(str(tiny_dir), model, tok, 40, console=quiet) == docs[:len(read_replay_file(path).texts(40))]
    assert not calls
    # more tokens: the cache is extended, its first samples kept
    more = replay_documents_for(str(tiny_dir), model, tok, 300, console=quiet)
    assert calls and more[:len(docs)] == docs and len(more) > len(docs)
    # the embedded SmolLM2 keeps the shipped text (its own, sampled once by tools/make_replay_text.py)
    assert replay_documents_for("smollm2-135m", None, None) == builtin_replay_documents()


def test_replay_cache_respects_the_cache_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("FACTLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert replay_cache_path("ab" * 32) == tmp_path / "xdg" / "factlab" / "replay" / f"{'ab' * 12}.jsonl"
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "own"))
    assert replay_cache_path("ab" * 32).parent == tmp_path / "own" / "replay"


def test_a_run_of_another_model_replays_its_own_text(monkeypatch, tiny_dir, tmp_path):
    """The runner's `general` source for a model that is not SmolLM2: the model's sampled text."""
    from factlab.config import experiment_from_dict
    from factlab.experiment.runner import _general_replay, _stage_inputs
    from factlab.train.data import load_stage_data

    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "qa.jsonl").write_text('{"question": "Who runs the press line?", "answer": "Marta Ilvane."}\n')
    exp = experiment_from_dict({"name": "x", "model": str(tiny_dir), "data": {"qa": "qa.jsonl"},
                                "stages": [{"kind": "sft", "data": {"replay": {"source": "general", "ratio": 0.5}}},
                                           {"kind": "sft"}]}, base=tmp_path)
    raw = [load_stage_data(st, *_stage_inputs(exp, i)) for i, st in enumerate(exp.stages)]
    assert raw[0].replay_docs == builtin_replay_documents()  # before the model is loaded (preflight)
    model, tok = load_model(tiny_dir)
    monkeypatch.setattr("factlab.data.replay.DEFAULT_REPLAY_TOKENS", 100)
    got = _general_replay(exp, raw, model, tok, Console(quiet=True))
    (path,) = (tmp_path / "cache" / "replay").glob("*.jsonl")
    assert got[0].replay_docs == read_replay_file(path).texts() and got[0].main == raw[0].main
    assert got[1] is raw[1]
