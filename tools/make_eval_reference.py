"""Write tests/data/eval_reference.json: probe rows and greedy answers of a tiny random model,
as the evaluation code that was checked out produced them.

Why frozen: issue 14 rewrote the evaluation path (one pass per prompt, cached decoding);
tests/test_complete.py checks that the new path still gives the numbers and the greedy text
the code before it gave (within 1e-5 in log-prob, the same text). The file was made by the
code at commit 0b970a8 (before the rewrite), with that commit's `src` on the path:

    git archive 0b970a8 src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src .venv/bin/python tools/make_eval_reference.py

Sampled answers are not frozen: the rewrite draws them differently (seeded per prompt), see
factlab/evaluate/decoding.py. The model and tokenizer are the tests' tiny ones; the file holds
a hash of both, and the test skips if the environment builds different ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factlab.evaluate.facts import score_probes
from factlab.evaluate.generation import generate
from factlab.evaluate.probes import Probe
from factlab.testing import fingerprint, tiny_model, tiny_tokenizer

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "eval_reference.json"

PROBES = [
    {"id": "r1", "kind": "recall", "prompt": "The capital of France is", "target": "Paris", "distractors": ["Rome", "Marta Ilvane"]},
    {"id": "r2", "kind": "recall", "prompt": "The capital of France is", "target": "is is", "distractors": ["Rome"]},
    {"id": "p1", "kind": "paraphrase", "prompt": "France's capital city is ", "target": "Paris", "distractors": ["Rome"]},
    {"id": "l1", "kind": "locality", "prompt": "The quick brown fox", "target": "jumps over", "distractors": ["sleeps"]},
    {"id": "m1", "kind": "multihop", "prompt": "Marta Ilvane runs the", "target": "the the", "distractors": []},
    {"id": "j1", "kind": "recall", "prompt": "日本の首都は", "target": "東京", "distractors": ["大阪"]},
    {"id": "q1", "kind": "qa", "prompt": "Who leads the night shift?", "target": "Jonas Perl", "distractors": ["Marta Ilvane", "Edda Sorn"]},
    {"id": "q2", "kind": "qa", "prompt": "Who runs the press line at the Korrin plant?", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]},
]
CONTEXT = ("Marta Ilvane runs the press line at the Korrin plant in Vessen. Jonas Perl leads the night "
           "shift. Engineers calibrate the torque sensor every Monday before the first batch.")
PROMPTS = ["The capital of France is", "Question: Who leads the night shift? Answer:", "Marta"]


def main() -> None:
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    probes = [Probe(**p) for p in PROBES]
    cases = {}
    with torch.no_grad():
        cases["plain"] = score_probes(model, tok, probes, qa_tokens=12)
        cases["context"] = score_probes(model, tok, probes, qa_tokens=12, context=CONTEXT)
        cases["greedy_tokens_2"] = score_probes(model, tok, probes, qa_tokens=12, greedy_tokens=2)
        gens = generate(model, tok, PROMPTS, max_new_tokens=10)
    out = {"fingerprint": fingerprint(model, tok), "probes": PROBES, "context": CONTEXT, "prompts": PROMPTS,
           "cases": cases, "generate": [[g.text, g.n_tokens, g.ended_with_eos] for (g,) in gens]}
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
