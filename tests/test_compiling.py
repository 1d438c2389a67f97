"""train.compile: the decoder layers run compiled while the stage trains, with the same loss,
and eager again afterwards. Dynamo's "eager" backend (traced, no code generated) keeps this
fast; the speed of the real backend is measured in bench/bench_training.py."""

from contextlib import contextmanager

import pytest
import torch

from factlab.config import PeftSpec, StageSpec
from factlab.data.corpus import pack_documents
from factlab.testing import tiny_model
from factlab.train import compiling
from factlab.train.compiling import compiled_blocks, repeated_blocks
from factlab.train.peft_methods import build_peft_model

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris."]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_repeated_blocks_are_the_decoder_layers(tok, arch):
    pm, _ = build_peft_model(tiny_model(arch, vocab_size=len(tok)), PeftSpec(method="lora", targets=["attention"], r=2))
    blocks = repeated_blocks(pm)
    assert len(blocks) == 2 and type(blocks[0]).__name__.endswith(("DecoderLayer", "Block"))


def test_compiled_layers_give_the_same_loss_and_are_undone(tok):
    torch.manual_seed(0)
    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="lora", targets=["attention", "mlp"], r=2))
    ids = torch.randint(3, len(tok), (2, 12))
    with torch.no_grad():
        eager = pm(input_ids=ids, labels=ids).loss
    with compiled_blocks(pm, backend="eager") as blocks:
        assert all(b._compiled_call_impl is not None for b in blocks)
        with torch.no_grad():
            compiled = pm(input_ids=ids, labels=ids).loss
    assert all(b._compiled_call_impl is None for b in blocks)
    assert float(compiled) == pytest.approx(float(eager), abs=1e-6)


def test_a_stage_with_compile_trains_compiled(tmp_path, tok, monkeypatch):
    from factlab.train.stage import train_stage

    monkeypatch.setattr(compiling, "BACKEND", "eager")
    seen = []
    real = compiling.compiled_blocks

    @contextmanager
    def spy(model, enabled=True, backend=None):
        with real(model, enabled, backend) as blocks:
            seen.append(sum(b._compiled_call_impl is not None for b in blocks))
            yield blocks

    monkeypatch.setattr("factlab.train.stage.compiled_blocks", spy)
    results = {}
    for compile_ in (True, False):
        stage = StageSpec.model_validate({"kind": "cpt", "merge": False, "peft": {"targets": ["attention"], "r": 2},
                                          "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "bf16": False,
                                                    "compile": compile_}})
        model, results[compile_] = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, stage, "s",
                                               tmp_path / str(compile_), pack_documents(tok, DOCS, 16), seed=0)
        assert all(b._compiled_call_impl is None for b in repeated_blocks(model))
    assert seen == [2, 0]  # both layers compiled while the first stage trained
    for a, b in zip(results[True].loss_history, results[False].loss_history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
