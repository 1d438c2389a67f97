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

            from factlab.models.loading import resolve_model

            path = resolve_model(name, self.console)
            try:
                config = AutoConfig.from_pretrained(path)
                tokenizer = AutoTokenizer.from_pretrained(path)
                with torch.device("meta"):  # the module tree only: no weights are read or allocated
                    model = AutoModelForCausalLM.from_config(config)
            except (OSError, ValueError, KeyError) as e:
                raise FactlabError(f"cannot read the model {name} ({path}): {str(e).splitlines()[0][:200]}") from None
            self._cache[name] = (config, tokenizer, model)
        return self._cache[name]


def preflight(exp: Experiment, shapes: ModelShape | None = None) -> None:
    """Everything a run checks before its first write, without loading weights: stage order,
    probe files, each stage's data files, layer groups and ranges against the architecture,
    chat templates, probe prompt lengths."""
    from factlab.data.sft import require_chat_template
    from factlab.experiment.evaluation import load_probe_files
    from factlab.models.targets import resolve_targets
    from factlab.methods import check_stage_order
    from factlab.train.data import load_stage_data

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


def preflight_sweep(points: list, console: Console | None = None) -> None:
    """preflight() for every sweep point before the first one runs; the error names the point."""
    shapes = ModelShape(console)
    for p in points:
        try:
            preflight(p.experiment, shapes)
        except FactlabError as e:
            raise FactlabError(f"sweep point {p.index} ({p.label}): {e}; fix the sweep: block or the files") from None
