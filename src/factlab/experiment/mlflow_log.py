"""Optional MLflow logging of a finished run (params, metrics, artifacts).

`--mlflow` imports mlflow (requirements.txt pins mlflow-skinny, which has the tracking client
and the SQLite store) and fails with a clear message when it is not installed; without the flag
nothing here is imported. Where runs go is MLflow's own setting: the MLFLOW_TRACKING_URI
environment variable (e.g. sqlite:///mlflow.db), else MLflow's default.
"""

from __future__ import annotations

import re
from pathlib import Path

from factlab.errors import FactlabError
from factlab.experiment.run_folder import RunFolder, RunResults
from factlab.experiment.store import flatten_metrics


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise FactlabError("--mlflow needs the mlflow package; install it with: pip install mlflow-skinny==3.17.2 (or pip install mlflow)") from None
    return mlflow


def _flat(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flat(v, key + ".")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                yield from _flat(x, f"{key}.{i}.")
        else:
            yield key, v


def log_run(run_dir: Path, config: dict, results: RunResults | dict, experiment: str, label: str | None = None) -> str:
    """One MLflow run per factlab run (so one per sweep point): the resolved config as params,
    every indexed metric (`stage/kind/metric`), and the run folder's results, config and loss curves
    as artifacts. `label` (a sweep point's overrides) is a tag. Returns the MLflow run id; the
    CLI adds the run's report to it (`log_artifact`): the report lives a layer above this one."""
    mlflow = require_mlflow()
    results = RunResults.coerce(results)
    folder = RunFolder(Path(run_dir))
    mlflow.set_experiment(experiment)
    tags = {"factlab.run_dir": str(folder.path.resolve()), "factlab.name": str(config.get("name", ""))}
    if label:
        tags["factlab.point"] = label
    with mlflow.start_run(run_name=folder.path.name, tags=tags) as active:
        # MLflow params are strings of at most a few hundred characters.
        mlflow.log_params({k: str(v)[:250] for k, v in _flat(config)})
        metrics = {}
        for stage, kind, metric, value, *_ in flatten_metrics(results):
            if value is not None:
                # MLflow takes letters, digits, _ - . / and space in a name; a leaked name
                # (priming_leaked/<name>) can hold anything else.
                name = re.sub(r"[^\w./ -]", "_", f"{stage}/{kind}/{metric}".replace("+", "_plus_"))
                metrics[name] = float(value)
        mlflow.log_metrics(metrics)
        for path in (folder.results_path, folder.config_path):
            if path.is_file():
                mlflow.log_artifact(str(path))
        for stage in results.stages:
            png = folder.loss_plot_path(stage)
            if png.is_file():
                mlflow.log_artifact(str(png), artifact_path=f"loss/{png.parent.name}")
        return active.info.run_id


def log_artifact(run_id: str, path: Path) -> None:
    """Add one more file to a finished MLflow run (the report, made by the CLI)."""
    mlflow = require_mlflow()
    mlflow.MlflowClient().log_artifact(run_id, str(path))
