"""Noised copies of samples: the rows of the noise-invariance desideratum.

``char``: each non-space character is replaced, with probability ``level``, by a random
lowercase letter (spaces kept, so word boundaries and the length stay). ``word``: each word is
replaced, with probability ``level``, by a random word of the whole sample set. Both seeded
from the sample id, the level and the seed, so the same settings give the same copies.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import replace

from factlab.influence.samples import Sample

_WORD = re.compile(r"(\s+)")


def noise_text(text: str, level: float, kind: str, rng: random.Random, vocabulary: list[str]) -> str:
    """``text`` with a share ``level`` of its characters or words replaced (see module doc)."""
    if kind == "char":
        return "".join(rng.choice(string.ascii_lowercase) if not c.isspace() and rng.random() < level else c
                       for c in text)
    parts = _WORD.split(text)  # words at even positions, the whitespace between at odd ones
    return "".join(rng.choice(vocabulary) if k % 2 == 0 and p and vocabulary and rng.random() < level else p
                   for k, p in enumerate(parts))


def noised_copies(samples: list[Sample], levels: list[float], kind: str, seed: int = 0) -> list[Sample]:
    """One copy per sample and level, prompt and target noised alike; id ``<id>~<kind><level>``,
    meta ``clean_id`` and ``noise``. The target keeps a character to score (a noised character
    is still one), so every copy can be trained on."""
    vocabulary = sorted({w for s in samples for w in s.text.split()})
    out = []
    for s in samples:
        for level in levels:
            rng = random.Random(f"factlab/noise/{seed}/{s.id}/{kind}/{level}")
            prompt = noise_text(s.prompt, level, kind, rng, vocabulary)
            target = noise_text(s.target, level, kind, rng, vocabulary)
            out.append(replace(s, id=f"{s.id}~{kind}{level:g}", prompt=prompt, target=target,
                               meta={**s.meta, "clean_id": s.id, "noise": level, "noise_kind": kind}))
    return out
