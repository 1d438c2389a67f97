"""The reuse cache of a sweep (and of a tune study): work that the runs of one call share,
kept in memory and keyed on the content it was computed from. Its own module so that the
runner, which consults it, and the sweep and tune modules, which create it, all import it
without importing each other both ways.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from factlab.config import Experiment
from factlab.experiment.run_folder import EvalRecord, RunFolder, StageRecord


def content_hash(parts: object, streams: Iterable[Iterable] = ()) -> str:
    """The one hash of the reuse cache: JSON of `parts` (sorted keys), then every item of each
    stream in turn with a boundary after each stream. Large inputs (a stage's token ids) are
    streamed into the hash rather than built into one JSON string."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for stream in streams:
        for item in stream:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a finished file (never modified afterwards); copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class SweepCache:
    """Work that the points of one `factlab sweep` call share, reused because it is
    deterministic on CPU and repeating it would cost as much as the new work. Each entry is
    keyed on exactly what it was computed from:

    - the untrained model's evaluation (`base`): the model, the eval settings, the contents of
      the probe and general-text files, the seed and the SFT prompts (style) — `base_key`;
    - its in-context evaluation (`base+context`): the base key plus the context text itself,
      which may come from a stage's corpus (`context_key`);
    - a merged stage that is not the last one (the CPT stage of a sweep over SFT settings):
      the base key, the settings and names of the stages up to it and the training examples
      they saw (`stage_key`). Its folder is hard-linked into the new run.
    """

    def __init__(self) -> None:
        self._evaluations: dict[str, tuple[RunFolder, EvalRecord]] = {}
        self._stages: dict[str, tuple[RunFolder, StageRecord, EvalRecord]] = {}

    @staticmethod
    def base_key(exp: Experiment, model_path: Path, sft_conversations: list | None) -> str:
        files = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in exp.eval.probes + exp.eval.general_text]
        return content_hash({"model": str(model_path), "eval": exp.eval.model_dump(mode="json"), "seed": exp.seed,
                             "device": exp.device, "files": files, "sft": sft_conversations})

    @staticmethod
    def context_key(base_key: str, context: str) -> str:
        return content_hash({"base": base_key, "context": context})

    @staticmethod
    def stage_key(base_key: str, exp: Experiment, i: int, stage_examples: list) -> str:
        return content_hash({"base": base_key, "stages": [st.model_dump(mode="json") for st in exp.stages[: i + 1]],
                             "names": exp.stage_names()[: i + 1]}, streams=stage_examples[: i + 1])

    def evaluation(self, key: str) -> tuple[RunFolder, EvalRecord] | None:
        """(the run that made it, the record) of an evaluation with this key, if any."""
        return self._evaluations.get(key)

    def keep_evaluation(self, key: str, folder: RunFolder, ev: EvalRecord) -> None:
        self._evaluations[key] = (folder, ev)

    def stage(self, key: str) -> tuple[RunFolder, StageRecord, EvalRecord] | None:
        """A trained stage with this key whose merged model is still on disk."""
        hit = self._stages.get(key)
        if hit is None or hit[0].merged_model(hit[1]) is None:
            return None
        return hit

    def keep_stage(self, key: str, folder: RunFolder, stage: StageRecord, ev: EvalRecord) -> None:
        self._stages[key] = (folder, stage, ev)

    @staticmethod
    def link_stage(source: RunFolder, stage: StageRecord, dst: Path) -> None:
        """Copy a finished stage folder by hard links (its files are never modified)."""
        shutil.copytree(source.stage_dir(stage), dst, copy_function=_link_or_copy)
