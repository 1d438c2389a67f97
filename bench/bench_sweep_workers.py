"""Wall time of one sweep run with `factlab sweep --workers 1` and `--workers N`.

The sweep is an example experiment (``--experiment``, default examples/demo-overfit.yaml: CPT
then SFT on the three Korrin documents, SmolLM2-135M, probes scored on the base model and after
each stage; ``--set`` overrides keys, e.g. to shorten its stages) without the in-context
baseline, over ``--points`` LoRA ranks of the CPT stage, so that no trained stage is shared between points
(each worker evaluates the base model once; see factlab.experiment.sweep). Each worker count
runs as its own `factlab sweep` process from a fresh output folder and is timed end to end
(worker start-up, model loading, training, evaluation, writing). Worker counts run one after
another, in the order given; the table gives wall time, points per hour, the speed-up over one
worker and the parallel efficiency (speed-up / processes). The points' final losses and
probe accuracies are compared across worker counts: one worker runs with all CPU threads,
N workers with cpus // N each, so the numbers may differ in the last bits (thread count
changes the order of float sums), not more.

    .venv/bin/python bench/bench_sweep_workers.py                 # demo-overfit, 4 points, --workers 1 and 2
    .venv/bin/python bench/bench_sweep_workers.py --set stages.0.train.epochs=3   # shorter points
    .venv/bin/python bench/bench_sweep_workers.py --workers 1 2 4 --points 8
    .venv/bin/python bench/bench_sweep_workers.py --quick         # tiny random model, seconds per point
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def demo_sweep(experiment: Path, points: int) -> dict:
    exp = yaml.safe_load(experiment.read_text())
    data = experiment.resolve().parent  # the example's relative paths, made absolute
    for key in ("corpus", "qa", "general"):
        if exp["data"].get(key):
            exp["data"][key] = str(data / exp["data"][key])
    exp["eval"]["probes"] = [str(data / p) for p in exp["eval"]["probes"]]
    exp["eval"]["in_context"] = False
    exp["name"] = "bench-workers"
    exp["sweep"] = {"stages.0.peft.r": [4 * 2 ** i for i in range(points)]}
    return exp


def quick_sweep(folder: Path, points: int) -> dict:
    """A tiny random llama and a few documents: the mechanics, in seconds per point."""
    from factlab.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "docs.txt").write_text(" ".join(f"Fact {i}: unit {i} is run by {n}." for i, n in
                                              enumerate(["Marta", "Jonas", "Edda", "Bob"] * 8)) + "\n")
    (folder / "probes.jsonl").write_text("".join(json.dumps(
        {"id": f"p{i}", "kind": "recall", "prompt": f"Fact {i}: unit {i} is run by", "target": n,
         "distractors": ["Jonas" if n != "Jonas" else "Marta"]}) + "\n" for i, n in enumerate(["Marta", "Jonas", "Edda", "Bob"])))
    return {"name": "bench-workers-quick", "model": str(folder / "model"), "seed": 0,
            "data": {"corpus": str(folder / "docs.txt")},
            "stages": [{"kind": "cpt", "peft": {"targets": ["all"], "r": 2},
                        "train": {"max_steps": 40, "lr": 1e-2, "batch_size": 4, "seq_len": 16, "bf16": False}}],
            "eval": {"probes": [str(folder / "probes.jsonl")], "sampling": {"n": 4, "max_new_tokens": 8}},
            "sweep": {"stages.0.peft.r": [2 * (i + 1) for i in range(points)]}}


def run(exp_path: Path, out: Path, workers: int, overrides: list[str]) -> tuple[float, list[dict]]:
    """Wall seconds of `factlab sweep --workers N` and each point's results.json, in point order."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the sweep decides the threads (cpus // processes)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "factlab", "sweep", str(exp_path), "--workers", str(workers),
                           "-o", str(out), *[a for kv in overrides for a in ("--set", kv)]], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"factlab sweep --workers {workers} failed:\n{proc.stderr[-3000:]}")
    runs = sorted(p for p in (out / yaml.safe_load(exp_path.read_text())["name"]).iterdir() if (p / "results.json").is_file())
    return seconds, [json.loads((p / "results.json").read_text()) for p in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    ap.add_argument("--points", type=int, default=4, help="sweep points (default: 4)")
    ap.add_argument("--quick", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    ap.add_argument("--experiment", type=Path, default=ROOT / "examples" / "demo-overfit.yaml",
                    help="the experiment swept (default: examples/demo-overfit.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to factlab sweep --set (repeatable)")
    args = ap.parse_args()

    from factlab.experiment.sweep import available_cpus, worker_plan

    cpus = available_cpus()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        tmp = Path(tmp)
        exp = quick_sweep(tmp, args.points) if args.quick else demo_sweep(args.experiment, args.points)
        exp_path = tmp / "sweep.yaml"
        exp_path.write_text(yaml.safe_dump(exp, sort_keys=False))
        rows, reference = [], None
        for w in args.workers:
            seconds, results = run(exp_path, tmp / f"out-{w}", w, args.overrides)
            n, threads = worker_plan(w, cpus)
            rows.append((w, n, threads, seconds))
            losses = [[s.get("final_loss") for s in r["stages"]] for r in results]
            acc = [r["summaries"][r["stages"][-1]["name"]]["all"]["accuracy"]["rate"] for r in results]
            if reference is None:
                reference = (losses, acc)
            else:
                dl = max(abs(a - b) for la, lb in zip(losses, reference[0]) for a, b in zip(la, lb))
                print(f"--workers {w}: final losses differ from --workers {args.workers[0]} by at most {dl:.2e}; "
                      f"probe accuracy {'the same' if acc == reference[1] else f'{acc} vs {reference[1]}'}")
            print(f"--workers {w}: {seconds:.1f} s", flush=True)

    print(f"\n{'quick (tiny random model)' if args.quick else f'{args.experiment.name} sweep (SmolLM2-135M) {args.overrides}'}, {args.points} points, "
          f"{cpus} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print("| --workers | processes x threads | wall (s) | points / hour | speed-up | efficiency |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = rows[0][3]
    for w, n, threads, seconds in rows:
        speedup = base / seconds
        print(f"| {w} | {n} x {threads} | {seconds:.1f} | {3600 * args.points / seconds:.0f} | "
              f"{speedup:.2f}x | {speedup / n:.0%} |")


if __name__ == "__main__":
    main()
