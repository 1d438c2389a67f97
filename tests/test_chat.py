"""`factlab chat`: scripted stdin through the entry point (and `python -m factlab chat` in a
pseudo-terminal) on a tiny chat model."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
from cli_helpers import run_cli

from factlab.chat import chat_loop
from factlab.errors import FactlabError
from factlab.testing import tiny_model, tiny_tokenizer


def _greedy(model, tok, history, n):
    enc = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_chat_streams_answers_keeps_history_and_resets():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    out = io.StringIO()
    n = chat_loop([("tuned", model, tok)], temperature=0, max_new_tokens=6,
                  inp=io.StringIO("Who runs the press line?\nAnd the night shift?\n/reset\nAnd the night shift?\n/quit\nnot read\n"), out=out)
    assert n == 3
    text = out.getvalue()
    answers = [part.split("you> ", 1)[0] for part in text.split("tuned> ")[1:]]
    first = _greedy(model, tok, [{"role": "user", "content": "Who runs the press line?"}], 6)
    second = _greedy(model, tok, [{"role": "user", "content": "Who runs the press line?"}, {"role": "assistant", "content": first},
                                  {"role": "user", "content": "And the night shift?"}], 6)
    fresh = _greedy(model, tok, [{"role": "user", "content": "And the night shift?"}], 6)
    assert [a.strip() for a in answers] == [first, second, fresh]
    assert "(conversation cleared)" in text and "not read" not in text


def test_chat_without_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=False)
    with pytest.raises(FactlabError, match="no chat template"):
        chat_loop([("m", tiny_model("llama", vocab_size=len(tok)), tok)], inp=io.StringIO("hi\n"), out=io.StringIO())


def chat_cli(monkeypatch, capsys, stdin: str, *args) -> tuple[int, str, str]:
    """`factlab chat ARGS` through the entry point in this process, `stdin` as its input."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return run_cli(monkeypatch, capsys, "chat", *args)


def test_chat_cli_scripted_stdin(tiny_dir, monkeypatch, capsys):
    code, out, err = chat_cli(monkeypatch, capsys, "Who runs the press line?\n/reset\nhello\n",
                              tiny_dir, "-t", "0", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.count(f"{tiny_dir.name}> ") == 2 and "(conversation cleared)" in out


def test_chat_cli_compare_answers_with_base_then_stage(tiny_run, monkeypatch, capsys):
    from factlab.models.loading import load_model

    q = "Who runs the press line?"
    code, out, err = chat_cli(monkeypatch, capsys, q + "\n/quit\n", tiny_run, "--compare", "-t", "0", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.index("base> ") < out.index("cpt> ")
    base_answer = out.split("base> ", 1)[1].split("cpt> ", 1)[0]
    tuned_answer = out.split("cpt> ", 1)[1].split("you> ", 1)[0]
    for answer, folder in [(base_answer, tiny_run.parent.parent / "model"), (tuned_answer, tiny_run / "stages" / "1-cpt" / "merged")]:
        model, tok = load_model(folder)
        assert answer.strip() == _greedy(model, tok, [{"role": "user", "content": q}], 6)


def test_chat_errors(tiny_dir, monkeypatch, capsys):
    code, _, err = chat_cli(monkeypatch, capsys, "", tiny_dir, "--stage", "cpt")
    assert code == 2 and "no finished stage 'cpt'" in err and "Traceback" not in err
    code, _, err = chat_cli(monkeypatch, capsys, "", tiny_dir, "--compare")
    assert code == 2 and "--compare needs a run folder" in err


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_chat_in_a_pseudo_terminal(tiny_dir):
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: the chat, its stdin/stdout a terminal
        os.execv(sys.executable, [sys.executable, "-m", "factlab", "chat", str(tiny_dir), "-t", "0", "--max-new-tokens", "4"])
    seen = b""

    def read_until(marker: bytes, timeout: float = 240) -> None:
        nonlocal seen
        import time

        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([fd], [], [], 1)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"you> ")
    os.write(fd, b"hello\n")
    read_until(f"{tiny_dir.name}> ".encode())
    seen = seen.split(f"{tiny_dir.name}> ".encode(), 1)[1]
    read_until(b"you> ")
    os.write(fd, b"/quit\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"you> " in seen


def test_chat_answers_a_taught_fact(tmp_path):
    # Teach a tiny model one fact by SFT, then ask it in the chat: the tuned model says it, the
    # untrained one does not.
    from factlab.config import StageSpec
    from factlab.train.data import StageInputs, build_stage_examples
    from factlab.train.stage import train_stage

    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    conv = [{"role": "user", "content": "Who runs the press line?"},
            {"role": "assistant", "content": "Marta Ilvane runs the press line."}]
    stage = StageSpec.model_validate({"kind": "sft", "peft": {"method": "full"},
                                      "train": {"lr": 1e-2, "max_steps": 60, "batch_size": 1, "seq_len": 64, "bf16": False, "scheduler": "constant"}})
    tuned, _ = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, stage, "sft", tmp_path / "1-sft",
                           build_stage_examples(stage, tok, StageInputs([conv]), seed=0), seed=0)
    out = io.StringIO()
    chat_loop([("base", base, tok), ("sft", tuned, tok)], temperature=0, max_new_tokens=12,
              inp=io.StringIO("Who runs the press line?\n"), out=out)
    base_answer = out.getvalue().split("base> ", 1)[1].split("sft> ", 1)[0]
    tuned_answer = out.getvalue().split("sft> ", 1)[1].split("you> ", 1)[0]
    assert "Marta Ilvane" in tuned_answer and "Marta Ilvane" not in base_answer
