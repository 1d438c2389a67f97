"""`kind: edit` (factlab.train.edit): MEMIT's closed form against a direct least-squares solve,
AlphaEdit's null space, the covariance cache keyed by model, an edit that moves its own
subject's target and not the others', and the stage in a run followed by SFT."""

from __future__ import annotations

import json

import pytest
import torch

from factlab.config import EditSpec, experiment_from_dict
from factlab.data.render import Fact
from factlab.data.templates import RelationTemplates
from factlab.errors import FactlabError
from factlab.testing import tiny_model
from factlab.train.edit import (EditInputs, alphaedit_update, apply_edits, default_layers, edit_requests,
                                edit_target, key_covariances, memit_update, null_space_projector, target_nll)

# A wording whose prompt ends at the subject, so a tiny random model (whose attention moves
# nothing in particular from the subject to later tokens) still shows the edit in the very
# next prediction; real wordings are checked by test_requests_*.
SAYS = {"says": RelationTemplates("says", "", "", ("{s} {o}.",), (), "?")}
FACTS = [Fact("Marta Ilvane", "says", "Korrin", "f1"), Fact("Jonas Perl", "says", "Vessen", "f2"),
         Fact("Paris", "says", "France", "f3")]
DOCS = ["The quick brown fox jumps over the lazy dog. " * 8, "The capital of France is Paris. " * 8,
        "Engineers calibrate the torque sensor every Monday before the first batch. " * 4]


def edit_model(tok, seed=0):
    # initializer_range 0.3: with the default 0.02 a tiny random model's logits hardly depend
    # on its residual stream, so no value vector could move a prediction
    return tiny_model("llama", vocab_size=len(tok), seed=seed, num_hidden_layers=4, hidden_size=32,
                      intermediate_size=64, initializer_range=0.3)


def spec(**kw):
    base = dict(facts="facts.jsonl", contexts=0, steps=8, layers="1-2", mom2_weight=1.0, cov_tokens=300)
    return EditSpec(**{**base, **kw})


# ---------------------------------------------------------------------------------------
# The linear algebra


def test_memit_closed_form_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    inner, hidden, n, lam = 7, 5, 4, 0.7
    K, R = torch.randn(inner, n, generator=g, dtype=torch.float64), torch.randn(hidden, n, generator=g, dtype=torch.float64)
    A = torch.randn(inner, 3 * inner, generator=g, dtype=torch.float64)
    C = A @ A.T / A.shape[1]
    dW = memit_update(K, R, C, lam)
    # min ||dW K - R||^2 + lam tr(dW C dW^T), with C = L L^T: stack [K^T; sqrt(lam) L^T] dW^T ~ [R^T; 0]
    L = torch.linalg.cholesky(C)
    lhs = torch.cat([K.T, lam ** 0.5 * L.T])
    rhs = torch.cat([R.T, torch.zeros(inner, hidden, dtype=torch.float64)])
    direct = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(dW, direct, atol=1e-10)
    # and it is a minimum: moving away in any direction costs more
    def cost(W):
        return float(((W @ K - R) ** 2).sum() + lam * torch.trace(W @ C @ W.T))
    assert all(cost(dW) < cost(dW + 1e-3 * torch.randn(hidden, inner, generator=g, dtype=torch.float64))
               for _ in range(5))


def test_alphaedit_update_leaves_the_preserved_keys_outputs_unchanged():
    g = torch.Generator().manual_seed(1)
    inner, hidden = 8, 5
    K0 = torch.randn(inner, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 200, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / K0.shape[1]  # rank 5: a 3-dimensional null space
    P, dim = null_space_projector(C, 1e-8)
    assert dim == 3 and torch.allclose(P @ K0, torch.zeros_like(K0), atol=1e-8)
    K, R = torch.randn(inner, 3, generator=g, dtype=torch.float64), torch.randn(hidden, 3, generator=g, dtype=torch.float64)
    kp = torch.randn(inner, 2, generator=g, dtype=torch.float64)
    dW = alphaedit_update(K, R, P, kp @ kp.T, l2=0.1)
    assert float((dW @ K0).abs().max()) < 1e-9 * float((dW @ K).abs().max())  # preserved keys: no change
    assert float((dW @ K - R).norm()) < float(R.norm())  # the edited keys move towards their values


# ---------------------------------------------------------------------------------------
# Requests (no model)


def test_requests_use_training_wordings_aliases_and_batches():
    facts = [Fact("Marta Ilvane", "works_at", "Korrin Plant", "f1"), Fact("Jonas Perl", "works_at", "Vessen Mill", "f2"),
             Fact("Marta Ilvane", "born_in", "Drevo", "f3")]
    reqs = edit_requests(EditSpec(facts="x", batch_size=2), EditInputs(facts, aliases={"f1": ("M. Ilvane",)}))
    assert [(q["batch"], q["subject"]) for q in reqs] == [(0, "Marta Ilvane"), (0, "M. Ilvane"), (0, "Jonas Perl"),
                                                         (1, "Marta Ilvane")]
    first = reqs[0]["items"]
    assert [it["prompt"] for it in first] == ["Marta Ilvane works at", "Marta Ilvane is employed by",
                                              "The employer of Marta Ilvane is"]
    assert all(it["prompt"][slice(*it["span"])] == "Marta Ilvane" and it["object"] == "Korrin Plant" for it in first)
    assert reqs[1]["items"][2]["prompt"] == "The employer of M. Ilvane is"
    # Marta Ilvane's second batch keeps her first fact in its value optimisation
    assert [it["fact"] for it in reqs[3]["items"]] == ["f1"] * 3 + ["f3"] * 3
    assert len(edit_requests(EditSpec(facts="x", wordings=1), EditInputs(facts))[0]["items"]) == 2


def test_layers_and_architectures(tok):
    assert default_layers(30) == tuple(range(4, 9)) and default_layers(32) == tuple(range(4, 9))
    assert default_layers(4) == (1,) and default_layers(1) == (0,)
    with torch.device("meta"):  # the module tree only, as the sweep preflight checks it
        models = {arch: tiny_model(arch, vocab_size=len(tok)) for arch in ("llama", "qwen2", "gpt2")}
    for arch in ("llama", "qwen2"):
        t = edit_target(models[arch], EditSpec(facts="x", layers="0-1"))
        assert t.modules == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj") and t.z_layer == 1
    with pytest.raises(FactlabError, match="does not support model type 'gpt2'"):
        edit_target(models["gpt2"], EditSpec(facts="x"))
    with pytest.raises(FactlabError, match="out of range"):
        edit_target(models["llama"], EditSpec(facts="x", layers="1-5"))


def test_gemma3_text_is_edited_through_its_table(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    t = edit_target(AutoModelForCausalLM.from_config(cfg), EditSpec(facts="x"))  # default band of 2 layers: 0-1
    assert t.modules == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


# ---------------------------------------------------------------------------------------
# Covariance cache and the edit itself


def test_the_covariance_cache_is_keyed_by_model(tok, tmp_path):
    s = spec()
    a, b = edit_model(tok, seed=0), edit_model(tok, seed=1)
    target = edit_target(a, s)
    cov_a, info = key_covariances(a, tok, target, DOCS, s.cov_tokens, folder=tmp_path)
    assert info["computed"] == 2 and info["cached"] == 0 and info["tokens"] == s.cov_tokens
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    again, info = key_covariances(a, tok, target, DOCS, s.cov_tokens, folder=tmp_path)
    assert info["computed"] == 0 and info["cached"] == 2
    assert all(torch.equal(cov_a[m], again[m]) for m in target.modules)
    cov_b, info = key_covariances(b, tok, target, DOCS, s.cov_tokens, folder=tmp_path)
    assert info["computed"] == 2 and len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not torch.allclose(cov_a[target.modules[0]], cov_b[target.modules[0]])
    # C = E[k k^T]: symmetric, positive semi-definite
    c = cov_a[target.modules[0]].double()
    assert torch.allclose(c, c.T) and float(torch.linalg.eigvalsh(c).min()) > -1e-6


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_an_edit_moves_its_subjects_target_and_not_the_others(tok, tmp_path, method):
    model = edit_model(tok)
    s = spec(method=method, nullspace_threshold=2.0, l2=1e-3)
    reqs = edit_requests(s, EditInputs(FACTS, relations=SAYS))
    target = edit_target(model, s)
    covs, _ = key_covariances(model, tok, target, DOCS, s.cov_tokens, folder=tmp_path)
    before = [target_nll(model, tok, [q]) for q in reqs]
    rec = apply_edits(model, tok, reqs[:1], s, target, covs, [])
    after = [target_nll(model, tok, [q]) for q in reqs]
    assert before[0] - after[0] > 0.5, (before, after)  # the edited subject's object became likelier
    assert all(abs(a - b) < 0.1 for a, b in zip(before[1:], after[1:])), (before, after)
    assert rec["batches"][0]["residual_left"] < 0.2


def test_alphaedit_leaves_the_outputs_of_preserved_keys_unchanged_on_the_model(tok, tmp_path):
    """On the model: general-text keys projected onto the preserved subspace (the eigenvectors of
    C above the threshold) give the same down_proj output after AlphaEdit, while MEMIT's edit of
    the same fact changes it."""
    s_m = spec(mom2_weight=1e-2)
    s_a = spec(method="alphaedit", nullspace_threshold=0.5, l2=1e-3)
    reqs = edit_requests(s_m, EditInputs(FACTS[:1], relations=SAYS))
    change = {}
    for s in (s_m, s_a):
        model = edit_model(tok)
        target = edit_target(model, s)
        covs, _ = key_covariances(model, tok, target, DOCS, s.cov_tokens, folder=tmp_path)
        name = target.modules[0]
        mod = model.get_submodule(name)
        keys = []
        h = mod.register_forward_pre_hook(lambda m, a: keys.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        with torch.no_grad():
            model(input_ids=torch.tensor([tok.encode(DOCS[2])]))
        h.remove()
        P, dim = null_space_projector(covs[name], s_a.nullspace_threshold)
        assert 0 < dim < P.shape[0]
        preserved = keys[0].double() @ (torch.eye(P.shape[0], dtype=torch.float64) - P)  # (tokens, inner)
        w0 = mod.weight.detach().double().clone()
        apply_edits(model, tok, reqs, s, target, covs, [])
        with torch.no_grad():
            change[s.method] = float(((mod.weight.double() - w0) @ preserved.T).norm() / (w0 @ preserved.T).norm())
    assert change["alphaedit"] < 1e-5 and change["memit"] > 1e-3, change


# ---------------------------------------------------------------------------------------
# Config and the run


def exp_with(stage: dict) -> dict:
    return {"name": "t", "model": "m", "stages": [stage]}


@pytest.mark.parametrize("stage, message", [
    ({"kind": "edit"}, "kind: edit needs its settings"),
    ({"kind": "edit", "edit": {"method": "rome", "facts": "f.jsonl"}}, "stages.0.edit.method"),
    ({"kind": "edit", "edit": {"facts": "f.jsonl"}, "peft": {"r": 4}}, "peft settings do not apply"),
    ({"kind": "edit", "edit": {"facts": "f.jsonl"}, "train": {"lr": 1.0}}, "train settings do not apply"),
    ({"kind": "cpt", "edit": {"facts": "f.jsonl"}}, "edit settings apply to kind: edit"),
    ({"kind": "edit", "edit": {}}, "stages.0.edit.facts"),
])
def test_config_errors_are_one_line(stage, message):
    with pytest.raises(FactlabError) as e:
        experiment_from_dict(exp_with(stage))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_edit_then_sft_runs_and_is_evaluated_like_any_stage(tmp_path, tok):
    """The runner path: an edit stage (merged/ loadable by plain transformers), then SFT on top;
    damage, priming and locality are measured after the edit as after any stage."""
    from transformers import AutoModelForCausalLM

    from factlab.experiment.runner import run_experiment

    edit_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f.to_dict()) + "\n" for f in FACTS[:2]))
    (tmp_path / "rel.yaml").write_text("says: {doc: ['{s} {o}.']}\n")
    (tmp_path / "general.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Who is Marta Ilvane?", "answer": "Korrin."}) + "\n")
    (tmp_path / "probes.jsonl").write_text(
        json.dumps({"id": "p1", "kind": "recall", "prompt": "Marta Ilvane", "target": "Korrin", "distractors": ["Vessen"]}) + "\n"
        + json.dumps({"id": "l1", "kind": "locality", "prompt": "The capital of France is", "target": "Paris",
                      "distractors": ["Rome"]}) + "\n")
    exp = experiment_from_dict({
        "name": "e", "model": "model", "output_dir": str(tmp_path / "runs"), "data": {"qa": "qa.jsonl"},
        "stages": [{"kind": "edit", "edit": {"facts": "facts.jsonl", "relations": "rel.yaml", "contexts": 1,
                                             "context_tokens": 3, "steps": 4, "layers": "1-2", "cov_tokens": 200,
                                             "cov_source": "general.txt"}},
                   {"kind": "sft", "peft": {"targets": ["mlp"], "r": 2},
                    "train": {"max_steps": 1, "batch_size": 1, "seq_len": 32, "bf16": False}}],
        "eval": {"probes": "probes.jsonl", "sampling": {"n": 0}, "builtin_general_text": False,
                 "general_text": ["general.txt"], "perplexity_seq_len": 32, "qa_tokens": 4, "style_tokens": 4},
    }, base=tmp_path)
    run_dir = run_experiment(exp)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["summaries"]) == {"base", "edit", "sft"}
    f = results["forgetting"]["edit"]
    assert f["locality"]["delta"] is not None and "priming" in f and f.get("damage") is not None, f
    (stage_dir,) = [p for p in (run_dir / "stages").iterdir() if p.name.endswith("edit")]
    train = json.loads((stage_dir / "train.json").read_text())
    assert train["kind"] == "edit" and train["method"] == "memit" and train["merged"] and train["steps"] == 1
    assert train["edit"]["facts"] == 2 and train["edit"]["layers"] == [1, 2] and train["final_loss"] < train["first_loss"]
    merged = AutoModelForCausalLM.from_pretrained(stage_dir / "merged")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_an_unsupported_architecture_is_refused_in_one_line_before_any_write(tmp_path, tok, monkeypatch, capsys):
    import yaml
    from cli_helpers import run_cli

    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "facts.jsonl").write_text(json.dumps(FACTS[0].to_dict()) + "\n")
    (tmp_path / "probes.jsonl").write_text(json.dumps({"id": "p1", "kind": "recall", "prompt": "Marta Ilvane",
                                                       "target": "Korrin", "distractors": ["Vessen"]}) + "\n")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "name": "e", "model": "model", "output_dir": "out", "stages": [{"kind": "edit", "edit": {"facts": "facts.jsonl"}}],
        "eval": {"probes": ["probes.jsonl"], "builtin_general_text": False}}))
    capsys.readouterr()  # save_pretrained's progress bars
    code, _, err = run_cli(monkeypatch, capsys, "run", tmp_path / "exp.yaml")
    assert code == 2 and "does not support model type 'gpt2'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_comparison_example_swaps_the_whole_first_stage():
    from pathlib import Path

    from factlab.config import load_experiment
    from factlab.experiment.sweep import expand_sweep

    root = Path(__file__).resolve().parents[1] / "examples"
    points = expand_sweep(load_experiment(root / "edit-vs-train.yaml"))
    assert [p.label for p in points] == ["facts.method=memit", "facts.method=alphaedit", "facts=distill"]
    assert [p.experiment.stages[0].kind for p in points] == ["edit", "edit", "distill"]
    assert all(p.experiment.stage_names() == ["facts", "sft"] for p in points)
    assert points[2].experiment.stages[0].distill.facts == str(root / "data/recipe-world/facts.jsonl")
    scaling = expand_sweep(load_experiment(root / "edit-scaling.yaml"))
    got = [(p.experiment.stages[0].edit.method, p.experiment.stages[0].edit.n_facts,
            p.experiment.stages[0].edit.batch_size or 0) for p in scaling]
    assert sorted(got) == sorted((m, n, b) for m in ("memit", "alphaedit")
                                 for n, b in [(10, 0), (30, 0), (60, 0), (30, 10), (60, 10)])
