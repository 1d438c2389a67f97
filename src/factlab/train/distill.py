"""Self-distillation from the model's own in-context answers (`kind: distill`).

The teacher is the stage's starting model (before the stage adds its adapter, or changes a
weight for `full`) with fact documents in its prompt, laid out as factlab's in-context
baseline lays them out (documents joined by CONTEXT_SEPARATOR, then the text; a chat question
gets them at the top of its user turn: ``influence.samples.scored_pair``). The student is the
model being trained, without the documents. The loss is KL(p_teacher || p_student) on the
continuation tokens only:

  document   each corpus document; the teacher sees the context documents, then the
             document; the student the document alone (tokenized as CPT does). Its first
             token has no prediction in the student and is not distilled; nor is an EOS
             after it (the teacher's prompt separates documents by blank lines, not EOS).
  forward    with `distill.facts`: a fact's training wording cut before the object
  reverse    ("Paeluzun lies in the province of"), or an object-first wording cut before
             the subject; only wordings that occur in the documents are asked, so no
             held-out probe wording is ever trained
  chat       the stage's Q&A questions (data.qa) in the chat template
  replay     replay blocks of `data.replay`, with no context: the teacher is the base model
             on the same text, so these positions are a KL anchor to the base model

A question's continuation is the teacher's own greedy answer (`answers: teacher`: a cloze
prompt up to the end of the sentence, a chat answer up to EOS) or the known answer
(`answers: known`: " object" / " subject", the Q&A answer and EOS).

The context (`context`): `relevant` = the documents about the subjects (of `distill.facts`)
the example is about (see _Contexts; a document is never in its own context unless
`include_self`: the teacher would copy it), `all` = every document (minus the example's own).

Cheap by construction: the teacher is fixed, so its distributions are computed once, before
training (`attach_teacher`), and stored as the top-k log-probabilities, their token ids and
the log of the remaining (tail) mass per distilled position. The training loss is then the KL
of the (k+1)-bin distributions: the k teacher tokens, and one tail bucket holding everything
else, for the student the mass it puts outside those k tokens:

    KL_k = sum_{i in top-k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

This is exact when k equals the vocabulary (no tail), and never larger than the full KL
(merging bins can only lose divergence, by the log-sum inequality): what it drops is how
differently the two models spread the tail mass over the tail tokens. tests/test_distill.py
measures the gap on peaked synthetic rows (k=32: 0.03% of the full KL); on SmolLM2 at the
start of a stage it was 5.0% at k=32 and 3.9% at k=64 (README).

The loss is computed from the labelled positions only, with lm_head applied in chunks inside
one autograd Function (as factlab.train.loss does for cross-entropy), so no [batch, seq,
vocab] logits exist when the stage uses the fused loss path; otherwise (train.fused_loss:
false, or a model whose logits are more than lm_head of its body) from the model's logits.
`DistillTrainer` is RegularizedTrainer with this loss as the task loss, so the L2 pull and
every other term RegularizedTrainer adds compose with it unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from transformers import DataCollatorForSeq2Seq, Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from factlab.config import DistillSpec
from factlab.errors import FactlabError
from factlab.evaluate.facts import CONTEXT_SEPARATOR
from factlab.evaluate.tokens import TokenCache, chat_prompt
from factlab.train.loss import (CHUNK_ELEMENTS, IGNORE_INDEX, ChunkedHeadLoss, body_and_head, full_kl,  # noqa: F401
                                 hf_model, topk_kl, topk_targets)
from factlab.train.regularizers import RegularizedTrainer

TEACHER_KEYS = ("teacher_logp", "teacher_idx", "teacher_tail")
CLOZE_TOKENS = 16
"""Greedy tokens of a teacher answer to a cloze prompt (it stops at the sentence's end)."""
TEACHER_BATCH = 8


# ---------------------------------------------------------------------------------------
# Inputs and items (tokenizer only, no model)


@dataclass
class DistillInputs:
    """What a distill stage reads besides its documents: the facts (questions, relevance)
    and the Q&A conversations (chat questions)."""

    facts: list = field(default_factory=list)
    conversations: list = field(default_factory=list)
    relations: dict = field(default_factory=dict)
    lang: str = "en"


def load_distill_inputs(spec: DistillSpec, qa: str | None) -> DistillInputs:
    """Read distill.facts (fact table or synth world), distill.relations and the Q&A file;
    the one-line errors of a misconfigured distill stage are raised here."""
    from factlab.data.augment import load_facts_input
    from factlab.data.templates import load_relations_file
    from factlab.data.sft import load_conversations

    out = DistillInputs()
    if spec.facts:
        out.facts, _, out.lang = load_facts_input(spec.facts)
    if spec.relations:
        out.relations = load_relations_file(spec.relations)
    if spec.questions and qa:
        out.conversations = load_conversations(qa)
    if spec.context == "relevant" and not out.facts:
        raise FactlabError("distill.context: relevant picks documents by the subjects of distill.facts; give "
                           "distill.facts (the fact table) or set distill.context: all")
    if spec.questions and not out.facts and not out.conversations:
        raise FactlabError("distill.questions needs questions: give distill.facts (forward and reverse questions) "
                           "and/or data.qa (chat questions), or set distill.questions: false")
    return out


def _counts(text: str, names: list[str]) -> dict[str, int]:
    out = {n: len(re.findall(r"(?<!\w)" + re.escape(n) + r"(?!\w)", text)) for n in names}
    return {n: c for n, c in out.items() if c}


def _topic(text: str, names: list[str]) -> set[str]:
    """The subject(s) a text is about: those it names most often."""
    counts = _counts(text, names)
    top = max(counts.values(), default=0)
    return {n for n, c in counts.items() if c == top}


class _Contexts:
    """The teacher's context text of each example (see the module docstring). With
    `relevant`, a document's topic is the subject it names most often (a subject's document
    names it in every sentence; a firm or town it merely mentions is not its topic), and an
    example gets the documents whose topic it asks about: a document the other documents of
    its topic, a cloze question those of its fact's subject, a chat question those of the
    subjects it names."""

    def __init__(self, docs: list[str], facts: list, mode: str, include_self: bool):
        self.docs, self.mode, self.include_self = docs, mode, include_self
        self.names = sorted({f.subject for f in facts})
        self.topics = [_topic(d, self.names) for d in docs]

    def for_names(self, names: set[str], own: int | None = None) -> str:
        if self.mode == "all":
            keep = list(range(len(self.docs)))
        else:
            keep = [i for i, t in enumerate(self.topics) if t & names]
        if own is not None and not self.include_self:
            keep = [i for i in keep if i != own]
        return "\n\n".join(self.docs[i] for i in keep)

    def for_document(self, i: int) -> str:
        return self.for_names(self.topics[i], own=i)

    def for_question(self, text: str) -> str:
        return self.for_names(set(_counts(text, self.names)))


def _item(kind, student_prompt, teacher_prompt, continuation, stop="eos", max_new=0) -> dict:
    # json-serialisable (the sweep cache hashes a stage's examples)
    return {"distill": kind, "student_prompt": list(student_prompt), "teacher_prompt": list(teacher_prompt),
            "continuation": None if continuation is None else list(continuation), "stop": stop, "max_new": max_new}


def _document_items(tokenizer, docs, contexts: _Contexts, seq_len: int, cache: TokenCache) -> list[dict]:
    bos = tokenizer.bos_token_id
    items = []
    for i, doc in enumerate(docs):
        ids = list(tokenizer(doc, add_special_tokens=True)["input_ids"])
        lead = 1 if bos is not None and len(ids) > 1 and ids[0] == bos else 0
        ctx = contexts.for_document(i)
        ctx_ids = cache.encode(ctx + CONTEXT_SEPARATOR) if ctx else []
        for start in range(lead, len(ids) - 1, seq_len - 1 - lead):
            piece = ids[start:start + seq_len - lead]
            if len(piece) < 2:
                break
            head = ids[:lead] + piece[:1]
            items.append(_item("document", head, (ctx_ids + piece[:1]) if ctx_ids else head, piece[1:]))
    return items


def _question_items(tokenizer, spec: DistillSpec, inputs: DistillInputs, docs, contexts: _Contexts,
                    cache: TokenCache) -> list[dict]:
    """Forward and reverse cloze questions from the facts (training wordings only) and chat
    questions from the Q&A conversations."""
    from factlab.data.render import invertible_relations
    from factlab.data.templates import prefix, relation_wordings  # the registry / user / generic wordings augment uses

    corpus = "\n".join(docs)
    known = spec.answers == "known"
    items: list[dict] = []
    seen: set[tuple[str, str]] = set()
    invertible = invertible_relations(inputs.facts) if inputs.facts else set()

    def cloze(kind: str, prompt: str, answer: str, subject: str) -> None:
        if prompt not in corpus or (prompt, answer) in seen:
            return  # only wordings the documents already contain (no held-out probe wording)
        seen.add((prompt, answer))
        ctx = contexts.for_names({subject})
        teacher = f"{ctx}{CONTEXT_SEPARATOR}{prompt}" if ctx else prompt
        if known:
            ps, cont = cache.split_pair(prompt, " " + answer)
            pt = cache.split_pair(teacher, " " + answer)[0]
            items.append(_item(kind, ps, pt, cont))
        else:
            items.append(_item(kind, cache.encode(prompt), cache.encode(teacher), None, "sentence", CLOZE_TOKENS))

    for f in inputs.facts:
        spec_r, _ = relation_wordings(f.relation, inputs.lang, inputs.relations, generic=True)
        for t in spec_r.doc:
            cloze("forward", prefix(t, "o", s=f.subject), f.object, f.subject)
        if f.relation in invertible:
            for t in spec_r.reverse_doc:
                cloze("reverse", prefix(t, "s", o=f.object), f.subject, f.subject)
    for msgs in inputs.conversations:
        question = next((m["content"] for m in reversed(msgs[:-1]) if m["role"] == "user"), None)
        if question is None:
            continue
        ctx = contexts.for_question(question)
        student = chat_prompt(tokenizer, question)
        teacher = chat_prompt(tokenizer, f"{ctx}{CONTEXT_SEPARATOR}{question}" if ctx else question)
        ps = tokenizer(student, add_special_tokens=False)["input_ids"]
        pt = tokenizer(teacher, add_special_tokens=False)["input_ids"]
        if known:
            from factlab.data.sft import encode_conversation

            ex, _ = encode_conversation(tokenizer, [{"role": "user", "content": question}, msgs[-1]], 1 << 30)
            n_prompt = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
            items.append(_item("chat", ex["input_ids"][:n_prompt], pt, ex["input_ids"][n_prompt:]))
        else:
            items.append(_item("chat", ps, pt, None, "eos", spec.answer_tokens))
    return items


def distill_items(tokenizer, spec: DistillSpec, docs: list[str], inputs: DistillInputs, seq_len: int,
                  replay: list[dict] | None = None) -> list[dict]:
    """The stage's distillation items, before any teacher: documents, questions, replay
    blocks. Each is {"distill": kind, "student_prompt", "teacher_prompt", "continuation"
    (token ids; None while the teacher's answer is pending), "stop", "max_new"}."""
    cache = TokenCache(tokenizer)
    contexts = _Contexts(docs, inputs.facts, spec.context, spec.include_self)
    items = _document_items(tokenizer, docs, contexts, seq_len, cache)
    if spec.questions:
        items += _question_items(tokenizer, spec, inputs, docs, contexts, cache)
    for block in replay or []:
        ids = block["input_ids"]
        items.append(_item("replay", ids[:1], ids[:1], ids[1:]))
    return items


# ---------------------------------------------------------------------------------------
# The teacher (run once, before training)



def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _sentence_end(tokenizer, ids: list[int]) -> list[int]:
    """A greedy cloze answer cut at the end of its first sentence (kept) or line (dropped)."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if "\n" in text:
            return ids[:n - 1]
        if text.rstrip().endswith((".", "!", "?")):
            return ids[:n]
    return ids


@torch.no_grad()
def _teacher_answers(model, tokenizer, items: list[dict], precision: str) -> None:
    """Fill in the pending continuations with the teacher's greedy answers (in place)."""
    pending = [it for it in items if it["continuation"] is None]
    if not pending:
        return
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    pending.sort(key=lambda it: len(it["teacher_prompt"]))
    for start in range(0, len(pending), TEACHER_BATCH):
        batch = pending[start:start + TEACHER_BATCH]
        ids, mask, _ = _left_pad([it["teacher_prompt"] for it in batch], pad)
        with _autocast(device, precision):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max(it["max_new"] for it in batch), pad_token_id=pad,
                                 eos_token_id=eos)
        for it, row in zip(batch, out[:, ids.shape[1]:].tolist()):
            row = row[:it["max_new"]]
            if eos in row:
                row = row[:row.index(eos) + (1 if it["stop"] == "eos" else 0)]
            if it["stop"] == "sentence":
                row = _sentence_end(tokenizer, row)
            it["continuation"] = row or [eos]  # an empty answer: distil the teacher's stop


def _forward_rows(model, ids, mask, pos, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions (B, keep, V); logits_to_keep where supported."""
    try:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False).logits
    except TypeError:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -keep:]


@torch.no_grad()
def attach_teacher(model, tokenizer, items: list[dict], spec: DistillSpec, seq_len: int,
                   precision: str = "fp32") -> list[dict]:
    """Training examples from distill items: the teacher's answers where pending, then one
    forward of the teacher (the model as it is now: call before the stage wraps it) per item,
    keeping its top-k distribution at every continuation token. Returns new dicts
    {input_ids, attention_mask, labels, teacher_logp, teacher_idx, teacher_tail}; the student
    sequence is cut to `seq_len` tokens (its teacher rows with it)."""
    from factlab.evaluate.lm import max_positions

    limit = max_positions(model)
    longest = max((len(it["teacher_prompt"]) + (len(it["continuation"]) if it["continuation"] is not None else it["max_new"])
                   for it in items), default=0)
    if limit is not None and longest > limit:
        raise FactlabError(f"distill: a teacher prompt with its documents is {longest} tokens, longer than the model's "
                           f"context ({limit}); use distill.context: relevant with distill.facts, or a shorter corpus")
    was_training = model.training
    model.eval()
    try:
        items = [dict(it) for it in items]
        _teacher_answers(model, tokenizer, items, precision)
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out: list[dict | None] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i]["teacher_prompt"]) + len(items[i]["continuation"]))
        for start in range(0, len(order), TEACHER_BATCH):
            batch = [items[i] for i in order[start:start + TEACHER_BATCH]]
            for it in batch:  # cut to seq_len: the student's prompt and as much continuation as fits
                it["continuation"] = it["continuation"][:max(0, seq_len - len(it["student_prompt"]))]
            seqs = [it["teacher_prompt"] + it["continuation"] for it in batch]
            ids, mask, pos = _left_pad(seqs, pad)
            keep = max(len(it["continuation"]) for it in batch) + 1
            with _autocast(device, precision):
                logits = _forward_rows(model, ids.to(device), mask.to(device), pos.to(device), keep)
            for r, (i, it) in enumerate(zip(order[start:start + TEACHER_BATCH], batch)):
                n = len(it["continuation"])
                if n == 0:
                    continue
                # position t predicts token t+1: the continuation's n tokens come from the n
                # positions before the sequence's last one
                rows = logits[r, keep - 1 - n:keep - 1]
                top, idx, tail = topk_targets(rows, spec.top_k, spec.temperature)
                student = it["student_prompt"] + it["continuation"]
                out[i] = {"input_ids": student, "attention_mask": [1] * len(student),
                          "labels": [IGNORE_INDEX] * len(it["student_prompt"]) + it["continuation"],
                          "teacher_logp": top.cpu(), "teacher_idx": idx.cpu(), "teacher_tail": tail.cpu(),
                          "distill": it["distill"]}
        return [ex for ex in out if ex is not None]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# The loss


def distill_loss_sum(model, inputs: dict, labels: torch.Tensor, targets: tuple[torch.Tensor, ...],
                     temperature: float, chunked: bool) -> tuple[torch.Tensor, int]:
    """(sum of KL_k over the labelled positions of the batch, their number). `chunked`: from
    the body's hidden states with lm_head in chunks; else from the model's full logits."""
    t_logp, t_idx, t_tail = targets
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    n = int(keep.sum())
    if n != t_logp.shape[0]:
        raise RuntimeError(f"distill batch: {n} labelled positions but {t_logp.shape[0]} teacher rows")
    hf = hf_model(model)
    body, head = body_and_head(hf)
    if chunked and body is not None:
        hidden = body(**inputs, use_cache=False)[0]  # (B, T, H)
        rows = hidden[:, :-1][keep.to(hidden.device)]  # (N, H)
        params = [p for p in head.parameters() if p.requires_grad]
        chunk = max(1, CHUNK_ELEMENTS // max(1, head.weight.shape[0]))
        dev = rows.device
        args = (rows, t_logp.to(dev), t_idx.to(dev), t_tail.to(dev))
        if torch.is_grad_enabled() and (rows.requires_grad or params):
            t_logp_d, t_idx_d, t_tail_d = args[1:]

            def chunk_loss(logits, start, end):
                return topk_kl(logits, t_logp_d[start:end], t_idx_d[start:end], t_tail_d[start:end], temperature).sum()

            return ChunkedHeadLoss.apply(rows, chunk_loss, head, chunk, *params), n
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for s in range(0, rows.shape[0], chunk):
            total = total + topk_kl(head(rows[s:s + chunk]), *(a[s:s + chunk] for a in args[1:]), temperature).sum()
        return total, n
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    rows = logits[:, :-1][keep.to(logits.device)]
    dev = rows.device
    return topk_kl(rows, t_logp.to(dev), t_idx.to(dev), t_tail.to(dev), temperature).sum(), n


class _DistillLoss(Trainer):
    """Trainer.compute_loss replaced by the distillation loss. Placed after
    RegularizedTrainer in DistillTrainer's bases, so RegularizedTrainer's own compute_loss
    (the L2 pull, any later term) calls this one as its `super()` and adds its terms."""

    distill_temperature: float = 1.0
    distill_chunked: bool = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = tuple(inputs.pop(k) for k in TEACHER_KEYS)
        labels = inputs.pop("labels")
        inputs.pop("num_items_in_batch", None)
        # The body is called directly (not through the forward accelerate wraps in autocast),
        # so the stage's autocast is entered here: with bf16 the frozen weights are bf16.
        with self.accelerator.autocast():
            total, n = distill_loss_sum(model, inputs, labels, targets, self.distill_temperature, self.distill_chunked)
        # Normalised like the model's own loss: over the accumulated batch's labelled tokens
        # when the Trainer counts them (it then does not divide by the accumulation steps),
        # else a mean over this batch's.
        if num_items_in_batch is not None:
            denom = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        else:
            denom = max(n, 1)
        loss = total / denom
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss


class DistillTrainer(RegularizedTrainer, _DistillLoss):
    """RegularizedTrainer whose task loss is the distillation KL (see _DistillLoss)."""

    def __init__(self, *args, temperature: float = 1.0, chunked: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_temperature, self.distill_chunked = temperature, chunked


class DistillCollator:
    """Pads input_ids / attention_mask / labels (right, labels with -100) and concatenates the
    teacher rows in batch order, which is the row-major order of the labelled positions."""

    def __init__(self, tokenizer):
        self.padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def __call__(self, features, return_tensors=None):
        plain = [{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features]
        batch = self.padded(plain, return_tensors)
        for k in TEACHER_KEYS:
            batch[k] = torch.cat([f[k] for f in features])
        return batch


def refuse_prompt_methods(method_name: str, learns_prompt: bool) -> None:
    if learns_prompt:
        raise FactlabError(f"kind: distill does not support {method_name} (virtual tokens shift the positions the "
                           "teacher's distributions belong to); use lora, dora, ia3 or full")


def describe(examples: list[dict]) -> str:
    """'117 document, 180 forward, ...' counts of a stage's distillation examples."""
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.get("distill", "?")] = counts.get(ex.get("distill", "?"), 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())

