"""Supervised fine-tuning data: Q&A or chat JSONL -> the tokenizer's chat template, with the
loss on the answer tokens only and the answer's EOS trained (so the model learns to stop)."""

from __future__ import annotations

import warnings
from pathlib import Path

from factlab.data.io import iter_jsonl
from factlab.errors import FactlabError


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Each line: {"question": ..., "answer": ...} (optional "system"), or {"messages": [...]}
    whose last message is the assistant's answer."""
    convs = []
    for lineno, obj in iter_jsonl(Path(path), "Q&A file"):
        if "messages" in obj:
            msgs = obj["messages"]
            ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)
            ok = ok and all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in msgs)
            if not ok or msgs[-1]["role"] != "assistant":
                raise FactlabError(f"{path}:{lineno}: \"messages\" must be a list of {{role, content}} ending with the assistant's answer")
        elif "question" in obj and "answer" in obj:
            for key in ("question", "answer", "system"):
                if key in obj and not isinstance(obj[key], str):
                    got = "null" if obj[key] is None else type(obj[key]).__name__
                    raise FactlabError(f"{path}:{lineno}: \"{key}\" must be a string, got {got}; give the text")
            msgs = [{"role": "user", "content": str(obj["question"])}, {"role": "assistant", "content": str(obj["answer"])}]
            if obj.get("system"):
                msgs.insert(0, {"role": "system", "content": str(obj["system"])})
        else:
            raise FactlabError(f"{path}:{lineno}: a Q&A line needs \"question\" and \"answer\" (or \"messages\")")
        if not str(msgs[-1]["content"]).strip():
            raise FactlabError(f"{path}:{lineno}: the answer is empty; every Q&A line needs an answer to train on")
        convs.append(msgs)
    if not convs:
        raise FactlabError(f"Q&A file {path} has no examples; add JSONL lines with \"question\" and \"answer\"")
    return convs


def require_chat_template(tokenizer, why: str = "SFT stages") -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FactlabError(
            f"the tokenizer of {name} has no chat template, which {why} need; "
            "use an instruct/chat model or add a chat_template to its tokenizer_config.json"
        )


def encode_conversation(tokenizer, messages: list[dict], seq_len: int) -> tuple[dict, bool]:
    """Token ids with labels = -100 on everything before the final answer.

    The prompt is the template applied to all messages but the last, with the generation
    prompt; the full text is the template over all messages. The answer's labels run up to and
    including the first EOS after the prompt (what follows EOS, such as the template's newline,
    is never generated, so it is not trained). Returns (example, truncated).
    """
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise FactlabError("the chat template renders the prompt differently inside the full conversation; factlab cannot mask the prompt for this template")
    # The template already contains its special tokens; don't let the tokenizer add a BOS twice.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(eos) + 1]
    else:  # templates that end turns with a non-EOS marker: still teach the model to stop
        answer_ids = answer_ids + [eos]
    ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    truncated = len(ids) > seq_len
    ids, labels = ids[:seq_len], labels[:seq_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def build_sft_examples(tokenizer, conversations: list[list[dict]], seq_len: int) -> list[dict]:
    require_chat_template(tokenizer)
    out, n_trunc = [], 0
    for msgs in conversations:
        ex, truncated = encode_conversation(tokenizer, msgs, seq_len)
        n_trunc += truncated
        if any(label != -100 for label in ex["labels"]):
            out.append(ex)
    if n_trunc:
        warnings.warn(f"{n_trunc} of {len(conversations)} SFT examples were longer than seq_len={seq_len} and were truncated")
    if not out:
        raise FactlabError(f"every SFT example lost its answer to truncation at seq_len={seq_len}; raise train.seq_len")
    return out
