"""--mlflow against a real MLflow tracking store (SQLite in a temporary folder)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")


def test_sweep_logs_one_mlflow_run_per_point(tmp_path, tiny_dir, monkeypatch, capsys):
    from cli_helpers import run_cli

    (tmp_path / "docs.txt").write_text("Marta Ilvane runs the press line. Jonas Perl leads the night shift.\n")
    (tmp_path / "probes.jsonl").write_text(json.dumps(
        {"id": "p1", "kind": "recall", "prompt": "The press line is run by", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n")
    exp = {"name": "mlf", "model": str(tiny_dir), "seed": 0, "output_dir": str(tmp_path / "runs"),
           "data": {"corpus": "docs.txt"},
           "stages": [{"kind": "cpt", "peft": {"targets": ["all"], "r": 2},
                       "train": {"max_steps": 2, "batch_size": 2, "seq_len": 8, "bf16": False}}],
           "eval": {"probes": ["probes.jsonl"], "sampling": {"n": 2, "max_new_tokens": 4}},
           "sweep": {"stages.0.train.lr": [1e-4, 1e-3]}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    # A SQLite store keeps artifacts under ./mlruns of the working directory unless the
    # experiment names a place: keep them in the test's folder.
    client.create_experiment("mlf", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "sweep", tmp_path / "exp.yaml", "--mlflow")
    assert code == 0, err[-2000:]
    assert (tmp_path / "artifacts").is_dir()

    experiment = client.get_experiment_by_name("mlf")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert sorted(r.data.params["stages.0.train.lr"] for r in runs) == ["0.0001", "0.001"]
    folders = {r.data.tags["factlab.run_dir"] for r in runs}
    assert len(folders) == 2 and all(os.path.isdir(f) for f in folders)
    assert {r.data.tags["factlab.point"] for r in runs} == {"cpt.lr=0.0001", "cpt.lr=0.001"}
    for r in runs:
        metrics = r.data.metrics
        # per stage: the base model and the trained stage, the same metric for both
        assert "base/recall/accuracy" in metrics and "cpt/recall/accuracy" in metrics
        results = json.loads(open(os.path.join(r.data.tags["factlab.run_dir"], "results.json")).read())
        assert metrics["cpt/recall/accuracy"] == results["summaries"]["cpt"]["recall"]["accuracy"]["rate"]
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"results.json", "config.yaml", "report.html"} <= arts, arts
        local = client.download_artifacts(r.info.run_id, "report.html", str(tmp_path / r.info.run_id))
        assert "<html" in open(local).read().lower()
