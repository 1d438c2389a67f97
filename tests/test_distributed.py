"""Data-parallel runs: `accelerate launch -m factlab run` with 2 CPU processes (gloo) gives the
run a single process gives with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factlab.errors import FactlabError

TOLERANCE = 1e-5
"""Largest difference allowed between the loss curves (and perplexities, relative) of the two
runs: the all-reduce sums the two halves' gradients in another order than one process sums
the whole batch's (float32), and that difference grows with the steps; measured about 7e-7
after 38 steps at lr 1e-2."""


def project(tmp_path: Path, tiny_dir: Path) -> Path:
    # 24 sentences packed into 8-token blocks: about 9 optimizer steps of 4 blocks per epoch.
    docs = " ".join(f"Fact {i}: the {w} of unit {i} is {c}."
                    for i, (w, c) in enumerate(zip(["head", "lead", "chief", "boss"] * 6, ["Marta", "Jonas", "Edda", "Bob"] * 6)))
    (tmp_path / "docs.txt").write_text(docs + "\n")
    (tmp_path / "probes.jsonl").write_text(json.dumps(
        {"id": "p1", "kind": "recall", "prompt": "The head of unit 0 is", "target": "Marta", "distractors": ["Jonas"]}) + "\n")
    exp = {"name": "dp", "model": str(tiny_dir), "seed": 0, "data": {"corpus": "docs.txt"},
           "stages": [{"kind": "cpt", "peft": {"targets": ["all"], "r": 2},
                       "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 4, "seq_len": 8, "bf16": False}}],
           "eval": {"probes": ["probes.jsonl"], "sampling": {"n": 0}, "builtin_general_text": True}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    return tmp_path / "exp.yaml"


def test_two_processes_train_what_one_process_trains_and_only_rank_0_writes(tmp_path, tiny_dir):
    from factlab.config import load_experiment
    from factlab.experiment.runner import RunOptions, run_experiment
    from factlab.experiment.store import RunStore

    exp_path = project(tmp_path, tiny_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("WORLD_SIZE", None)
    # --multi_gpu picks accelerate's torchrun launcher; on a machine without GPUs the Trainer
    # runs it on the CPU with gloo. A free port: tests may run side by side.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), "-m", "factlab", "run", exp_path, "-o", tmp_path / "two"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = run_experiment(load_experiment(exp_path), RunOptions(run_dir=tmp_path / "one" / "run"))

    (two,) = [p for p in (tmp_path / "two").iterdir() if p.is_dir()]  # rank 1 made no folder of its own
    assert not list((tmp_path / "two").rglob("*.partial"))
    (row,) = RunStore(tmp_path / "two" / "factlab.db").runs()
    assert row["status"] == "done" and row["run_dir"] == str(two)
    assert proc.stderr.count("stage cpt: 6 steps") == 1  # rank 1 prints nothing of its own

    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    sa, sb = a["stages"][0], b["stages"][0]
    assert sb["processes"] == 2 and sa["processes"] == 1
    assert (sa["steps"], sa["examples"], sa["train_tokens"]) == (sb["steps"], sb["examples"], sb["train_tokens"])
    la = json.loads((one / "stages" / "1-cpt" / "train.json").read_text())["loss_history"]
    lb = json.loads((two / "stages" / "1-cpt" / "train.json").read_text())["loss_history"]
    assert [h["step"] for h in la] == [h["step"] for h in lb] == list(range(1, 7))
    assert la[0]["loss"] == pytest.approx(lb[0]["loss"], abs=1e-6)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) < TOLERANCE
    # The loss fell, so the comparison is of real training, not of two untrained models.
    assert la[-1]["loss"] < la[0]["loss"] - 0.1
    ppl_a = a["perplexity"]["cpt"]["builtin-general"]["perplexity"]
    ppl_b = b["perplexity"]["cpt"]["builtin-general"]["perplexity"]
    assert ppl_a == pytest.approx(ppl_b, rel=TOLERANCE) and ppl_a != a["perplexity"]["base"]["builtin-general"]["perplexity"]
    assert a["summaries"]["base"] == b["summaries"]["base"]  # the base evaluations are the same model


def test_the_global_batch_must_split_evenly(monkeypatch):
    from factlab.train.distributed import per_process_batch

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert per_process_batch(8, "cpt") == 4
    with pytest.raises(FactlabError, match="train.batch_size 5 is the global batch, split over 2 processes"):
        per_process_batch(5, "cpt")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert per_process_batch(5, "cpt") == 5


@pytest.mark.parametrize("command", ["sweep", "tune", "influence", "eval", "chat"])
def test_only_run_is_launched_on_several_processes(tmp_path, monkeypatch, capsys, command):
    from cli_helpers import run_cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "x.yaml").write_text("name: x\nmodel: m\n")
    code, _, err = run_cli(monkeypatch, capsys, command, tmp_path / "x.yaml")
    assert code == 2 and f"`factlab {command}` runs in one process" in err
