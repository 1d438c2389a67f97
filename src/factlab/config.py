"""The experiment file: a typed config tree (pydantic), YAML loading and dotted overrides.

Configs hold names and numbers, never classes, so they serialize; the resolved config is saved
beside every run. Unknown keys and wrong types are rejected with a message that names the key.

Relative paths inside an experiment file are resolved against the file's own folder, so an
experiment and its data can be moved together.
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from factlab.errors import FactlabError
from factlab.methods import lora_family, method_info, methods


class _Strict(BaseModel):
    # strict: a YAML boolean or a string is never a number (`lr: true` was 1.0, `epochs: yes`
    # was 1); an int is still accepted where a float is expected. No inf/nan either.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _listify(v: Any, *keys: str) -> Any:
    """Accept a single string where a list of paths is expected (`corpus: docs.txt`)."""
    if isinstance(v, dict) and any(isinstance(v.get(k), str) for k in keys):
        v = {**v, **{k: [v[k]] for k in keys if isinstance(v.get(k), str)}}
    return v


class PeftSpec(_Strict):
    """Which parameters a stage trains and how (one adapter per stage).

    Methods (factlab.methods): lora, rslora, dora, ia3 (use targets; merge),
    prompt_tuning, prefix_tuning, p_tuning (virtual tokens; ignore targets/layers/r/alpha/dropout;
    cannot merge, so they must be the last stage) and full (the targeted modules' own weights,
    no adapter; `all` = every parameter). Fields a method does not use are ignored.
    """

    method: str = "lora"
    """PEFT method: lora, rslora, dora, ia3, prompt_tuning, prefix_tuning, p_tuning, full."""
    targets: list[str] = Field(default_factory=lambda: ["all-but-embed"], min_length=1)
    """Layer groups (attention, mlp, lm_head, embed, all, all-but-embed) or module names."""
    layers: str | None = None
    """Restrict per-layer modules to these decoder layers, e.g. "0-11" or "0,2,5-7"."""
    r: int = Field(8, gt=0)
    """LoRA rank (lora, rslora, dora)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA dropout."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (LoRA family; `method: rslora` is the same)."""
    dora: bool = False
    """Weight-decomposed LoRA (LoRA family; `method: dora` is the same)."""
    num_virtual_tokens: int = Field(20, gt=0)
    """Virtual tokens of prompt_tuning, prefix_tuning and p_tuning."""

    @model_validator(mode="after")
    def _check(self) -> "PeftSpec":
        if self.method not in methods():
            raise ValueError(f"unknown PEFT method '{self.method}' in peft.method; use one of: {', '.join(methods())}")
        for switch in ("rslora", "dora"):
            if getattr(self, switch) and self.method not in lora_family():
                raise ValueError(f"peft.{switch} applies to the LoRA methods ({', '.join(lora_family())}), "
                                 f"not to {self.method}; remove it")
        return self


class AnchorSpec(_Strict):
    """Forgetting control: keep the model's next-token distributions on general text those of
    the model the stage starts from. Each training step adds kl * KL(p_base || p_model), over the
    full vocabulary and averaged over the tokens of a few general-text blocks drawn for that
    step (see factlab.train.anchor)."""

    kl: float = Field(1.0, gt=0)
    """The weight of the KL term (per token, in nats) against the stage's own loss."""
    source: list[str] = Field(default_factory=lambda: ["general"])
    """`general` (factlab/builtin/replay.txt for SmolLM2, text sampled from the model itself for
    other models; never the damage text), `corpus`, and/or text files or folders."""
    ratio: float = Field(0.25, gt=0)
    """Anchor blocks per training example in each step: 0.25 with batch_size 8 scores 2 blocks."""
    seq_len: int = Field(128, gt=1)
    """Tokens per anchor block."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "source")


class TrainSpec(_Strict):
    """Optimisation settings of one stage."""

    lr: float = Field(1e-4, gt=0)
    embed_lr: float | None = Field(None, gt=0)
    """Learning rate for parameters of the input embeddings and lm_head (default: `lr`);
    `head_lr`, when set, takes over for lm_head."""
    head_lr: float | None = Field(None, gt=0)
    """Learning rate for parameters of the output head lm_head (default: `embed_lr`, then `lr`)."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides `epochs` when set."""
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    micro_batch_size: int | None = Field(None, gt=0)
    """Examples per forward/backward pass (default: batch_size). Smaller splits each batch into
    micro-batches whose gradients add up before the optimizer step: the same steps, the same
    loss (normalised over the whole batch), activation memory of the micro-batch only.
    batch_size must be a multiple of it."""
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    seq_len: int = Field(256, gt=1)
    """CPT: block length of packed text (`packing: blocks`) or the longest piece of a document
    (`packing: documents`). SFT: examples are truncated to this many tokens."""
    packing: Literal["blocks", "documents"] = "documents"
    """CPT: `documents` (the default) makes one example per document (see factlab.data.corpus),
    so a corpus of short facts gives as many examples, and optimizer steps, as it has
    documents; `blocks` joins documents with EOS and cuts seq_len blocks. The default was chosen
    by measurement (README, "How much a stage trains")."""
    seed: int | None = None
    """Seed of this stage (default: the experiment's seed)."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the stage's examples held out for an eval loss (and early stopping)."""
    eval_steps: int = Field(10, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without a lower held-out loss (needs eval_fraction)."""
    neftune_alpha: float | None = Field(None, ge=0)
    """NEFTune: uniform noise in [-a, a], a = alpha/sqrt(L*d) (L: the batch's padded length,
    d: hidden size), added to the input token embeddings in training steps only (0 or unset:
    off; the paper uses 5-15)."""
    l2_to_base: float = Field(0.0, ge=0.0)
    """Forgetting control: adds l2_to_base * sum ||W_merged - W_base||_F^2 over the changed
    weights to the training loss (see factlab.train.regularizers). Not for prompt methods."""
    anchor: AnchorSpec | None = None
    """Forgetting control: KL to the starting model on general text in every step (see
    AnchorSpec), e.g. `anchor: {kl: 1.0, source: general, ratio: 0.25}`."""
    prune_updates: float | None = Field(None, gt=0, lt=1)
    """Forgetting control at merge: leave the largest share of each adapted matrix's update
    out of the merged model (0.08: the top 8% of |delta W| entries; the Outlandish paper's
    ignore-top-k). LoRA only; adapter/ keeps the whole adapter, merged/ the pruned update."""
    max_update_norm: float | None = Field(None, gt=0)
    """Forgetting control: cap on the global L2 norm of each optimizer step's parameter update;
    a larger update is scaled back onto the cap (see factlab.train.regularizers)."""
    bf16: bool | Literal["auto"] = "auto"
    """Mixed precision: true (bf16 autocast), false (fp32), or `auto`: on the CPU fp32 without
    native bf16 (AVX512-BF16 / AMX); with it, bf16 where a short probe at the model's Linear
    shapes measures bf16 at least 1.2x faster than fp32 (cached per CPU model, torch version and
    shapes; factlab.train.bf16_probe), else fp32; on a GPU bf16 where it is supported, else fp16
    autocast."""
    bf16_weights: bool = True
    """With bf16 on: the frozen base matrices are stored in bf16 while the stage trains (adapters,
    trained weights and optimizer state stay fp32; the fp32 base is restored afterwards; see
    factlab.train.precision). false: fp32 storage, cast by autocast at every step."""
    compile: bool = False
    """torch.compile the model's repeated blocks (decoder layers) while the stage trains
    (factlab.train.compiling). Off by default: on CPU the compilation costs more than short
    stages win (bench/bench_training.py measures it)."""
    fused_loss: bool = True
    """Compute the loss from the labelled positions only, lm_head applied in chunks, never
    building [batch, seq, vocab] logits (factlab.train.loss); the same loss as the model's
    own. Methods it cannot apply to (prompt methods) use the model's loss; false: always."""

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give either train.warmup_steps or train.warmup_ratio, not both")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.micro_batch_size ({self.micro_batch_size}) must divide train.batch_size "
                             f"({self.batch_size}); e.g. micro_batch_size: 1, 2 or 4 for batch_size: 8")
        if self.early_stopping_patience and not self.eval_fraction:
            raise ValueError("train.early_stopping_patience needs a held-out split: set train.eval_fraction (e.g. 0.1)")
        return self


class ReplaySpec(_Strict):
    """Plain-text LM examples mixed into a stage (e.g. CPT text during SFT) against forgetting."""

    source: list[str] = Field(default_factory=lambda: ["corpus"])
    """`corpus` (the experiment's corpus), `general` (general English shipped with factlab:
    factlab/builtin/replay.txt, the base model's own answers on everyday topics; for a model
    other than the embedded SmolLM2, text sampled from that model, cached: factlab.data.replay)
    and/or text files or folders, like data.corpus."""
    ratio: float = Field(0.2, ge=0.0)
    """Replay blocks per training example of the stage: 0.2 adds one block per five examples
    (rounded; at least one when > 0)."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "source")


class DataSpec(_Strict):
    """Data shared by all stages (a stage's own `data` overrides it)."""

    substitute: dict[str, str] = Field(default_factory=dict)
    """Counterfactual edit of the corpus as it is read, e.g. {Romeo: Bob}: word-boundary aware
    and case preserving (see factlab.data.substitute); applies to CPT text and replay."""

    corpus: list[str] | None = None
    """CPT text: .txt files (one document each), .jsonl files ({"text": ...} per line) or folders."""
    qa: str | None = None
    """SFT Q&A JSONL: {"question", "answer"} or {"messages": [...]} per line."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "corpus")


class StageData(DataSpec):
    """Data of one stage; unset fields fall back to the experiment's `data`."""

    replay: ReplaySpec | None = None
    """Mix plain text into this stage (see ReplaySpec)."""


class DistillSpec(_Strict):
    """`kind: distill`: self-distillation from the stage's starting model with the documents in
    its prompt (the teacher) into the model without them (the student); see
    factlab.train.distill."""

    top_k: int = Field(32, gt=0)
    """Teacher tokens kept per position (their log-probs, plus one bucket for the rest)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of teacher and student (the loss is scaled by its square)."""
    questions: bool = True
    """Also distil answers to questions: forward and reverse cloze questions from `facts`
    (training wordings found in the documents only) and chat questions from data.qa."""
    facts: str | None = None
    """Fact table (.csv/.tsv/.jsonl) or synth world: the subjects that pick each example's
    context (`context: relevant`) and the facts the cloze questions ask."""
    relations: str | None = None
    """Relations file (as `factlab data augment --relations`) for relations the registry lacks."""
    context: Literal["relevant", "all"] = "relevant"
    """The teacher's prompt: `relevant` = the documents about the subjects the example is
    about (a document's subject: the one it names most; needs `facts`), `all` = every
    document. A document is never in its own context unless `include_self`."""
    include_self: bool = False
    """Put a document in its own teacher's context too (the teacher then mostly copies it)."""
    answers: Literal["teacher", "known"] = "teacher"
    """A question's continuation: the in-context teacher's greedy answer, or the known answer
    (the fact's object / subject, the Q&A answer)."""
    answer_tokens: int = Field(48, gt=0)
    """Token budget of the teacher's greedy chat answers."""


class EditSpec(_Strict):
    """`kind: edit`: facts written into the MLP output projections of a band of early-middle
    layers in closed form, without training (MEMIT, arXiv 2210.07229; AlphaEdit, arXiv
    2410.02355); see factlab.train.edit. The stage's `peft` and `train` settings do not apply."""

    method: Literal["memit", "alphaedit"] = "memit"
    """`memit`: the update that maps each fact's subject key to its new value, held back by the
    covariance of general-text keys; `alphaedit`: the same residual, with the update projected
    onto the null space of the general-text keys (it leaves their outputs unchanged)."""
    facts: str
    """Fact table (.csv/.tsv/.jsonl with subject, relation, object; optional `aliases`, which are
    edited as subjects too) or a synth world: the facts to write (`factlab data augment`'s input)."""
    relations: str | None = None
    """Relations file (as `factlab data augment --relations`) for relations the registry lacks;
    without it such a relation is worded "The <relation> of <subject> is <object>."."""
    n_facts: int | None = Field(None, gt=0)
    """Edit only the first n facts of the table (the edit scaling curve); default: all."""
    batch_size: int | None = Field(None, gt=0)
    """Facts per edit; the batches are applied one after another to the edited model
    (sequential editing). Default: all facts in one batch."""
    layers: str | None = None
    """Decoder layers whose MLP output projection is edited, e.g. "4-8"; default: the band from
    1/8 to 1/4 of the depth (layers 4-8 of a 30- or 32-layer model)."""
    wordings: int | None = Field(None, gt=0)
    """Training wordings of the relation (its `doc` templates) used as edit prompts per fact;
    default: all of them. Held-out wordings are never used."""
    contexts: int = Field(2, ge=0)
    """Short texts the model generates (greedy, from "The", "Therefore", ...) put before each
    edit prompt while the target value is optimised and the keys are read (MEMIT uses 5; each
    one adds a row per wording to every optimisation step, the cost of an edit on a CPU)."""
    context_tokens: int = Field(10, gt=0)
    """Tokens of each generated context."""
    steps: int = Field(25, gt=0)
    """Adam steps of each fact's target-value optimisation (stops early below 0.05 loss)."""
    lr: float = Field(0.5, gt=0)
    """Adam learning rate of the target-value optimisation."""
    clamp_norm: float = Field(4.0, gt=0)
    """Cap on ||delta|| relative to the norm of the residual it is added to."""
    weight_decay: float = Field(1e-3, ge=0)
    """Penalty weight_decay * ||delta|| / ||h||^2 in the target-value optimisation."""
    kl: float = Field(0.0625, ge=0)
    """Weight of KL(before || now) of the next-token distribution after "<subject> is a"."""
    mom2_weight: float = Field(15000.0, gt=0)
    """memit: lambda of the covariance term, (lambda C + K K^T)^-1 (C per token)."""
    cov_tokens: int = Field(100_000, gt=0)
    """General-text tokens the key covariance C = E[k k^T] is estimated from (computed once per
    model and layer, cached by the model's fingerprint)."""
    cov_source: list[str] = Field(default_factory=lambda: ["general"])
    """Text of the covariance: `general` (factlab/builtin/replay.txt for SmolLM2, text sampled
    from the model itself for other models; never the damage text), `corpus`, text files/folders."""
    nullspace_threshold: float = Field(2e-2, gt=0)
    """alphaedit: eigenvalues of C below this span the null space the update is projected onto."""
    l2: float = Field(10.0, gt=0)
    """alphaedit: the ridge term of its solve, (P (K K^T + K_p K_p^T) + l2 I)^-1."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "cov_source")


class StageSpec(_Strict):
    kind: Literal["cpt", "sft", "distill", "edit"]
    """`cpt`: raw text, packed. `sft`: chat-formatted Q&A, loss on the answer only.
    `distill`: KL to the in-context teacher on the documents and on questions (see `distill`).
    `edit`: facts written into the weights in closed form, no training (see `edit`)."""
    name: str | None = None
    """Folder/column name of this stage (default: its kind, numbered if repeated)."""
    data: StageData = Field(default_factory=StageData)
    peft: PeftSpec = Field(default_factory=PeftSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    merge: bool = True
    """Merge the adapter into the weights after training and save the merged model."""
    distill: DistillSpec | None = None
    """Settings of a `kind: distill` stage (default: DistillSpec's defaults)."""
    edit: EditSpec | None = None
    """Settings of a `kind: edit` stage (required there: at least `edit.facts`)."""

    @model_validator(mode="after")
    def _check(self) -> "StageSpec":
        if self.kind == "edit":
            if self.edit is None:
                raise ValueError("kind: edit needs its settings: add edit: {method: memit, facts: FACTS.jsonl}")
            # Compared with the defaults, not by presence: a dumped config (the run's, a sweep
            # point's) spells every field out.
            for key, default in (("peft", PeftSpec()), ("train", TrainSpec())):
                if getattr(self, key) != default:
                    raise ValueError(f"kind: edit trains nothing, so {key} settings do not apply; remove {key} "
                                     "(the edit's own settings go under edit:)")
            if not self.merge:
                raise ValueError("kind: edit changes the weights themselves (there is no adapter); remove merge: false")
        elif self.edit is not None:
            raise ValueError(f"edit settings apply to kind: edit, not to kind: {self.kind}; remove them")
        if self.kind == "distill" and self.distill is None:
            self.distill = DistillSpec()
        elif self.kind != "distill" and self.distill is not None:
            raise ValueError(f"distill settings apply to kind: distill, not to kind: {self.kind}; remove them")
        if self.kind == "distill" and self.peft.method in methods() and not method_info(self.peft.method).merges:
            raise ValueError(f"kind: distill does not support peft.method {self.peft.method} (virtual tokens); "
                             "use lora, dora, ia3 or full")
        return self


class SamplingSpec(_Strict):
    """Sampled continuations per probe; the share containing the target is the hit rate."""

    n: int = Field(5, ge=0)
    """Samples per probe (0 turns sampling off)."""
    temperature: float = Field(0.9, gt=0)
    max_new_tokens: int = Field(24, gt=0)


class EvalSpec(_Strict):
    probes: list[str] = Field(default_factory=list)
    """Probe JSONL files, scored on the base model and after every stage."""
    batch_size: int = Field(16, gt=0)
    greedy_tokens: int | None = Field(None, gt=0)
    """Greedy continuation length of completion probes (default: longest target + 4)."""
    qa_tokens: int = Field(48, gt=0)
    """Token budget of greedy chat answers to qa probes (the EOS rate is measured within it)."""
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    style_tokens: int = Field(96, gt=0)
    """Token budget of the answers to the SFT training prompts (style and EOS metrics)."""
    in_context: bool = False
    """Also score the base model with the corpus documents placed before every prompt: the
    reference for "could the model use this fact at all"."""
    general_text: list[str] = Field(default_factory=list)
    """Extra held-out text files whose perplexity is tracked (forgetting)."""
    builtin_general_text: bool = True
    """Track perplexity on factlab's built-in general-English sample."""
    perplexity_seq_len: int = Field(256, gt=1)
    priming: bool = True
    """Measure priming: how often a trained name (a target of the fact probes) turns up in the
    greedy answers to the locality probes and to ~25 built-in general prompts (see
    evaluate.priming; the general prompts cost a few seconds per evaluation)."""
    targets: dict[str, str] = Field(default_factory=dict)
    """Goals the run is checked against after its last stage, printed as a table beside the
    results: metric -> ">= 0.95" or "<= 0.15". Metrics: `<kind>.<stat>` (stat accuracy,
    greedy_match, sample_hit or eos; kind a probe kind or all), `damage` (a fraction: 0.15 is
    +15%), `locality.greedy_drop` (base minus after), `priming` (when measured)."""

    @field_validator("targets")
    @classmethod
    def _goals(cls, v: dict[str, str]) -> dict[str, str]:
        for metric, goal in v.items():
            kind, dot, stat = metric.partition(".")
            if metric not in ("damage", "priming", "locality.greedy_drop") and not (
                    dot and stat in ("accuracy", "greedy_match", "sample_hit", "eos")):
                raise ValueError(f"eval.targets: unknown metric {metric!r}; use damage, priming, "
                                 "locality.greedy_drop or <kind>.<accuracy|greedy_match|sample_hit|eos>")
            if not re.fullmatch(r"\s*(>=|<=)\s*-?\d+(\.\d*)?\s*", str(goal)):
                raise ValueError(f"eval.targets.{metric}: {goal!r} is not a goal; write '>= 0.95' or '<= 0.15'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "probes", "general_text")


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config values: `true` is not 1 (Python's True == 1), 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


class TuneParam(_Strict):
    """One dimension of a `tune:` search space (Optuna distributions)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: float | None = None
    choices: list[Any] | None = None
    """Values of a categorical dimension (lists allowed, e.g. targets: [[mlp], [attention]])."""

    @model_validator(mode="after")
    def _check(self) -> "TuneParam":
        # The rules of Optuna's distributions (FloatDistribution, IntDistribution,
        # CategoricalDistribution), stated here so that a bad space is a config error naming its
        # key; experiment.tune_guard also builds the distributions themselves before a study exists.
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs choices: [...]")
            given = [k for k in ("low", "high", "step") if getattr(self, k) is not None] + (["log"] if self.log else [])
            if given:
                raise ValueError(f"a categorical dimension takes only choices, not {', '.join(given)}; remove "
                                 f"{'it' if len(given) == 1 else 'them'} or use type: float / int")
            seen: list = []
            for c in self.choices:
                if any(_same_value(c, x) for x in seen):
                    raise ValueError(f"choice {c!r} is listed twice; list each choice once")
                seen.append(c)
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} dimension takes low and high, not choices; use type: categorical for a list of values")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int dimension needs whole-number low and high")
        if self.step is not None:
            if self.log and not (self.type == "int" and self.step == 1):
                raise ValueError("log: true cannot be combined with step (a log scale is sampled without a grid); "
                                 "remove step or log")
            if not self.step > 0:
                raise ValueError(f"step must be above 0, got {self.step}")
            if self.type == "int" and self.step != int(self.step):
                raise ValueError(f"an int dimension needs a whole-number step, got {self.step}")
            k = (self.high - self.low) / self.step
            if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)) or round(k) < 1:
                raise ValueError(f"high - low = {self.high - self.low:g} is not a whole multiple of step {self.step:g}; "
                                 f"make high = low + k * step (e.g. {self.low + self.step * max(1, math.floor(k)):g})")
        return self

    def contains(self, value: Any) -> bool:
        """Whether `value` is a point of this dimension (an enqueued starting point must be)."""
        if self.type == "categorical":
            return any(_same_value(value, c) for c in self.choices or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.type == "int" and value != int(value):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))
        return True

    def describe(self) -> str:
        """The dimension in words, for messages: `1e-05..0.001 (log)`, `one of [8, 16]`."""
        if self.type == "categorical":
            return f"one of {self.choices}"
        extra = " (log)" if self.log else f" in steps of {self.step:g}" if self.step is not None else ""
        return f"{self.low:g}..{self.high:g}{extra}"


class TuneObjective(_Strict):
    metric: str
    """`damage` (relative perplexity increase on general text, see evaluate.metrics.damage),
    `priming` (share of answers with a leaked trained name, see evaluate.priming; minimize) or
    `<probe kind>.<accuracy|greedy_match|sample_hit>` (e.g. paraphrase.accuracy), measured on
    the selection probes after the last stage."""
    direction: Literal["maximize", "minimize"] = "maximize"


class TuneSpec(_Strict):
    """`factlab tune`: an Optuna study over dotted keys of this experiment (`factlab run` and
    `factlab sweep` ignore the block)."""

    space: dict[str, TuneParam] = Field(min_length=1)
    """Dotted key (as in --set) -> dimension, e.g. stages.0.train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}."""
    objectives: list[TuneObjective] = Field(min_length=1, max_length=4)
    trials: int | None = Field(None, gt=0)
    """Finished (complete or pruned) trials to reach; a resumed study counts its earlier ones."""
    timeout_minutes: float | None = Field(None, gt=0)
    """Stop starting new trials after this long (per invocation)."""
    sampler: Literal["tpe", "nsga2"] = "tpe"
    """tpe: (multi-objective) TPE; nsga2: NSGA-II (for larger budgets)."""
    select_probes: list[str] = Field(min_length=1)
    """Probe files the recipe is chosen on; eval.probes (different files) report it."""
    prune: bool = True
    """Stop trials that are clearly behind after a stage other than the last (median rule, or
    prune_threshold); needs two or more stages to save anything."""
    prune_metric: str | None = None
    """Metric reported after every stage for pruning (default: the first objective)."""
    prune_probes: int | None = Field(None, gt=0)
    """Use only the first N selection probes for that intermediate value (cheaper, noisier)."""
    prune_threshold: float | None = None
    """Prune when the intermediate value is worse than this (instead of the median rule)."""
    prune_startup_trials: int = Field(2, ge=0)
    """The median rule starts pruning after this many finished trials."""
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    """Points to try first, e.g. the current recipe: [{stages.0.train.lr: 5.0e-4}]."""
    seed: int | None = Field(None, ge=0, lt=2**32)
    """Sampler seed (default: the experiment's seed); 0 to 2**32 - 1, as numpy's generators take."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "select_probes")

    @model_validator(mode="after")
    def _check(self) -> "TuneSpec":
        if self.trials is None and self.timeout_minutes is None:
            raise ValueError("tune needs a budget: trials: N and/or timeout_minutes: M")
        for point in self.enqueue:
            unknown = set(point) - set(self.space)
            if unknown:
                raise ValueError(f"tune.enqueue names {sorted(unknown)[0]!r}, which is not in tune.space")
        # Optuna would only warn and train at a point outside the space (lr 5.0 in 1e-4..1e-3)
        for i, point in enumerate(self.enqueue):
            for key, value in point.items():
                dim = self.space[key]
                if not dim.contains(value):
                    raise ValueError(f"tune.enqueue.{i}: {key} = {value!r} is outside its tune.space ({dim.describe()}); "
                                     "move the point inside the space or widen the space")
        return self


class InfluenceSamples(_Strict):
    """The sample set of `factlab influence`: exactly one source."""

    corpus: list[str] | None = None
    """Documents (.txt files, folders, or .jsonl with {"text", "id"?, "group"?}): the whole text is scored."""
    qa: str | None = None
    """Q&A JSONL ({"question", "answer", "id"?, "group"? or "fact"?}): chat samples, the answer scored."""
    pairs: str | None = None
    """JSONL of {"prompt", "target", "id"?, "group"?}: the target scored after the prompt."""
    world: str | None = None
    """A folder written by `factlab data synth` (world, chain or containment): its probes of `kinds`
    become samples, grouped by fact; chains and containment add their structure columns."""
    kinds: list[str] = Field(default_factory=lambda: ["recall", "paraphrase", "reverse"], min_length=1)
    """World probe kinds used as samples."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "corpus")

    @model_validator(mode="after")
    def _check(self) -> "InfluenceSamples":
        given = [k for k in ("corpus", "qa", "pairs", "world") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("influence.samples needs exactly one of corpus, qa, pairs, world"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class InfluenceNoise(_Strict):
    """Noised copies of the training samples as extra rows (noise invariance)."""

    levels: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2], min_length=1)
    """Share of characters (or words) replaced, each in (0, 1]."""
    kind: Literal["char", "word"] = "char"

    @model_validator(mode="after")
    def _check(self) -> "InfluenceNoise":
        if any(not 0 < x <= 1 for x in self.levels):
            raise ValueError(f"influence.noise.levels must lie in (0, 1], got {self.levels}")
        return self


class InfluenceSpec(_Strict):
    """`factlab influence`: the empirical influence of each sample, fine-tuned on alone."""

    samples: InfluenceSamples
    train: Literal["all"] | int | list[str] = "all"
    """Rows: `all`, the first N samples, or a list of sample ids and/or `kind:NAME` (world probe kind)."""
    score_samples: bool = True
    """Score the samples themselves as columns."""
    probes: list[str] = Field(default_factory=list)
    """Probe JSONL files scored as extra columns."""
    steps: int = Field(1, gt=0)
    """Optimizer steps on the one sample (1 = one epoch of it)."""
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    """Columns per scoring forward."""
    peft: PeftSpec = Field(default_factory=lambda: PeftSpec(targets=["attention", "mlp"]))
    seeds: list[int] | None = None
    """Adapter-initialisation seeds (default: the experiment's seed); several give intervals over seeds."""
    in_context: bool = True
    """Also the in-context matrix (sample i in the prompt before j, no training)."""
    noise: InfluenceNoise | None = None
    top_k: int = Field(5, gt=0)
    """k of the sparsity desideratum (share of a row's |influence| in its top k)."""
    bootstrap: int = Field(1000, gt=0)
    """Bootstrap resamples of every interval."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _listify(v, "probes")

    @model_validator(mode="after")
    def _check(self) -> "InfluenceSpec":
        if isinstance(self.train, int) and not isinstance(self.train, bool) and self.train < 1:
            raise ValueError(f"influence.train must be all, a positive count or a list of ids, got {self.train}")
        if isinstance(self.train, list) and not self.train:
            raise ValueError("influence.train is an empty list; give sample ids, a count, or all")
        if not self.score_samples and not self.probes:
            raise ValueError("influence has no columns: set score_samples: true or give probes")
        return self


def check_run_name(v: str) -> str:
    """A run name names a folder: letters, digits, dots, underscores and hyphens (ValueError otherwise)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", v):
        raise ValueError(f"the run name {v!r} may contain only letters, digits, dots, underscores and hyphens "
                         "(it names the run folder); rename it")
    return v


class Experiment(_Strict):
    name: str = Field(..., min_length=1)
    """Run name; also the prefix of the run folder (letters, digits, . _ -)."""
    model: str
    """Alias (see `factlab models`), a `.gguf` file, a local Hugging Face folder, or a hub id (online only)."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where the model trains and is scored: `auto` = a GPU when torch sees one (CUDA, then
    Apple's MPS), else the CPU (see factlab.models.device). Under `accelerate launch` each
    process takes its own GPU."""
    output_dir: str = "runs"
    """Where run folders are created. Set in the file, it is relative to the file's folder like
    every other path; the default `runs` and `factlab run -o DIR` are relative to the current
    directory (where `factlab runs` and `factlab report` look for the store)."""
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    influence: InfluenceSpec | None = None
    """`factlab influence`: the per-sample influence study (see InfluenceSpec)."""
    _base: Path = PrivateAttr(default_factory=Path.cwd)
    """Folder relative paths were resolved against (the experiment file's); sweep values too."""
    sweep: dict[str, Any] = Field(default_factory=dict)
    """Grid for `factlab sweep`: dotted key -> list of values (every combination is one run),
    plus `points: [{key: value, ...}, ...]` for settings that only make sense together (each
    item is one point, crossed with the grid), plus `repeat: N` to run each point with seeds
    seed, seed+1, ... (`factlab run` ignores the block)."""
    tune: TuneSpec | None = None
    """Search space, objectives and budget for `factlab tune` (see TuneSpec)."""

    @field_validator("name")
    @classmethod
    def _name_rule(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _check(self) -> "Experiment":
        for key, values in self.sweep.items():
            if key == "repeat":
                if isinstance(values, bool) or not isinstance(values, int) or values < 1:
                    raise ValueError(f"sweep.repeat must be a positive integer, got {values!r}")
            elif key == "points":
                if not isinstance(values, list) or not values or not all(
                        isinstance(p, dict) and p and all(isinstance(k, str) for k in p) for p in values):
                    raise ValueError("sweep.points must be a non-empty list of {dotted.key: value} mappings, "
                                     "e.g. [{stages.0.peft.method: ia3, stages.0.train.lr: 1.0e-2}]")
            elif not isinstance(values, list) or not values:
                raise ValueError(f"sweep.{key} must be a non-empty list of values, e.g. [1.0e-4, 5.0e-4]")
        for i, st in enumerate(self.stages[:-1]):
            if not st.merge:
                raise ValueError(
                    f"stages.{i} sets merge: false but stage {i + 1} trains on top of it; "
                    "set merge: true or make it the last stage"
                )
        return self

    def stage_names(self) -> list[str]:
        """Unique names of the stages: their `name`, or kind numbered when repeated."""
        unnamed = [st.kind for st in self.stages if not st.name]
        names: list[str] = []
        count: dict[str, int] = {}
        for st in self.stages:
            if st.name:
                names.append(st.name)
                continue
            count[st.kind] = count.get(st.kind, 0) + 1
            names.append(st.kind if unnamed.count(st.kind) == 1 else f"{st.kind}{count[st.kind]}")
        if "base" in names:
            raise FactlabError("a stage is named 'base', which is reserved for the untrained model; rename it")
        if len(set(names)) != len(names):
            raise FactlabError(f"stage names are not unique: {names}; give each stage a distinct `name`")
        return names


# ---------------------------------------------------------------------------------------
# Loading


def non_ascii_letter(key: str) -> str | None:
    """`the non-ASCII letter 'а' (U+0430 CYRILLIC SMALL LETTER A)` for the first character of
    `key` outside ASCII (keys are ASCII: a look-alike letter pasted from elsewhere is the usual
    reason an apparently right key is unknown), else None."""
    for ch in key:
        if ord(ch) > 127:
            kind = "letter" if ch.isalpha() else "character"
            return f"the non-ASCII {kind} {ch!r} (U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')})"
    return None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first offending key, e.g. `stages.0.train.lrr: unknown key`."""
    # A misspelt key shows up twice (unknown key + missing key): name the typo first.
    e = sorted(err.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    # a key with spaces, newlines or nothing in it is shown quoted, so the line stays readable
    loc = ".".join(str(p) if str(p).isprintable() and str(p).strip() == str(p) and str(p) else repr(p)
                   for p in e["loc"]) or "(top level)"
    if e["type"] == "extra_forbidden":
        what = "unknown key; check its spelling against the documented keys"
        odd = non_ascii_letter(str(e["loc"][-1]) if e["loc"] else "")
        if odd:
            what = f"unknown key: it holds {odd}; config keys are plain ASCII, retype the key"
    elif e["type"] == "missing":
        what = "required key is missing"
    elif e["type"] == "value_error":
        what = str(e["msg"]).removeprefix("Value error, ")
    else:
        what = f"{e['msg']} (got {e.get('input')!r})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config error in {source}: {loc}: {what}{more}"


class _YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one
    silently: a second `stages:` dropped the first) and reads `1e-4` as a number (YAML 1.1
    wants `1.0e-4`; without this `lr: 1e-4` would be the string "1e-4", which strict number
    fields now refuse)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML's own error ("found unhashable key") follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    """YAML text -> Python, refusing duplicate keys (see _YamlLoader); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`stages.0.train.lr=1e-4` -> (["stages", "0", "train", "lr"], 1e-4); values are YAML."""
    if "=" not in item:
        raise FactlabError(f"--set {item!r} has no '='; write it as key.path=value, e.g. stages.0.train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise FactlabError(f"--set {item!r} has an empty key; write it as key.path=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any, what: str = "--set") -> None:
    """Set `value` at the dotted `path` inside the raw (unvalidated) config mapping; errors
    name the override as `what` (`--set`, or `sweep` for a sweep key)."""
    node: Any = raw
    dotted = ".".join(path)
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise FactlabError(f"{what} {dotted}: '{part}' is not an index of a list of {len(node)} items")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # an unset optional section (replay: null) takes keys too
                    node[part] = {}
                node = node[part]
        else:
            raise FactlabError(f"{what} {dotted}: '{'.'.join(path[:i])}' is a value, not a section")


def _resolve_paths(exp: Experiment, base: Path) -> Experiment:
    """Make data and probe paths absolute, relative to the experiment file's folder."""

    def fix(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    for d in [exp.data] + [st.data for st in exp.stages]:
        if d.corpus:
            d.corpus = [fix(p) for p in d.corpus]
        if d.qa:
            d.qa = fix(d.qa)
        if getattr(d, "replay", None):
            d.replay.source = [p if p in ("corpus", "general") else fix(p) for p in d.replay.source]
    for st in exp.stages:
        if st.distill is not None:
            st.distill.facts, st.distill.relations = (fix(p) if p else None for p in (st.distill.facts, st.distill.relations))
        if st.edit is not None:
            st.edit.facts = fix(st.edit.facts)
            st.edit.relations = fix(st.edit.relations) if st.edit.relations else None
            st.edit.cov_source = [p if p in ("corpus", "general") else fix(p) for p in st.edit.cov_source]
    exp.eval.probes = [fix(p) for p in exp.eval.probes]
    if exp.tune is not None:
        exp.tune.select_probes = [fix(p) for p in exp.tune.select_probes]
    exp.eval.general_text = [fix(p) for p in exp.eval.general_text]
    if exp.influence is not None:
        smp = exp.influence.samples
        smp.corpus = [fix(p) for p in smp.corpus] if smp.corpus else None
        smp.qa, smp.pairs, smp.world = (fix(p) if p else None for p in (smp.qa, smp.pairs, smp.world))
        exp.influence.probes = [fix(p) for p in exp.influence.probes]
    # A local model folder or .gguf file given relatively: resolve it too (aliases and hub ids stay as they are).
    cand = base / exp.model
    if not Path(exp.model).is_absolute() and (cand.is_dir() or (cand.is_file() and cand.suffix.lower() == ".gguf")):
        exp.model = str(cand.resolve())
    return exp


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment file; raise FactlabError with one clear line."""
    path = Path(path)
    if path.is_dir():
        raise FactlabError(f"experiment {path} is a folder; give the YAML experiment file (e.g. {path / 'experiment.yaml'})")
    if not path.is_file():
        raise FactlabError(f"experiment file {path} does not exist; give the path of a YAML experiment (see examples/)")
    try:
        # utf-8-sig: a BOM written by some editors is accepted, as in every data file
        raw = load_yaml(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise FactlabError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FactlabError(f"{path} is not valid YAML{where}: {problem}; fix the syntax there") from None
    if raw is None:
        raise FactlabError(f"{path} is empty; an experiment needs at least `name` and `model`")
    if not isinstance(raw, dict):
        raise FactlabError(f"{path} must be a YAML mapping (key: value), not a {type(raw).__name__}")
    file_output_dir = "output_dir" in raw  # relative to the file; the default runs/ stays in the cwd
    overridden: dict[str, str] = {}
    for item in overrides or []:
        keys, value = parse_override(item)
        apply_override(raw, keys, value)
        overridden[".".join(keys)] = item
    exp = experiment_from_dict(raw, source=str(path), base=path.parent, overridden=overridden)
    out = Path(exp.output_dir).expanduser()
    if file_output_dir and "output_dir" not in overridden and not out.is_absolute():
        exp.output_dir = str((path.parent / out).resolve())
    return exp


def experiment_from_dict(raw: dict, source: str = "<dict>", base: Path | None = None,
                         overridden: dict[str, str] | None = None) -> Experiment:
    """Validate a mapping as an Experiment (paths resolved against `base`, default: cwd).
    `overridden` maps dotted keys to the `--set` items that set them: an error at such a key
    blames that `--set`, not the file."""
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as e:
        first = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        loc = ".".join(str(p) for p in first["loc"])
        blame = next((item for key, item in (overridden or {}).items()
                      if loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")), None)
        raise FactlabError(format_validation_error(e, f"--set {blame}" if blame else source)) from None
    exp = _resolve_paths(exp, (base or Path.cwd()).resolve())
    exp._base = (base or Path.cwd()).resolve()
    exp.stage_names()  # fail early on duplicate names
    return exp


def dump_experiment(exp: Experiment) -> str:
    """The resolved config as YAML (what is saved beside a run)."""
    return yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
