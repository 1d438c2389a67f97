"""Influence approximations against the exact EIF matrix, in one run on one model.

Builds a synth world (`factlab data synth --facts N`: each fact's recall and paraphrase probes
are the samples, so 10 facts give 20 samples), computes the exact matrix (one fine-tune per row,
``exact_eif``), then each approximation (``factlab.influence.approx``) on the same samples,
adapter (same seed) and schedule, and prints per approximation: the mean per-row Spearman with
the exact matrix (95% bootstrap interval over rows), the mean top-5 overlap (interval), seconds
and the speed ratio exact seconds / approximation seconds. Model loading and the world are not
timed.

    python bench/bench_influence.py                       # smollm2-135m, 10 facts -> 20 samples
    python bench/bench_influence.py --tiny --samples 4    # a tiny random model: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model alias or folder (default smollm2-135m)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of --model (script check)")
    ap.add_argument("--facts", type=int, default=10, help="synth world facts (2 samples each)")
    ap.add_argument("--samples", type=int, default=None, help="use only the first N samples")
    ap.add_argument("--methods", default="first_order,grad_dot,kronfluence_identity,kronfluence_ekfac",
                    help="comma-separated approximation names")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--k", type=int, default=5, help="top-k overlap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    from factlab.config import InfluenceSamples, PeftSpec
    from factlab.data.synth import synth_world, write_world
    from factlab.influence import approx
    from factlab.influence.exact import Schedule, exact_eif
    from factlab.influence.sources import load_sample_set

    if args.tiny:
        from factlab.testing import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model("llama", vocab_size=len(tok))
    else:
        from factlab.models.loading import load_model, resolve_model

        model, tok = load_model(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        write_world(synth_world(args.facts, seed=args.seed), os.path.join(tmp, "world"))
        samples = load_sample_set(InfluenceSamples(world=os.path.join(tmp, "world"),
                                                   kinds=["recall", "paraphrase"])).samples
    samples = samples[: args.samples] if args.samples else samples
    peft = PeftSpec(targets=["attention", "mlp"])  # the influence section's default adapter
    sched = Schedule(steps=args.steps, lr=args.lr, optimizer=args.optimizer)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {sys.version.split()[0]}")
    print(f"model: {'tiny random llama' if args.tiny else args.model}; {len(samples)} samples "
          f"(synth world, {args.facts} facts, seed {args.seed}); schedule {sched}")
    t0 = time.perf_counter()
    exact = exact_eif(model, tok, samples, samples, peft, sched, seeds=[args.seed])
    exact_s = time.perf_counter() - t0
    E = exact.mean()
    print(f"exact: {exact_s:.2f} s ({exact_s / len(samples):.2f} s/row, {exact.trainable_params} trainable params)")

    def fmt(x: dict) -> str:
        return "n/a" if x["value"] is None else f"{x['value']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"

    results = {"samples": len(samples), "exact_seconds": exact_s, "methods": {}}
    print(f"\n| method | Spearman per row (mean, 95% CI) | top-{args.k} overlap | seconds | speed ratio |")
    print("|---|---|---|---:|---:|")
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        A, secs = approx.estimate(name, model, tok, samples, samples, peft, sched, args.seed)
        cmp = approx.compare_to_exact(E, A, k=args.k, seed=args.seed)
        cmp.update(seconds=secs, speed_ratio=exact_s / secs)
        results["methods"][name] = cmp
        print(f"| {name} | {fmt(cmp['spearman'])} | {fmt(cmp['top_k_overlap'])} | {secs:.2f} | {exact_s / secs:.1f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
