"""Continued pre-training data: documents joined with EOS and packed into fixed-length blocks."""

from __future__ import annotations

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
    blocks = []
    for start in range(0, len(stream), seq_len):
        ids = stream[start : start + seq_len]
        if len(ids) < 2:  # a lone trailing token has nothing to predict
            continue
        blocks.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return blocks
