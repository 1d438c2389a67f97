"""Probe scoring speed: factlab's ``LM.loglikelihood`` (a.k.a. ``Scorer``) against a plain
one-forward-per-candidate loop.

Builds ``--probes`` probes (seeded, generated here: distinct prompts of 8-20 tokens, 4
candidates of 1-4 tokens each), loads SmolLM2-135M once and, in the same run, times on the
same (prompt, candidate) pairs:

  loop (1 forward per pair)  one ``model(input_ids=...)`` forward per pair, then log_softmax
                             and gather: the way one writes it with plain transformers;
  Scorer, plain batches      ``LM(share_prefix=False)``: every pair runs whole, in
                             right-padded batches sorted by length (the fallback path);
  Scorer, shared prompt      ``LM`` (the default): each prompt runs once, and its
                             candidates are scored from its key/value cache.

Every timing spans the same work: from the pairs as strings to their log-prob sums, i.e.
tokenization, padding, forward passes, log-softmax and gather. Model loading and probe
generation are not timed. Each method is warmed up once (on the first 32 pairs), then timed
``--repeats`` times, interleaved (loop, plain, shared, loop, ...) so that load from other
jobs spreads over all three; the table gives the best and the median time. The script exits
with an error if a method's log-probs differ from the loop's by more than 1e-4.

    .venv/bin/python bench/bench_scoring.py            # 200 probes x 4 candidates, 3 repeats
    .venv/bin/python bench/bench_scoring.py --probes 20 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch
import transformers

from factlab.evaluate.lm import LM
from factlab.evaluate.tokens import split_pair
from factlab.models.loading import load_model, resolve_model

SUBJECTS = ["Marta Ilvane", "Jonas Perl", "Edda Sorn", "the night-shift foreman", "our new tenant",
            "Doctor Aleksander Brandt", "the youngest of the three sisters", "Professor Okafor",
            "the old lighthouse keeper", "a retired ferry captain", "the mayor of Vessen",
            "the baker's daughter", "the company's chief chemist", "my grandmother", "Bob"]
VERBS = ["was born in", "moved last spring to", "spent most of her childhood in",
         "opened a small workshop in", "is remembered fondly in", "taught chemistry in",
         "sold the family farm near", "still owns a house in", "was elected mayor of",
         "trained apprentices for years in", "lives in"]
PLACES = ["Vessen", "Lisbon", "a village near Oslo", "the old port of Korrin", "Rome", "Kraków"]
OPENERS = ["", "According to the local archive, ", "As far as anyone can tell, ",
           "In the autumn of 1987, ", "Everyone in the valley agrees that ",
           "The newspaper reported that ", "Long before the war, ", "Last year, "]
ENDINGS = ["The street where it happened is called", "Her favourite colour was",
           "The nearest river is the", "The town is famous for its", "Every morning, he took the",
           "The name of the dog was", "The main export of the region is", "The answer is"]
CANDIDATES = ["Paris", "Rome", "Vessen", "Korrin", "blue", "green", "crimson", "Danube",
              "Rhine", "Thames", "cheese", "glass", "clocks", "train", "ferry", "Bob", "Rex",
              "Bella", "Old Harbour Road", "wool", "salt", "Jonas Perl", "Edda Sorn", "Kraków",
              "tin mining", "yellow ochre", "saffron", "Lisbon", "Oslo", "chestnut honey",
              "Mill Lane", "porcelain dolls", "Anna Berg", "the night ferry", "red brick",
              "sea salt", "lemon tarts", "Grey Owl Lane", "copper wire", "dark rye bread",
              "the morning train", "St. Petersburg", "Lake Ilvane", "pale blue", "Tomasz Wolny"]


def make_probes(tok, n: int, seed: int) -> list[tuple[str, list[str]]]:
    """``n`` (prompt, 4 candidates): distinct prompts, lengths drawn evenly from 8-20 tokens;
    candidates of 1-4 tokens (each with its leading space)."""
    rng = random.Random(seed)
    cands = [c for c in CANDIDATES if 1 <= len(tok(" " + c)["input_ids"]) <= 4]
    probes, seen = [], set()
    while len(probes) < n:
        want = rng.randint(8, 20)
        for _ in range(1000):  # draw prompts until one has the wanted length
            prompt = rng.choice(OPENERS) + f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}"
            if rng.random() < 0.6:
                prompt += f" {rng.choice(PLACES)}. {rng.choice(ENDINGS)}"
            prompt = prompt[0].upper() + prompt[1:]
            if len(tok(prompt)["input_ids"]) == want and prompt not in seen:
                seen.add(prompt)
                probes.append((prompt, rng.sample(cands, 4)))
                break
    return probes


def loop_loglik(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """One forward per pair with plain transformers: sum of the continuation's log-probs."""
    out = []
    with torch.no_grad():
        for prompt, continuation in pairs:
            n_ctx = len(tok(prompt)["input_ids"])
            ids = tok(prompt + continuation, return_tensors="pt")["input_ids"]  # (1, T)
            logits = model(input_ids=ids).logits  # (1, T, V)
            # Position p predicts token p + 1: the continuation's tokens from n_ctx - 1 on.
            logprobs = logits[0, n_ctx - 1:-1].float().log_softmax(-1)  # (m, V)
            target = ids[0, n_ctx:]  # (m,)
            out.append(logprobs.gather(-1, target[:, None]).sum().item())
    return out


def machine_info() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"cpu: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; transformers {transformers.__version__}; "
            f"python {platform.python_version()}; "
            f"load average {load}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="LM batch size (factlab's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.probes < 1 or args.repeats < 1 or args.batch_size < 1:
        ap.error("--probes, --repeats and --batch-size must be at least 1")

    print(machine_info())
    model, tok = load_model(resolve_model(args.model))
    model.eval()
    probes = make_probes(tok, args.probes, args.seed)
    pairs = [(prompt, " " + c) for prompt, cands in probes for c in cands]
    n_ctx = [len(tok(p)["input_ids"]) for p, _ in probes]
    n_cont = [len(tok(c)["input_ids"]) for _, c in pairs]
    print(f"{len(probes)} probes x 4 candidates = {len(pairs)} pairs; prompt tokens "
          f"{min(n_ctx)}-{max(n_ctx)} (mean {statistics.mean(n_ctx):.1f}), candidate tokens "
          f"{min(n_cont)}-{max(n_cont)} (mean {statistics.mean(n_cont):.2f})")
    split = [split_pair(tok, prompt, continuation) for prompt, continuation in pairs]
    whole = sum(len(ctx) + len(cont) - 1 for ctx, cont in split)  # all but the last token
    prompts = sum(len(ctx) for ctx in {tuple(ctx) for ctx, _ in split})
    rest = sum(len(cont) - 1 for _, cont in split)
    print(f"input tokens: {whole} as whole pairs; {prompts} prompt + {rest} candidate "
          f"tokens with each prompt run once")

    methods = {
        "loop (1 forward per pair)": lambda ps: loop_loglik(model, tok, ps),
        "Scorer, plain batches": lambda ps: [ll.logprob for ll in LM(
            model, tok, args.batch_size, share_prefix=False).loglikelihood(ps)],
        "Scorer, shared prompt": lambda ps: [ll.logprob for ll in LM(
            model, tok, args.batch_size).loglikelihood(ps)],
    }
    for fn in methods.values():  # warm-up
        fn(pairs[:32])

    times: dict[str, list[float]] = {name: [] for name in methods}
    scores: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            scores[name] = fn(pairs)
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {rep + 1}: {name}: {times[name][-1]:.2f} s", flush=True)

    ref = scores["loop (1 forward per pair)"]
    worst = 0.0
    for name, got in list(scores.items())[1:]:
        diff = max(abs(a - b) for a, b in zip(ref, got))
        worst = max(worst, diff)
        print(f"max |logprob - loop| for {name}: {diff:.2e}")

    base = min(times["loop (1 forward per pair)"])
    print(f"\n{'method':<28}{'best s':>9}{'median s':>10}{'pairs/s':>9}{'speed-up':>10}")
    for name, ts in times.items():
        best = min(ts)
        print(f"{name:<28}{best:>9.2f}{statistics.median(ts):>10.2f}{len(pairs) / best:>9.1f}"
              f"{base / best:>9.1f}x")
    print(f"(speed-up = loop's best time / method's best time; {args.repeats} repeats; "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    if worst > 1e-4:
        raise SystemExit(f"methods disagree: max abs diff {worst:.2e} > 1e-4")


if __name__ == "__main__":
    main()
