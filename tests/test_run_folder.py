"""The run record: RunFolder writes and reads results.json and the score files; old run
folders still read and report as they did; bad files fail with one line naming them; the
report hides exactly the untrained model's evaluations."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from factlab.errors import FactlabError
from factlab.experiment.run_folder import EvalRecord, RunFolder, RunResults, StageRecord
from cli_helpers import run_cli

DATA = Path(__file__).parent / "data"
OLD_RUN = DATA / "old-run"




def rate(k, n):
    return {"k": k, "n": n, "rate": k / n, "ci_low": 0.0, "ci_high": 1.0}


def test_results_round_trip_through_the_writer(tmp_path):
    results = RunResults(name="r", model="tiny", seed=3)
    results.add(EvalRecord("base", summaries={"recall": {"accuracy": rate(1, 4)}}, perplexity={"t": {"perplexity": 9.0}}))
    results.add(EvalRecord("base+context", summaries={"recall": {"accuracy": rate(4, 4)}}))
    results.stages.append(StageRecord("cpt", RunFolder.stage_folder_name(0, "cpt"), {"steps": 2, "merged": True}))
    results.add(EvalRecord("cpt", summaries={"recall": {"accuracy": rate(3, 4)}}, perplexity={"t": {"perplexity": 12.0}},
                           style={"n": 1, "rouge_l": {"n": 1, "mean": 0.5, "ci_low": 0.5, "ci_high": 0.5}},
                           forgetting={"locality": None}))
    folder = RunFolder(tmp_path)
    folder.write_results(results)
    back = folder.read_results()
    assert back == results
    assert back.untrained_labels == ["base", "base+context"] and back.trained_labels == ["cpt"]
    assert folder.stage_path(0, "cpt") == tmp_path / "stages" / "1-cpt"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_score_rows_with_unicode_line_separators_round_trip_and_report(tmp_path, monkeypatch, capsys):
    """A sampled answer may contain U+2028 / U+2029 / NEL: json.dumps(ensure_ascii=False) keeps
    them raw, so a reader that splits with splitlines() breaks the row (and `factlab report`)."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    folder = RunFolder(run)
    rows = folder.read_scores("cpt")
    rows[0]["greedy"] = "Marta\u2028Ilvane"
    rows[0]["samples"] = ["line one\u2029line two", "next\x85line", "sep\x1cfile"]
    folder.write_scores("cpt", rows)
    assert folder.read_scores("cpt") == rows
    code, _, err = run_cli(monkeypatch, capsys, "report", run, "-o", tmp_path / "r.html", "--probe", rows[0]["id"])
    assert code == 0, err
    assert "line one\u2029line two" in (tmp_path / "r.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("content, expected", [
    ('{"name": "x", "stages": [{"name": "cpt", ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"stages": {"cpt": 1}}', "'stages' must be a list"),
    ('{"summaries": {"base": 3}}', "'summaries' must map"),
])
def test_a_broken_results_json_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, content, expected):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    (run / "results.json").write_text(content)
    with pytest.raises(FactlabError, match=expected) as e:
        RunFolder(run).read_results()
    assert str(run / "results.json") in str(e.value) and "\n" not in str(e.value)
    for args in (("report", run, "-o", tmp_path / "r.html"), ("compare", run)):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in out + err


def test_an_old_run_folder_reads_and_reports_as_before(tmp_path):
    """tests/data/old-run was written by factlab before RunFolder existed;
    tests/data/old-run-report.md is what that version's `factlab report --format md` made of
    it. The new reader must give the same tables."""
    from factlab.experiment.store import flatten_metrics
    from factlab.report.build import build_report

    results = RunFolder(OLD_RUN).read_results()
    assert [s.name for s in results.stages] == ["cpt", "sft"] and results.stages[1].folder == "stages/2-sft"
    assert results.untrained_labels == ["base", "base+context"] and results.trained_labels == ["cpt", "sft"]
    assert results.stages[0].get("steps") == 2 and results.stages[0].merged
    metrics = {(s, k, m) for s, k, m, *_ in flatten_metrics(results)}
    assert ("sft", "train", "final_loss") in metrics and ("base+context", "recall", "accuracy") in metrics

    out = build_report([(OLD_RUN, "old-run")], tmp_path / "new.md", fmt="md")

    def tables(text):  # headings and table rows: what does not depend on the output's name or time
        return [line for line in text.splitlines() if line.startswith(("|", "## "))]

    new, old = tables(out.read_text(encoding="utf-8")), tables((DATA / "old-run-report.md").read_text(encoding="utf-8"))
    # Since the old version, the Variants table shows the damage figure (relative perplexity
    # increase = ratio - 1, derived from the old folder's ratios) in place of the ratio, the
    # priming figure and the greedy locality change (neither measured by the old version:
    # "-"). Every other line is the same.
    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]

    variants = [i for i, line in enumerate(old) if line.startswith("| variant")][0]
    assert new[:variants] == old[:variants]
    assert cells(new[variants]) == [c for c in cells(old[variants]) if c != "ppl ratio"][:5] + [
        "damage", "priming", "locality Δ", "locality greedy Δ", "qa EOS"]
    for o, n in zip(old[variants + 2:variants + 5], new[variants + 2:variants + 5]):
        o, n = cells(o), cells(n)
        assert n[:5] == o[:5] and n[7] == o[6] and n[9] == o[7]
        assert n[5] == ("-" if o[5] == "-" else f"{float(o[5][1:]) - 1:+.1%}") and n[6] == n[8] == "-"
    assert new[variants + 5:] == old[variants + 5:]


def test_old_names_and_missing_fields_are_migrated_on_read(tmp_path):
    old = json.loads((OLD_RUN / "results.json").read_text())
    old["probes"] = old.pop("summaries")  # the in-memory name that once leaked into files
    for st in old["stages"]:
        st.pop("folder")
    old.pop("style")
    old.pop("forgetting")
    (tmp_path / "results.json").write_text(json.dumps(old))
    results = RunFolder(tmp_path).read_results()
    assert [s.folder for s in results.stages] == ["stages/1-cpt", "stages/2-sft"]
    assert results.summaries["cpt"]["recall"]["accuracy"]["n"] == 1 and results.style == {} and results.forgetting == {}


def test_factlab_eval_finds_the_stages_of_an_old_run(tmp_path, tiny_dir):
    from factlab.experiment.evaluation import eval_targets

    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = str(tiny_dir)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = eval_targets(str(run))
    assert [t[0] for t in targets] == ["base", "cpt", "sft"]
    assert targets[1][1] == run / "stages" / "1-cpt" / "merged" and targets[2][1] == run / "stages" / "2-sft" / "merged"


def test_the_report_hides_exactly_the_untrained_evaluations(tmp_path):
    """A stage may be named `baseline`: only base and base+context (the untrained model, the
    same for every variant) are shown once; every stage of every variant is shown."""
    from factlab.report.build import sample_sections
    from factlab.report.tables import load_run, style_rows

    style = {"n": 1, "length": {"n": 1, "mean": 3.0, "ci_low": 3.0, "ci_high": 3.0}}
    row = {"id": "p1", "kind": "recall", "prompt": "The press line is run by", "target": "Marta", "greedy": "x", "samples": []}
    for name, stage in (("a", "cpt"), ("b", "baseline")):
        results = RunResults(name=name)
        results.add(EvalRecord("base", summaries={"recall": {"accuracy": rate(1, 2)}}, style=style))
        results.add(EvalRecord("base+context", summaries={"recall": {"accuracy": rate(2, 2)}}))
        results.stages.append(StageRecord(stage, RunFolder.stage_folder_name(0, stage), {"merged": True}))
        results.add(EvalRecord(stage, summaries={"recall": {"accuracy": rate(2, 2)}}, style=style, forgetting={}))
        folder = RunFolder(tmp_path / name)
        folder.path.mkdir()
        folder.write_results(results)
        for label in ("base", "base+context", stage):
            folder.write_scores(label, [row])
    runs = [load_run(tmp_path / "a", "A"), load_run(tmp_path / "b", "B")]
    assert runs[1].stages == ["baseline"]
    _, rows = style_rows(runs)
    assert [r[:2] for r in rows] == [["(untrained)", "base (n=1)"], ["A", "cpt (n=1)"], ["B", "baseline (n=1)"]]
    (section,) = sample_sections(runs, ["p1"])
    assert [(e["variant"], e["stage"]) for e in section["entries"]] == [
        ("A", "base"), ("A", "base+context"), ("A", "cpt"), ("B", "baseline")]


def test_one_interval_format_and_one_kind_order():
    from factlab.evaluate.facts import summarize
    from factlab.report.format import interval, order_kinds

    assert interval({"n": 4, "rate": 0.5, "ci_low": 0.15, "ci_high": 0.85}) == "0.50 [0.15,0.85]"
    assert interval({"n": 4, "mean": -0.5, "ci_low": -0.75, "ci_high": 0.25}, signed=True) == "-0.50 [-0.75,+0.25]"
    assert interval({"n": 0, "rate": None}) == "-" and interval(None) == "-" and interval(2.0) == "2.00"
    assert order_kinds({"all", "qa", "zeta", "recall", "locality"}) == ["recall", "locality", "qa", "zeta", "all"]
    rows = [{"kind": k, "correct": True, "greedy_match": False, "target_logprob": -1.0, "target_mean_logprob": -1.0,
             "rank": 1, "greedy_eos": True, "greedy_tokens": 3} for k in ("qa", "locality", "recall")]
    assert list(summarize(rows)) == ["recall", "locality", "qa", "all"]


def _imports(package_dir: Path) -> dict[str, set[str]]:
    """module file -> the factlab modules it imports (at any depth: lazy imports count)."""
    import ast

    out = {}
    for f in package_dir.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("factlab"):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("factlab")}
        out[str(f.relative_to(package_dir.parent))] = names
    return out


def test_no_library_module_imports_the_report_or_the_cli():
    """experiment/ hands presentation to callbacks; nothing below the CLI imports it or report/."""
    import factlab

    src = Path(factlab.__file__).parent
    for module, names in _imports(src).items():
        if module.startswith(("factlab/report/", "factlab/cli")) or module == "factlab/__main__.py":
            continue
        upward = {n for n in names if n.startswith(("factlab.report", "factlab.cli"))}
        assert not upward, f"{module} imports {upward}"


def test_reading_a_run_needs_no_torch():
    """The report, compare and the store read run folders without loading torch."""
    import subprocess

    code = ("import sys, factlab.report.build, factlab.report.console, factlab.experiment.run_folder; "
            f"factlab.report.tables.load_run({str(OLD_RUN)!r}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_cut_short_score_file_is_one_line_naming_it(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_scores("cpt", [{"id": "p1", "greedy": "a"}, {"id": "p2", "greedy": "b"}])
    path = folder.scores_path("cpt")
    path.write_text(path.read_text()[:-8])
    with pytest.raises(FactlabError, match=r"cpt\.jsonl:2: malformed JSON") as e:
        folder.read_scores("cpt")
    assert "\n" not in str(e.value)


# --- influence runs ---------------------------------------------------------------------


def _influence_record():
    from factlab.experiment.run_folder import InfluenceDesiderata, InfluenceResults, InfluenceSchedule, InfluenceTiming

    iv = {"n": 4, "value": -0.0123, "ci_low": -0.02, "ci_high": -0.004}
    return InfluenceResults(
        name="toy", model="tiny", sample_set="chain", n_rows=3, n_clean_rows=2, n_columns=3, seeds=[0, 1],
        schedule=InfluenceSchedule(steps=1, lr=1e-3, optimizer="adamw", weight_decay=0.0, max_grad_norm=None),
        peft={"method": "lora", "targets": ["attention"], "r": 4}, trainable_params=2048, sparsity_k=1,
        timing=InfluenceTiming(finetune_seconds=1.5, finetune_seconds_per_row=0.5, finetune_cpu_seconds=1.2, threads=2),
        desiderata=InfluenceDesiderata(finetune={"symmetry": iv, "transitive": None},
                                       finetune_per_seed={"symmetry": [-0.01, None], "transitive": [None, None]},
                                       finetune_over_seeds={"symmetry": iv, "transitive": {"n": 0, "value": None,
                                                                                           "ci_low": None, "ci_high": None}},
                                       in_context={"symmetry": {**iv, "value": 0.5}, "transitive": None}))


def test_an_influence_record_round_trips_in_the_layout_it_always_had(tmp_path):
    import numpy as np

    from factlab.experiment.run_folder import InfluenceMatrices

    results = _influence_record()
    folder = RunFolder(tmp_path)
    folder.write_influence(results)
    assert folder.read_influence() == results and folder.read_record() == results and folder.is_influence()
    # the key order influence.study wrote before the record existed (readers of the JSON see no change)
    assert list(json.loads(folder.results_path.read_text())) == [
        "kind", "name", "model", "sample_set", "n_rows", "n_clean_rows", "n_columns", "seeds", "schedule", "peft",
        "trainable_params", "sparsity_k", "timing", "desiderata"]
    assert list(results.to_json()["desiderata"]) == ["finetune", "finetune_per_seed", "finetune_over_seeds", "in_context"]
    with pytest.raises(FactlabError, match="an influence run's results"):
        folder.read_results()  # not a training run: one line, not an empty RunResults
    rng = np.random.default_rng(0)
    eif = rng.normal(size=(2, 3, 3))
    m = InfluenceMatrices(eif_mean=eif.mean(0), row_ids=["a", "b", "c"], col_ids=["a", "b", "x"], eif=eif,
                          base_loss=rng.normal(size=(2, 3)), train_loss=rng.normal(size=(2, 3, 1)),
                          row_seconds=rng.random((2, 3)), seeds=[0, 1], eif_ctx=rng.normal(size=(3, 3)))
    folder.write_matrices(m)
    back = folder.read_matrices()
    for k, v in m.arrays().items():
        assert np.array_equal(m.arrays()[k], back.arrays()[k]), k
    assert (back.row_ids, back.col_ids, back.seeds) == (m.row_ids, m.col_ids, m.seeds)
    csv_rows = (tmp_path / "eif.csv").read_text().splitlines()
    assert csv_rows[0] == "row,a,b,x" and [float(x) for x in csv_rows[1].split(",")[1:]] == list(m.eif_mean[0])
    lines = [json.loads(x) for x in (tmp_path / "eif.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[4] == {"seed": 1, "row": "b", "values": dict(zip(m.col_ids, eif[1, 1]))}
    assert "seed" not in json.loads((tmp_path / "eif_ctx.jsonl").read_text().splitlines()[0])


def test_an_early_influence_run_reads_and_a_bad_one_is_one_line(tmp_path):
    """Fields early influence runs did not record read as their defaults; a wrong shape names the file."""
    res = {"kind": "influence", "name": "toy", "model": "tiny", "seeds": [0], "schedule": {"steps": 1, "lr": 1e-3},
           "peft": {"method": "lora"}, "timing": {"finetune_seconds": 1.5},
           "desiderata": {"finetune": {"symmetry": None}}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    back = RunFolder(tmp_path).read_influence()
    assert back.schedule.lr == 1e-3 and back.schedule.optimizer is None and back.timing.in_context_seconds is None
    assert back.trainable_params is None and back.desiderata.in_context is None
    for bad, expected in (({**res, "n_rows": "3"}, "'n_rows' must be an integer"),
                          ({**res, "desiderata": {"in_context": {}}}, "'finetune' object"),
                          ({**res, "timing": {"threads": 1.5}}, "'threads' must be an integer"),
                          ({**res, "kind": None}, "not an influence run's results")):
        (tmp_path / "results.json").write_text(json.dumps(bad))
        with pytest.raises(FactlabError, match=expected) as e:
            RunFolder(tmp_path).read_influence()
        assert str(tmp_path / "results.json") in str(e.value) and "\n" not in str(e.value)


def test_a_staged_run_folder_appears_only_when_complete(tmp_path):
    """RunFolder.staged (influence runs): an error or Ctrl-C part-way leaves no folder and no
    results; on success the folder has its final name and nothing .partial is left."""
    for exc in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with RunFolder.staged(tmp_path / "runs", "toy-influence") as folder:
                assert folder.path.name.endswith(".partial")
                folder.write_influence(_influence_record())
                raise exc
        assert not list((tmp_path / "runs").rglob("*")), "a failed run left files behind"
    with RunFolder.staged(tmp_path / "runs", "toy-influence") as a:
        a.write_influence(_influence_record())
    with RunFolder.staged(tmp_path / "runs", "toy-influence") as b:  # same second: numbered, not merged into a
        b.write_influence(_influence_record())
    assert a.path != b.path and a.is_influence() and b.is_influence()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([a.path.name, b.path.name])


def test_influence_runs_are_in_the_store_and_an_old_store_migrates(tmp_path, monkeypatch, capsys):
    import sqlite3

    from factlab.experiment.store import SCHEMA, RunStore

    db = tmp_path / "runs" / "factlab.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as con:  # a store written before influence runs were indexed (no `kind`)
        con.executescript(SCHEMA.replace(",\n    kind         TEXT NOT NULL DEFAULT 'run'   -- run | influence", ""))
        con.execute("INSERT INTO runs (run_dir, name, config_hash, config, status, started) "
                    "VALUES ('runs/old', 'old', 'h', '{}', 'done', 0)")
    con.close()
    store = RunStore(db)
    folder = RunFolder(tmp_path / "runs" / "toy-influence-1")
    folder.path.mkdir()
    folder.write_influence(_influence_record())
    started = time.time() - 90  # the study ran before its folder was complete and indexed
    store.start(folder.path, "toy", {"name": "toy"}, kind="influence", started=started)
    store.finish(folder.path, folder.read_record())
    old, inf = store.runs()
    assert old["kind"] == "run" and (inf["kind"], inf["status"], inf["started"]) == ("influence", "done", started)
    assert inf["seconds"] >= 90
    assert store.runs(kind="influence") == [inf]
    metrics = {(m["stage"], m["kind"], m["metric"]): m for m in store.metrics(str(folder.path))}
    assert metrics[("finetune", "desiderata", "symmetry")]["ci_low"] == -0.02
    assert metrics[("in_context", "desiderata", "symmetry")]["value"] == 0.5
    assert metrics[("finetune", "timing", "seconds_per_row")]["value"] == 0.5
    assert ("finetune", "desiderata", "transitive") not in metrics  # no such structure: not a metric
    monkeypatch.setenv("COLUMNS", "250")  # the table's run folder column whole
    code, out, err = run_cli(monkeypatch, capsys, "runs", "--store", db)
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if "toy-influence-1" in x]
    cells = [c.strip() for c in line.split("│")]
    assert cells[2:6] == ["influence", "", "", "done"] and float(cells[6]) >= 1.5  # kind, sweep, point, status; minutes
