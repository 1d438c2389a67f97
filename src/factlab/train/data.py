"""A training stage's data, apart from any model: `load_stage_data` reads the files (so bad
files are reported before anything is loaded) and `build_stage_examples` tokenizes them, with
replay blocks and the anchor's general text; `split_heldout` sets the held-out examples apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from factlab.config import StageSpec
from factlab.data.corpus import builtin_replay_documents, cpt_examples, load_documents, pack_documents
from factlab.data.sft import build_sft_examples, load_conversations
from factlab.data.substitute import substitute as swap
from factlab.errors import FactlabError
from factlab.train.anchor import anchor_blocks


@dataclass
class StageInputs:
    """A stage's raw inputs: documents (cpt) or conversations (sft), and replay documents."""

    main: list
    replay_docs: list[str] = field(default_factory=list)
    distill: object = None
    """A distill stage's facts and Q&A (factlab.train.distill.DistillInputs)."""
    anchor_docs: list[str] = field(default_factory=list)
    """General text for train.anchor (factlab.train.anchor)."""
    edit: object = None
    """An edit stage's facts (factlab.train.edit.EditInputs); its covariance text is replay_docs."""


def load_stage_data(stage: StageSpec, corpus: list[str] | None, qa: str | None,
                    substitute: dict[str, str] | None = None, general: list[str] | None = None) -> StageInputs:
    """Read a stage's raw data; needs no model, so bad files are reported before anything is
    loaded or written. `corpus` is also what a replay source named "corpus" means, `general`
    what the source "general" means (default: the builtin replay text; the runner passes
    factlab.data.replay.replay_documents_for's text once the model is loaded).
    `substitute` rewrites every document (CPT text and replay) as it is read."""
    extra = None
    if stage.kind == "edit":
        from factlab.train.edit import load_edit_inputs

        edit = load_edit_inputs(stage.edit)
        cov_docs = _source_documents(stage.edit.cov_source, corpus, "edit.cov_source", general)
        if substitute:
            cov_docs = [swap(d, substitute)[0] for d in cov_docs]
        return StageInputs(edit.facts, cov_docs, edit=edit)
    if stage.kind in ("cpt", "distill"):
        if not corpus:
            raise FactlabError(f"a {stage.kind} stage needs text: set data.corpus (or the stage's data.corpus) to .txt/.jsonl files")
        main = load_documents(corpus)
        if stage.kind == "distill":
            from factlab.train.distill import load_distill_inputs

            extra = load_distill_inputs(stage.distill, qa)
    else:
        if not qa:
            raise FactlabError("an sft stage needs Q&A: set data.qa (or the stage's data.qa) to a JSONL file")
        main = load_conversations(qa)
    rp = stage.data.replay
    replay_docs = _source_documents(rp.source, corpus, "replay", general) if rp and rp.ratio > 0 else []
    anchor = stage.train.anchor
    anchor_docs = _source_documents(anchor.source, corpus, "train.anchor", general) if anchor else []
    if substitute:
        if stage.kind in ("cpt", "distill"):
            main = [swap(d, substitute)[0] for d in main]
        replay_docs = [swap(d, substitute)[0] for d in replay_docs]
        anchor_docs = [swap(d, substitute)[0] for d in anchor_docs]
    return StageInputs(main, replay_docs, extra, anchor_docs)


def _source_documents(sources: list[str], corpus: list[str] | None, what: str,
                      general: list[str] | None = None) -> list[str]:
    """The documents of a replay or anchor `source` list: `corpus`, `general` (`general` if
    given: the model's own sampled text, see factlab.data.replay; else the builtin text),
    files/folders."""
    docs: list[str] = []
    for src in sources:
        if src == "corpus":
            if not corpus:
                raise FactlabError(f"{what} source 'corpus' needs data.corpus; set it or name text files instead")
            docs += load_documents(corpus)
        elif src == "general":
            docs += builtin_replay_documents() if general is None else general
        else:
            docs += load_documents([src])
    return docs


def replay_blocks(tokenizer, docs: list[str], n_examples: int, ratio: float, seq_len: int, seed: int) -> list[dict]:
    """round(ratio * n_examples) packed LM blocks of `docs` (at least one when ratio > 0),
    drawn without replacement while they last, then again, with a seeded RNG."""
    if ratio <= 0 or not docs:
        return []
    blocks = pack_documents(tokenizer, docs, seq_len)
    want = max(1, round(ratio * n_examples))
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < want:
        out += rng.sample(blocks, min(len(blocks), want - len(out)))
    return out


class StageExamples(list):
    """A stage's tokenized examples (a plain list to every caller: the Trainer, the sweep's
    hashing), which also says how many of them are replay and how many documents or
    conversations they came from, for the stage's step plan."""

    replay: int = 0
    sources: int = 0
    anchor_blocks: torch.Tensor | None = None
    """(n, train.anchor.seq_len) token ids of the anchor's general text, when the stage has one."""
    general_docs: list[str] | None = None
    """An edit stage's covariance text (edit.cov_source)."""


def build_stage_examples(stage: StageSpec, tokenizer, data: StageInputs, seed: int = 0) -> StageExamples:
    """Tokenized training examples ({input_ids, attention_mask, labels}) from load_stage_data(),
    with replay blocks appended (the Trainer shuffles). A distill stage's are its distillation
    items (factlab.train.distill.distill_items), which prepare_stage completes with the
    teacher's targets once the stage's starting model is at hand."""
    if stage.kind == "edit":
        from factlab.train.edit import edit_requests

        examples = StageExamples(edit_requests(stage.edit, data.edit))
        examples.sources = len(data.main)
        examples.general_docs = data.replay_docs  # the key covariance's text
        return examples
    if stage.kind == "distill":
        from factlab.train.distill import distill_items

        tr = stage.train
        replay = []
        if stage.data.replay:
            replay = replay_blocks(tokenizer, data.replay_docs, len(data.main), stage.data.replay.ratio, tr.seq_len, seed)
        examples = StageExamples(distill_items(tokenizer, stage.distill, data.main, data.distill, tr.seq_len, replay))
        examples.sources, examples.replay = len(data.main), len(replay)
        return examples
    if stage.kind == "cpt":
        examples = StageExamples(cpt_examples(tokenizer, data.main, stage.train.seq_len, stage.train.packing))
    else:
        examples = StageExamples(build_sft_examples(tokenizer, data.main, stage.train.seq_len))
    examples.sources = len(data.main)
    if stage.data.replay:
        replay = replay_blocks(tokenizer, data.replay_docs, len(examples), stage.data.replay.ratio,
                               stage.train.seq_len, seed)
        examples += replay
        examples.replay = len(replay)
    if stage.train.anchor:
        examples.anchor_blocks = anchor_blocks(tokenizer, data.anchor_docs, stage.train.anchor.seq_len)
    return examples


def split_heldout(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded random split into (train, held-out); at least one example stays in each part."""
    if fraction <= 0:
        return examples, []
    if len(examples) < 2:
        raise FactlabError(f"train.eval_fraction={fraction} needs at least 2 examples, the stage has {len(examples)}")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(idx) - 1, max(1, round(fraction * len(idx))))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
