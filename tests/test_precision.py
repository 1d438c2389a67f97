"""Frozen base weights in bf16 while a bf16 stage trains (factlab.train.precision): what is cast
and what stays fp32, the fp32 base restored bit for bit, and a loss curve that matches the
autocast path (fp32 storage) within 0.01 on a tiny model (its loss is about 6; autocast
itself differs from fp32 training by as much). bf16 matmuls run emulated on CPUs without
native bf16: slow, but correct, and these models are tiny."""

import pytest
import torch
from rich.console import Console

from factlab.config import PeftSpec, StageSpec
from factlab.data.corpus import pack_documents
from factlab.testing import tiny_model
from factlab.train.peft_methods import build_peft_model
from factlab.train.precision import frozen_matrices, frozen_weights_in_bf16

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris.",
        "Engineers calibrate the torque sensor every Monday before the first batch."]


def stage(method="lora", targets=("all-but-embed",), steps=6, **train):
    train = {"lr": 1e-2, "max_steps": steps, "batch_size": 4, "seq_len": 16, "bf16": True, **train}
    return StageSpec.model_validate({"kind": "cpt", "merge": False, "train": train,
                                     "peft": {"method": method, "targets": list(targets), "r": 4, "alpha": 8}})


def test_what_is_cast_and_restored(tmp_path, tok):
    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="lora", targets=["all"], r=4))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    spill = tmp_path / "spill.safetensors"
    ids = torch.tensor([[5, 6, 7, 8]])
    with frozen_weights_in_bf16(pm, spill) as cast:
        assert spill.is_file() and cast
        for name, p in pm.named_parameters():
            if name in cast:
                assert p.dtype == torch.bfloat16 and not p.requires_grad and p.dim() >= 2
            else:  # adapters, norms
                assert p.dtype == torch.float32 and (p.requires_grad or p.dim() == 1), name
        assert any("base_layer" in n for n in cast) and any("embed_tokens" in n for n in cast)
        emb = pm.get_base_model().get_input_embeddings()
        assert emb(ids).dtype == torch.float32  # the residual stream stays fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(pm(input_ids=ids, labels=ids).loss)
    assert not spill.exists()
    for name, p in pm.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[name]), name


def test_nothing_to_cast_when_everything_trains(tmp_path, tok):
    model, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="full", targets=["all"]))
    assert frozen_matrices(model) == {}
    with frozen_weights_in_bf16(model, tmp_path / "spill.safetensors") as cast:
        assert cast == {} and not (tmp_path / "spill.safetensors").exists()


def test_a_bf16_stage_trains_fp32_adapters_and_optimizer_state_and_gives_back_the_fp32_base(tmp_path, tok):
    from factlab.train.stage import fit, prepare_stage

    model = tiny_model("llama", vocab_size=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared = prepare_stage(model, tok, stage(steps=2), "s", tmp_path / "s", pack_documents(tok, DOCS, 16),
                             seed=0, console=Console(quiet=True))
    dtypes_in_training = {}

    def record(module, args, output):  # what the first q_proj's base layer holds while training
        dtypes_in_training[module.training] = module.weight.dtype

    q = prepared.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    handle = q.register_forward_hook(record)
    fit(prepared)
    handle.remove()
    assert dtypes_in_training[True] == torch.bfloat16
    assert not list(prepared.partial.glob("frozen-fp32*.safetensors"))
    state = prepared.trainer.optimizer.state
    assert state and all(t.dtype == torch.float32 for s in state.values() for t in s.values() if t.dim() > 0)
    for name, p in prepared.model.named_parameters():
        assert p.dtype == torch.float32, name
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if not p.requires_grad and key in before:
            assert torch.equal(p.detach(), before[key]), name


@pytest.mark.parametrize("method,targets", [("lora", ("all-but-embed",)), ("full", ("mlp",))])
def test_loss_curve_matches_the_autocast_path(tmp_path, tok, method, targets):
    from factlab.train.stage import train_stage

    curves = {}
    for bf16_weights in (True, False):
        _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok,
                             stage(method, targets, bf16_weights=bf16_weights), "s", tmp_path / str(bf16_weights),
                             pack_documents(tok, DOCS * 3, 16), seed=0)
        assert res.bf16
        curves[bf16_weights] = [h["loss"] for h in res.loss_history]
    assert len(curves[True]) == 6
    assert curves[True] != curves[False]  # the storage did change something
    assert curves[True] == pytest.approx(curves[False], abs=0.01)


def test_after_a_full_bf16_stage_the_model_computes_logits_again(tmp_path, tok):
    """Without PEFT, accelerate wraps the trained model's own forward (autocast); the fused
    loss installed under that wrapper must pass calls through once the stage is over."""
    from factlab.train.stage import train_stage

    model, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, stage("full", ("mlp",), steps=1), "s",
                             tmp_path / "s", pack_documents(tok, DOCS, 16), seed=0)
    assert res.loss_path == "fused"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (1, 4, len(tok))
