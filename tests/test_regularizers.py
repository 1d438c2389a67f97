"""Forgetting controls: the L2 distance to the base weights (a hand computation, and equal to
what merging would change for every method), its place in the training loss, the per-step
update-norm cap, and per-group learning rates."""

import pytest
import torch
from rich.console import Console

from factlab.config import PeftSpec, StageSpec
from factlab.data.corpus import pack_documents
from factlab.errors import FactlabError
from factlab.testing import tiny_model
from factlab.train.peft_methods import build_peft_model
from factlab.train.regularizers import L2ToBase, UpdateNormCap

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris."]


def randomize_adapter(model, seed=1):
    """Give every trainable parameter a non-trivial value (LoRA's B and IA3's l start at 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_penalty_by_hand(tok):
    """One adapted module, r = 1: ||s * B A||_F^2 with s = alpha / r, written out."""
    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)),
                             PeftSpec(method="lora", targets=["model.layers.0.self_attn.q_proj"], r=1, alpha=2))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_A["default"].weight.copy_(torch.arange(16.0).view(1, 16) / 16)  # (r=1, in=16): a_j = j/16
        q.lora_B["default"].weight.fill_(0.5)  # (out=16, r=1): b_i = 0.5
    # (s * B A)_ij = 2 * 0.5 * j/16, so the sum of squares is 16 rows * sum_j (j/16)^2
    by_hand = 16 * sum((j / 16) ** 2 for j in range(16))
    assert float(L2ToBase(pm)()) == pytest.approx(by_hand, rel=1e-6)


def test_full_penalty_by_hand(tok):
    model, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="full", targets=["mlp"]))
    l2 = L2ToBase(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert float(l2()) == pytest.approx(0.25 * n, rel=1e-6)
    assert not any(p.requires_grad for n_, p in model.named_parameters() if ".mlp." not in n_)


@pytest.mark.parametrize("method,targets", [("lora", ["all"]), ("rslora", ["attention", "mlp"]),
                                            ("dora", ["attention", "mlp"]), ("ia3", ["all-but-embed"])])
def test_penalty_equals_what_merging_changes(tok, method, targets):
    """The definition: sum over weights of ||W_merged - W_base||_F^2."""
    base = tiny_model("llama", vocab_size=len(tok))
    pm, _ = build_peft_model(base, PeftSpec(method=method, targets=targets, r=4, alpha=8))
    randomize_adapter(pm)
    penalty = float(L2ToBase(pm)())
    before = {k: v.detach().clone() for k, v in pm.get_base_model().state_dict().items()}
    merged = pm.merge_and_unload()
    after = merged.state_dict()
    distance = 0.0
    for key, w0 in before.items():
        if "lora_" in key or "ia3_" in key:
            continue
        distance += float((after[key.replace(".base_layer", "")].double() - w0.double()).pow(2).sum())
    assert penalty > 0 and penalty == pytest.approx(distance, rel=1e-4)


def test_penalty_refused_for_prompt_methods(tok):
    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="prefix_tuning", num_virtual_tokens=2))
    with pytest.raises(FactlabError, match="prefix_tuning changes no weights.*remove l2_to_base"):
        L2ToBase(pm)


def stage(method="lora", **train):
    train = {"lr": 5e-2, "max_steps": 4, "batch_size": 2, "seq_len": 16, "bf16": False, **train}
    return StageSpec.model_validate({"kind": "cpt", "merge": False, "train": train,
                                     "peft": {"method": method, "targets": ["attention", "mlp"], "r": 4, "alpha": 8}})


def run(tmp_path, tok, spec, name="s"):
    from factlab.train.stage import train_stage

    return train_stage(tiny_model("llama", vocab_size=len(tok)), tok, spec, "cpt", tmp_path / name,
                       pack_documents(tok, DOCS, 16), seed=0, console=Console(quiet=True))


def test_trainer_adds_coef_times_distance_in_training_only(tmp_path, tok):
    from factlab.train.regularizers import RegularizedTrainer
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="lora", targets=["mlp"], r=4, alpha=8))
    randomize_adapter(pm)
    l2 = L2ToBase(pm)
    ex = pack_documents(tok, DOCS, 16)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none", per_device_train_batch_size=2)
    trainer = RegularizedTrainer(model=pm, args=args, train_dataset=ex, l2_to_base=l2, l2_coef=3.0,
                                 data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    inputs = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(ex[:2])
    pm.train()
    with torch.no_grad():
        plain = pm(**inputs).loss
        with_penalty = trainer.compute_loss(pm, dict(inputs))
    assert float(with_penalty - plain) == pytest.approx(3.0 * float(l2()), rel=1e-5)
    assert trainer.last_l2 == pytest.approx(float(l2()))
    # A loss already normalised over the accumulated batch (the Trainer will not divide it):
    # the penalty is divided by the accumulation steps instead, so each step sees it once.
    trainer.loss_is_scaled_for_ga, trainer.current_gradient_accumulation_steps = True, 2
    with torch.no_grad():
        halved = trainer.compute_loss(pm, dict(inputs))
    assert float(halved - plain) == pytest.approx(1.5 * float(l2()), rel=1e-5)
    pm.eval()  # evaluation (held-out loss): the plain model loss
    with torch.no_grad():
        assert float(trainer.compute_loss(pm, dict(inputs))) == pytest.approx(float(pm(**inputs).loss))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_l2_to_base_keeps_the_stage_closer_to_the_base(tmp_path, tok, method):
    _, free = run(tmp_path, tok, stage(method, l2_to_base=1e-9), "free")  # ~no pull, but measured
    _, pulled = run(tmp_path, tok, stage(method, l2_to_base=50.0), "pulled")
    assert 0 < pulled.l2_to_base_final < 0.5 * free.l2_to_base_final
    assert all("l2_to_base" in h for h in pulled.loss_history if "loss" in h)


def test_update_norm_cap_unit():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    v = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [v], "lr": 2.0}], lr=1.0)
    cap = UpdateNormCap(opt, max_norm=0.1)
    w.grad, v.grad = -torch.ones(3, 4), -torch.ones(5)
    opt.step()  # uncapped update: w += 1, v += 2, norm sqrt(12 + 20)
    delta = torch.cat([w.detach().flatten(), v.detach().flatten()])
    assert float(delta.norm()) == pytest.approx(0.1, rel=1e-6)
    uncapped = torch.cat([torch.ones(12), 2 * torch.ones(5)])
    torch.testing.assert_close(delta / delta.norm(), uncapped / uncapped.norm())  # direction kept
    assert cap.capped_steps == 1 and cap.max_seen == pytest.approx(32 ** 0.5)
    before = w.detach().clone()
    w.grad, v.grad = -1e-3 * torch.ones(3, 4), torch.zeros(5)
    opt.step()  # small update: untouched
    torch.testing.assert_close(w.detach() - before, 1e-3 * torch.ones(3, 4))
    assert cap.capped_steps == 1 and cap.steps == 2
    cap.remove()


def test_update_norm_cap_in_a_stage(tmp_path, tok):
    from factlab.train.regularizers import UpdateNormCap as Cap

    seen = []
    orig_post = Cap._post

    def spy(self, optimizer, args, kwargs):
        orig_post(self, optimizer, args, kwargs)
        seen.append(float(torch.sqrt(sum((p.detach() - p0).pow(2).sum() for p, p0 in zip(self.params, self._spy_before)))))

    orig_pre = Cap._pre

    def pre(self, optimizer, args, kwargs):
        orig_pre(self, optimizer, args, kwargs)
        self._spy_before = [p.detach().clone() for p in self.params]

    Cap._post, Cap._pre = spy, pre
    try:
        _, res = run(tmp_path, tok, stage("full", lr=1e-2, max_update_norm=1e-3))
    finally:
        Cap._post, Cap._pre = orig_post, orig_pre
    assert len(seen) == res.steps == 4
    assert all(s <= 1e-3 * (1 + 1e-5) for s in seen) and res.update_norm_capped_steps == 4


def test_head_lr_gives_lm_head_its_own_group(tok):
    from factlab.train.stage import param_groups

    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="lora", targets=["all"]))
    groups = param_groups(pm, lr=1e-4, embed_lr=1e-5, weight_decay=0.0, head_lr=3e-5)
    assert [g["lr"] for g in groups] == [1e-4, 1e-5, 3e-5]
    names = {id(p): n for n, p in pm.named_parameters()}
    assert all("embed_tokens" in names[id(p)] for p in groups[1]["params"])
    assert groups[2]["params"] and all("lm_head" in names[id(p)] for p in groups[2]["params"])
    # without head_lr, lm_head stays with the embeddings (embed_lr's documented meaning)
    assert [g["lr"] for g in param_groups(pm, 1e-4, 1e-5, 0.0)] == [1e-4, 1e-5]
    # head_lr alone: embeddings at lr
    assert [g["lr"] for g in param_groups(pm, 1e-4, None, 0.0, head_lr=3e-5)] == [1e-4, 1e-4, 3e-5]


def test_prune_updates_leaves_the_largest_entries_of_each_update_out_of_the_merge(tok):
    import copy

    from factlab.train.merge import merge_adapter

    base = tiny_model("llama", vocab_size=len(tok))
    reference = copy.deepcopy(base)
    pm, _ = build_peft_model(base, PeftSpec(method="lora", targets=["mlp"], r=4, alpha=8))
    randomize_adapter(pm)
    q = pm.base_model.model.model.layers[0].mlp.down_proj
    delta = q.get_delta_weight("default").detach().clone()
    merged = merge_adapter(pm, prune=0.1)
    after = merged.model.layers[0].mlp.down_proj.weight.detach()
    before = reference.model.layers[0].mlp.down_proj.weight.detach()
    kept = after - before
    n = delta.numel()
    dropped = (kept == 0) & (delta != 0)
    assert int(dropped.sum()) == round(0.1 * n)
    # the dropped entries are exactly the largest |delta|; the rest merged unchanged
    assert float(delta.abs()[dropped].min()) >= float(delta.abs()[~dropped].max())
    torch.testing.assert_close(kept[~dropped], delta[~dropped], rtol=1e-5, atol=1e-6)
    # untouched (not adapted) weights are the base's
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight)
