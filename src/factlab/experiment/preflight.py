"""Checks that need the model's shape but not its weights: run before anything trains or is
written, for every point of a sweep (and by `factlab sweep --dry-run`).

The model's architecture comes from its config.json alone: the module tree is built on the
meta device (no memory, no weights), so layer groups and layer ranges are checked with the
same `resolve_targets` a run uses, and probe prompts against the model's context length.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from factlab.config import Experiment
from factlab.errors import FactlabError


def check_probe_lengths(probes, tokenizer, model) -> None:
    """FactlabError naming the first probe whose prompt alone does not fit the model's context
    (it could only be scored truncated, i.e. wrongly). `model` may live on the meta device."""
    from factlab.evaluate.lm import max_positions

    limit = max_positions(model)
    if not limit:
        return
    for p in probes:
        n = len(tokenizer(p.prompt)["input_ids"])
        if n + 1 >= limit:
            raise FactlabError(f"probe {p.id!r}: its prompt is {n} tokens, longer than this model's context "
                               f"({limit} tokens); shorten the prompt")


def in_context_text(exp: Experiment) -> str | None:
    """The corpus as one prompt text for `eval.in_context` (None when it is off); FactlabError
    when there is no corpus to put there."""
    if not exp.eval.in_context:
        return None
    from factlab.data.corpus import load_documents

    corpus = exp.data.corpus or next((st.data.corpus for st in exp.stages if st.data.corpus), None)
    if not corpus:
        raise FactlabError("eval.in_context puts the corpus in the prompt, but the experiment has no data.corpus")
    docs = load_documents(corpus)
    if exp.data.substitute:
        from factlab.data.substitute import substitute

        docs = [substitute(d, exp.data.substitute)[0] for d in docs]
    return "\n\n".join(docs)


def check_in_context_length(context: str | None, tokenizer, model) -> None:
    """FactlabError when the in-context corpus takes more than half the model's context (the
    probes need the rest). `model` may live on the meta device."""
    if context is None:
        return
    from factlab.evaluate.lm import max_positions

    n_ctx = len(tokenizer(context)["input_ids"])
    limit = max_positions(model) or float("inf")  # None: no fixed context (ALiBi), any corpus fits
    if n_ctx > limit // 2:
        raise FactlabError(f"eval.in_context: the corpus is {n_ctx} tokens, too long to put in a prompt "
                           f"of this model (context {limit}); turn in_context off or use a shorter corpus")


class ModelShape:
    """A model's config, tokenizer and module tree on the meta device, per model name (cached)."""

    def __init__(self, console: Console | None = None):
        self.console = console
        self._cache: dict[str, tuple] = {}

    def get(self, name: str) -> tuple:
        """(config, tokenizer, meta model) of an alias, local folder or hub id."""
        if name not in self._cache:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            from factlab.models.loading import model_source

            path, gguf_file = model_source(name, self.console)  # a GGUF is read, not converted
            kw = {"gguf_file": gguf_file} if gguf_file else {}
            try:
                config = AutoConfig.from_pretrained(path, **kw)
                tokenizer = AutoTokenizer.from_pretrained(path, **kw)
                with torch.device("meta"):  # the module tree only: no weights are read or allocated
                    model = AutoModelForCausalLM.from_config(config)
            except (OSError, ValueError, KeyError) as e:
                raise FactlabError(f"cannot read the model {name} ({path}): {str(e).splitlines()[0][:200]}") from None
            self._cache[name] = (config, tokenizer, model)
        return self._cache[name]


def preflight(exp: Experiment, shapes: ModelShape | None = None) -> None:
    """Everything a run checks before its first write, without loading weights: the device,
    stage order, probe files, each stage's data files, layer groups and ranges against the
    architecture, chat templates, probe prompt lengths, the in-context corpus."""
    from factlab.data.sft import require_chat_template
    from factlab.experiment.evaluation import load_probe_files
    from factlab.models.targets import resolve_targets
    from factlab.methods import check_stage_order
    from factlab.train.data import load_stage_data

    from factlab.models.device import check_training_device, resolve_device

    # The device first, as run_experiment does: `device: cuda` on a machine without one fails
    # before a sweep's workers, logs or store are created (and in --dry-run).
    device = resolve_device(exp.device)
    if exp.stages:
        check_training_device(device)
    exp.stage_names()
    check_stage_order(exp.stages)
    probes = load_probe_files(exp.eval.probes)
    for st in exp.stages:
        load_stage_data(st, st.data.corpus or exp.data.corpus, st.data.qa or exp.data.qa,
                        substitute=st.data.substitute or exp.data.substitute)
    for path in exp.eval.general_text:
        if not Path(path).is_file():
            raise FactlabError(f"eval.general_text: {path} does not exist; check the path")
    _, tokenizer, model = (shapes or ModelShape()).get(exp.model)
    for i, st in enumerate(exp.stages):
        try:
            resolve_targets(model, list(st.peft.targets), st.peft.layers)
            if st.kind == "edit":
                from factlab.train.edit import edit_target

                edit_target(model, st.edit)  # architecture and edit.layers
        except FactlabError as e:
            raise FactlabError(f"stages.{i}: {e}") from None
    if any(st.kind == "sft" for st in exp.stages):
        require_chat_template(tokenizer, "SFT stages")
    if any(p.kind == "qa" for p in probes):
        require_chat_template(tokenizer, "qa probes")
    check_probe_lengths(probes, tokenizer, model)
    check_in_context_length(in_context_text(exp), tokenizer, model)


def preflight_sweep(points: list, console: Console | None = None) -> None:
    """preflight() for every sweep point before the first one runs; the error names the point."""
    shapes = ModelShape(console)
    for p in points:
        try:
            preflight(p.experiment, shapes)
        except FactlabError as e:
            raise FactlabError(f"sweep point {p.index} ({p.label}): {e}; fix the sweep: block or the files") from None
