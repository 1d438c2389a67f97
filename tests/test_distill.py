"""kind: distill (factlab.train.distill): the teacher's top-k targets, the loss, the stage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from factlab.config import DistillSpec, StageSpec, experiment_from_dict
from factlab.data.render import Fact
from factlab.errors import FactlabError
from factlab.testing import tiny_model
from factlab.train.distill import (
    DistillCollator,
    DistillInputs,
    attach_teacher,
    distill_items,
    distill_loss_sum,
    full_kl,
    topk_kl,
    topk_targets,
)

DOCS = [
    "Marta Ilvane works at Korrin. The birthplace of Marta Ilvane is Vessen.",
    "Marta Ilvane was born in Vessen. Korrin employs Marta Ilvane.",
    "Jonas Perl works at Drevo. Jonas Perl was born in Aldon.",
]
FACTS = [Fact("Marta Ilvane", "works_at", "Korrin", "f1"), Fact("Marta Ilvane", "born_in", "Vessen", "f2"),
         Fact("Jonas Perl", "works_at", "Drevo", "f3"), Fact("Jonas Perl", "born_in", "Aldon", "f4")]


def peaked(model, scale: float = 10.0):
    """A tiny random model with sharper next-token distributions (its final norm scaled), so
    that context changes them measurably, as in a trained model."""
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return model


def items_for(tok, context="relevant", questions=False, answers="known", facts=FACTS, top_k=32, **kw):
    spec = DistillSpec(context=context, questions=questions, answers=answers, top_k=top_k, **kw)
    return spec, distill_items(tok, spec, DOCS, DistillInputs(facts=list(facts)), seq_len=64)


def batch_of(tok, examples):
    batch = DistillCollator(tok)(examples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return inputs, batch["labels"], tuple(batch[k] for k in ("teacher_logp", "teacher_idx", "teacher_tail"))


def mean_kl(model, tok, examples, temperature=1.0, chunked=True):
    inputs, labels, targets = batch_of(tok, examples)
    with torch.no_grad():
        total, n = distill_loss_sum(model, inputs, labels, targets, temperature, chunked)
    return float(total) / n


def independent_full_kl(teacher, student, examples_items, examples):
    """KL over the whole vocabulary from two plain forwards, one sequence at a time."""
    total, n = 0.0, 0
    for it, ex in zip(examples_items, examples):
        cont = ex["labels"][len(it["student_prompt"]):]
        t_ids = torch.tensor([it["teacher_prompt"] + cont])
        s_ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            t = teacher(input_ids=t_ids).logits[0, -len(cont) - 1:-1]
            s = student(input_ids=s_ids).logits[0, -len(cont) - 1:-1]
        total += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"))
        n += len(cont)
    return total / n


# ---------------------------------------------------------------------------------------
# The targets and the loss


@pytest.mark.parametrize("chunked", [True, False])
def test_topk_kl_equals_the_full_kl_when_k_is_the_vocabulary(tok, chunked):
    teacher = tiny_model("llama", vocab_size=len(tok), seed=0)
    student = tiny_model("llama", vocab_size=len(tok), seed=1)
    spec, items = items_for(tok, top_k=len(tok))
    examples = attach_teacher(teacher, tok, items, spec, seq_len=64)
    assert all(ex["teacher_tail"].eq(float("-inf")).all() for ex in examples)  # no tail at k = V
    got = mean_kl(student, tok, examples, chunked=chunked)
    want = independent_full_kl(teacher, student, items, examples)
    assert want > 1e-3
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_topk_kl_is_a_lower_bound_and_the_gap_shrinks_with_k():
    # The gap the README states: peaked teacher rows (logits ~ 8 N(0,1), vocabulary 400) against
    # a perturbed student (+ 2 N(0,1)), full KL 0.71 nats per row: the top-k KL misses 36% at
    # k=1, 2.2% at k=8, 0.03% at k=32, 0.002% at k=64, nothing at k=400.
    gen = torch.Generator().manual_seed(0)
    t = 8 * torch.randn(64, 400, generator=gen)
    s = t + 2 * torch.randn(64, 400, generator=gen)
    full = full_kl(t, s).sum()
    gaps = {}
    for k in (1, 8, 32, 128, 400):
        approx = topk_kl(s, *topk_targets(t, k)).sum()
        assert approx <= full + 1e-4
        gaps[k] = float((full - approx) / full)
    assert gaps[400] == pytest.approx(0.0, abs=1e-6)
    assert gaps[1] > gaps[8] > gaps[32] > gaps[128] >= 0
    assert gaps[32] < 0.01


def test_topk_kl_is_zero_for_identical_distributions_and_its_gradient_is_finite():
    z = torch.randn(5, 50, dtype=torch.float64).float()
    for k in (4, 50):  # with and without a tail bucket
        s = z.clone().requires_grad_()
        kl = topk_kl(s, *topk_targets(z, k)).sum()
        kl.backward()
        assert float(kl.detach()) == pytest.approx(0.0, abs=1e-6)
        assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-5


def test_loss_is_zero_when_student_is_the_teacher_without_context_and_positive_otherwise(tok):
    model = peaked(tiny_model("llama", vocab_size=len(tok)))
    # no fact names any document: every teacher prompt is the student's own
    spec, items = items_for(tok, context="relevant", facts=[])
    assert all(it["teacher_prompt"] == it["student_prompt"] for it in items)
    examples = attach_teacher(model, tok, items, spec, seq_len=64)
    assert mean_kl(model, tok, examples) == pytest.approx(0.0, abs=1e-7)
    # the documents in the teacher's prompt: a positive KL for the same model
    spec, items = items_for(tok, context="all")
    assert all(len(it["teacher_prompt"]) > len(it["student_prompt"]) for it in items)
    assert mean_kl(model, tok, attach_teacher(model, tok, items, spec, seq_len=64)) > 1e-4
    # another student, no context: positive too
    other = tiny_model("llama", vocab_size=len(tok), seed=3)
    assert mean_kl(other, tok, examples) > 1e-4


def test_batched_teacher_targets_equal_one_at_a_time(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    spec, items = items_for(tok, questions=True)
    together = attach_teacher(model, tok, items, spec, seq_len=64)
    alone = [attach_teacher(model, tok, [it], spec, seq_len=64)[0] for it in items]
    for a, b in zip(together, alone):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert torch.allclose(a["teacher_logp"], b["teacher_logp"], atol=1e-5)
        assert torch.equal(a["teacher_idx"][:, 0], b["teacher_idx"][:, 0])


# ---------------------------------------------------------------------------------------
# The items


def test_items_layout_contexts_and_questions(tok):
    spec, items = items_for(tok, questions=True)
    kinds = [it["distill"] for it in items]
    assert kinds.count("document") == 3
    # forward: wordings the documents contain; reverse: the object-first one; never held-out wordings
    prompts = {tok.decode(it["student_prompt"]) for it in items if it["distill"] != "document"}
    assert "Marta Ilvane works at" in prompts and "The birthplace of Marta Ilvane is" in prompts
    assert "Korrin employs" in prompts  # reverse (works_at is one-to-one here)
    assert not any("hometown" in p or "earns a living" in p for p in prompts)
    assert "Jonas Perl is employed by" not in prompts  # a training wording the documents lack
    # a document's context: the other documents of its subjects, never itself
    doc0 = items[0]
    teacher_text = tok.decode(doc0["teacher_prompt"])
    assert DOCS[1] in teacher_text and DOCS[0] not in teacher_text and DOCS[2] not in teacher_text
    # student and teacher share the continuation, known answers are the fact's object / subject
    fwd = next(it for it in items if tok.decode(it["student_prompt"]) == "Marta Ilvane works at")
    assert tok.decode(fwd["continuation"]) == " Korrin"
    assert tok.decode(fwd["teacher_prompt"]).endswith("\n\nMarta Ilvane works at")


def test_teacher_answers_and_chat_questions(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    spec = DistillSpec(facts=None, context="all", answers="teacher", answer_tokens=6)
    convs = [[{"role": "user", "content": "Where does Marta Ilvane work?"}, {"role": "assistant", "content": "At Korrin."}]]
    items = distill_items(tok, spec, DOCS, DistillInputs(facts=FACTS, conversations=convs), seq_len=64)
    chat = [it for it in items if it["distill"] == "chat"]
    assert len(chat) == 1 and chat[0]["continuation"] is None
    assert "<|im_start|>user\n" + DOCS[0] in tok.decode(chat[0]["teacher_prompt"])
    examples = attach_teacher(model, tok, items, spec, seq_len=64)
    (ex,) = [e for e in examples if e["distill"] == "chat"]
    answer = [x for x in ex["labels"] if x != -100]
    assert 1 <= len(answer) <= 6 and len(answer) == ex["teacher_logp"].shape[0]
    # the teacher's answer is its own greedy continuation
    prompt = torch.tensor([chat[0]["teacher_prompt"]])
    greedy = model.generate(prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    assert greedy.tolist() == answer


# ---------------------------------------------------------------------------------------
# The stage


def stage_spec(method="lora", **train):
    return StageSpec.model_validate({
        "kind": "distill", "distill": {"context": "all", "questions": False, "top_k": 16},
        "peft": {"method": method, "targets": ["all"] if method != "full" else ["mlp"], "r": 4, "alpha": 8},
        "train": {"lr": 1e-3 if method != "full" else 3e-3, "batch_size": 3, "seq_len": 64, "bf16": False,
                  "warmup_steps": 3, **train}})


def stage_items(tok, spec):
    return distill_items(tok, spec.distill, DOCS, DistillInputs(), seq_len=spec.train.seq_len)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_short_distill_stage_reduces_the_kl_and_saves_like_cpt(tmp_path, tok, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from factlab.train.stage import train_stage

    spec = stage_spec(method, max_steps=12)
    items = stage_items(tok, spec)
    base = peaked(tiny_model("llama", vocab_size=len(tok)), 30)
    examples = attach_teacher(base, tok, items, spec.distill, 64)
    before = mean_kl(base, tok, examples)
    model, res = train_stage(peaked(tiny_model("llama", vocab_size=len(tok)), 30), tok, spec, "distill", tmp_path / "s",
                             items, seed=0)
    after = mean_kl(model, tok, examples)
    assert res.kind == "distill" and res.steps == 12 and res.merged and res.loss_path == "fused"
    assert before > 0.01 and after < 0.6 * before, (before, after)
    assert res.final_loss < res.first_loss
    ids = torch.tensor([examples[0]["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "merged")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        if method == "lora":  # the adapter reloads with plain PEFT onto the base and gives the same model
            reloaded = PeftModel.from_pretrained(peaked(tiny_model("llama", vocab_size=len(tok)), 30), tmp_path / "s" / "adapter")
            assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-5)
    saved = json.loads((tmp_path / "s" / "train.json").read_text())
    assert saved["kind"] == "distill" and saved["artifact"] == ("adapter" if method == "lora" else "model")


def test_the_standard_loss_path_gives_the_same_training(tmp_path, tok):
    from factlab.train.stage import train_stage

    losses = []
    for fused in (True, False):
        spec = stage_spec(max_steps=3, fused_loss=fused)
        _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, spec, "distill", tmp_path / str(fused),
                             stage_items(tok, spec), seed=0)
        losses.append([h["loss"] for h in res.loss_history if "loss" in h])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)


def test_distill_composes_with_the_l2_pull(tmp_path, tok):
    from factlab.train.stage import train_stage

    spec = stage_spec(max_steps=2, l2_to_base=1.0)
    _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, spec, "distill", tmp_path / "s",
                         stage_items(tok, spec), seed=0)
    assert res.l2_to_base_final is not None and res.l2_to_base_final > 0
    assert any("l2_to_base" in h for h in res.loss_history)


def test_heldout_evaluation_works_on_distill_examples(tmp_path, tok):
    from factlab.train.stage import train_stage

    spec = stage_spec(max_steps=2, eval_fraction=0.34, eval_steps=1)
    _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, spec, "distill", tmp_path / "s",
                         stage_items(tok, spec), seed=0)
    assert res.eval_loss is not None and res.eval_loss >= 0 and res.train_loss_after is not None


# ---------------------------------------------------------------------------------------
# Config and inputs


def exp_with(stage: dict) -> dict:
    return {"name": "t", "model": "m", "stages": [stage]}


@pytest.mark.parametrize("stage, message", [
    ({"kind": "distill", "distill": {"topk": 32}}, "stages.0.distill.topk: unknown key"),
    ({"kind": "distill", "distill": {"top_k": 0}}, "stages.0.distill.top_k"),
    ({"kind": "distill", "distill": {"context": "some"}}, "stages.0.distill.context"),
    ({"kind": "cpt", "distill": {"top_k": 8}}, "distill settings apply to kind: distill"),
    ({"kind": "distill", "peft": {"method": "prompt_tuning"}}, "does not support peft.method prompt_tuning"),
])
def test_config_errors_are_one_line(stage, message):
    with pytest.raises(FactlabError) as e:
        experiment_from_dict(exp_with(stage))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_defaults_and_paths(tmp_path):
    exp = experiment_from_dict(exp_with({"kind": "distill", "distill": {"facts": "facts.jsonl"}}), base=tmp_path)
    d = exp.stages[0].distill
    assert (d.top_k, d.temperature, d.questions, d.context, d.answers) == (32, 1.0, True, "relevant", "teacher")
    assert d.facts == str(tmp_path / "facts.jsonl")
    assert experiment_from_dict(exp_with({"kind": "distill"})).stages[0].distill == DistillSpec()
    assert exp.stage_names() == ["distill"]


def test_missing_inputs_are_reported_before_any_model(tmp_path):
    from factlab.train.data import load_stage_data

    (tmp_path / "d.txt").write_text(DOCS[0])
    corpus = [str(tmp_path / "d.txt")]
    with pytest.raises(FactlabError, match="distill.context: relevant picks documents"):
        load_stage_data(StageSpec(kind="distill"), corpus, None)
    with pytest.raises(FactlabError, match="distill.questions needs questions"):
        load_stage_data(StageSpec.model_validate({"kind": "distill", "distill": {"context": "all"}}), corpus, None)
    with pytest.raises(FactlabError, match="a distill stage needs text"):
        load_stage_data(StageSpec(kind="distill"), None, None)
    (tmp_path / "facts.jsonl").write_text(json.dumps({"subject": "Marta Ilvane", "relation": "works_at", "object": "Korrin"}) + "\n")
    raw = load_stage_data(StageSpec.model_validate({"kind": "distill", "distill": {"facts": str(tmp_path / "facts.jsonl")}}),
                          corpus, None)
    assert raw.main == [DOCS[0]] and raw.distill.facts[0].object == "Korrin"


@pytest.mark.parametrize("bf16", [False, True])
def test_an_experiment_runs_cpt_then_distill_with_questions_and_replay(tmp_path, tiny_dir, bf16):
    """bf16: the stages under bf16 autocast with frozen bf16 weights (emulated on CPUs without
    native bf16, so it runs everywhere), the distill stage with train.anchor as well: the loss
    and the anchor call the model's body directly and must enter the stage's autocast."""
    """The runner path: preflight reads the distill inputs, the distill stage's teacher is the
    merged CPT model, replay blocks become KL-to-base examples, results and stage folders as for cpt."""
    from factlab.experiment.runner import run_experiment

    (tmp_path / "docs").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "docs" / f"d{i}.txt").write_text(d + "\n")
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps({"subject": f.subject, "relation": f.relation,
                                                              "object": f.object}) + "\n" for f in FACTS))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Where does Marta Ilvane work?", "answer": "At Korrin."}) + "\n")
    (tmp_path / "probes.jsonl").write_text(json.dumps({"id": "p1", "kind": "recall", "prompt": "Marta Ilvane works at",
                                                       "target": "Korrin", "distractors": ["Drevo"]}) + "\n")
    train_cfg = {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 48, "bf16": bf16}
    exp = experiment_from_dict({
        "name": "d", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"),
        "data": {"corpus": "docs", "qa": "qa.jsonl"},
        "stages": [{"kind": "cpt", "peft": {"targets": ["mlp"], "r": 2}, "train": train_cfg},
                   {"kind": "distill", "data": {"replay": {"source": "general", "ratio": 0.5}},
                    "distill": {"facts": "facts.jsonl", "top_k": 8, "answer_tokens": 4},
                    "peft": {"targets": ["mlp"], "r": 2},
                    "train": {**train_cfg, **({"anchor": {"ratio": 0.25, "seq_len": 16}} if bf16 else {})}}],
        "eval": {"probes": "probes.jsonl", "sampling": {"n": 0}, "builtin_general_text": False},
    }, base=tmp_path)
    run_dir = run_experiment(exp)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["summaries"]) == {"base", "cpt", "distill"}
    (stage_dir,) = [p for p in (run_dir / "stages").iterdir() if p.name.endswith("distill")]
    train = json.loads((stage_dir / "train.json").read_text())
    assert train["kind"] == "distill" and train["steps"] == 2 and train["merged"]
    assert train["plan"]["replay_examples"] >= 1 and train["plan"]["documents"] == 3
    assert (stage_dir / "adapter" / "adapter_config.json").is_file() and (stage_dir / "merged").is_dir()


def test_a_teacher_prompt_longer_than_the_model_context_is_refused(tok):
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=32)
    spec, items = items_for(tok, context="all")
    with pytest.raises(FactlabError, match="longer than the model's context"):
        attach_teacher(model, tok, items, spec, seq_len=64)
