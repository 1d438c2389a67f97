"""Issue 11: every bad input (command line, paths, values, sweeps) gets exactly one line on
stderr that names the file, flag or key, exit code 2, no traceback, and leaves every file as it
was (nothing new, nothing lost).

The table runs through the installed entry point `factlab.cli.main()` in subprocesses: a small
driver (tests/bad_input_driver.py) runs a chunk of cases per process, so python and torch are
imported a few times rather than once per case; a few cases also run as `python -m factlab`
alone. Models are tiny random ones saved into the test's folder, never the real model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("bad_input_driver.py")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    return env


# The base experiment: valid; cases change one thing. {lab} is the shared assets folder.
EXP = """name: t
model: {lab}/model
seed: 0
output_dir: out
data:
  corpus: {lab}/docs.txt
  qa: {lab}/qa.jsonl
stages:
  - kind: cpt
    peft: {targets: [attention], r: 2}
    train: {max_steps: 1, batch_size: 1, seq_len: 16, bf16: false}
eval:
  probes: [{lab}/probes.jsonl]
  builtin_general_text: false
"""
SFT = EXP.replace("  - kind: cpt\n", "  - kind: sft\n")


def exp(old: str = "", new: str = "", base: str = EXP, extra: str = "") -> str:
    assert old in base
    return base.replace(old, new, 1) + extra


def sweep(block: str, base: str = EXP) -> str:
    return base + "sweep:\n" + block


PROBE = {"id": "p1", "kind": "recall", "prompt": "The press line is run by", "target": "Marta Ilvane",
         "distractors": ["Jonas Perl"]}
LONG = dict(PROBE, id="long1", prompt="the press line " * 40)
NULL_QA = '{"question": "Who runs it?", "answer": null}\n'
PLAY = "Romeo loves Juliet. Juliet was in love with Romeo.\n"

# --- issue 23 (tune and influence): the base tune experiment, worlds and study files ---------
SELECT = json.dumps(dict(PROBE, id="s1")) + "\n"
TUNE_LR = "    stages.0.train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}\n"
TARGETS = "stages.0.peft.targets"


def tune(space: str = TUNE_LR, extra: str = "", base: str = EXP, **files) -> dict:
    """The files of a tune case: the base experiment with a tune: block (`space` lines under
    tune.space, `extra` lines after it) and its selection probes."""
    block = ("tune:\n  space:\n" + space + "  objectives: [{metric: recall.accuracy}]\n  trials: 1\n"
             "  select_probes: select.jsonl\n" + extra)
    return {"exp.yaml": base + block, "select.jsonl": SELECT, **files}


def optuna_study(choices: list, directions: tuple = ("maximize",)):
    """A builder of study `t` in a SQLite file, with one finished trial whose categorical
    tune.space.stages.0.peft.targets had `choices` (encoded as experiment.tune does: JSON text)."""

    def build(path: Path) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=f"sqlite:///{path}", study_name="t", directions=list(directions))
        dist = CategoricalDistribution([json.dumps(c) for c in choices])
        study.add_trial(optuna.trial.create_trial(params={TARGETS: json.dumps(choices[0])}, distributions={TARGETS: dist},
                                                  values=[0.5] * len(directions)))

    return build


def other_sqlite(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()


def world(summary: str = '{"kind": "world", "lang": "en"}', facts: str | None = None, **extra) -> dict:
    """An LLM influence experiment over a synth world folder `w` (files as given)."""
    probes = "".join(json.dumps({"id": f"f{i}-recall", "fact": f"f{i}", "kind": "recall", "prompt": f"The press line {i} is run by",
                                 "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n" for i in (1, 2))
    if facts is None:
        facts = "".join(json.dumps({"id": f"f{i}", "subject": f"line {i}", "relation": "runs", "object": "Marta Ilvane"}) + "\n"
                        for i in (1, 2))
    exp_text = ("name: inf\nmodel: {lab}/model\noutput_dir: out\ninfluence:\n  samples: {world: w, kinds: [recall]}\n"
                "  in_context: false\n  bootstrap: 10\n")
    return {"exp.yaml": exp_text, "w/world.json": summary, "w/facts.jsonl": facts, "w/probes.jsonl": probes, **extra}


DIGITS = "name: d\ninfluence:\n  task: digits\n  digits: {per_class: 1, pretrain_epochs: 1, noise: [{}]}\n"


# (id, args, names: substrings the one stderr line must contain, files to create in the case's
#  own folder; optional 5th: substrings it must not contain)
CASES: list[tuple] = [
    # 1. the command line itself
    ("u-unknown-command", ["frobnicate"], ["frobnicate"], {}),
    ("u-run-no-file", ["run"], ["experiment"], {}),
    ("u-run-unknown-option", ["run", "exp.yaml", "--lr", "1"], ["--lr"], {"exp.yaml": EXP}),
    ("u-synth-facts-not-int", ["data", "synth", "--facts", "x", "-o", "w"], ["--facts"], {}),
    ("u-synth-no-out", ["data", "synth"], ["--out"], {}),
    ("u-dry-run-value", ["sweep", "exp.yaml", "--dry-run", "true"], ["true"], {"exp.yaml": EXP}),
    ("u-set-no-value", ["run", "exp.yaml", "--set"], ["--set"], {"exp.yaml": EXP}),
    ("u-data-unknown", ["data", "frobnicate"], ["frobnicate"], {}),
    ("u-compare-no-args", ["compare"], ["run_dirs"], {}),
    ("u-eval-no-args", ["eval"], ["model_or_run"], {}),
    ("u-report-format-no-value", ["report", "{lab}/run", "--format"], ["--format"], {}),
    ("u-runs-unknown-option", ["runs", "--bogus"], ["--bogus"], {}),
    ("u-eval-samples-not-int", ["eval", "{lab}/model", "--samples", "many"], ["--samples"], {}),
    ("u-check-corpus-no-value", ["data", "check", "--corpus"], ["--corpus"], {}),
    ("u-run-o-no-value", ["run", "exp.yaml", "-o"], ["-o"], {"exp.yaml": EXP}),
    ("u-synth-seed-float", ["data", "synth", "-o", "w", "--seed", "1.5"], ["--seed"], {}),
    ("u-check-strict-value", ["data", "check", "--corpus", "play.txt", "--strict", "yes"], ["yes"], {"play.txt": PLAY}),
    # 2. paths and files
    ("p-run-out-is-file", ["run", "exp.yaml", "-o", "afile"], ["afile"], {"exp.yaml": EXP, "afile": "x"}),
    ("p-run-store-is-folder", ["run", "exp.yaml", "--store", "adir"], ["adir"], {"exp.yaml": EXP, "adir/": None}),
    ("p-run-store-is-text", ["run", "exp.yaml", "--store", "notes.txt"], ["notes.txt"], {"exp.yaml": EXP, "notes.txt": "hello"}),
    ("p-runs-store-text", ["runs", "--store", "notes.txt"], ["notes.txt"], {"notes.txt": "hello"}),
    ("p-runs-store-folder", ["runs", "--store", "adir"], ["adir"], {"adir/": None}),
    ("p-runs-store-missing", ["runs", "--store", "none.db"], ["none.db"], {}),
    ("p-report-out-folder", ["report", "{lab}/run", "-o", "adir"], ["adir"], {"adir/": None}),
    ("p-report-out-under-file", ["report", "{lab}/run", "-o", "afile/r.html"], ["afile"], {"afile": "x"}),
    ("p-compare-truncated", ["compare", "trunc"], ["results.json"], {"trunc/results.json": '{"summaries": {"base": {"rec'}),
    ("p-compare-wrong-shape", ["compare", "shape"], ["results.json"], {"shape/results.json": "[1, 2]"}),
    ("p-compare-summaries-list", ["compare", "shape"], ["results.json"], {"shape/results.json": '{"summaries": [1]}'}),
    ("p-report-truncated", ["report", "trunc", "-o", "r.html"], ["results.json"], {"trunc/results.json": '{"summ'}),
    ("p-compare-no-results", ["compare", "adir"], ["adir"], {"adir/": None}),
    ("p-compare-missing", ["compare", "missing_dir"], ["missing_dir"], {}),
    ("p-report-unknown-sweep", ["report", "nosuch-sweep"], ["nosuch-sweep"], {}),
    ("p-substitute-probes-out-folder", ["data", "substitute", "play.txt", "--map", "Romeo=Bob", "-o", "out.txt",
                                        "--probes-about", "Juliet was in love with", "--probes-out", "adir"],
     ["--probes-out"], {"play.txt": PLAY, "adir/": None}),
    ("p-substitute-probes-out-alone", ["data", "substitute", "play.txt", "--map", "Romeo=Bob", "-o", "out.txt",
                                       "--probes-out", "p.jsonl"], ["--probes-out"], {"play.txt": PLAY}),
    ("p-substitute-missing-corpus", ["data", "substitute", "missing.txt", "--map", "A=B", "-o", "o.txt"], ["missing.txt"], {}),
    ("p-substitute-out-exists", ["data", "substitute", "play.txt", "--map", "Romeo=Bob", "-o", "existing.txt"],
     ["existing.txt"], {"play.txt": PLAY, "existing.txt": "keep me"}),
    ("p-substitute-folder-to-file", ["data", "substitute", "plays", "--map", "Romeo=Bob", "-o", "afile"], ["afile"],
     {"plays/a.txt": PLAY, "afile": "keep"}),
    ("p-substitute-out-is-input", ["data", "substitute", "play.txt", "--map", "Romeo=Bob", "-o", "play.txt"], ["play.txt"],
     {"play.txt": PLAY}),
    ("p-check-min-chars", ["data", "check", "--corpus", "play.txt", "--min-chars", "-1"], ["--min-chars"], {"play.txt": PLAY}),
    ("p-check-tokenizer-empty-folder", ["data", "check", "--corpus", "play.txt", "--tokenizer", "adir"], ["--tokenizer"],
     {"play.txt": PLAY, "adir/": None}),
    ("p-check-tokenizer-junk", ["data", "check", "--corpus", "play.txt", "--tokenizer", "tk"], ["--tokenizer"],
     {"play.txt": PLAY, "tk/tokenizer_config.json": "{not json", "tk/tokenizer.json": "nope"}),
    ("p-check-tokenizer-file", ["data", "check", "--corpus", "play.txt", "--tokenizer", "play.txt"], ["--tokenizer"],
     {"play.txt": PLAY}),
    ("p-check-corpus-missing", ["data", "check", "--corpus", "missing.txt"], ["missing.txt"], {}, ["experiment file"]),
    ("p-check-qa-missing", ["data", "check", "--qa", "missing.jsonl"], ["missing.jsonl"], {}, ["experiment file"]),
    ("p-check-empty-folder", ["data", "check", "--corpus", "adir"], ["adir"], {"adir/": None}),
    ("p-eval-out-folder", ["eval", "{lab}/model", "--probes", "{lab}/probes.jsonl", "-o", "adir"], ["adir"], {"adir/": None}),
    ("p-eval-no-model", ["eval", "./nomodel", "--probes", "{lab}/probes.jsonl"], ["nomodel"], {}),
    ("p-eval-probes-missing", ["eval", "{lab}/model", "--probes", "missing.jsonl"], ["missing.jsonl"], {}),
    ("p-eval-probes-folder", ["eval", "{lab}/model", "--probes", "adir"], ["adir"], {"adir/": None}),
    ("p-eval-general-text-missing", ["eval", "{lab}/model", "--probes", "{lab}/probes.jsonl", "--general-text", "gone.txt"],
     ["gone.txt"], {}),
    ("p-eval-in-context-missing", ["eval", "{lab}/model", "--probes", "{lab}/probes.jsonl", "--in-context", "gone.txt"],
     ["gone.txt"], {}),
    ("p-run-folder-as-experiment", ["run", "adir"], ["adir", "folder"], {"adir/": None}),
    ("p-run-missing-brackets", ["run", "exp[v2].yaml"], ["exp[v2].yaml"], {}),
    ("p-run-corpus-missing", ["run", "exp.yaml"], ["nothere.txt"], {"exp.yaml": exp("{lab}/docs.txt", "nothere.txt")},
     ["experiment file"]),
    ("p-run-output-dir-file", ["run", "exp.yaml"], ["afile"], {"exp.yaml": exp("output_dir: out", "output_dir: afile"),
                                                                "afile": "x"}),
    ("p-synth-out-file", ["data", "synth", "-o", "afile"], ["afile"], {"afile": "keep"}),
    ("p-synth-out-not-empty", ["data", "synth", "-o", "full"], ["full"], {"full/mine.txt": "keep me"}),
    ("p-sweep-out-file", ["sweep", "exp.yaml", "-o", "afile"], ["afile"],
     {"exp.yaml": sweep("  stages.0.train.lr: [1.0e-3, 2.0e-3]\n"), "afile": "x"}),
    ("p-synth-name-too-long", ["data", "synth", "--facts", "3", "-o", "a" * 300], ["too long"], {}),
    ("p-run-name-too-long", ["run", "a" * 300 + ".yaml"], ["too long"], {}),
    ("p-run-model-missing", ["run", "exp.yaml"], ["nomodel"], {"exp.yaml": exp("{lab}/model", "./nomodel")}),
    ("p-run-model-folder-empty", ["run", "exp.yaml"], ["adir"], {"exp.yaml": exp("{lab}/model", "adir"), "adir/": None}),
    # 3. values accepted silently before
    ("v-lr-true", ["run", "exp.yaml"], ["lr"], {"exp.yaml": exp("max_steps: 1,", "max_steps: 1, lr: true,")}),
    ("v-set-epochs-yes", ["run", "exp.yaml", "--set", "stages.0.train.epochs=yes"], ["epochs", "--set"], {"exp.yaml": EXP}),
    ("v-set-lr-word", ["run", "exp.yaml", "--set", "stages.0.train.lr=abc"], ["lr"], {"exp.yaml": EXP}),
    ("v-duplicate-stages", ["run", "exp.yaml"], ["stages"], {"exp.yaml": EXP + "stages:\n  - kind: sft\n"}),
    ("v-duplicate-nested", ["run", "exp.yaml"], ["lr"], {"exp.yaml": exp("max_steps: 1,", "lr: 1.0e-3, max_steps: 1, lr: 2.0e-3,")}),
    ("v-r-float", ["run", "exp.yaml"], ["r"], {"exp.yaml": exp("r: 2", "r: 1.5")}),
    ("v-seed-bool", ["run", "exp.yaml"], ["seed"], {"exp.yaml": exp("seed: 0", "seed: true")}),
    ("v-batch-size-string", ["run", "exp.yaml"], ["batch_size"], {"exp.yaml": exp("batch_size: 1", 'batch_size: "8"')}),
    ("v-epochs-string", ["run", "exp.yaml"], ["epochs"], {"exp.yaml": exp("max_steps: 1,", 'epochs: "3",')}),
    ("v-lr-inf", ["run", "exp.yaml"], ["lr"], {"exp.yaml": exp("max_steps: 1,", "max_steps: 1, lr: .inf,")}),
    ("v-merge-word", ["run", "exp.yaml"], ["merge"], {"exp.yaml": exp("    train:", "    merge: sometimes\n    train:")}),
    ("v-qa-answer-null-check", ["data", "check", "--qa", "qa.jsonl"], ["answer", "qa.jsonl"], {"qa.jsonl": NULL_QA}),
    ("v-qa-answer-null-run", ["run", "exp.yaml"], ["answer"], {"exp.yaml": exp("{lab}/qa.jsonl", "qa.jsonl", base=SFT),
                                                               "qa.jsonl": NULL_QA}),
    ("v-qa-question-null", ["data", "check", "--qa", "qa.jsonl"], ["question"], {"qa.jsonl": '{"question": null, "answer": "x"}\n'}),
    ("v-qa-messages-content-null", ["data", "check", "--qa", "qa.jsonl"], ["messages"],
     {"qa.jsonl": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}\n'}),
    ("v-corpus-nul", ["data", "check", "--corpus", "nul.txt"], ["nul.txt"], {"nul.txt": "\0\0\0\0"}),
    ("v-corpus-nul-jsonl", ["data", "check", "--corpus", "c.jsonl"], ["c.jsonl"], {"c.jsonl": '{"text": "a"}\n\0\0\n'}),
    ("v-corpus-text-not-string", ["data", "check", "--corpus", "c.jsonl"], ["text"], {"c.jsonl": '{"text": 5}\n'}),
    ("v-corpus-not-utf8", ["data", "check", "--corpus", "c.txt"], ["c.txt"], {"c.txt": b"\xff\xfe\xfa bad"}),
    ("v-probes-nul", ["data", "check", "--probes", "p.jsonl"], ["p.jsonl"], {"p.jsonl": "\0" * 8}),
    ("v-compare-stage-typo", ["compare", "{lab}/run", "--stage", "cptt"], ["cptt"], {}),
    ("v-report-probe-unknown", ["report", "{lab}/run", "-o", "r.html", "--probe", "nope"], ["nope"], {}),
    ("v-report-format", ["report", "{lab}/run", "-o", "r.html", "--format", "pdf"], ["pdf"], {}),
    ("v-runs-status", ["runs", "--status", "finished"], ["finished"], {}),
    ("v-probes-about-unknown-name", ["data", "substitute", "play.txt", "--map", "Romeo=Bob", "-o", "o.txt",
                                     "--probes-about", "Tybalt=Juliet was in love with"], ["Tybalt"], {"play.txt": PLAY}),
    ("v-map-no-equals", ["data", "substitute", "play.txt", "--map", "Romeo", "-o", "o.txt"], ["--map"], {"play.txt": PLAY}),
    ("v-synth-facts-zero", ["data", "synth", "-o", "w", "--facts", "0"], ["--facts"], {}, ["n_facts"]),
    ("v-synth-paraphrases", ["data", "synth", "-o", "w", "--paraphrases", "0"], ["--paraphrases"], {}),
    ("v-synth-heldout", ["data", "synth", "-o", "w", "--heldout", "1.5"], ["--heldout"], {}),
    ("v-synth-lang", ["data", "synth", "-o", "w", "--lang", "xx"], ["--lang"], {}),
    ("v-synth-kind", ["data", "synth", "-o", "w", "--kind", "tree"], ["--kind"], {}),
    ("v-eval-samples", ["eval", "{lab}/model", "--probes", "{lab}/probes.jsonl", "--samples", "-1"], ["--samples"], {},
     ["bad option: n"]),
    ("v-eval-temperature", ["eval", "{lab}/model", "--probes", "{lab}/probes.jsonl", "--temperature", "0"], ["--temperature"], {}),
    ("v-eval-batch-size", ["eval", "{lab}/model", "--probes", "{lab}/probes.jsonl", "--batch-size", "0"], ["--batch-size"], {}),
    ("v-check-max-len-zero", ["data", "check", "--corpus", "play.txt", "--max-len", "0"], ["--max-len"], {"play.txt": PLAY}),
    ("v-check-show", ["data", "check", "--corpus", "play.txt", "--show", "-1"], ["--show"], {"play.txt": PLAY}),
    ("v-probe-target-null", ["data", "check", "--probes", "p.jsonl"], ["target"], {"p.jsonl": json.dumps(dict(PROBE, target=None))}),
    ("v-probe-malformed", ["data", "check", "--probes", "p.jsonl"], ["p.jsonl"], {"p.jsonl": '{"id": "p1", '}),
    # 4. sweeps: every point checked before the first runs, and in --dry-run
    ("s-dry-run-bad-group", ["sweep", "exp.yaml", "--dry-run"], ["attn"],
     {"exp.yaml": sweep("  stages.0.peft.targets: [[attention], [attn]]\n")}),
    ("s-bad-group", ["sweep", "exp.yaml"], ["attn"], {"exp.yaml": sweep("  stages.0.peft.targets: [[attention], [attn]]\n")}),
    ("s-dry-run-bad-layers", ["sweep", "exp.yaml", "--dry-run"], ["0-9"], {"exp.yaml": sweep('  stages.0.peft.layers: ["0", "0-9"]\n')}),
    ("s-bad-layers", ["sweep", "exp.yaml"], ["0-9"], {"exp.yaml": sweep('  stages.0.peft.layers: ["0", "0-9"]\n')}),
    ("s-dry-run-missing-data", ["sweep", "exp.yaml", "--dry-run"], ["missing.txt"],
     {"exp.yaml": sweep("  data.corpus: [[docs.txt], [missing.txt]]\n"), "docs.txt": PLAY}),
    ("s-missing-data", ["sweep", "exp.yaml"], ["missing.txt"],
     {"exp.yaml": sweep("  data.corpus: [[docs.txt], [missing.txt]]\n"), "docs.txt": PLAY}),
    ("s-bad-key", ["sweep", "exp.yaml", "--dry-run"], ["lrr", "sweep"], {"exp.yaml": sweep("  stages.0.train.lrr: [1.0e-3]\n")},
     ["--set"]),
    ("s-bad-index", ["sweep", "exp.yaml", "--dry-run"], ["stages.5", "sweep"], {"exp.yaml": sweep("  stages.5.train.lr: [1.0e-3]\n")},
     ["--set"]),
    ("s-bool-value", ["sweep", "exp.yaml", "--dry-run"], ["lr"], {"exp.yaml": sweep("  stages.0.train.lr: [1.0e-3, true]\n")}),
    ("s-no-block", ["sweep", "exp.yaml", "--dry-run"], ["sweep", "[values]"], {"exp.yaml": EXP}),
    ("s-not-a-list", ["sweep", "exp.yaml", "--dry-run"], ["[1.0e-4, 5.0e-4]"], {"exp.yaml": sweep("  stages.0.train.lr: 1.0e-3\n")}),
    ("s-repeat-bool", ["sweep", "exp.yaml", "--dry-run"], ["repeat"], {"exp.yaml": sweep("  repeat: true\n")}),
    ("s-sft-no-chat-template", ["sweep", "exp.yaml", "--dry-run"], ["chat template"],
     {"exp.yaml": sweep("  stages.0.train.lr: [1.0e-3]\n", base=SFT).replace("{lab}/model", "{lab}/model-nochat")}),
    # 5. messages
    ("m-brackets-in-name", ["run", "exp[v2].yaml"], ["exp[v2].yaml", "lrr"], {"exp[v2].yaml": exp("max_steps: 1,", "lrr: 1,")}),
    ("m-set-typo", ["run", "exp.yaml", "--set", "stages.0.train.lrr=1"], ["--set", "lrr"], {"exp.yaml": EXP}, ["in exp.yaml"]),
    ("m-set-not-index", ["run", "exp.yaml", "--set", "stages.x.train.lr=1"], ["--set", "stages.x"], {"exp.yaml": EXP}),
    ("m-run-name-rule", ["run", "exp.yaml"], ["letters, digits"], {"exp.yaml": exp("name: t", "name: my run")}, ["^[", "pattern"]),
    ("m-probe-key-typo", ["data", "check", "--probes", "p.jsonl"], ["targt", "unknown"],
     {"p.jsonl": json.dumps({k if k != "target" else "targt": v for k, v in PROBE.items()})}),
    ("m-unknown-key", ["run", "exp.yaml"], ["stages.0.train.lrr"], {"exp.yaml": exp("max_steps: 1,", "lrr: 1,")}),
    ("m-malformed-yaml", ["run", "exp.yaml"], ["exp.yaml", "line"], {"exp.yaml": "name: [t\nmodel: x\n"}),
    ("m-yaml-not-mapping", ["run", "exp.yaml"], ["exp.yaml"], {"exp.yaml": "- a\n- b\n"}),
    ("m-empty-experiment", ["run", "exp.yaml"], ["exp.yaml"], {"exp.yaml": ""}),
    ("m-missing-model-key", ["run", "exp.yaml"], ["model"], {"exp.yaml": "name: t\n"}),
    # 7. smaller items, and what already worked
    ("x-probe-longer-than-context-eval", ["eval", "{lab}/model-short", "--probes", "long.jsonl"], ["long1"],
     {"long.jsonl": json.dumps(LONG)}),
    ("x-probe-longer-than-context-run", ["run", "exp.yaml"], ["long1"],
     {"exp.yaml": exp("{lab}/probes.jsonl", "long.jsonl").replace("{lab}/model", "{lab}/model-short"),
      "long.jsonl": json.dumps(LONG)}),
    ("x-no-chat-template", ["run", "exp.yaml"], ["chat template"], {"exp.yaml": exp("{lab}/model", "{lab}/model-nochat", base=SFT)}),
    ("x-unknown-layer-group", ["run", "exp.yaml"], ["attn"], {"exp.yaml": exp("targets: [attention]", "targets: [attn]")}),
    ("x-layer-range", ["run", "exp.yaml"], ["0-9"], {"exp.yaml": exp("r: 2}", 'r: 2, layers: "0-9"}')}),
    ("x-empty-corpus", ["run", "exp.yaml"], ["empty"], {"exp.yaml": exp("{lab}/docs.txt", "empty.txt"), "empty.txt": "  \n"}),
    ("x-empty-target", ["data", "check", "--probes", "p.jsonl"], ["target"], {"p.jsonl": json.dumps(dict(PROBE, target=" "))}),
    ("x-prompt-method-not-last", ["run", "exp.yaml"], ["prompt_tuning"],
     {"exp.yaml": exp("    peft: {targets: [attention], r: 2}", "    peft: {method: prompt_tuning}").replace(
         "eval:", "  - kind: cpt\n    train: {max_steps: 1, bf16: false}\neval:")}),
    ("x-in-context-no-corpus", ["run", "exp.yaml"], ["in_context"],
     {"exp.yaml": exp("  corpus: {lab}/docs.txt\n", "", base=SFT).replace("  builtin_general_text: false",
                                                                         "  builtin_general_text: false\n  in_context: true")}),
    # --- issue 23, round two: tune and influence ---
    # the search space: what Optuna accepts, checked before the study file exists
    ("t-log-with-step", ["tune", "exp.yaml"], ["tune.space.stages.0.train.lr", "log", "step"],
     tune("    stages.0.train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true, step: 1.0e-4}\n")),
    ("t-int-step-fraction", ["tune", "exp.yaml"], ["max_steps", "whole-number step"],
     tune("    stages.0.train.max_steps: {type: int, low: 1, high: 3, step: 0.5}\n")),
    ("t-step-negative", ["tune", "exp.yaml"], ["step must be above 0"],
     tune("    stages.0.train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, step: -1.0e-4}\n")),
    ("t-step-zero", ["tune", "exp.yaml"], ["step must be above 0"],
     tune("    stages.0.peft.r: {type: int, low: 1, high: 4, step: 0}\n")),
    ("t-step-not-dividing", ["tune", "exp.yaml"], ["multiple of step"],
     tune("    stages.0.train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, step: 4.0e-4}\n")),
    ("t-int-log-step", ["tune", "exp.yaml"], ["log", "step"],
     tune("    stages.0.peft.r: {type: int, low: 1, high: 9, log: true, step: 2}\n")),
    ("t-low-equals-high", ["tune", "exp.yaml"], ["low < high"],
     tune("    stages.0.train.lr: {type: float, low: 1.0e-3, high: 1.0e-3}\n")),
    ("t-categorical-with-low", ["tune", "exp.yaml"], ["categorical", "low"],
     tune(f"    {TARGETS}: {{type: categorical, choices: [[attention]], low: 1}}\n")),
    ("t-float-with-choices", ["tune", "exp.yaml"], ["choices", "categorical"],
     tune("    stages.0.train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, choices: [1.0e-4]}\n")),
    ("t-choice-twice", ["tune", "exp.yaml"], ["lora", "twice"],
     tune("    stages.0.peft.method: {type: categorical, choices: [lora, lora]}\n")),
    # every choice against the architecture (meta device), the data files and the schema
    ("t-choice-unknown-group", ["tune", "exp.yaml"], [f"tune.space.{TARGETS}", "attn"],
     tune(f"    {TARGETS}: {{type: categorical, choices: [[attention], [attn]]}}\n")),
    ("t-choice-bad-layers", ["tune", "exp.yaml"], ["tune.space.stages.0.peft.layers", "0-9"],
     tune('    stages.0.peft.layers: {type: categorical, choices: ["0", "0-9"]}\n')),
    ("t-choice-bad-method", ["tune", "exp.yaml"], ["lorax", "tune"],
     tune("    stages.0.peft.method: {type: categorical, choices: [lora, lorax]}\n")),
    ("t-choice-missing-corpus", ["tune", "exp.yaml"], ["missing.txt"],
     tune("    data.corpus: {type: categorical, choices: [[docs.txt], [missing.txt]]}\n", **{"docs.txt": PLAY})),
    ("t-seed-negative", ["tune", "exp.yaml"], ["tune.seed"], tune(extra="  seed: -1\n")),
    ("t-experiment-seed-negative", ["tune", "exp.yaml"], ["seed", "-1"], tune(base=exp("seed: 0", "seed: -1"))),
    ("t-seed-huge", ["tune", "exp.yaml"], ["tune.seed"], tune(extra="  seed: 1.0e+26\n")),
    # enqueued starting points inside their space
    ("t-enqueue-outside", ["tune", "exp.yaml"], ["tune.enqueue.0", "5.0", "outside"],
     tune(extra="  enqueue: [{stages.0.train.lr: 5.0}]\n")),
    ("t-enqueue-not-a-choice", ["tune", "exp.yaml"], ["tune.enqueue.0", "lm_head"],
     tune(f"    {TARGETS}: {{type: categorical, choices: [[attention], [mlp]]}}\n",
          extra=f"  enqueue: [{{{TARGETS}: [lm_head]}}]\n")),
    ("t-enqueue-int-fraction", ["tune", "exp.yaml"], ["tune.enqueue.0", "2.5"],
     tune("    stages.0.peft.r: {type: int, low: 1, high: 4}\n", extra="  enqueue: [{stages.0.peft.r: 2.5}]\n")),
    # messages: a tune.space key is blamed on tune.space, not on a --set nobody gave
    ("t-space-unknown-stage", ["tune", "exp.yaml"], ["tune.space", "stages.5"],
     tune("    stages.5.train.lr: {type: float, low: 1.0e-4, high: 1.0e-3}\n"), ["--set"]),
    ("t-space-key-typo", ["tune", "exp.yaml"], ["lrr", "tune"],
     tune("    stages.0.train.lrr: {type: float, low: 1.0e-4, high: 1.0e-3}\n"), ["--set"]),
    ("t-space-key-cyrillic", ["tune", "exp.yaml"], ["non-ASCII", "U+0430"],
     tune("    stages.0.peft.\u0430lpha: {type: float, low: 1, high: 8}\n"), ["--set"]),
    ("m-key-cyrillic", ["run", "exp.yaml"], ["n\u0430me", "non-ASCII letter", "U+0430"],
     {"exp.yaml": exp("name: t", "n\u0430me: t")}),
    ("m-nested-key-cyrillic", ["run", "exp.yaml"], ["m\u0430x_steps", "non-ASCII"],
     {"exp.yaml": exp("max_steps: 1,", "m\u0430x_steps: 1,")}),
    ("m-set-key-cyrillic", ["run", "exp.yaml", "--set", "stages.0.train.l\u0433=1"], ["--set", "non-ASCII"], {"exp.yaml": EXP}),
    # the study storage: not a database, another database, or a study started with other choices
    ("t-study-text-file", ["tune", "exp.yaml"], ["t-optuna.db", "not an Optuna study storage"],
     tune(**{"out/t-optuna.db": "my notes"})),
    ("t-study-folder", ["tune", "exp.yaml"], ["t-optuna.db", "folder"], tune(**{"out/t-optuna.db/": None})),
    ("t-study-other-sqlite", ["tune", "exp.yaml"], ["another SQLite database"], tune(**{"out/t-optuna.db": other_sqlite})),
    ("t-study-edited-choices", ["tune", "exp.yaml"], [f"tune.space.{TARGETS}", "'mlp'", "--study-name"],
     tune(f"    {TARGETS}: {{type: categorical, choices: [[attention], [lm_head]]}}\n",
          **{"out/t-optuna.db": optuna_study([["attention"], ["mlp"]])})),
    ("t-study-other-objectives", ["tune", "exp.yaml"], ["objectives"],
     tune(f"    {TARGETS}: {{type: categorical, choices: [[attention], [mlp]]}}\n",
          **{"out/t-optuna.db": optuna_study([["attention"], ["mlp"]], ("maximize", "minimize"))})),
    ("t-storage-text-file", ["tune", "exp.yaml", "--storage", "sqlite:///notes.txt"], ["--storage", "notes.txt"],
     tune(**{"notes.txt": "my notes"})),
    ("t-storage-folder", ["tune", "exp.yaml", "--storage", "sqlite:///adir"], ["--storage", "adir", "folder"],
     tune(**{"adir/": None})),
    ("t-storage-edited-choices", ["tune", "exp.yaml", "--storage", "sqlite:///s.db", "--study-name", "t"],
     [f"tune.space.{TARGETS}", "s.db"],
     tune(f"    {TARGETS}: {{type: categorical, choices: [[mlp], [attention]]}}\n",
          **{"s.db": optuna_study([["attention"], ["mlp"]])})),
    ("t-trials-folder-is-file", ["tune", "exp.yaml"], ["is a file", "--study-name"], tune(**{"out/t": "x"})),
    # influence: a strict schema for the digits task, and a world that cannot be read
    ("i-digits-unknown-top-key", ["influence", "exp.yaml"], ["modell", "unknown key"],
     {"exp.yaml": DIGITS + "modell: x\n"}),
    ("i-digits-influence-lr", ["influence", "exp.yaml"], ["influence.lr"],
     {"exp.yaml": DIGITS.replace("  task: digits\n", "  task: digits\n  lr: -1\n")}),
    ("i-digits-name-slash", ["influence", "exp.yaml"], ["a/b", "letters, digits"], {"exp.yaml": DIGITS.replace("name: d", "name: a/b")}),
    ("i-digits-seed-negative", ["influence", "exp.yaml"], ["influence.digits.seed"],
     {"exp.yaml": DIGITS.replace("noise: [{}]", "noise: [{}], seed: -1")}),
    ("i-digits-seed-bool", ["influence", "exp.yaml"], ["influence.digits.seed"],
     {"exp.yaml": DIGITS.replace("noise: [{}]", "noise: [{}], seed: true")}),
    ("i-digits-block-list", ["influence", "exp.yaml"], ["influence.digits"],
     {"exp.yaml": DIGITS.replace("{per_class: 1, pretrain_epochs: 1, noise: [{}]}", "[1, 2]")}),
    ("i-task-typo", ["influence", "exp.yaml"], ["influence.task", "digit"], {"exp.yaml": DIGITS.replace("task: digits", "task: digit")}),
    ("i-world-json-broken", ["influence", "exp.yaml"], ["world.json", "JSON"], world("{not json")),
    ("i-world-json-list", ["influence", "exp.yaml"], ["world.json"], world("[1, 2]")),
    ("i-world-kind-unknown", ["influence", "exp.yaml"], ["world.json", "tree"], world('{"kind": "tree"}')),
    ("i-chain-facts-empty", ["influence", "exp.yaml"], ["facts.jsonl", "no facts"], world('{"kind": "chain"}', facts="")),
    ("i-world-fact-no-subject", ["influence", "exp.yaml"], ["facts.jsonl", "subject"],
     world('{"kind": "chain"}', facts='{"id": "f1", "relation": "causes", "object": "B"}\n')),
    ("i-llm-lr-negative", ["influence", "exp.yaml"], ["influence.lr"], {**world(), "exp.yaml": world()["exp.yaml"] + "  lr: -1\n"}),
    ("i-llm-task-with-samples", ["influence", "exp.yaml"], ["influence.task"],
     {**world(), "exp.yaml": world()["exp.yaml"] + "  task: llm\n"}),
]

# Cases that must succeed (not counted as bad input): the other side of the rules above.
GOOD: list[tuple] = [
    ("ok-bom-corpus-qa-probes", ["data", "check", "--corpus", "c.txt", "--qa", "qa.jsonl", "--probes", "p.jsonl"],
     ["no warnings"], {"c.txt": "\ufeffMarta runs the press line.\n", "qa.jsonl": '\ufeff{"question": "q?", "answer": "a."}\n',
                       "p.jsonl": "\ufeff" + json.dumps(PROBE) + "\n"}),
    ("ok-bom-experiment", ["sweep", "exp.yaml", "--dry-run"], ["2 runs"], {"exp.yaml": "\ufeff" + sweep("  stages.0.train.lr: [1e-3, 2e-3]\n")}),
    ("ok-large-world-says-corpus-jsonl", ["data", "synth", "--facts", "600", "-o", "w"], ["corpus.jsonl"], {}),
]


def _materialize(lab: Path, cases: list[tuple]) -> list[dict]:
    out = []
    for case in cases:
        cid, args, _, files = case[:4]
        cwd = lab / "cases" / cid
        cwd.mkdir(parents=True)
        for rel, content in files.items():
            p = cwd / rel
            if rel.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):  # a file the test builds (e.g. an Optuna study database)
                content(p)
            elif isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content.replace("{lab}", str(lab)), encoding="utf-8")
        out.append({"id": cid, "cwd": str(cwd), "args": [a.replace("{lab}", str(lab)) for a in args]})
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """Shared assets: tiny models (one with a 16-token context, one without a chat template),
    valid data files, and a run folder as `factlab run` writes it (results and scores)."""
    from factlab.testing import tiny_model, tiny_tokenizer

    lab = tmp_path_factory.mktemp("lab")
    tok = tiny_tokenizer()
    for name, kw, chat in (("model", {}, True), ("model-short", {"max_position_embeddings": 16}, True),
                           ("model-nochat", {}, False)):
        t = tiny_tokenizer(chat_template=chat)
        tiny_model("llama", vocab_size=len(tok), **kw).save_pretrained(lab / name)
        t.save_pretrained(lab / name)
    (lab / "docs.txt").write_text("Marta Ilvane runs the press line. Jonas Perl leads the night shift.\n")
    (lab / "qa.jsonl").write_text(json.dumps({"question": "Who runs the press line?", "answer": "Marta Ilvane."}) + "\n")
    (lab / "probes.jsonl").write_text(json.dumps(PROBE) + "\n")
    run = lab / "run"
    (run / "scores").mkdir(parents=True)
    summary = {"recall": {"n": 1, "accuracy": {"rate": 1.0, "low": 0.2, "high": 1.0, "k": 1, "n": 1}}}
    (run / "results.json").write_text(json.dumps({"name": "t", "model": str(lab / "model"), "seed": 0, "stages": [],
                                                  "summaries": {"base": summary, "cpt": summary}, "perplexity": {},
                                                  "forgetting": {}, "style": {}}))
    (run / "config.yaml").write_text(EXP.replace("{lab}", str(lab)))
    for st in ("base", "cpt"):
        (run / "scores" / f"{st}.jsonl").write_text(json.dumps({"id": "p1", "kind": "recall", "correct": True}) + "\n")
    return lab


def _run_driver(lab: Path, cases: list[tuple], chunks: int = 2) -> dict[str, dict]:
    """Run the cases in `chunks` driver processes in parallel; results by case id."""
    import tempfile

    payloads = _materialize(lab, cases)
    procs = []
    io_dir = Path(tempfile.mkdtemp(prefix="bad-input-io"))  # outside the lab: not part of any snapshot
    for i in range(chunks):
        part = payloads[i::chunks]
        cfile, rfile = io_dir / f"cases-{i}.json", io_dir / f"results-{i}.json"
        cfile.write_text(json.dumps({"root": str(lab), "cases": part}))
        procs.append((subprocess.Popen([sys.executable, str(DRIVER), str(cfile), str(rfile)], env=_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cfile, rfile))
    results = {}
    for proc, cfile, rfile in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"driver failed: {err[-3000:]}"
        for r in json.loads(rfile.read_text()):
            results[r["id"]] = r
        cfile.unlink()
        rfile.unlink()
    return results


@pytest.fixture(scope="module")
def outcomes(lab) -> dict[str, dict]:
    return _run_driver(lab, CASES + GOOD)


def test_the_table_covers_the_issue():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 95
    for prefix in ("u-", "p-", "v-", "s-", "m-", "x-"):
        assert any(i.startswith(prefix) for i in ids), prefix


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(outcomes, case):
    cid, names, forbidden = case[0], case[2], case[4] if len(case) > 4 else []
    r = outcomes[cid]
    assert r["traceback"] is None, r["traceback"]
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["code"] == 2, (r["code"], r["stderr"][-2000:])
    assert len(lines) == 1, r["stderr"]
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in r["stderr"] + r["stdout"]
    for name in names:
        assert name.lower() in line.lower(), (name, line)
    for bad in forbidden:
        assert bad not in line, (bad, line)
    # nothing new, nothing removed, every existing file byte-identical
    assert r["changed"] == [], r["changed"]


@pytest.mark.parametrize("case", GOOD, ids=[c[0] for c in GOOD])
def test_the_accepted_side(outcomes, lab, case):
    r = outcomes[case[0]]
    assert r["traceback"] is None, r["traceback"]
    assert r["code"] == 0, r["stderr"]
    for name in case[2]:
        assert name in r["stdout"] + r["stderr"], (name, r["stdout"], r["stderr"])


def _factlab(*args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "factlab", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def test_installed_entry_point_alone(tmp_path):
    """`python -m factlab` as its own process: usage errors, --version and help."""
    for args, name in ((["frobnicate"], "frobnicate"), (["run", "x.yaml", "--lr"], "--lr"),
                       (["data", "synth", "--facts", "x", "-o", "w"], "--facts")):
        r = _factlab(*args, cwd=tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and name in lines[0], r.stderr
    r = _factlab("--version", cwd=tmp_path)
    from factlab import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"factlab {__version__}"
    r = _factlab("sweep", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "<bool>" not in r.stdout
    r = _factlab("runs", "--help", cwd=tmp_path)
    assert "<output_dir>" not in r.stdout
    assert list(tmp_path.iterdir()) == []


def _default_sigint():
    # A test run started in the background (nohup, `cmd &`) has SIGINT ignored, and children
    # inherit that; restore the default so that python installs its KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(pred, proc, timeout=240.0, step=0.001):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if pred():
            return True
        time.sleep(step)
    return False


def test_ctrl_c_while_synth_writes_leaves_nothing(tmp_path):
    """SIGINT while `data synth` writes (its temporary folder exists): exit 130, one line, and
    no half-written world. The process is frozen (SIGSTOP) the moment the temporary folder
    appears, so the interrupt lands inside the write whatever the machine's load."""
    for attempt in range(3):
        work = tmp_path / str(attempt)
        work.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "factlab", "data", "synth", "--facts", "20000", "-o", "w"],
                                cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        if not _wait_for(lambda: any(p.name.startswith(".w.partial") for p in work.iterdir()), proc):
            proc.communicate()
            continue  # pragma: no cover - finished between two polls
        proc.send_signal(signal.SIGSTOP)
        still_writing = any(p.name.startswith(".w.partial") for p in work.iterdir())
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
        if not still_writing:  # pragma: no cover - frozen just after the rename
            continue
        lines = [x for x in err.splitlines() if x.strip()]
        assert proc.returncode == 130, err
        assert len(lines) == 1 and lines[0].startswith("interrupted; "), err
        left = sorted(p.name for p in work.iterdir())
        if left:  # the rename had completed inside the frozen system call: the world is whole
            assert left == ["w"] and (work / "w" / "world.json").is_file(), left
            assert "written completely" in lines[0]
        else:
            assert lines == ["interrupted; nothing was written"], err
            # and the next call is not refused
            r = _factlab("data", "synth", "--facts", "20", "-o", "w", cwd=work)
            assert r.returncode == 0, r.stderr
        return
    pytest.skip("could not catch the writer in three attempts")  # pragma: no cover


def test_ctrl_c_before_writing(tmp_path):
    """SIGINT while the world is still being generated: exit 130, one line, nothing on disk."""
    proc = subprocess.Popen([sys.executable, "-m", "factlab", "data", "synth", "--facts", "100000", "-o", "w"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)

    def cpu_seconds() -> float:  # the child's own CPU time: independent of how loaded the machine is
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # Past the imports (about 1 s of CPU) and well inside generating 100000 facts (many more).
    _wait_for(lambda: cpu_seconds() >= 3.0, proc, step=0.05)
    if proc.poll() is not None:  # pragma: no cover
        pytest.skip("synth finished before the interrupt")
    assert not any(tmp_path.iterdir()), "the write started earlier than expected"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert [x for x in err.splitlines() if x.strip()] == ["interrupted; nothing was written"], err
    assert list(tmp_path.iterdir()) == []


def test_output_dir_is_relative_to_the_experiment_file(tmp_path, monkeypatch):
    from factlab.config import load_experiment

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "exp.yaml").write_text("name: t\nmodel: m\noutput_dir: myruns\n")
    monkeypatch.chdir(tmp_path)
    assert Path(load_experiment("sub/exp.yaml").output_dir) == (tmp_path / "sub" / "myruns").resolve()
    # the default stays in the current folder, where `factlab runs` and `report` look for the store
    (tmp_path / "sub" / "plain.yaml").write_text("name: t\nmodel: m\n")
    assert load_experiment("sub/plain.yaml").output_dir == "runs"


def test_writers_leave_complete_outputs_and_no_temporary_files(lab, tmp_path, monkeypatch, capsys):
    """The staged writers still write: a tiny run, then report (html and md with its figures),
    eval -o, synth and substitute; every output is complete and no temporary sibling is left."""
    (tmp_path / "exp.yaml").write_text(EXP.replace("{lab}", str(lab)).replace("output_dir: out", "output_dir: runs"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "run", "exp.yaml")
    assert code == 0, err
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    code, _, err = run_cli(monkeypatch, capsys, "report", run, "-o", "rep/r.html")
    assert code == 0, err
    assert (tmp_path / "rep" / "r.html").read_text().rstrip().endswith("</html>")
    code, _, err = run_cli(monkeypatch, capsys, "report", run, "-o", "rep/r.md", "--format", "md")
    assert code == 0, err
    md = (tmp_path / "rep" / "r.md").read_text()
    assert "r_files/figure1.png" in md and (tmp_path / "rep" / "r_files" / "figure1.png").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "eval", lab / "model", "--probes", lab / "probes.jsonl", "--samples", "0",
                        "-o", "ev/e.json")
    assert code == 0, err
    assert "summaries" in json.loads((tmp_path / "ev" / "e.json").read_text())
    code, _, err = run_cli(monkeypatch, capsys, "data", "substitute", lab / "docs.txt", "--map", "Marta=Edda", "-o", "sub.txt",
                        "--probes-about", "The press line is run by")
    assert code == 0, err
    assert "Edda Ilvane" in (tmp_path / "sub.txt").read_text() and (tmp_path / "probes.jsonl").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "data", "synth", "--facts", "5", "-o", "w")
    assert code == 0, err
    assert (tmp_path / "w" / "world.json").is_file() and (tmp_path / "w" / "docs").is_dir()
    left = [p for p in tmp_path.rglob("*") if "partial" in p.name or p.name.endswith(".build")]
    assert left == []
