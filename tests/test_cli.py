"""The command line: bad input gets one line and exit code 2; a tiny end-to-end run writes a
complete run folder; a run that fails midway keeps what earlier stages wrote."""

import json

import pytest
import yaml

from factlab.testing import tiny_model, tiny_tokenizer
from cli_helpers import run_cli


@pytest.fixture()
def project(tmp_path, tiny_dir):
    (tmp_path / "docs.txt").write_text("Marta Ilvane runs the press line. Jonas Perl leads the night shift.\n")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Who runs the press line?", "answer": "Marta Ilvane."}) + "\n")
    (tmp_path / "probes.jsonl").write_text(
        json.dumps({"id": "p1", "kind": "recall", "prompt": "The press line is run by", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n"
        + json.dumps({"id": "p2", "kind": "qa", "prompt": "Who runs the press line?", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n"
    )
    exp = {
        "name": "tiny", "model": str(tiny_dir), "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"corpus": "docs.txt", "qa": "qa.jsonl"},
        "stages": [
            {"kind": "cpt", "peft": {"targets": ["all"], "r": 2}, "train": {"max_steps": 2, "batch_size": 2, "seq_len": 8, "bf16": False}},
            {"kind": "sft", "peft": {"targets": ["attention", "mlp"], "r": 2}, "train": {"max_steps": 2, "seq_len": 64, "bf16": False}},
        ],
        "eval": {"probes": ["probes.jsonl"]},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    return tmp_path




def test_end_to_end_run_folder(project, monkeypatch, capsys):
    # loss.png is the report's job (drawn through the runner's on_stage callback), not training's
    code, _, err = run_cli(monkeypatch, capsys, "run", project / "exp.yaml")
    assert code == 0, err
    (run,) = [p for p in (project / "runs").iterdir() if p.is_dir()]
    assert (run / "config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"][0]["peft"]["targets"] == ["all"]
    results = json.loads((run / "results.json").read_text())
    assert list(results["summaries"]) == ["base", "cpt", "sft"]
    assert [s["name"] for s in results["stages"]] == ["cpt", "sft"]
    for label in ("base", "cpt", "sft"):
        rows = [json.loads(x) for x in (run / "scores" / f"{label}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["p1", "p2"]
    for folder in ("1-cpt", "2-sft"):
        assert (run / "stages" / folder / "merged" / "config.json").is_file()
        assert (run / "stages" / folder / "adapter" / "adapter_config.json").is_file()
        assert (run / "stages" / folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "probes by kind" in err and "forgetting" in err  # the tables, printed by the CLI
    # priming: measured on every evaluation, compared with base after each stage, shown beside damage
    assert list(results["priming"]) == ["base", "cpt", "sft"] and results["forgetting"]["sft"]["priming"]["after"]["n"] > 20
    assert (run / "scores" / "sft.priming.jsonl").is_file() and "priming" in err


def test_set_override_reaches_the_run(project, monkeypatch, capsys):
    """The file says max_steps 2 for both stages; the overrides must change what was trained
    (steps in results.json), not only what config.yaml says."""
    from factlab.experiment.run_folder import RunFolder

    code, _, err = run_cli(monkeypatch, capsys, "run", project / "exp.yaml", "--set", "stages.0.train.max_steps=1",
                           "--set", "stages.1.train.max_steps=3")
    assert code == 0, err
    (run,) = [p for p in (project / "runs").iterdir() if p.is_dir()]
    assert [st["train"]["max_steps"] for st in yaml.safe_load((run / "config.yaml").read_text())["stages"]] == [1, 3]
    assert [st.get("steps") for st in RunFolder(run).read_results().stages] == [1, 3]


def test_set_can_replace_a_whole_list(project, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", project / "exp.yaml", "--set", "stages=[]")
    assert code == 0, err
    (run,) = [p for p in (project / "runs").iterdir() if p.is_dir()]
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"] == []


def _edit(project, fn):
    exp = yaml.safe_load((project / "exp.yaml").read_text())
    fn(exp)
    (project / "exp.yaml").write_text(yaml.safe_dump(exp))


BAD_INPUTS = {
    "malformed yaml": (lambda p: (p / "exp.yaml").write_text("name: [oops\n"), "not valid YAML"),
    "malformed jsonl": (lambda p: (p / "qa.jsonl").write_text('{"question": "q", \n'), "qa.jsonl:1: malformed JSON"),
    "unknown layer group": (lambda p: _edit(p, lambda e: e["stages"][0]["peft"].update(targets=["mlps"])), "unknown layer group or module 'mlps'"),
    "empty corpus": (lambda p: (p / "docs.txt").write_text(""), "the corpus is empty"),
    "missing model": (lambda p: _edit(p, lambda e: e.update(model=str(p / "no-model"))), "neither an alias nor an existing folder"),
    "hub id offline": (lambda p: _edit(p, lambda e: e.update(model="some-org/some-model")), "hub id"),
    "empty probe target": (lambda p: (p / "probes.jsonl").write_text('{"id": "x", "kind": "recall", "prompt": "a", "target": " "}\n'), "empty target"),
    "unknown key": (lambda p: _edit(p, lambda e: e["stages"][0]["train"].update(lrr=1)), "stages.0.train.lrr: unknown key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(project, monkeypatch, capsys, case):
    if case == "hub id offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    breaker, expected = BAD_INPUTS[case]
    breaker(project)
    code, out, err = run_cli(monkeypatch, capsys, "run", project / "exp.yaml")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert "Traceback" not in err + out
    assert not (project / "runs").exists()  # checked before anything was written


def test_tokenizer_without_chat_template(project, tiny_dir, tmp_path_factory, monkeypatch, capsys):
    d = tmp_path_factory.mktemp("no-template")
    tok = tiny_tokenizer(chat_template=False)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    capsys.readouterr()  # the save's own progress bar is not the run's output
    _edit(project, lambda e: e.update(model=str(d)))
    code, _, err = run_cli(monkeypatch, capsys, "run", project / "exp.yaml")
    assert code == 2 and "no chat template" in err and len(err.strip().splitlines()) == 1


def test_failure_midway_keeps_earlier_stages(project, monkeypatch, capsys):
    import factlab.experiment.runner as runner

    real = runner.train_stage

    def fail_on_sft(model, tok, stage, name, *a, **kw):
        if name == "sft":
            raise RuntimeError("simulated crash in stage 2")
        return real(model, tok, stage, name, *a, **kw)

    monkeypatch.setattr(runner, "train_stage", fail_on_sft)
    with pytest.raises(RuntimeError):
        run_cli(monkeypatch, capsys, "run", project / "exp.yaml")
    (run,) = [p for p in (project / "runs").iterdir() if p.is_dir()]
    results = json.loads((run / "results.json").read_text())  # still valid JSON
    assert [s["name"] for s in results["stages"]] == ["cpt"] and "cpt" in results["summaries"]
    assert (run / "stages" / "1-cpt" / "merged" / "model.safetensors").is_file()
    assert not any(p.name.endswith(".partial") for p in (run / "stages").iterdir())


def test_models_lists_the_embedded_alias(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "models")
    assert code == 0 and "smollm2-135m" in out
