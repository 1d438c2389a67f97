"""Evaluation speed: the demo's four evaluations (base, base+context, after CPT, after SFT) with
the evaluation code of this checkout against the code of a base commit, in the same run, on the
same models, with a check that both give the same numbers.

What runs: a finished demo run folder (``--run``; without it the demo is trained once first,
with this checkout, into a temporary folder). Its base model and merged stage models are then
evaluated by ``Evaluator.evaluate`` exactly as ``factlab run`` does it (the experiment's
``eval:`` settings: probes with greedy answers and samples, perplexity of the held-out text,
answers to the SFT prompts; the in-context baseline on the base model), once by the code of
``--old`` (default d97314b, main before issue 14: the current code path; its ``src`` is taken
with ``git archive`` into a temporary folder) and once by this checkout's ``src``, each in a
subprocess of its own, ``--repeats`` times, alternating old and new. A worker loads each model
(not timed), runs one warm-up forward, then times the evaluation (wall and CPU seconds).
rouge_score/nltk are imported before timing (a one-time import of a few seconds that would
otherwise land in the first evaluation of either code).

Agreement (the script exits 1 otherwise): every probe's target and distractor log-probs within
1e-4, the same greedy answers (text, token count, EOS), correctness and rank; perplexities
within 1e-4 relative; the same answers to the SFT prompts. Sampled answers are not compared
one by one: the new code draws them with per-prompt seeds (see factlab/evaluate/decoding.py),
so the table gives the mean sample hit rate of both instead.

    .venv/bin/python bench/bench_eval.py                     # the demo on SmolLM2-135M (trains it first)
    .venv/bin/python bench/bench_eval.py --run runs/demo-... # a finished demo run folder
    .venv/bin/python bench/bench_eval.py --quick             # a tiny random model: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OLD = "d97314b"

WORKER = r'''
import json, sys, time
from pathlib import Path

import torch

from factlab.config import load_experiment
from factlab.data.corpus import load_documents
from factlab.data.sft import load_conversations
from factlab.experiment.evaluation import Evaluator, load_probe_files
from factlab.experiment.run_folder import RunFolder
from factlab.models.loading import load_model, resolve_model

run, out = RunFolder(Path(sys.argv[1])), Path(sys.argv[2])
try:
    exp = load_experiment(run.config_path)
except Exception:
    # A run folder written by newer code read by the old code: drop the keys added since
    # (issue 14's device and training keys; none of them changes an evaluation).
    import yaml
    raw = yaml.safe_load(run.config_path.read_text())
    raw.pop("device", None)
    for st in raw.get("stages", []):
        for key in ("micro_batch_size", "fused_loss", "bf16_weights", "compile"):
            st.get("train", {}).pop(key, None)
    older = out.parent / f"{out.name}-config.yaml"
    older.write_text(yaml.safe_dump(raw, sort_keys=False))
    exp = load_experiment(older)
probes = load_probe_files(exp.eval.probes)
context = "\n\n".join(load_documents(exp.data.corpus)) if exp.eval.in_context else None
convs = load_conversations(exp.data.qa) if exp.data.qa else None
targets = [("base", resolve_model(exp.model))]
targets += [(st.name, run.merged_model(st)) for st in run.read_results().stages]
import rouge_score.rouge_scorer, sacrebleu  # noqa: E401,F401  (one-time imports, not timed)

folder = RunFolder(out)
times = {}
for label, path in targets:
    model, tok = load_model(path)
    evaluator = Evaluator(exp.eval, probes, tok, seed=exp.seed, folder=folder, conversations=convs)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tok.encode("warm up the kernels")]))
    jobs = [(label, None)] + ([("base+context", context)] if label == "base" and context else [])
    for name, ctx in jobs:
        t, c = time.perf_counter(), time.process_time()
        if ctx is None:
            ev = evaluator.evaluate(name, model)
        else:
            ev = evaluator.evaluate(name, model, context=ctx, with_perplexity=False)
        times[name] = {"seconds": time.perf_counter() - t, "cpu": time.process_time() - c,
                       "perplexity": ev.perplexity}
    del model
print(json.dumps(times))
'''


def quick_experiment(tmp: Path) -> Path:
    """The demo's data and eval settings on a tiny random llama (saved into ``tmp``), with
    stages of a few steps: the same four evaluations, in minutes."""
    import yaml

    from factlab.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data = ROOT / "examples"
    exp = {**demo, "model": str(tmp / "tiny"),
           "data": {k: str(data / v) for k, v in demo["data"].items()},
           "eval": {**demo["eval"], "probes": [str(data / p) for p in demo["eval"]["probes"]]},
           "stages": [{**st, "train": {**st["train"], "max_steps": 2, "bf16": False}} for st in demo["stages"]]}
    for st in exp["stages"]:
        st["train"].pop("epochs", None)
    path = tmp / "quick.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def train_demo(experiment: Path, out: Path) -> Path:
    """Run the experiment with this checkout; return its run folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    print(f"training {experiment.name} with this checkout (not timed) ...", flush=True)
    subprocess.run([sys.executable, "-m", "factlab", "run", str(experiment), "-o", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    (run,) = [p for p in out.iterdir() if (p / "results.json").is_file()]
    return run


def old_source(rev: str, tmp: Path) -> Path:
    """The ``src`` folder of commit ``rev``, extracted into ``tmp``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp / "src"


def evaluate(src: Path, run: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    res = subprocess.run([sys.executable, "-c", WORKER, str(run), str(out)], capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"evaluation with {src} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(old_dir: Path, new_dir: Path, labels: list[str], old_times: dict, new_times: dict) -> list[str]:
    """Differences between the two evaluations' saved rows (empty: they agree)."""
    sys.path.insert(0, str(ROOT / "src"))
    from factlab.experiment.run_folder import RunFolder

    old, new, bad = RunFolder(old_dir), RunFolder(new_dir), []
    for label in labels:
        a_rows, b_rows = old.read_scores(label), new.read_scores(label)
        if [r["id"] for r in a_rows] != [r["id"] for r in b_rows]:
            bad.append(f"{label}: different probes")
            continue
        for a, b in zip(a_rows, b_rows):
            for key in ("target_logprob", "target_mean_logprob"):
                if abs(a[key] - b[key]) > 1e-4:
                    bad.append(f"{label} {a['id']}: {key} {a[key]:.6f} vs {b[key]:.6f}")
            if any(abs(x - y) > 1e-4 for x, y in zip(a["distractor_mean_logprobs"], b["distractor_mean_logprobs"])):
                bad.append(f"{label} {a['id']}: distractor log-probs {a['distractor_mean_logprobs']} vs "
                           f"{b['distractor_mean_logprobs']}")
            for key in ("target_tokens", "target_is_greedy", "correct", "rank", "greedy", "greedy_tokens", "greedy_eos"):
                if a[key] != b[key]:
                    bad.append(f"{label} {a['id']}: {key} {a[key]!r} vs {b[key]!r}")
        a_style, b_style = old.read_style(label), new.read_style(label)
        for a, b in zip(a_style, b_style, strict=True):
            if (a["answer"], a["tokens"], a["eos"]) != (b["answer"], b["tokens"], b["eos"]):
                bad.append(f"{label} style answer to {a['prompt']!r}: {a['answer']!r} vs {b['answer']!r}")
        for name, p in old_times[label]["perplexity"].items():
            q = new_times[label]["perplexity"][name]
            if abs(p["nll_per_token"] - q["nll_per_token"]) > 1e-4 * max(1.0, abs(p["nll_per_token"])):
                bad.append(f"{label} perplexity {name}: {p['nll_per_token']} vs {q['nll_per_token']}")
    return bad


def hit_rate(folder: Path, label: str) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from factlab.experiment.run_folder import RunFolder

    rates = [r["sample_hit_rate"] for r in RunFolder(folder).read_scores(label) if r.get("sample_hit_rate") is not None]
    return f"{statistics.mean(rates):.3f}" if rates else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="A finished demo run folder (default: train the demo first).")
    ap.add_argument("--experiment", type=Path, default=ROOT / "examples" / "demo.yaml",
                    help="The experiment to train when --run is not given.")
    ap.add_argument("--old", default=DEFAULT_OLD, help=f"Commit whose evaluation code is the reference (default {DEFAULT_OLD}).")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="A tiny random model with the demo's data and settings.")
    a = ap.parse_args()
    import torch

    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        experiment = quick_experiment(tmp) if a.quick else a.experiment
        run = a.run or train_demo(experiment, tmp / "runs")
        old_src = old_source(a.old, tmp / "old")
        new_src = ROOT / "src"
        print(f"run: {run}\nold code: {a.old}; new code: {ROOT} (HEAD "
              f"{subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()})")
        times: dict[str, list[dict]] = {"old": [], "new": []}
        for rep in range(a.repeats):
            for code, src in (("old", old_src), ("new", new_src)):
                t = time.perf_counter()
                out = tmp / f"{code}-{rep}"
                times[code].append(evaluate(src, run, out))
                total = sum(x["seconds"] for x in times[code][-1].values())
                print(f"  repeat {rep + 1}: {code} code: {total:.1f} s for the evaluations "
                      f"({time.perf_counter() - t:.0f} s with loading)", flush=True)
        labels = list(times["old"][0])
        bad = compare(tmp / "old-0", tmp / "new-0", labels, times["old"][0], times["new"][0])

        print(f"\n{'evaluation':<16}{'old s':>9}{'new s':>9}{'speed-up':>10}{'old cpu s':>11}{'new cpu s':>11}"
              f"{'hit old':>9}{'hit new':>9}")
        best = {code: {lab: min(r[lab]["seconds"] for r in times[code]) for lab in labels} for code in times}
        cpu = {code: {lab: min(r[lab]["cpu"] for r in times[code]) for lab in labels} for code in times}
        for lab in labels:
            print(f"{lab:<16}{best['old'][lab]:>9.1f}{best['new'][lab]:>9.1f}{best['old'][lab] / best['new'][lab]:>9.1f}x"
                  f"{cpu['old'][lab]:>11.1f}{cpu['new'][lab]:>11.1f}{hit_rate(tmp / 'old-0', lab):>9}{hit_rate(tmp / 'new-0', lab):>9}")
        old_total, new_total = sum(best["old"].values()), sum(best["new"].values())
        print(f"{'all four':<16}{old_total:>9.1f}{new_total:>9.1f}{old_total / new_total:>9.1f}x"
              f"{sum(cpu['old'].values()):>11.1f}{sum(cpu['new'].values()):>11.1f}")
        print("(best of the repeats per evaluation; speed-up = old / new wall time; hit = mean sample hit rate)")
        if bad:
            print(f"\nold and new DISAGREE in {len(bad)} places:")
            for line in bad[:40]:
                print("  " + line)
            sys.exit(1)
        print("\nold and new agree: log-probs within 1e-4, the same greedy answers, style answers and perplexities")


if __name__ == "__main__":
    main()
