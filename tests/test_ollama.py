"""`factlab export --ollama`: the Modelfile, parsed the way Ollama documents its format
(docs/modelfile.md: one instruction per line, `#` comments, FROM required, values in double
quotes or triple quotes over several lines), and its TEMPLATE checked against transformers'
rendering of the chat template."""

from __future__ import annotations

import json
import re

from cli_helpers import run_cli

from factlab.models.ollama import chat_pieces
from factlab.testing import tiny_tokenizer

INSTRUCTIONS = {"from", "parameter", "template", "system", "adapter", "license", "message", "requires"}
PARAMETERS = {"num_ctx", "repeat_last_n", "repeat_penalty", "temperature", "seed", "stop", "num_predict", "top_k", "top_p", "min_p"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, value) per Ollama's Modelfile format; AssertionError on anything else."""
    out, i, lines = [], 0, text.split("\n")
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, value = line.partition(" ")
        assert word.lower() in INSTRUCTIONS, line
        if value.startswith('"""'):
            body = value[3:]
            while '"""' not in body:
                body += "\n" + lines[i]
                i += 1
            value, rest = body.split('"""', 1)
            assert not rest.strip(), line
        elif value.startswith('"'):
            value = json.loads(value)
        out.append((word.lower(), value))
    return out


def test_the_template_gives_transformers_prompt():
    tok = tiny_tokenizer()
    pieces = chat_pieces(tok)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who runs the press line?"},
            {"role": "assistant", "content": "Marta Ilvane."}, {"role": "user", "content": "And the night shift?"}]
    for msgs in (conv, conv[1:], conv[1:2]):
        assert pieces.render(msgs) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    go = pieces.go_template()
    assert "{{-" not in go  # Go's trim markers would eat the template's newlines
    # every piece is in the Go template, in the order the renderer uses them
    at = 0
    for piece in (pieces.system[0], pieces.system[1], pieces.head, pieces.user[0], pieces.user[1],
                  pieces.assistant[0], pieces.assistant[1], pieces.generation):
        at = go.index(piece, at) if piece else at


def test_export_ollama_writes_a_modelfile_ollama_reads(smol_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ollama"
    code, _, err = run_cli(monkeypatch, capsys, "export", smol_run, "--ollama", out, "--type", "q8_0")
    assert code == 0, err
    entries = parse_modelfile((out / "Modelfile").read_text())
    got = {}
    for k, v in entries:
        got.setdefault(k, []).append(v)
    assert got["from"] == ["./model.gguf"] and (out / "model.gguf").is_file()
    assert len(got["template"]) == 1 and "{{ .Content }}" in got["template"][0]
    params = [v.split(" ", 1) for v in got["parameter"]]
    assert all(name in PARAMETERS for name, _ in params)
    stops = [json.loads(v) for name, v in params if name == "stop"]
    assert "<|im_end|>" in stops  # SmolLM2-Instruct ends its turns with it
    assert re.search(r"<\|im_start\|>assistant\n$", got["template"][0])  # where the answer starts


def test_export_survival_scores_every_type_in_llama_cpp(smol_run, tmp_path, monkeypatch, capsys):
    # The pipeline of `factlab export RUN --survival DIR` on the tiny run (rows of 16 values: too
    # short for blocks of 32, so here every type holds f16 matrices; the real numbers come from the
    # demo's run).
    out = tmp_path / "survival"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", smol_run, "--survival", out)
    assert code == 0, err
    data = json.loads((out / "survival.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["fp32 (transformers)", "f16 (llama.cpp)", "q8_0 (llama.cpp)", "q4_0 (llama.cpp)"]
    assert all(r["recall acc"] is not None for r in data["rows"])
    assert data["rows"][1]["recall acc"] == data["rows"][0]["recall acc"]  # f16 keeps the verdicts
    assert (out / "survival.md").read_text().startswith("| model | recall acc | recall greedy |")
    assert "| q4_0 (llama.cpp) |" in stdout and sorted(p.name for p in out.glob("*.gguf")) == [
        "model-f16.gguf", "model-q4_0.gguf", "model-q8_0.gguf"]
