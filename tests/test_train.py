"""Training stages on tiny random models: what trains, what stays frozen, merge == base+adapter,
saved artefacts reload with plain transformers/PEFT, and a seed makes a run repeatable."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, set_seed

from factlab.config import StageSpec
from factlab.data.corpus import pack_documents
from factlab.data.sft import build_sft_examples
from factlab.evaluate.facts import score_probes
from factlab.evaluate.probes import Probe
from factlab.testing import tiny_model
from factlab.train.peft_methods import build_peft_model

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris."]
QA = [[{"role": "user", "content": "Who runs the press line?"}, {"role": "assistant", "content": "Marta Ilvane."}],
      [{"role": "user", "content": "Who leads the night shift?"}, {"role": "assistant", "content": "Jonas Perl."}]]
PROBES = [Probe(id="p1", kind="recall", prompt="The press line is run by", target="Marta Ilvane", distractors=["Jonas Perl"]),
          Probe(id="p2", kind="qa", prompt="Who leads the night shift?", target="Jonas Perl", distractors=["Marta Ilvane"])]


def stage(kind="cpt", targets=("all-but-embed",), merge=True, **train):
    train = {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "seq_len": 16, "bf16": False, **train}
    return StageSpec.model_validate({"kind": kind, "merge": merge, "peft": {"targets": list(targets), "r": 4, "alpha": 8},
                                     "train": train})


def examples(tok, kind):
    return pack_documents(tok, DOCS, 16) if kind == "cpt" else build_sft_examples(tok, QA, 64)


def logits(model, tok):
    x = tok(["Marta Ilvane runs the press line", "Jonas Perl"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("kind", ["cpt", "sft"])
@pytest.mark.parametrize("targets", [("all-but-embed",), ("all",), ("mlp",)])
def test_a_step_changes_every_trainable_parameter_and_no_frozen_one(tmp_path, tok, kind, targets):
    from factlab.train.stage import train_stage

    model = tiny_model("llama", vocab_size=len(tok))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Two steps: LoRA's B starts at zero, so A receives no gradient in the very first step.
    peft_model, res = train_stage(model, tok, stage(kind, targets, merge=False), kind, tmp_path / "s", examples(tok, kind), seed=0)
    changed, frozen_ok = [], []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name
            changed.append(name)
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            if key in before:  # the untied lm_head copy is new but equal to the embedding
                frozen_ok.append(torch.equal(p.detach(), before[key]))
    assert changed and all(frozen_ok)
    assert res.steps == 2 and res.trainable_params == sum(peft_model.get_parameter(n).numel() for n in changed)
    # every trainable parameter moved away from its initial value (same seed -> same init)
    set_seed(0)
    init, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), stage(kind, targets).peft)
    init_params = dict(init.named_parameters())
    for name in changed:
        assert not torch.equal(peft_model.get_parameter(name).detach(), init_params[name].detach()), name


@pytest.mark.parametrize("targets", [("all",), ("lm_head",), ("embed", "attention")])
def test_merged_equals_base_plus_adapter_on_tied_embeddings(tmp_path, tok, targets):
    from factlab.train.stage import train_stage

    model = tiny_model("llama", vocab_size=len(tok))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    peft_model, _ = train_stage(model, tok, stage("cpt", targets, merge=False), "cpt", tmp_path / "s", examples(tok, "cpt"), seed=0)
    unmerged = logits(peft_model, tok)
    merged = peft_model.merge_and_unload()
    # fp32 on CPU: the merged matmul differs from base + B@A only by rounding.
    torch.testing.assert_close(logits(merged, tok), unmerged, atol=1e-5, rtol=1e-5)


def test_saved_outputs_reload_with_plain_transformers_and_peft(tmp_path, tok):
    from factlab.train.stage import train_stage

    base = tiny_model("llama", vocab_size=len(tok))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    out = tmp_path / "1-cpt"
    merged, res = train_stage(base, tok, stage("cpt", ("all",)), "cpt", out, examples(tok, "cpt"), seed=0)
    assert (out / "adapter" / "adapter_config.json").is_file()
    record = json.loads((out / "train.json").read_text())
    assert record["steps"] == 2 and [h["step"] for h in record["loss_history"]] == [1, 2]
    assert not (out.with_name("1-cpt.partial")).exists() and not (out / "checkpoints").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(reloaded, tok), logits(merged, tok), atol=0, rtol=0)
    assert score_probes(reloaded, tok, PROBES) == score_probes(merged, tok, PROBES)

    # The adapter applies to the original (tied) base model and reproduces the merged model.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    torch.testing.assert_close(logits(adapted, tok), logits(merged, tok), atol=1e-5, rtol=1e-5)
    # the adapter holds LoRA factors only, not copies of the embedding matrices
    from safetensors.torch import load_file
    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "full"])
def test_same_seed_same_weights_losses_and_saved_files(tmp_path, tok, method):
    from factlab.train.stage import train_stage

    spec = StageSpec.model_validate({"kind": "cpt", "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "seq_len": 16,
                                                              "bf16": False, "eval_fraction": 0.3, "eval_steps": 1},
                                     "peft": {"method": method, "targets": ["all"] if method in ("lora", "full") else ["attention", "mlp"],
                                              "r": 4, "alpha": 8, "num_virtual_tokens": 3}})
    runs = []
    for i in range(2):
        m, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, spec, "cpt", tmp_path / f"r{i}",
                             examples(tok, "cpt") * 2, seed=3)
        saved = {f.relative_to(tmp_path / f"r{i}"): f.read_bytes() for f in (tmp_path / f"r{i}").rglob("*.safetensors")}
        runs.append((m.state_dict(), res.loss_history, saved))
    (w0, h0, s0), (w1, h1, s1) = runs
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert h0 == h1 and any("eval_loss" in h for h in h0)
    assert s0 and s0 == s1


def test_embed_lr_puts_embedding_parameters_in_their_own_group(tok):
    from factlab.train.stage import param_groups

    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), stage("cpt", ("all",)).peft)
    groups = param_groups(pm, lr=1e-4, embed_lr=1e-5, weight_decay=0.0)
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    names = {id(p): n for n, p in pm.named_parameters()}
    emb_names = [names[id(p)] for p in groups[1]["params"]]
    assert emb_names and all("embed_tokens" in n or "lm_head" in n for n in emb_names)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in pm.parameters())


def test_heldout_split_and_early_stopping(tmp_path, tok):
    from factlab.train.stage import train_stage

    ex = examples(tok, "cpt") * 4
    _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok,
                         stage("cpt", ("mlp",), max_steps=40, eval_fraction=0.25, eval_steps=1, early_stopping_patience=1, lr=5.0),
                         "cpt", tmp_path / "s", ex, seed=0)
    assert res.heldout_examples == round(0.25 * len(ex)) and res.eval_loss is not None
    # lr=5 diverges, so the held-out loss stops improving and training stops well before 40 steps
    assert res.stopped_early and res.steps < 40


def test_train_loss_after_is_the_clean_mean_loss_on_the_training_examples(tmp_path, tok):
    """With a held-out share, the stage also scores its own training examples once trained,
    in eval mode: no NEFTune noise (alpha 50 here would move the loss a lot), no dropout."""
    from factlab.train.data import split_heldout
    from factlab.train.stage import train_stage

    blocks = [b for b in pack_documents(tok, DOCS * 6, 16) if len(b["input_ids"]) == 16]
    spec = stage("cpt", ("mlp",), max_steps=3, eval_fraction=0.25, neftune_alpha=50.0)
    model, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, spec, "cpt", tmp_path / "s", blocks, seed=0)
    train_ex, _ = split_heldout(blocks, 0.25, 0)
    assert len(train_ex) % spec.train.batch_size == 0  # equal batches: the mean of batch means is the mean
    model.eval()
    with torch.no_grad():
        by_hand = sum(float(model(input_ids=torch.tensor([b["input_ids"]]), labels=torch.tensor([b["labels"]])).loss)
                      for b in train_ex) / len(train_ex)
    assert res.train_loss_after == pytest.approx(by_hand, rel=1e-4)
    assert res.eval_loss is not None
    _, plain = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, stage("cpt", ("mlp",)), "cpt", tmp_path / "t", blocks, seed=0)
    assert plain.train_loss_after is None and plain.eval_loss is None


def test_flattened_documents_train_exactly_like_padded_documents(tmp_path, tok, monkeypatch):
    """`packing: documents` trains on unpadded flattened rows; the loss of every step equals the
    one the same batches give padded (same seed, same shuffling)."""
    from transformers import DataCollatorForSeq2Seq

    import factlab.train.stage as st
    from factlab.data.corpus import document_examples

    docs = DOCS + ["The night shift starts at ten.", "Vessen lies on the river Aro."]

    def run(folder):
        model = tiny_model("llama", vocab_size=len(tok))
        spec = stage("cpt", packing="documents", max_steps=4, batch_size=3, lr=5e-3)
        _, res = st.train_stage(model, tok, spec, "cpt", tmp_path / folder, document_examples(tok, docs, 32), seed=0)
        return res

    flat = run("flat")
    monkeypatch.setattr(st, "stage_collator",
                        lambda *a: DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    padded = run("padded")
    assert len(flat.loss_history) == 4
    for a, b in zip(flat.loss_history, padded.loss_history):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (flat.loss_history, padded.loss_history)


def test_micro_batches_train_the_same_steps_with_smaller_forward_passes(tmp_path, tok):
    """batch_size 4 as micro-batches of 2 or 1: the same optimizer steps, logged losses and
    trained weights (up to summation order), no forward pass over more than the micro-batch."""
    from factlab.train.stage import train_stage

    ex = examples(tok, "sft") * 3  # 6 conversations of different lengths: padding differs per micro-batch
    runs = {}
    for micro in (None, 2, 1):
        sizes = []
        model = tiny_model("llama", vocab_size=len(tok))
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: sizes.append(out.shape[0]))
        spec = stage("sft", ("all",), merge=False, max_steps=3, batch_size=4, micro_batch_size=micro)
        peft_model, res = train_stage(model, tok, spec, "sft", tmp_path / str(micro), ex, seed=0)
        handle.remove()
        runs[micro] = (res, {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        assert res.steps == 3 and max(sizes) == (micro or 4)
    ref, ref_w = runs[None]
    for micro in (2, 1):
        res, w = runs[micro]
        assert res.train_tokens == ref.train_tokens
        assert [h["loss"] for h in res.loss_history] == pytest.approx([h["loss"] for h in ref.loss_history], abs=1e-5)
        for name, p in w.items():
            torch.testing.assert_close(p, ref_w[name], atol=1e-4, rtol=1e-3)
