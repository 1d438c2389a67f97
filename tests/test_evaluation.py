"""Generation, sampling, chat-format and style summaries, forgetting from saved tables, the
in-context baseline and `factlab eval`, on tiny models."""

import json
import sys
from dataclasses import asdict

import pytest
import torch

from factlab.config import EvalSpec
from factlab.evaluate.facts import score_probes, summarize
from factlab.evaluate.generation import generate
from factlab.evaluate.metrics import contains_target
from factlab.evaluate.probes import Probe
from factlab.experiment.evaluation import Evaluator, forgetting
from factlab.experiment.run_folder import EvalRecord, RunFolder
from factlab.report.console import summary_table
from factlab.testing import tiny_model

PROBES = [
    Probe(id="r1", fact="f1", kind="recall", prompt="The capital of France is", target="Paris", distractors=["Rome"]),
    Probe(id="l1", kind="locality", prompt="The quick brown fox", target="jumps", distractors=["sleeps"]),
    Probe(id="q1", fact="f2", kind="qa", prompt="Who leads the night shift?", target="Jonas Perl", distractors=["Marta Ilvane"]),
]


def test_greedy_generation_matches_plain_generate_and_flags_eos(tok, llama):
    prompts = ["The capital of France is", "Marta"]
    outs = generate(llama, tok, prompts, max_new_tokens=6)
    for p, (g,) in zip(prompts, outs):
        ids = tok(p, return_tensors="pt")
        ref = llama.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = ref[0, ids["input_ids"].shape[1]:].tolist()
        cut = new.index(tok.eos_token_id) if tok.eos_token_id in new else None
        assert g.text == tok.decode(new[:cut], skip_special_tokens=True)
        assert g.ended_with_eos == (cut is not None)
        assert g.n_tokens == (cut + 1 if cut is not None else len(new))


def test_eos_is_detected_when_the_model_emits_it(tok, llama):
    class EosHead(torch.nn.Module):  # puts all probability on EOS
        def forward(self, h):  # (B, T, d) -> (B, T, V)
            out = torch.full((*h.shape[:-1], len(tok)), -1e4)
            out[..., tok.eos_token_id] = 0.0
            return out

    llama.lm_head = EosHead()
    ((g,),) = generate(llama, tok, ["hello"], max_new_tokens=5)
    assert g.ended_with_eos and g.n_tokens == 1 and g.text == ""


def test_sampling_is_seeded_and_returns_n_per_prompt(tok, llama):
    a = generate(llama, tok, ["The capital", "Marta Ilvane"], max_new_tokens=5, n=3, temperature=1.0, seed=1)
    b = generate(llama, tok, ["The capital", "Marta Ilvane"], max_new_tokens=5, n=3, temperature=1.0, seed=1)
    c = generate(llama, tok, ["The capital", "Marta Ilvane"], max_new_tokens=5, n=3, temperature=1.0, seed=2)
    assert [len(x) for x in a] == [3, 3] and a == b and a != c


def test_rows_carry_samples_and_summaries_report_hit_rate_and_chat_format(tok, llama):
    rows = score_probes(llama, tok, PROBES, samples=4, temperature=1.0, sample_tokens=4, qa_tokens=7)
    for r in rows:
        assert len(r["samples"]) == 4
        assert r["sample_hit_rate"] == sum(contains_target(x, r["target"]) for x in r["samples"]) / 4
    q = next(r for r in rows if r["kind"] == "qa")
    assert 1 <= q["greedy_tokens"] <= 7
    s = summarize(rows)
    assert s["qa"]["eos"]["n"] == 1 and s["qa"]["answer_tokens"]["mean"] == q["greedy_tokens"]
    assert s["all"]["sample_hit"]["n"] == 3
    assert "eos" not in s["recall"]


def test_summarize_sample_hit_is_a_mean_over_probes():
    base = {"kind": "recall", "correct": True, "greedy_match": False, "target_logprob": -1.0,
            "target_mean_logprob": -1.0, "rank": 1, "greedy_eos": False, "greedy_tokens": 3}
    rows = [dict(base, sample_hit_rate=0.2), dict(base, sample_hit_rate=0.6), dict(base, sample_hit_rate=None)]
    s = summarize(rows)["recall"]["sample_hit"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.4)


def test_in_context_baseline_changes_only_the_context(tok, llama):
    plain = score_probes(llama, tok, PROBES[:1])
    ctx = score_probes(llama, tok, PROBES[:1], context="Marta Ilvane runs the press line.")
    assert plain[0]["target_logprob"] != ctx[0]["target_logprob"]
    # the context goes before the prompt, separated by a blank line
    from factlab.evaluate.facts import probe_context
    assert probe_context(PROBES[0], tok, "DOC") == "DOC\n\nThe capital of France is"
    assert "DOC\n\nWho leads" in probe_context(PROBES[2], tok, "DOC")


def test_forgetting_comes_from_saved_tables_without_a_model(tmp_path, tok, llama, monkeypatch):
    spec = EvalSpec(probes=[], builtin_general_text=True, sampling={"n": 0})
    folder = RunFolder(tmp_path)
    ev = Evaluator(spec, PROBES, tok, folder=folder)
    before = ev.evaluate("base", llama)
    with torch.no_grad():
        for p in llama.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = ev.evaluate("after", llama)
    saved = {k: EvalRecord(**json.loads(json.dumps(asdict(v)))) for k, v in (("base", before), ("after", after))}

    import factlab.evaluate.scoring as scoring
    monkeypatch.setattr(scoring.Scorer, "loglikelihood", lambda *a, **k: pytest.fail("model used"))
    monkeypatch.setattr(scoring.Scorer, "complete", lambda *a, **k: pytest.fail("model used"))
    f = forgetting(saved["base"], saved["after"])
    p = f["perplexity"]["builtin-general"]
    assert p["perplexity_ratio"] == pytest.approx(after.perplexity["builtin-general"]["perplexity"] / before.perplexity["builtin-general"]["perplexity"])
    assert f["locality"]["delta"] == after.summaries["locality"]["accuracy"]["rate"] - before.summaries["locality"]["accuracy"]["rate"]
    assert [r["id"] for r in folder.read_scores("base")] == ["r1", "l1", "q1"]


def test_style_of_answers_to_training_prompts(tmp_path, tok, llama):
    convs = [[{"role": "user", "content": "Who runs the press line?"}, {"role": "assistant", "content": "Marta Ilvane."}]]
    folder = RunFolder(tmp_path)
    ev = Evaluator(EvalSpec(builtin_general_text=False, style_tokens=5), [], tok, folder=folder, conversations=convs)
    out = ev.evaluate("base", llama)
    st = out.style
    assert st["n"] == 1 and 0.0 <= st["rouge_l"]["mean"] <= 1.0 and st["chat_eos"]["n"] == 1
    (row,) = folder.read_style("base")
    assert row["reference"] == "Marta Ilvane." and row["tokens"] <= 5


def test_summary_table_shows_change_against_base(tok):
    from rich.console import Console

    base = {"recall": {"n": 2, "accuracy": {"n": 2, "k": 1, "rate": 0.5, "ci_low": 0.1, "ci_high": 0.9}}}
    after = {"recall": {"n": 2, "accuracy": {"n": 2, "k": 2, "rate": 1.0, "ci_low": 0.3, "ci_high": 1.0}}}
    console = Console(record=True, width=200)
    console.print(summary_table({"base": base, "cpt": after}, title="t"))
    text = console.export_text()
    cpt_cell = [line for line in text.splitlines() if "1.00 [0.30,1.00]" in line]
    assert cpt_cell and "0.50 [0.10,0.90]" in cpt_cell[0]
    assert "+0.50" in text.splitlines()[text.splitlines().index(cpt_cell[0]) + 1]


def test_factlab_eval_on_a_model_folder(tmp_path, tok, monkeypatch, capsys):
    from factlab import cli

    d = tmp_path / "m"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps(p.model_dump()) + "\n" for p in PROBES))
    docs = tmp_path / "doc.txt"
    docs.write_text("Jonas Perl leads the night shift.")
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["factlab", "eval", str(d), "--probes", str(probes), "--samples", "2",
                                      "--in-context", str(docs), "-o", str(out)])
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None)
    res = json.loads(out.read_text())
    assert list(res["summaries"]) == ["m", "m+context"]
    assert res["perplexity"]["m"]["builtin-general"]["n_tokens"] > 100
    assert "probes by kind" in capsys.readouterr().out
