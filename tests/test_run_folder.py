"""The run record: RunFolder writes and reads results.json and the score files; old run
folders still read and report as they did; bad files fail with one line naming them; the
report hides exactly the untrained model's evaluations."""

import json
import shutil
import sys
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
