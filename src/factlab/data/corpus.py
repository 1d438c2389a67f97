"""Continued pre-training data: documents as training examples.

Two packings (`train.packing`):
- `blocks`: documents joined with EOS and cut into fixed `seq_len` blocks (few, full examples:
  the fastest per token, the classic pre-training layout; a short-fact corpus becomes a
  handful of blocks, so few optimizer steps).
- `documents` (the default): one document per example (a document longer than `seq_len` is cut
  into pieces of at most `seq_len`); the Trainer lays a batch's documents end to end in one
  row without padding (train.collators.stage_collator), no token ever attends across documents,
  and every fact starts at a document start, as it will in a question.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from factlab.data.io import iter_jsonl, read_text
from factlab.errors import FactlabError


def read_documents(paths: list[str | Path]) -> list[tuple[str, str]]:
    """(label, text) of every document, empty ones included: .txt/.md files (one document per
    file), .jsonl files ({"text": ...} per line, labelled file:line) or folders of those
    (sorted by name). A missing path or a folder without such files is an error."""
    out: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".md"))
            if not files:
                raise FactlabError(f"corpus folder {p} has no .txt, .md or .jsonl files; put the documents there")
        else:
            files = [p]
        for f in files:
            if f.suffix == ".jsonl":
                for lineno, obj in iter_jsonl(f, "corpus file"):
                    if not isinstance(obj.get("text"), str):
                        raise FactlabError(f"{f}:{lineno}: corpus lines need a string field \"text\"")
                    out.append((f"{f}:{lineno}", obj["text"]))
            else:
                out.append((str(f), read_text(f, "corpus file")))
    return out


def load_documents(paths: list[str | Path]) -> list[str]:
    """The non-empty documents of read_documents(), stripped; no documents at all is an error."""
    docs = [text.strip() for _, text in read_documents(paths) if text.strip()]
    if not docs:
        shown = ", ".join(str(p) for p in paths) or "(none given)"
        raise FactlabError(f"the corpus is empty ({shown}); give .txt/.jsonl files with some text in data.corpus")
    return docs


def pack_documents(tokenizer, docs: list[str], seq_len: int) -> list[dict]:
    """Tokenize, join documents with EOS and cut into `seq_len` blocks.

    Every document is followed by EOS, so a block that spans two documents has the boundary
    marked. The last, shorter block is kept (padded at collation, its padding masked out of
    the loss) because in a small fact corpus every token counts.
    Returns examples {"input_ids", "attention_mask", "labels"}.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FactlabError("the tokenizer has no EOS token; CPT packing needs one to mark document ends")
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
        stream.append(eos)
    return _pieces(stream, seq_len)


def _pieces(ids: list[int], seq_len: int) -> list[dict]:
    """Consecutive examples of at most `seq_len` tokens; a lone trailing token is dropped (it
    has nothing to predict)."""
    return [{"input_ids": piece, "attention_mask": [1] * len(piece), "labels": list(piece)}
            for piece in (ids[start : start + seq_len] for start in range(0, len(ids), seq_len))
            if len(piece) >= 2]


def document_examples(tokenizer, docs: list[str], seq_len: int) -> list[dict]:
    """One example per document (ending with EOS), a document longer than `seq_len` tokens cut
    into consecutive pieces of at most `seq_len` tokens. Padding happens at collation (masked
    out of the loss and of attention), so a token only ever sees tokens of its own document.
    Returns examples {"input_ids", "attention_mask", "labels"}.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FactlabError("the tokenizer has no EOS token; CPT needs one to mark document ends")
    return [ex for doc in docs for ex in _pieces(tokenizer(doc, add_special_tokens=True)["input_ids"] + [eos], seq_len)]


def cpt_examples(tokenizer, docs: list[str], seq_len: int, packing: str = "documents") -> list[dict]:
    """CPT examples in the chosen packing (`blocks` or `documents`, see the module docstring)."""
    if packing == "documents":
        return document_examples(tokenizer, docs, seq_len)
    if packing == "blocks":
        return pack_documents(tokenizer, docs, seq_len)
    raise FactlabError(f"train.packing: unknown value {packing!r}; use blocks or documents")


def builtin_replay_documents() -> list[str]:
    """The general English shipped for `replay: {source: general}` (factlab/builtin/replay.txt:
    SmolLM2-135M-Instruct's own answers on everyday topics, made by tools/make_replay_text.py),
    one document per blank-line-separated block; the header comment is left out."""
    text = resources.files("factlab.builtin").joinpath("replay.txt").read_text(encoding="utf-8")
    return [b.strip() for b in text.split("\n\n") if b.strip() and not b.lstrip().startswith("#")]
