"""Where the demo's CPT stage loses throughput: the first stage of examples/demo.yaml, trained
for --steps optimizer steps under each of several `train` overrides, one after the other in
this process, each printed as tokens per second (the stage's own count, train.json's train_tokens).

    .venv/bin/python bench/bench_demo_shape.py --steps 6 \\
        '{}' '{"anchor": null}' '{"batch_size": 32}' '{"batch_size": 32, "anchor": null}' \\
        '{"packing": "blocks", "anchor": null}' '{"bf16": false}'

Each argument is a JSON object merged into the stage's `train` block (BENCHMARKS.md, "the
demo's shape"). The rows share the process (the model is reloaded for each); run it alone on
the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", default=["{}"], help="JSON objects merged into the stage's train block")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    from factlab.config import load_experiment
    from factlab.experiment.runner import _stage_inputs
    from factlab.models.loading import load_model, resolve_model
    from factlab.train.data import build_stage_examples, load_stage_data
    from factlab.train.stage import train_stage

    logging.set_verbosity_error()
    exp = load_experiment(ROOT / "examples/demo.yaml")
    rows = []
    for text in a.overrides:
        upd = {"max_steps": a.steps, **json.loads(text)}
        st = exp.stages[0]
        st = st.model_copy(update={"merge": False, "train": st.train.model_validate({**st.train.model_dump(), **upd})})
        model, tok = load_model(resolve_model(exp.model))
        raw = load_stage_data(st, *_stage_inputs(exp, 0), substitute=st.data.substitute or exp.data.substitute)
        examples = build_stage_examples(st, tok, raw, seed=exp.seed)
        _, res = train_stage(model, tok, st, "cpt", Path(tempfile.mkdtemp()) / "s", examples, seed=exp.seed)
        rows.append((text, res.seconds, res.train_tokens, res.bf16))
        print(f"{text}: {res.seconds:.1f} s, {res.train_tokens} tokens, {res.train_tokens / res.seconds:.1f} tokens/s "
              f"({'bf16' if res.bf16 else 'fp32'})", flush=True)
        del model
    print("\noverride                                        seconds   tokens   tok/s")
    for text, sec, tokens, _ in rows:
        print(f"{text:<46} {sec:8.1f} {tokens:8d} {tokens / sec:7.1f}")


if __name__ == "__main__":
    main()
