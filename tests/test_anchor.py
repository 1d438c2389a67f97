"""The anchor (train.anchor): its KL equals an independent computation (value and gradient,
adapter and full fine-tuning), and in a stage a large weight keeps the general-text loss of the
base while the facts are trained. The top-k form it shares with distillation (loss.topk_kl) is
tested as a lower bound in tests/test_distill.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import factlab.train.anchor as anchor_mod
from factlab.config import AnchorSpec, PeftSpec, StageSpec
from factlab.data.corpus import pack_documents
from factlab.errors import FactlabError
from factlab.testing import tiny_model
from factlab.train.anchor import Anchor, anchor_blocks
from factlab.train.peft_methods import build_peft_model

TEXT = [("The river runs past the old mill and the bakery on the corner of the square. " * 4),
        ("Children walk to school in the morning while the shops open their doors. " * 4)]
FACTS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
         "Jonas Perl leads the night shift at Korrin.", "The Korrin plant makes axles for tractors."]


def perturb(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def independent_kl(base, student, ids):
    """mean over positions of KL(p_base || p_student), from the models' own full logits."""
    with torch.no_grad():
        base_logp = F.log_softmax(base(input_ids=ids).logits.float(), -1)
    logq = F.log_softmax(student(input_ids=ids).logits.float(), -1)
    return F.kl_div(logq, base_logp, log_target=True, reduction="sum") / ids.numel()


@pytest.mark.parametrize("method,targets", [("lora", ["all"]), ("dora", ["attention", "mlp"]), ("ia3", ["all-but-embed"])])
def test_kl_with_the_adapter_off_equals_an_independent_computation(tok, method, targets):
    model = tiny_model("llama", vocab_size=len(tok))
    base = copy.deepcopy(model).eval()
    pm, _ = build_peft_model(model, PeftSpec(method=method, targets=targets, r=4, alpha=8, dropout=0.0))
    perturb(pm, scale=0.5)
    pm.eval()
    blocks = anchor_blocks(tok, TEXT, 12)
    anchor = Anchor(pm, blocks, AnchorSpec(kl=1.0, ratio=1.0, seq_len=12), rows_per_call=2, calls=1, seed=0)
    anchor.chunk_rows = 5  # several chunks, one of them partial
    picks = anchor.order[:2]
    got = anchor(pm)
    want = independent_kl(base, pm, blocks[picks])
    assert float(want) > 1e-6  # the adapter moved the model: a non-trivial KL
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    params = [p for p in pm.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for a, b in zip(g_got, g_want):
        if b is None:
            assert a is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_full_fine_tuning_uses_the_starting_model_precomputed(tok, monkeypatch):
    """Top-k with k = the vocabulary is the full KL: equal to an independent computation."""
    monkeypatch.setattr(anchor_mod, "TOP_K", len(tok))
    model = tiny_model("llama", vocab_size=len(tok))
    base = copy.deepcopy(model).eval()
    pm, _ = build_peft_model(model, PeftSpec(method="full", targets=["mlp"]))
    blocks = anchor_blocks(tok, TEXT, 12)
    anchor = Anchor(pm, blocks, AnchorSpec(ratio=1.0, seq_len=12), rows_per_call=1, calls=3, seed=0)
    assert len(anchor.cached) == min(3, len(blocks))
    perturb(pm)  # training moved the weights after the precomputation
    pm.eval()
    picks = [anchor.order[0]]
    got = anchor(pm)
    want = independent_kl(base, pm, blocks[picks])
    assert float(want) > 1e-3
    assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_prompt_methods_are_refused(tok):
    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="prompt_tuning", num_virtual_tokens=4))
    with pytest.raises(FactlabError, match="train.anchor"):
        Anchor(pm, anchor_blocks(tok, TEXT, 12), AnchorSpec(), rows_per_call=1, calls=1, seed=0)


def test_too_little_text_is_one_clear_error(tok):
    with pytest.raises(FactlabError, match="anchor.seq_len"):
        anchor_blocks(tok, ["short"], 128)


def test_unknown_anchor_key_is_refused():
    with pytest.raises(ValueError, match="klw"):
        StageSpec(kind="cpt", train={"anchor": {"klw": 1.0}})


def general_text_ids(tok):
    from factlab.evaluate.perplexity import builtin_general_text  # the damage text, never the anchor's

    return torch.tensor([tok(builtin_general_text())["input_ids"][:256]])


def train(tmp_path, tok, name, anchor=None, method="lora"):
    """(general-text loss of the base, of the trained model, KL(base || trained) on it, result)."""
    from factlab.train.stage import train_stage

    spec = StageSpec(kind="cpt", peft={"method": method, "targets": ["attention", "mlp"], "r": 8, "alpha": 16},
                     train={"lr": 2e-2, "max_steps": 12, "batch_size": 2, "seq_len": 32, "bf16": False,
                            **({"anchor": anchor} if anchor else {})})
    model = tiny_model("llama", vocab_size=len(tok))
    base = copy.deepcopy(model).eval()
    trained, res = train_stage(model, tok, spec, name, tmp_path / name, pack_documents(tok, FACTS, 32), seed=0,
                               console=Console(quiet=True))
    trained.eval()
    ids = general_text_ids(tok)
    with torch.no_grad():
        before, after = float(base(input_ids=ids, labels=ids).loss), float(trained(input_ids=ids, labels=ids).loss)
        kl = float(independent_kl(base, trained, ids))
    return before, after, kl, res


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_large_anchor_keeps_the_general_text_loss_of_the_base(tmp_path, tok, method):
    """The facts at a high learning rate move the model on general text (the damage text, not
    the anchor's); with kl = 1e4 a LoRA stage keeps the general-text loss within 1e-3 of the
    base. Full fine-tuning at this learning rate moves every weight by Adam-sized steps, so
    there the anchor holds the KL to a twentieth and the loss change to a sixth (measured:
    KL 4.9e-3 -> 2.1e-4, loss change 0.022 -> 0.0037)."""
    before, free, free_kl, _ = train(tmp_path, tok, "free", method=method)
    _, held, held_kl, res = train(tmp_path, tok, "anchored", {"kl": 1e4, "ratio": 1.0, "seq_len": 32}, method=method)
    assert abs(free - before) > 0.01 and free_kl > 1e-3
    assert held_kl < 0.05 * free_kl
    if method == "lora":
        assert abs(held - before) < 1e-3
    else:
        assert abs(held - before) < abs(free - before) / 5
    kls = [h["anchor_kl"] for h in res.loss_history]
    assert len(kls) == res.steps and all(k >= 0 for k in kls)
