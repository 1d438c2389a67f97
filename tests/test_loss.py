"""The fused training loss (factlab.train.loss): the same loss and gradients as the model's own
through the real Trainer step, for CPT, SFT, padded documents, NEFTune, l2_to_base and every
method that takes it; which path each method takes; and that lm_head never sees an unlabelled
position nor produces more than one chunk of logits, in the forward or for the backward."""

import pytest
import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from factlab.config import PeftSpec, StageSpec
from factlab.data.corpus import cpt_examples
from factlab.data.sft import build_sft_examples
from factlab.methods import methods
from factlab.testing import tiny_model
from factlab.train.loss import causal_lm_loss, fused_loss, loss_path
from factlab.train.peft_methods import build_peft_model
from factlab.train.regularizers import neftune

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris.",
        "Engineers calibrate the torque sensor every Monday before the first batch."]
QA = [[{"role": "user", "content": "Who runs the press line?"}, {"role": "assistant", "content": "Marta Ilvane."}],
      [{"role": "user", "content": "Who leads the night shift at the plant?"}, {"role": "assistant", "content": "Jonas Perl."}],
      [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris, on the Seine."}]]


def spec(kind="cpt", method="lora", targets=("all",), fused=True, **train):
    train = {"lr": 1e-2, "max_steps": 2, "batch_size": 3, "seq_len": 16, "bf16": False, "fused_loss": fused, **train}
    return StageSpec.model_validate({"kind": kind, "merge": False, "train": train,
                                     "peft": {"method": method, "targets": list(targets), "r": 4, "alpha": 8}})


def examples(tok, stage):
    if stage.kind == "sft":
        return build_sft_examples(tok, QA, 64)
    return cpt_examples(tok, DOCS, stage.train.seq_len, stage.train.packing)


def prepare(tmp_path, tok, stage, name="s"):
    from factlab.train.stage import prepare_stage

    model = tiny_model("llama", vocab_size=len(tok))
    return prepare_stage(model, tok, stage, name, tmp_path / name, examples(tok, stage), seed=0,
                         console=Console(quiet=True))


def randomize_trainable(model, seed=1):
    """Non-trivial adapter values (LoRA's B starts at 0: A would get no gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def trainer_step(prepared, fused: bool, chunk_rows: int | None = None):
    """The Trainer's own compute_loss on its first batch, then backward: (loss, gradients)."""
    from contextlib import nullcontext

    trainer, model = prepared.trainer, prepared.model
    batch = next(iter(trainer.get_train_dataloader()))
    n_items = (batch["labels"][:, 1:] != -100).sum()
    model.train()
    model.zero_grad()
    set_seed(5)  # NEFTune noise and dropout: the same draws in both paths
    with neftune(model, prepared.stage.train.neftune_alpha), (fused_loss(model, chunk_rows) if fused else nullcontext()):
        loss = trainer.compute_loss(model, batch, num_items_in_batch=n_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


CASES = {
    "cpt blocks": dict(kind="cpt"),
    "sft": dict(kind="sft"),
    "cpt documents (padded)": dict(kind="cpt", packing="documents"),
    "neftune": dict(kind="sft", neftune_alpha=5.0),
    "l2_to_base": dict(kind="cpt", l2_to_base=0.3),
    "lora on attention only": dict(kind="cpt", targets=("attention",)),
    "lora on lm_head (peft-wrapped head)": dict(kind="sft", targets=("lm_head", "mlp")),
    "dora": dict(kind="cpt", method="dora", targets=("attention", "mlp")),
    "ia3": dict(kind="sft", method="ia3", targets=("all-but-embed",)),
    "full": dict(kind="sft", method="full", targets=("all",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_and_gradients_equal_the_models_own(tmp_path, tok, case):
    kw = dict(CASES[case])
    stage = spec(kw.pop("kind"), kw.pop("method", "lora"), kw.pop("targets", ("all",)), **kw)
    prepared = prepare(tmp_path, tok, stage)
    assert prepared.loss_path.name == "fused"
    randomize_trainable(prepared.model)
    standard, g_std = trainer_step(prepared, fused=False)
    fused, g_fused = trainer_step(prepared, fused=True, chunk_rows=7)  # several chunks
    assert fused == pytest.approx(standard, abs=1e-5, rel=1e-6)
    assert g_std.keys() == g_fused.keys() and g_std
    for name, g in g_std.items():
        assert torch.allclose(g_fused[name], g, rtol=1e-4, atol=1e-7), name
    assert any(g.abs().max() > 0 for g in g_fused.values())


def test_a_stage_trains_the_same_on_both_paths(tmp_path, tok):
    """End to end: the logged losses and the held-out losses of two steps."""
    from factlab.train.stage import train_stage

    results = {}
    for fused in (True, False):
        stage = spec("sft", fused=fused, eval_fraction=0.34)
        _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, stage, "s", tmp_path / str(fused),
                             examples(tok, stage), seed=0)
        results[fused] = res
    assert results[True].loss_path == "fused" and results[False].loss_path == "standard"
    assert results[False].loss_path_note == "train.fused_loss is false"
    for a, b in zip(results[True].loss_history, results[False].loss_history, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=2e-5), (k, a, b)
    assert results[True].eval_loss == pytest.approx(results[False].eval_loss, abs=1e-5)
    assert results[True].train_loss_after == pytest.approx(results[False].train_loss_after, abs=1e-5)


@pytest.mark.parametrize("method", methods())
def test_which_path_each_method_takes(tmp_path, tok, method):
    # lm_head is adapted wherever the method allows it (DoRA cannot take the tiny model's
    # all-zero padding row of lm_head, IA3 cannot take the embedding)
    targets = {"dora": ("attention", "mlp"), "ia3": ("all-but-embed",)}.get(method, ("all",))
    prepared = prepare(tmp_path, tok, spec("cpt", method, targets))
    if method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        assert prepared.loss_path.name == "standard"
        assert "virtual tokens" in prepared.loss_path.reason
    else:
        assert prepared.loss_path.name == "fused", prepared.loss_path.reason


def test_switched_off_takes_the_models_own_loss(tmp_path, tok):
    prepared = prepare(tmp_path, tok, spec(fused=False))
    assert prepared.loss_path.name == "standard"


def test_logit_softcapping_falls_back_to_the_models_own_loss(tok):
    """Gemma 2 soft-caps its logits after lm_head: the check finds it even where the tiny
    random logits are so small that the cap barely changes the loss."""
    cfg = AutoConfig.for_model("gemma2", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=4, final_logit_softcapping=30.0)
    model = AutoModelForCausalLM.from_config(cfg)
    pm, _ = build_peft_model(model, PeftSpec(method="lora", targets=["attention"], r=2))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    path = loss_path(pm, True, ids)
    assert path.name == "standard" and "soft-capping" in path.reason
    cfg.final_logit_softcapping = None
    assert loss_path(build_peft_model(AutoModelForCausalLM.from_config(cfg),
                                      PeftSpec(method="lora", targets=["attention"], r=2))[0], True, ids).name == "fused"


def test_head_sees_only_labelled_rows_in_chunks_and_no_full_logits_are_kept(tok):
    """SFT-like batch: prompt and padding positions never reach lm_head, at most chunk_rows rows
    at a time; and no activation saved for a backward has more than chunk_rows rows of logits
    (the model's own loss saves all [batch * seq, vocab])."""
    model = tiny_model("llama", vocab_size=len(tok))
    pm, _ = build_peft_model(model, PeftSpec(method="lora", targets=["all"], r=4, alpha=8))
    randomize_trainable(pm)
    pm.train()
    ids = torch.randint(3, len(tok), (3, 20))
    labels = ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[1, 16:] = -100  # padding
    n_labelled = int((labels[:, 1:] != -100).sum())
    head = pm.get_base_model().get_output_embeddings()

    def run(fused: bool):
        rows, logit_rows = [], []

        def pack(t):  # activations (not frozen weights) with a vocabulary-sized last dimension
            if t.requires_grad and t.dim() >= 2 and t.shape[-1] == len(tok):
                logit_rows.append(t.shape[:-1].numel())
            return t

        handle = head.register_forward_hook(lambda m, a, out: rows.append(out.shape[:-1].numel()))
        try:
            with (fused_loss(pm, chunk_rows=4) if fused else torch.enable_grad()), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = pm(input_ids=ids, labels=labels).loss
            loss.backward()
        finally:
            handle.remove()
        return rows, logit_rows

    rows, logit_rows = run(fused=True)
    assert sum(rows) == n_labelled and max(rows) <= 4
    assert logit_rows and max(logit_rows) <= 4
    rows, logit_rows = run(fused=False)  # for contrast: the model's own loss
    assert rows == [60] and max(logit_rows) == 60


def test_outside_the_context_and_without_labels_the_model_is_untouched(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with fused_loss(model):
            inside = model(input_ids=ids).logits  # no labels: the model's own forward
            fused = model(input_ids=ids, labels=ids)
        after = model(input_ids=ids, labels=ids)
    assert torch.equal(inside, before) and fused.logits is None
    assert "forward" not in vars(model) and after.logits is not None
    assert float(fused.loss) == pytest.approx(float(after.loss), abs=1e-6)


def test_no_labelled_position_gives_nan_like_the_model(tok):
    """All labels masked: cross_entropy's mean over nothing is NaN in both paths."""
    model = tiny_model("llama", vocab_size=len(tok))
    head = model.get_output_embeddings()
    hidden = torch.randn(2, 5, 16)
    labels = torch.full((2, 5), -100)
    assert torch.isnan(causal_lm_loss(head, hidden, labels))
    assert torch.isnan(model(input_ids=torch.ones(2, 5, dtype=torch.long), labels=labels).loss)
