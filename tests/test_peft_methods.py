"""Every PEFT method (and full fine-tuning) on a tiny random Llama, through one shared set of
tests: a stage trains the method's parameters and nothing else, save -> reload reproduces the
outputs with plain PEFT / transformers, merge equals base + adapter where the method merges,
and the stage reports what it saved."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, set_seed

from factlab.config import PeftSpec, StageSpec, experiment_from_dict
from factlab.data.corpus import pack_documents
from factlab.errors import FactlabError
from factlab.methods import check_stage_order, method_info, methods
from factlab.testing import tiny_model
from factlab.train.peft_methods import build_peft_model

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris."]
METHODS = ["lora", "rslora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "full"]
MERGING = [m for m in METHODS if m not in ("prompt_tuning", "prefix_tuning", "p_tuning", "full")]
PROMPT = ["prompt_tuning", "prefix_tuning", "p_tuning"]
# What a method's trainable parameters are called (full: the targeted layers' own weights).
TRAINABLE_NAME = {"lora": "lora_", "rslora": "lora_", "dora": "lora_", "ia3": "ia3_l",
                  "prompt_tuning": "prompt_encoder", "prefix_tuning": "prompt_encoder", "p_tuning": "prompt_encoder"}


def stage(method, merge=True, targets=("attention", "mlp"), **train):
    train = {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "seq_len": 16, "bf16": False, **train}
    return StageSpec.model_validate({"kind": "cpt", "merge": merge, "train": train, "peft": {
        "method": method, "targets": list(targets), "r": 4, "alpha": 8, "num_virtual_tokens": 3}})


def examples(tok):
    return pack_documents(tok, DOCS, 16)


def batch(tok):
    return tok(["Marta Ilvane runs the press line", "Jonas Perl"], return_tensors="pt", padding=True)


def logits(model, tok):
    x = batch(tok)
    with torch.no_grad():
        return model(**x).logits


def train(tmp_path, tok, spec, base=None, name="s"):
    from rich.console import Console

    from factlab.train.stage import train_stage

    base = base if base is not None else tiny_model("llama", vocab_size=len(tok))
    return train_stage(base, tok, spec, "cpt", tmp_path / name, examples(tok), seed=0, console=Console(quiet=True))


def test_registry_has_every_method_and_config_validates_against_it():
    assert set(METHODS) == set(methods())  # every row of the table goes through the tests below
    with pytest.raises(FactlabError, match="unknown PEFT method 'lorra'.*use one of: .*ia3.*prompt_tuning"):
        experiment_from_dict({"name": "x", "model": "m", "stages": [{"kind": "cpt", "peft": {"method": "lorra"}}]})
    with pytest.raises(FactlabError, match="stages.0.peft: peft.rslora applies to the LoRA methods"):
        experiment_from_dict({"name": "x", "model": "m", "stages": [{"kind": "cpt", "peft": {"method": "ia3", "rslora": True}}]})
    # the switches and the method names are two spellings of one thing
    assert PeftSpec(method="lora", rslora=True, dora=True).method == "lora"
    assert [method_info(m).merges for m in PROMPT] == [False] * 3 and method_info("ia3").merges


@pytest.mark.parametrize("method", METHODS)
def test_steps_change_the_methods_parameters_and_nothing_frozen(tmp_path, tok, method):
    base = tiny_model("llama", vocab_size=len(tok))
    before = {k: v.detach().clone() for k, v in base.named_parameters()}  # tied lm_head counted once
    # Two steps: LoRA's B starts at zero, so A receives no gradient in the very first step.
    model, res = train(tmp_path, tok, stage(method, merge=False), base=base)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad or method == "full"}
    if method == "full":
        # the targeted layers' own weights changed, every other parameter kept its value
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed and all(".self_attn." in n or ".mlp." in n for n in changed)
        assert changed == {n for n in before if (".self_attn." in n or ".mlp." in n) and n.endswith("weight")}
        assert res.trainable_params == sum(before[n].numel() for n in changed)
        return
    assert trained and all(TRAINABLE_NAME[method] in n for n in trained)
    assert res.trainable_params == sum(p.numel() for p in trained.values())
    frozen = [(n, p) for n, p in model.get_base_model().named_parameters() if not p.requires_grad]
    assert len(frozen) == len(before)
    for name, p in frozen:
        assert torch.equal(p.detach(), before[name.replace(".base_layer", "")]), f"frozen {name} changed"
    # every trainable parameter moved away from its initial value (same seed -> same init)
    set_seed(0)
    init, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), stage(method).peft)
    init_params = dict(init.named_parameters())
    for name, p in trained.items():
        assert not torch.equal(p.detach(), init_params[name].detach()), f"{name} did not train"


@pytest.mark.parametrize("method", METHODS)
def test_save_reload_reproduces_outputs_and_result_describes_the_artifact(tmp_path, tok, method):
    base = tiny_model("llama", vocab_size=len(tok))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    out = tmp_path / "s"
    model, res = train(tmp_path, tok, stage(method), base=base)
    expected = logits(model, tok)  # (B, T, V)
    assert res.method == method
    assert res.trainable_share == pytest.approx(res.trainable_params / res.total_params)
    if method == "full":
        assert not (out / "adapter").exists() and res.artifact == "model" and res.merged
        tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
        assert res.artifact_bytes == sum(f.stat().st_size for f in (out / "merged").iterdir() if f.name not in tokenizer_files)
        reloaded = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(logits(reloaded, tok), expected, atol=0, rtol=0)
        return
    assert res.artifact == "adapter"
    assert res.artifact_bytes == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    got = logits(adapted, tok)
    if method in PROMPT:
        # not merged, and said why; the returned model is the PeftModel, its logits aligned
        # with the input ids (plain PEFT also returns the virtual tokens' positions first)
        assert not res.merged and "nothing to merge" in res.merge_note and not (out / "merged").exists()
        assert isinstance(model, PeftModel) and expected.shape[1] == batch(tok)["input_ids"].shape[1]
        got = got[:, -expected.shape[1]:]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    else:
        assert res.merged and res.merge_note is None and not isinstance(model, PeftModel)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(logits(merged, tok), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize("targets", [("attention", "mlp"), ("all-but-embed",)])
def test_merge_equals_unmerged(tmp_path, tok, method, targets):
    if method == "dora" and "all-but-embed" in targets:
        targets = ("attention", "mlp", "embed")  # tiny lm_head has a zero (padding) row: see next test
    model, res = train(tmp_path, tok, stage(method, merge=False, targets=targets))
    assert not res.merged and res.merge_note == "merge: false in the stage"
    unmerged = logits(model, tok)
    torch.testing.assert_close(logits(model.merge_and_unload(), tok), unmerged, atol=1e-5, rtol=1e-5)


def test_dora_refuses_a_layer_with_a_zero_row(tok):
    model = tiny_model("llama", vocab_size=len(tok))  # row 0 (padding) of the tied lm_head is zero
    with pytest.raises(FactlabError, match="dora: lm_head has 1 all-zero output row"):
        build_peft_model(model, PeftSpec(method="dora", targets=["lm_head"]))


def test_ia3_scales_mlp_inputs_and_attention_outputs(tok):
    pm, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="ia3", targets=["attention", "mlp"]))
    layers = {n: m for n, m in pm.named_modules() if hasattr(m, "is_feedforward")}
    assert layers and all(m.is_feedforward == (".mlp." in n) for n, m in layers.items())
    with pytest.raises(FactlabError, match="ia3 cannot adapt the input embedding"):
        build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="ia3", targets=["embed"]))


def test_full_all_trains_every_parameter_and_unties(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    m, targets = build_peft_model(model, PeftSpec(method="full", targets=["all"]))
    assert m is model and all(p.requires_grad for p in m.parameters())
    assert m.lm_head.weight is not m.model.embed_tokens.weight  # lm_head trains on its own copy


@pytest.mark.parametrize("method", PROMPT)
def test_a_stage_after_a_method_that_cannot_merge_is_an_error(tmp_path, tok, method):
    with pytest.raises(FactlabError, match=f"stages.0: method {method} cannot merge.*make it the last stage"):
        check_stage_order([stage(method), stage("lora")])
    check_stage_order([stage("lora"), stage(method)])  # last is fine
    model, _ = train(tmp_path, tok, stage(method))
    with pytest.raises(FactlabError, match=f"method {method} cannot merge; make it the last stage"):
        train(tmp_path, tok, stage("lora"), base=model, name="t")


@pytest.mark.parametrize("method", PROMPT)
def test_prompt_method_evaluates_through_the_scoring_and_perplexity_paths(tmp_path, tok, method):
    """The returned PeftModel works where factlab evaluates a stage: probe scores and
    perplexity read logits aligned with the input ids (PEFT itself puts the virtual tokens'
    logits first for prompt tuning and P-tuning, and counts them in logits_to_keep)."""
    from factlab.evaluate.perplexity import perplexity
    from factlab.evaluate.scoring import Scorer, split_pair

    model, _ = train(tmp_path, tok, stage(method))
    ctx, cont = split_pair(tok, "The press line is run by", " Marta Ilvane")
    ids = torch.tensor([ctx + cont])  # (1, T)
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].log_softmax(-1)  # (T, V): position t predicts t + 1
    by_hand = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    (ll,) = Scorer(model, tok).loglikelihood([("The press line is run by", " Marta Ilvane")])
    assert ll.logprob == pytest.approx(by_hand, abs=1e-4)

    text_ids = tok(" ".join(DOCS))["input_ids"][:32]
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([text_ids])).logits[0, :-1].log_softmax(-1)  # (T-1, V)
    nll = -lp.gather(-1, torch.tensor(text_ids[1:])[:, None]).mean()
    ppl = perplexity(model, tok, tok.decode(text_ids), seq_len=32)
    assert ppl["n_tokens"] == 31 and ppl["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_prefix_starts_as_the_base_model_after_real_tokens(tok, arch):
    """prefix_tuning is initialised with the base model's own keys/values of random tokens:
    before training it equals the base model reading those tokens first."""
    from factlab.train.peft_methods import init_prefix_from_tokens

    base = tiny_model(arch, vocab_size=len(tok))
    x = batch(tok)["input_ids"][:1]  # (1, T)
    prefix = torch.tensor([11, 12, 13])
    with torch.no_grad():
        reference = base(input_ids=torch.cat([prefix[None], x], 1)).logits[:, 3:]  # (1, T, V)
    pm, _ = build_peft_model(base, PeftSpec(method="prefix_tuning", num_virtual_tokens=3))
    assert init_prefix_from_tokens(pm, prefix)
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, reference, atol=1e-5, rtol=1e-5)


def test_full_with_layers_trains_only_those_layers(tok):
    model, _ = build_peft_model(tiny_model("llama", vocab_size=len(tok)), PeftSpec(method="full", targets=["all"], layers="1"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") or n in ("model.embed_tokens.weight", "lm_head.weight")
                           for n in trained)
    assert "model.layers.1.input_layernorm.weight" not in trained  # a norm is not a targeted layer


@pytest.mark.parametrize("method", PROMPT)
def test_factlab_eval_of_a_run_scores_an_unmerged_stage_as_model_plus_adapter(tmp_path, tiny_dir, method):
    """`factlab eval RUN` finds the last stage's adapter (no merged/ for a prompt method), puts
    it on the model that stage trained on (the CPT stage's merged model) and scores exactly
    what the run scored."""
    import json

    from factlab.config import EvalSpec
    from factlab.experiment.evaluation import eval_targets, evaluate_models
    from factlab.experiment.runner import run_experiment

    (tmp_path / "docs.txt").write_text(" ".join(DOCS) + "\n")
    (tmp_path / "probes.jsonl").write_text(json.dumps({"id": "p1", "kind": "recall", "prompt": "The press line is run by",
                                                       "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n")
    train_cfg = {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "seq_len": 16, "bf16": False}
    exp = experiment_from_dict({
        "name": "pe", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "data": {"corpus": "docs.txt"},
        "stages": [{"kind": "cpt", "peft": {"targets": ["mlp"], "r": 2}, "train": train_cfg},
                   {"kind": "cpt", "name": "prompt", "peft": {"method": method, "num_virtual_tokens": 3}, "train": train_cfg}],
        "eval": {"probes": "probes.jsonl", "sampling": {"n": 0}, "builtin_general_text": False},
    }, base=tmp_path)
    run_dir = run_experiment(exp)
    targets = eval_targets(str(run_dir))
    assert [t[0] for t in targets] == ["base", "cpt", "prompt"]
    assert targets[2][1] == targets[1][1] and targets[2][2].name == "adapter"
    again = evaluate_models(targets, EvalSpec(probes=[str(tmp_path / "probes.jsonl")], sampling={"n": 0},
                                              builtin_general_text=False))
    saved = json.loads((run_dir / "results.json").read_text())["summaries"]
    for label in ("base", "cpt", "prompt"):
        lp = saved[label]["recall"]["mean_target_logprob"]
        assert again["summaries"][label]["recall"]["mean_target_logprob"] == pytest.approx(lp, abs=1e-4)
    assert saved["prompt"]["recall"]["mean_target_logprob"] != pytest.approx(saved["cpt"]["recall"]["mean_target_logprob"], abs=1e-6)
