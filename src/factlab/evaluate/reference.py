"""The reference path: every pair runs whole, and answers come from transformers' ``generate``.

No key/value-cache reuse, so it works for every model, and it is the oracle the cached
engine (``engine``) is tested against (``LM(share_prefix=False)`` takes it for every
request). ``LM`` also falls back to it for what the engine cannot take: PEFT prompt-learning
methods, caches that cannot be copied per row and extended (the convolution states of LFM2),
a request too long for the model (here the oldest context is dropped, as lm-eval does), and
a batch whose candidates and answers would not fit a sliding window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList

from factlab.errors import FactlabError
from factlab.evaluate.decoding import Sampler, SamplerProcessor
from factlab.evaluate.hfmodel import HFModel, pad, token_scores
from factlab.evaluate.interface import Completion, Generation, LogLik

Pair = tuple[tuple[int, ...], tuple[int, ...]]
"""(context ids, never empty; continuation ids)."""


def loglikelihood(hf: HFModel, pairs: Sequence[Pair], batch_size: int) -> list[LogLik]:
    """Every pair in one forward of its own row; right-padded batches of ``batch_size``,
    longest first. A pair longer than the model drops its oldest context tokens."""
    inputs = []  # the ids fed to the model: all but the last token (position p predicts p + 1)
    max_len = hf.max_length
    for ctx, cont in pairs:
        inp = list(ctx + cont[:-1])
        if max_len is not None and len(inp) > max_len:
            if len(cont) > max_len:
                raise FactlabError(f"continuation of {len(cont)} tokens is longer than the "
                                   f"model's context of {max_len}; shorten the answer")
            inp = inp[-max_len:]  # drop the oldest context, as lm-eval does
        inputs.append(inp)

    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    results: list[LogLik | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = [(inputs[i], list(pairs[i][1])) for i in idx]
        for i, ll in zip(idx, _score_batch(hf, batch)):
            results[i] = ll
    return results  # type: ignore[return-value]


def _score_batch(hf: HFModel, batch: list[tuple[list[int], list[int]]]) -> list[LogLik]:
    ids, mask = pad([inp for inp, _ in batch], hf.pad_id, "right", hf.device)  # (B, T)
    # Continuation tokens sit at the end of each row's real tokens (right padding), so
    # row b's m continuation tokens are predicted at positions len(inp)-m .. len(inp)-1.
    firsts = [len(inp) - len(cont) for inp, cont in batch]
    # Logits only from the first position any row needs on: (B, K, V), not (B, T, V).
    keep = ids.shape[1] - min(firsts)
    logits = hf.forward(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep)  # (B, K, V)
    offset = ids.shape[1] - logits.shape[1]
    sums, misses = token_scores(logits, [(b, first - offset, cont) for b, (first, (_, cont))
                                         in enumerate(zip(firsts, batch))], len(batch))
    return [LogLik(s, len(cont), m == 0) for s, m, (_, cont) in zip(sums, misses, batch)]


def generate(hf: HFModel, prompts: Sequence[tuple[int, ...]], max_new_tokens: int, n: int, batch_size: int,
             sampler: Sampler | None = None, sampler_rows: Sequence[int] = ()) -> list[list[Generation]]:
    """``n`` continuations per prompt (token ids) by transformers' greedy ``generate``,
    left-padded batches of up to ``batch_size`` sequences, longest prompt first. With
    ``sampler`` the n rows of each prompt are sampled (``SamplerProcessor``; ``sampler_rows``
    gives the sampler row of each (prompt, sample), prompt-major)."""
    stops = hf.stops
    # A fresh config, so sampling defaults shipped with the model neither apply nor warn.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              temperature=None, top_p=None, top_k=None,
                              eos_token_id=stops or None, pad_token_id=hf.pad_id)
    processor = SamplerProcessor(sampler) if sampler is not None else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    per_batch = max(1, batch_size // n)
    results: list[list[Generation]] = [[] for _ in prompts]
    for start in range(0, len(order), per_batch):
        idx = order[start:start + per_batch]
        ids, mask = pad([prompts[i] for i in idx], hf.pad_id, "left", hf.device)  # (B, T)
        rows = torch.arange(len(idx), device=hf.device).repeat_interleave(n)  # (B*n,)
        extra = {}
        if processor is not None:
            processor.rows = [sampler_rows[i * n + j] for i in idx for j in range(n)]
            processor.width = ids.shape[1]
            extra["logits_processor"] = LogitsProcessorList([processor])
        out = hf.model.generate(input_ids=ids[rows], attention_mask=mask[rows],
                                generation_config=config, **extra)  # (B*n, T + new)
        for j, row in enumerate(out[:, ids.shape[1]:].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), None)
            results[idx[j // n]].append(hf.generation(row if cut is None else row[:cut + 1], cut is not None))
    return results


def complete(hf: HFModel, prompts: Sequence[tuple[int, ...]], greedy_tokens: Sequence[int], samples: Sequence[int],
             pairs: Sequence[Sequence[Pair]], *, batch_size: int, gen_batch: int, sample_tokens: int,
             sampler: Sampler | None, first_samples: Sequence[int]) -> list[Completion]:
    """``LM.complete`` for requests given as tokens: request i continues ``prompts[i]`` with a
    greedy answer of ``greedy_tokens[i]`` tokens and ``samples[i]`` samples (sampler rows from
    ``first_samples[i]`` on), and scores its candidates ``pairs[i]`` (``loglikelihood``)."""
    scores = iter(loglikelihood(hf, [p for ps in pairs for p in ps], batch_size))
    idx = range(len(prompts))
    greedy: dict[int, Generation] = {}
    for budget in sorted(set(greedy_tokens) - {0}):
        rows = [i for i in idx if greedy_tokens[i] == budget]
        for i, (g,) in zip(rows, generate(hf, [prompts[i] for i in rows], budget, 1, gen_batch)):
            greedy[i] = g
    sampled: dict[int, list[Generation]] = {}
    for n in sorted(set(samples) - {0}):
        rows = [i for i in idx if samples[i] == n]
        sampler_rows = [first_samples[i] + j for i in rows for j in range(n)]
        outs = generate(hf, [prompts[i] for i in rows], sample_tokens, n, gen_batch, sampler, sampler_rows)
        sampled.update(zip(rows, outs))
    return [Completion([next(scores) for _ in pairs[i]], greedy.get(i), sampled.get(i, [])) for i in idx]
