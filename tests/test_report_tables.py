"""Report tables built from saved results alone: every stage of every run, the cost of each
training method, and the style of SFT answers. Fixtures are written by the run folder's own
writer (RunFolder), so a change of the saved format shows here."""

from factlab.experiment.run_folder import EvalRecord, RunFolder, RunResults, StageRecord
from factlab.report.build import build_report
from factlab.report.tables import load_run, style_rows, training_rows, variant_rows


def rate(k, n):
    return {"k": k, "n": n, "rate": k / n, "ci_low": 0.0, "ci_high": 1.0}


def mean(v, n=4):
    return {"n": n, "mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1}


def fake_run(folder, stages, style=None):
    """A run folder with these stage records: recall 1/4 on the untrained model, 2/4, 3/4, ...
    after each stage."""
    style = style or {}
    results = RunResults(name=folder.name, model="tiny", seed=0)
    results.add(EvalRecord("base", summaries={"recall": {"accuracy": rate(1, 4)}}, style=style.get("base")))
    for i, st in enumerate(stages):
        name = st["name"]
        results.stages.append(StageRecord(name, RunFolder.stage_folder_name(i, name), {k: v for k, v in st.items() if k != "name"}))
        results.add(EvalRecord(name, summaries={"recall": {"accuracy": rate(2 + i, 4)}}, style=style.get(name), forgetting={}))
    folder.mkdir(parents=True)
    RunFolder(folder).write_results(results)
    return folder


def stage(name, **kw):
    base = {"name": name, "method": "lora", "steps": 10, "first_loss": 4.0, "final_loss": 1.25, "eval_loss": None,
            "tokens_per_second": 300.0, "trainable_params": 1000, "trainable_share": 0.035, "artifact": "adapter",
            "artifact_bytes": 19_600_000, "train_peak_rss_mb": 900.0, "merged": True}
    return {**base, **kw}


def test_tables_show_every_stage_the_method_costs_and_style(tmp_path):
    two = fake_run(tmp_path / "two", [stage("cpt"), stage("sft", eval_loss=2.5)],
                   style={"base": {"n": 4, "length": mean(40.0), "rouge_l": mean(0.2)},
                          "sft": {"n": 4, "length": mean(80.0), "rouge_l": mean(0.35)}})
    prompt = fake_run(tmp_path / "prompt", [stage("cpt", method="prompt_tuning", merged=False, artifact_bytes=50_000,
                                                  trainable_share=0.00009)],
                      style={"base": {"n": 4, "length": mean(41.0)}})
    runs = [load_run(two, "A"), load_run(prompt, "B")]

    header, rows = variant_rows(runs, all_stages=True)
    assert [r[:2] for r in rows] == [["(untrained)", "base"], ["A", "cpt"], ["A", "sft"], ["B", "cpt"]]
    assert rows[2][2].startswith("0.75") and rows[3][2].startswith("0.50")

    header, rows = training_rows(runs)
    by = {(r[0], r[1]): dict(zip(header, r)) for r in rows}
    assert by[("A", "sft")]["held-out loss"] == "2.500" and by[("A", "cpt")]["held-out loss"] == "-"
    assert by[("A", "cpt")]["train loss first → last"] == "4.000 → 1.250"
    assert by[("A", "cpt")]["saved artefact"] == "19.60 MB adapter" and by[("A", "cpt")]["merged"] == "yes"
    assert by[("B", "cpt")]["method"] == "prompt_tuning" and by[("B", "cpt")]["merged"] == "no: evaluated as base + adapter"
    assert by[("B", "cpt")]["trainable (share)"] == "1,000 (0.009%)"

    header, rows = style_rows(runs)
    assert [r[:2] for r in rows] == [["(untrained)", "base (n=4)"], ["A", "sft (n=4)"]]  # B's base row is the same model
    assert rows[1][header.index("words")] == "80.00 [79.90,80.10]"

    out = build_report([(two, "A"), (prompt, "B")], tmp_path / "r.html")
    text = out.read_text()
    assert "Answers to the SFT training prompts" in text and "no: evaluated as base + adapter" in text
    md = build_report([(two, "A"), (prompt, "B")], tmp_path / "r.md", fmt="md").read_text()
    assert "## Training" in md and "| A | sft | lora |" in md


def test_paired_difference_counts_probes_and_says_when_it_is_real(tmp_path):
    from factlab.report.tables import difference_rows, paired_difference

    def rows(correct, lp):
        return [{"id": f"p{i}", "kind": "paraphrase", "correct": c, "target_mean_logprob": x} for i, (c, x) in enumerate(zip(correct, lp))]

    a = rows([False] * 20 + [True] * 10, [-3.0] * 30)
    b = rows([True] * 20 + [True] * 10, [-1.0] * 30)   # right on every probe A missed
    d = paired_difference(a, b, "paraphrase")
    assert d["n"] == 30 and d["b_only"] == 20 and d["a_only"] == 0 and d["real"]
    assert abs(d["accuracy"]["mean"] - 20 / 30) < 1e-12 and d["target_logprob"]["mean"] == 2.0
    # the same two rates split over different probes: no paired evidence of a difference
    c = rows([True] * 10 + [False] * 10 + [True] * 10, [-3.0] * 30)
    e = rows([False] * 10 + [True] * 10 + [True] * 10, [-3.0] * 30)
    same = paired_difference(c, e, "paraphrase")
    assert same["accuracy"]["mean"] == 0 and not same["real"] and (same["b_only"], same["a_only"]) == (10, 10)
    assert paired_difference(a, b, "reverse")["n"] == 0

    for name, r in (("a", a), ("b", b)):
        run = fake_run(tmp_path / name, [stage("cpt")])
        RunFolder(run).write_scores("cpt", r)
    runs = [load_run(tmp_path / "a", "one wording"), load_run(tmp_path / "b", "three wordings")]
    header, table = difference_rows(runs)
    row = dict(zip(header, table[0]))
    assert row["variant"] == "three wordings" and row["vs"] == "one wording" and row["kind"] == "paraphrase"
    assert row["Δ accuracy"].endswith("*") and row["right only here / only there"] == "20 / 0"
    text = build_report([(tmp_path / "a", "one wording"), (tmp_path / "b", "three wordings")], tmp_path / "d.html").read_text()
    assert "Differences against one wording" in text


def test_a_sweep_report_leaves_out_runs_whose_folder_is_gone(tmp_path):
    import pytest

    from factlab.errors import FactlabError
    from factlab.experiment.store import RunStore
    from factlab.report.build import resolve_runs

    store = RunStore(tmp_path / "db.sqlite")
    for name in ("kept", "moved"):
        run = fake_run(tmp_path / name, [stage("cpt")])
        store.start(run, "x", {"name": name}, sweep="sw", label=f"label-{name}")
        store.finish(run, RunFolder(run).read_results())
    (tmp_path / "moved" / "results.json").unlink()
    assert resolve_runs(["sw"], store) == [(tmp_path / "kept", "label-kept")]
    (tmp_path / "kept" / "results.json").unlink()
    with pytest.raises(FactlabError, match="no longer on disk"):
        resolve_runs(["sw"], store)


def test_stage_by_stage_table_pools_the_fact_kinds_per_stage(tmp_path):
    from factlab.report.tables import stage_rows

    one = fake_run(tmp_path / "one", [stage("cpt")])
    assert stage_rows([load_run(one)]) == ([], [])  # single-stage runs: no such table
    two = fake_run(tmp_path / "two", [stage("cpt"), stage("sft")])
    res = RunFolder(two).read_results()
    res.evaluations["sft"].summaries["qa"] = {"accuracy": rate(1, 2), "eos": rate(2, 2)}
    res.evaluations["sft"].forgetting = {"perplexity": {"general": {"perplexity_ratio": 1.5}}}
    RunFolder(two).write_results(res)
    header, rows = stage_rows([load_run(one, "single"), load_run(two, "two-stage")])
    row = dict(zip(header, rows[1]))
    assert header[:4] == ["variant", "facts: base", "facts: cpt", "facts: sft"]
    assert row["facts: base"].startswith("0.25") and row["facts: base"].endswith("(4)")
    assert row["facts: sft"].startswith("0.67") and row["facts: sft"].endswith("(6)")  # recall 3/4 + qa 1/2
    assert row["qa EOS: sft"].startswith("1.00") and row["qa EOS: cpt"] == "-" and row["ppl ×: sft"] == "x1.50"
    assert dict(zip(header, rows[0]))["facts: sft"] == "-"


def test_sample_hit_table_pools_the_samples_per_kind_with_counts(tmp_path):
    from factlab.evaluate.metrics import rate_summary
    from factlab.report.tables import sample_hit_rows

    results = RunResults(name="r", model="tiny", seed=0)
    results.add(EvalRecord("base", summaries={"paraphrase": {"accuracy": rate(0, 7), "sample_hits": rate_summary([False] * 140)}}))
    results.stages.append(StageRecord("cpt", RunFolder.stage_folder_name(0, "cpt"), stage("cpt")))
    hits = rate_summary([True] * 12 + [False] * 128)
    results.add(EvalRecord("cpt", summaries={"paraphrase": {"accuracy": rate(0, 7), "sample_hits": hits}}, forgetting={}))
    folder = tmp_path / "run"
    folder.mkdir()
    RunFolder(folder).write_results(results)
    header, rows = sample_hit_rows([load_run(folder, "mlp")])
    assert header == ["variant", "stage", "paraphrase (samples)"]
    assert rows[0][:2] == ["(untrained)", "base"] and rows[0][2].endswith("(0/140)")
    assert rows[1][:2] == ["mlp", "cpt"] and rows[1][2].startswith("0.09 [") and rows[1][2].endswith("(12/140)")
    # no samples anywhere: no table
    assert sample_hit_rows([load_run(fake_run(tmp_path / "plain", [stage("cpt")]), "x")]) == ([], [])


def test_targets_table_checks_the_last_evaluation_against_each_goal():
    from rich.console import Console

    from factlab.report.console import targets_table

    results = RunResults(name="r", model="tiny", seed=0)
    results.add(EvalRecord("base", summaries={"recall": {"accuracy": rate(1, 4)}}))
    results.stages.append(StageRecord("cpt", RunFolder.stage_folder_name(0, "cpt"), {}))
    results.add(EvalRecord("cpt", summaries={"recall": {"accuracy": rate(3, 4)}, "qa": {"eos": rate(4, 4)}},
                           forgetting={"damage": 0.2, "locality_greedy": {"before": rate(4, 5), "after": rate(3, 5)},
                                       "priming": {"before": rate(0, 8), "after": rate(1, 8), "leaked": {"Buku": 1}}}))
    goals = {"recall.accuracy": ">= 0.7", "qa.eos": ">= 0.9", "damage": "<= 0.15", "priming": "<= 0",
             "locality.greedy_drop": "<= 0.05", "reverse.accuracy": ">= 0.6"}
    table = targets_table(results, goals)
    console = Console(width=160, record=True)
    console.print(table)
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") >= 4}
    assert lines["recall.accuracy"].rstrip(" │").endswith("yes") and "0.75" in lines["recall.accuracy"]
    assert lines["qa.eos"].rstrip(" │").endswith("yes")
    assert lines["damage"].rstrip(" │").endswith("no") and "+20.0%" in lines["damage"]
    assert lines["locality.greedy_drop"].rstrip(" │").endswith("no") and "+0.20" in lines["locality.greedy_drop"]
    assert lines["reverse.accuracy"].rstrip(" │").endswith("?")  # not measured: no reverse probes
    assert lines["priming"].rstrip(" │").endswith("no") and "Buku" in lines["priming"]


def test_targets_are_checked_when_the_experiment_is_read():
    import pytest

    from factlab.config import EvalSpec

    assert EvalSpec(targets={"damage": "<= 0.15", "qa.eos": ">=0.9"}).targets["qa.eos"] == ">=0.9"
    with pytest.raises(ValueError, match="not a goal"):
        EvalSpec(targets={"damage": "less than 0.15"})
    with pytest.raises(ValueError, match="unknown metric"):
        EvalSpec(targets={"recall.acc": ">= 0.9"})
