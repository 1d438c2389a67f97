"""Priming: trained names in answers where they do not belong (evaluate.priming), measured by
the Evaluator and shown beside damage in the console table, the report, the store, MLflow and
`factlab tune`'s objectives."""

from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from factlab.config import EvalSpec, load_experiment
from factlab.errors import FactlabError
from factlab.evaluate.lm import Completion, Generation, LogLik
from factlab.evaluate.priming import (
    builtin_priming_prompts, find_objects, is_common, priming_record, priming_summary, watched_objects,
)
from factlab.evaluate.probes import Probe
from factlab.experiment.evaluation import Evaluator, forgetting
from factlab.experiment.run_folder import EvalRecord, RunFolder, RunResults, StageRecord
from factlab.experiment.store import RunStore, flatten_metrics
from factlab.experiment.tune import check_tune, metric_value
from factlab.report.console import forgetting_table

PROBES = [
    Probe(id="r1", fact="f1", kind="recall", prompt="The birthplace of Raraen Rekaeva is", target="Buku", distractors=["Tulux"]),
    Probe(id="r2", fact="f2", kind="recall", prompt="Raraen Rekaeva works as a", target="potter", distractors=["chemist"]),
    Probe(id="r3", fact="f3", kind="recall", prompt="Fova Engines opened its doors in", target="1981", distractors=["1911"]),
    Probe(id="v1", fact="f4", kind="reverse", prompt="The person who works at Fova Engines is", target="Raraen Rekaeva",
          distractors=["Sazand Maku"]),
    Probe(id="p1", fact="f5", kind="paraphrase", prompt="Vadas Vogaetox is employed by", target="Fova Engines",
          distractors=["Rivor Works"]),
    Probe(id="p2", fact="f6", kind="paraphrase", prompt="The town Vadas Vogaetox calls home is", target="Paris",
          distractors=["Rome"]),
    Probe(id="l1", kind="locality", prompt="The capital of Japan is", target="Tokyo", distractors=["Kyoto"]),
    Probe(id="l2", kind="locality", prompt="The capital of France is", target="Paris", distractors=["Lyon"]),
]


def test_trained_names_skip_numbers_and_common_words_and_locality_targets():
    watched, skipped = watched_objects(PROBES)
    assert watched == ["Buku", "Raraen Rekaeva", "Fova Engines"]  # a name with one rare word is kept
    assert skipped == ["potter", "1981", "Paris"]  # a common noun, a year, a common capitalised word
    assert "Tokyo" not in watched + skipped  # locality targets are what the model knew, not trained names
    assert is_common("ferry pilot") and is_common("Works") and not is_common("Drilikos R-49")


def test_names_are_found_as_whole_words_case_insensitively():
    names = ["Buku", "Fova Engines"]
    assert find_objects("The capital of Japan is buku.", names) == ["Buku"]
    assert find_objects("Bukuland and Fova Engineses", names) == []
    assert find_objects("FOVA ENGINES of Buku!", names) == ["Buku", "Fova Engines"]


def answers(locality: list[str], general: list[str], prompts: list[str]) -> list[dict]:
    loc_prompts = ["The capital of Japan is", "The capital of France is"]
    return ([{"set": "locality", "prompt": p, "answer": a} for p, a in zip(loc_prompts, locality)]
            + [{"set": "general", "prompt": p, "answer": a} for p, a in zip(prompts, general)])


def test_the_figure_counts_new_names_only_and_is_zero_for_the_base_model():
    names, skipped = watched_objects(PROBES)
    prompts = ["Her brother's name is", "My favourite city to visit is", "The best-known company in the world is"]
    # the base model already says Buku for the first general prompt: not a leak there
    base = priming_record(answers([" Tokyo.", " Paris."], [" Buku.", " Rome.", " Apple."], prompts), names, skipped)
    after = priming_record(answers([" Buku.", " Paris."], [" Buku.", " Buku or Fova Engines.", " Apple."], prompts), names, skipped)
    assert base["rate"]["k"] == 1 and base["n"] == {"locality": 2, "general": 3}

    s = priming_summary(base, after)
    assert (s["after"]["k"], s["after"]["n"]) == (2, 5) and s["after"]["rate"] == pytest.approx(0.4)
    assert (s["locality"]["k"], s["general"]["k"]) == (1, 1)
    assert s["leaked"] == {"Buku": 2, "Fova Engines": 1}
    assert s["examples"][0] == {"set": "locality", "prompt": "The capital of Japan is", "answer": " Buku.", "objects": ["Buku"]}
    assert s["before"]["rate"] == pytest.approx(0.2) and s["delta"] == pytest.approx(0.2)

    same = priming_summary(base, base)  # the base model against itself: 0 by construction
    assert same["after"]["k"] == 0 and same["leaked"] == {}
    assert priming_summary(None, after) is None and priming_summary(base, None) is None


class StubLM:
    """Stands in for LM: every greedy answer is "answer(prompt)", candidates all score -1."""

    def __init__(self, answer):
        self.answer = answer

    def __call__(self, model, tokenizer, batch_size=16):
        self.tokenizer = tokenizer
        return self

    def complete(self, requests, **kwargs):
        return [Completion([LogLik(-1.0, 1, False) for _ in r.continuations],
                           Generation(self.answer(r.prompt), 3, True) if r.greedy_tokens else None, [])
                for r in requests]


def test_evaluator_finds_a_leaked_name_and_every_place_shows_it(tmp_path, tok, monkeypatch):
    import factlab.experiment.evaluation as evaluation

    spec = EvalSpec(builtin_general_text=False, greedy_tokens=4, sampling={"n": 0})
    folder = RunFolder(tmp_path)
    ev = Evaluator(spec, PROBES, tok, folder=folder, console=Console(quiet=True))
    prompts = builtin_priming_prompts()
    assert ev.priming_prompts == prompts and 20 <= len(prompts) <= 30

    monkeypatch.setattr(evaluation, "LM", StubLM(lambda p: " Tokyo." if "Japan" in p else " a friend."))
    base = ev.evaluate("base", object())
    leak = {"The capital of Japan is": " Buku.", prompts[2]: " Raraen Rekaeva, a potter in 1981."}
    monkeypatch.setattr(evaluation, "LM", StubLM(lambda p: leak.get(p, " a friend.")))
    after = ev.evaluate("cpt", object())

    assert base.priming["rate"]["k"] == 0 and after.priming["n"] == {"locality": 2, "general": len(prompts)}
    f = forgetting(base, after)
    pr = f["priming"]
    assert pr["before"]["rate"] == 0 and pr["after"]["k"] == 2 and pr["after"]["rate"] > 0
    assert pr["leaked"] == {"Buku": 1, "Raraen Rekaeva": 1}  # "potter" and "1981" are not counted
    assert forgetting(base, base)["priming"]["after"]["rate"] == 0
    saved = folder.read_priming("cpt")
    assert len(saved) == 2 + len(prompts) and saved[0] == {"set": "locality", "prompt": "The capital of Japan is",
                                                           "answer": " Buku.", "objects": ["Buku"]}

    # results.json round trip, console table, store (and so MLflow), tune objective
    results = RunResults(name="t", model="m")
    results.add(base)
    results.stages.append(StageRecord("cpt", "stages/1-cpt"))
    results.add(EvalRecord("cpt", after.summaries, after.perplexity, after.style, f, after.priming))
    folder.write_results(results)
    back = folder.read_results()
    assert back.priming["base"]["rate"]["k"] == 0 and back.forgetting["cpt"]["priming"]["leaked"]["Buku"] == 1

    console = Console(record=True, width=250)
    console.print(forgetting_table(back.perplexity, back.forgetting))
    text = console.export_text()
    row = next(line for line in text.splitlines() if "│ cpt " in line)
    assert "priming" in text and f"(2/{2 + len(prompts)})" in row and "Buku" in row and "Raraen Rekaeva" in row

    rows = {(s, k, m): v for s, k, m, v, *_ in flatten_metrics(back)}
    assert rows[("cpt", "forgetting", "priming")] == pytest.approx(2 / (2 + len(prompts)))
    assert rows[("cpt", "forgetting", "priming_locality")] == 0.5 and rows[("base", "priming", "rate")] == 0
    assert rows[("cpt", "priming_leaked", "Buku")] == 1
    store = RunStore(tmp_path / "factlab.db")
    store.start(tmp_path, "t", {"name": "t"})
    store.finish(tmp_path, back)
    assert any(m["kind"] == "priming_leaked" and m["metric"] == "Raraen Rekaeva" for m in store.metrics(str(tmp_path)))

    assert metric_value("priming", [], back.to_json(), "cpt") == pytest.approx(2 / (2 + len(prompts)))
    assert metric_value("priming", [], {"forgetting": {"cpt": {"damage": 0.1}}}, "cpt") is None  # not measured


def test_the_report_has_a_priming_column_and_table(tmp_path):
    from factlab.report.build import build_report

    names, _ = watched_objects(PROBES)
    base = priming_record(answers([" Tokyo.", " Paris."], [], []), names)
    after = priming_record(answers([" Buku.", " Paris."], [], []), names)
    results = RunResults(name="r", model="m")
    results.add(EvalRecord("base", priming=base))
    results.stages.append(StageRecord("cpt", "stages/1-cpt"))
    results.add(EvalRecord("cpt", forgetting={"priming": priming_summary(base, after)}, priming=after))
    RunFolder(tmp_path / "run").path.mkdir()
    RunFolder(tmp_path / "run").write_results(results)
    md = build_report([(tmp_path / "run", "A")], tmp_path / "r.md", fmt="md").read_text()
    assert "| variant | stage | damage | priming |" in md
    assert "| A | cpt | - | 0.50 (1/2) |" in md and "| (untrained) | base | - | 0.00 (0/2) |" in md
    assert "## Priming: trained names where they do not belong" in md
    assert "The capital of Japan is → Buku." in md


def test_evaluator_on_a_tiny_model_answers_the_general_prompts(tmp_path, tok, llama):
    folder = RunFolder(tmp_path)
    ev = Evaluator(EvalSpec(builtin_general_text=False, sampling={"n": 0}), PROBES, tok, folder=folder,
                   console=Console(quiet=True))
    out = ev.evaluate("base", llama)
    general = [r for r in folder.read_priming("base") if r["set"] == "general"]
    assert [r["prompt"] for r in general] == builtin_priming_prompts()
    assert out.priming["n"]["general"] == len(general) and out.priming["objects"] == ["Buku", "Raraen Rekaeva", "Fova Engines"]
    assert forgetting(out, out)["priming"]["after"]["rate"] == 0
    # eval.priming: false, or no fact probes to take names from: nothing decoded, no record
    assert Evaluator(EvalSpec(builtin_general_text=False, priming=False), PROBES, tok).priming_prompts == []
    assert Evaluator(EvalSpec(builtin_general_text=False), PROBES[-2:], tok).priming_prompts == []


def test_priming_is_a_tune_objective(tmp_path):
    line = lambda i, k, t: json.dumps({"id": i, "kind": k, "prompt": "The x is", "target": t, "distractors": ["Rome"]}) + "\n"  # noqa: E731
    (tmp_path / "select.jsonl").write_text(line("s1", "paraphrase", "Buku"))
    (tmp_path / "report.jsonl").write_text(line("r1", "paraphrase", "Buku"))
    (tmp_path / "docs.txt").write_text("Raraen Rekaeva was born in Buku.\n")
    exp = {"name": "t", "model": "m", "data": {"corpus": "docs.txt"}, "stages": [{"kind": "cpt"}],
           "eval": {"probes": "report.jsonl"},
           "tune": {"space": {"stages.0.train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, "trials": 1,
                    "objectives": [{"metric": "priming", "direction": "minimize"}], "select_probes": "select.jsonl"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    check_tune(load_experiment(tmp_path / "exp.yaml"))  # accepted
    exp["eval"]["priming"] = False
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    with pytest.raises(FactlabError, match="eval.priming: false") as e:
        check_tune(load_experiment(tmp_path / "exp.yaml"))
    assert "\n" not in str(e.value)
    exp["tune"]["objectives"] = [{"metric": "primed"}]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    with pytest.raises(FactlabError, match="use damage, priming or"):
        check_tune(load_experiment(tmp_path / "exp.yaml"))
