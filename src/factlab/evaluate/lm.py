"""The one model interface: a causal LM and its tokenizer behind four requests.

``LM`` is the transformers backend of ``interface.LanguageModel`` (lm-evaluation-harness's
shape): ``loglikelihood`` scores (context, continuation) pairs, ``loglikelihood_rolling``
scores whole texts in windows (perplexity), ``generate`` continues prompts (greedy or
sampled), and ``complete`` does all a probe needs in one pass over its prompt: the
candidates' scores, the greedy answer and the samples (``generate`` is ``complete`` without
candidates). This module only turns strings into tokens (``tokens``), checks the arguments
and chooses the path; the work is done elsewhere:

- ``engine``: the one cached engine, for pairs and prompts alike (each prompt runs once,
  continuations and answers come from its key/value cache);
- ``reference``: every pair whole and transformers' ``generate``; the oracle the engine is
  tested against (``share_prefix=False``), and the fallback for what the engine cannot take;
- ``rolling``: the perplexity windows;
- ``hfmodel``: what every path needs of a transformers model (forward, padding, eval mode,
  context length, stop tokens); ``kvcache`` and ``decoding`` hold the cache and the
  token-by-token loop.

Works with any Hugging Face causal LM, PEFT-wrapped or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from factlab.errors import FactlabError
from factlab.evaluate import engine, reference
from factlab.evaluate.decoding import Sampler, sample_uniforms
from factlab.evaluate.hfmodel import HFModel, eos_ids, eval_mode, max_positions, pad
from factlab.evaluate.interface import (
    Completion,
    Generation,
    LanguageModel,
    LogLik,
    PromptRequest,
    RollingLogLik,
    generate_by_complete,
)
from factlab.evaluate.rolling import rolling, rolling_plan, rolling_windows
from factlab.evaluate.tokens import TokenCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The names callers import from here: the interface's types and the model helpers.
__all__ = ["LM", "Completion", "Generation", "LanguageModel", "LogLik", "PromptRequest", "RollingLogLik",
           "eos_ids", "eval_mode", "max_positions", "pad", "rolling_windows"]

Pair = tuple[tuple[int, ...], tuple[int, ...]]

# Continuations of one context that share an engine row (one candidate block each). More
# blocks widen the row's cache (earlier blocks stay, masked); a context with more
# continuations (documents scored after BOS) takes several rows.
_PER_ROW = 4


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise FactlabError(f"batch_size must be at least 1, got {batch_size}; set a positive batch size")
    return batch_size


class LM:
    """A causal LM and its tokenizer: log-likelihoods of pairs, of whole texts, and generation.

    ``batch_size`` is the number of rows per forward (a method's ``batch_size`` argument
    overrides it for one call). ``share_prefix`` (default True) runs what it can on the
    cached engine; False runs everything on the reference path. Every request puts the
    model in eval mode under inference mode and restores its train/eval state after.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 16, *, share_prefix: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _check_batch_size(batch_size)
        self.share_prefix = share_prefix
        self.hf = HFModel(model, tokenizer)
        self._tokens = TokenCache(tokenizer)  # each distinct text encoded once per LM

    @property
    def device(self) -> torch.device:
        """Where the model's parameters (and so its inputs) are."""
        return self.hf.device

    @property
    def max_length(self) -> int | None:
        """The model's context length (``max_positions``); None if unlimited."""
        return self.hf.max_length

    @property
    def pad_id(self) -> int:
        """Id written at padded positions (``HFModel.pad_id``)."""
        return self.hf.pad_id

    @property
    def prefix_id(self) -> int:
        """Token that stands in for an empty context or prompt (BOS, else EOS)."""
        return self.hf.prefix_id

    def _cached(self) -> bool:
        """Whether requests go to the cached engine first."""
        return self.share_prefix and self.hf.caches_rows()

    @property
    def _budget(self) -> int:
        """Cache positions (rows x width) the engine holds at once (see ``engine.run``)."""
        return max(16384, self.batch_size * 1024)

    # -- tokens ------------------------------------------------------------------------------

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Pair]:
        """(context ids, continuation ids) of each pair, as ``loglikelihood`` scores it
        (``tokens.split_pair``; an empty context becomes ``prefix_id``); each text is
        tokenized once per LM."""
        self._tokens.prefetch_pairs(list(pairs))
        out = []
        for context, continuation in pairs:
            ctx, cont = self._tokens.split_pair(context, continuation)
            out.append((tuple(ctx) or (self.prefix_id,), tuple(cont)))
        return out

    def _prompt_ids(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        """``tokens.encode`` of each prompt, ``prefix_id`` for an empty one."""
        self._tokens.prefetch(list(prompts))
        return [tuple(self._tokens.encode(p)) or (self.prefix_id,) for p in prompts]

    # -- loglikelihood: (context, continuation) pairs ----------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """Score each (context, continuation) pair; results are in the order of ``pairs``.

        Pairs are tokenized by ``tokenize_pairs``. On the cached engine each distinct
        context runs once (up to ``batch_size`` contexts a forward) and its continuations
        are scored from its key/value cache, up to four of them per copy of the context. A
        pair longer than the model, a model whose cache cannot be reused (see
        ``HFModel.caches_rows``) and ``share_prefix=False`` take the reference path: every
        pair runs whole, in right-padded batches sorted by length, its oldest context
        dropped if it is too long. Both give the same numbers up to float rounding (tested
        to 1e-5).
        """
        requests = self.tokenize_pairs(pairs)
        with eval_mode(self.model):
            return self._loglikelihood(requests)

    def _loglikelihood(self, pairs: Sequence[Pair]) -> list[LogLik]:
        results: list[LogLik | None] = [None] * len(pairs)
        if self._cached():
            max_len = self.max_length
            fits = [i for i, (ctx, cont) in enumerate(pairs) if max_len is None or len(ctx) + len(cont) - 1 <= max_len]
            # Each distinct context is one prompt of the engine, its continuations (longest
            # first) its candidates, _PER_ROW to a row.
            groups: dict[tuple[int, ...], list[int]] = {}
            for i in fits:
                groups.setdefault(pairs[i][0], []).append(i)
            rows, members = [], []
            for ctx, idx in groups.items():
                idx = sorted(idx, key=lambda i: -len(pairs[i][1]))
                for s in range(0, len(idx), _PER_ROW):
                    members.append(idx[s:s + _PER_ROW])
                    rows.append(engine.Row(ctx, tuple(pairs[i][1] for i in members[-1])))
            done = engine.run(self.hf, rows, max_rows=self.batch_size, budget=self._budget)
            for idx, c in zip(members, done):
                if c is not None:
                    for i, score in zip(idx, c.scores):
                        results[i] = score
        rest = [i for i, r in enumerate(results) if r is None]
        for i, ll in zip(rest, reference.loglikelihood(self.hf, [pairs[i] for i in rest], self.batch_size)):
            results[i] = ll
        return results  # type: ignore[return-value]

    # -- loglikelihood_rolling: whole texts in windows ---------------------------------------

    def loglikelihood_rolling(self, texts: Sequence[str | Sequence[int]], seq_len: int,
                              stride: int | None = None, *,
                              batch_size: int | None = None) -> list[RollingLogLik]:
        """Log-likelihood of each whole text (a string, encoded by ``tokens.encode``, or token
        ids), scored in windows of ``seq_len`` tokens; in the order of ``texts``.

        - ``stride=None``: non-overlapping windows [0, L), [L, 2L), ... of ``seq_len`` = L
          tokens. Each window's first token is context only (not scored), so one token per
          window boundary is never scored; every other token is scored once.
        - ``stride=s`` (1 <= s <= L): sliding windows starting at 0, s, 2s, ...; each window
          scores only the tokens after the previous window's end, so every token after the
          first is scored exactly once, with at least L - s tokens of context (the Hugging
          Face "perplexity of fixed-length models" scheme). Costs about L / s times as much.

        The first token is never scored (nothing before it), so a text whose tokenizer puts
        a BOS first has every text token scored. Windows of one text go through the model in
        batches of up to ``batch_size`` (default: the LM's), unpadded; log-softmax in fp32 and
        sums in float64, so the result does not depend on the batch size beyond float
        rounding. Raises ``ValueError`` for a bad seq_len/stride and ``FactlabError`` for a
        seq_len beyond the model's context or a text of fewer than 2 tokens.
        """
        batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        streams, plans = rolling_plan(self.tokenizer, texts, seq_len, stride, self.max_length, "the model's")
        with eval_mode(self.model):
            return [rolling(self.hf, ids, windows, batch_size) for ids, windows in zip(streams, plans)]

    # -- generate: greedy or sampled continuations of prompts --------------------------------

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int | None = None) -> list[list[Generation]]:
        """``n`` generations per prompt, in the order of ``prompts``.

        Prompts are tokenized by ``tokens.encode`` (special tokens added once; an empty
        prompt becomes ``prefix_id``). Generation stops at any of ``eos_ids``; each result
        records whether it ended with EOS within ``max_new_tokens`` and how many tokens it
        took. temperature 0 means greedy (then ``n`` must be 1). Sampling is seeded per
        prompt (``decoding.sample_uniforms``): the same seed and prompt give the same samples
        whatever else is in the call and whatever the batch size. ``batch_size`` (default:
        the LM's, at least 512) is the most sequences (prompts x n) decoded together: a
        decoding step of a small model multiplies a few rows by every weight, and a CPU does
        that at a fraction of its speed unless there are a few hundred rows. This is
        ``complete`` with prompts only.
        """
        return generate_by_complete(self, prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature,
                                    top_p=top_p, seed=seed, gen_batch=batch_size)

    # -- complete: candidates, a greedy answer and samples per prompt, in one pass -----------

    def complete(self, requests: Sequence[PromptRequest], *, temperature: float = 1.0, top_p: float = 1.0,
                 sample_tokens: int = 24, seed: int = 0, gen_batch: int | None = None) -> list[Completion]:
        """Per request: the log-likelihood of each continuation after its context, its greedy
        answer (``greedy_tokens`` > 0) and its ``samples`` sampled continuations of
        ``sample_tokens`` tokens at ``temperature`` (top-p ``top_p``), in the order of
        ``requests``.

        On the cached engine every prompt runs through the model once: its continuations
        are scored from its cache, and its greedy answer goes on from there (the first
        continuation's tokens that are the model's argmax are already the answer's first
        tokens, so decoding starts after them, and is skipped when they fill the budget).
        Then the greedy answers and the samples of all batches (up to a memory budget) decode
        together, at most ``gen_batch`` (default max(512, batch_size)) sequences a step. A
        continuation scored after another context than the prompt's tokens (a BPE merge
        across the boundary) goes through ``loglikelihood``. ``share_prefix=False``, a model
        whose cache cannot be reused and a request too long for the model take the reference
        path (``loglikelihood`` on the reference path, transformers' ``generate``). Both
        paths give the same scores up to float rounding (tested to 1e-5), the same greedy
        answers and the same samples (see ``decoding``).
        """
        if any(r.samples < 0 or r.greedy_tokens < 0 for r in requests):
            raise FactlabError("greedy_tokens and samples must be 0 (none) or more")
        if any(r.samples for r in requests) and (temperature <= 0 or sample_tokens < 1):
            raise FactlabError("sampling needs temperature > 0 and sample_tokens >= 1; "
                               f"got temperature {temperature}, sample_tokens {sample_tokens}")
        gen_batch = max(512, self.batch_size) if gen_batch is None else _check_batch_size(gen_batch)
        counts = [r.samples for r in requests]
        sampler = (Sampler(sample_uniforms(seed, [r.prompt for r in requests], counts, sample_tokens),
                           temperature, top_p) if any(counts) else None)
        first_samples = [0, *accumulate(counts)][:-1]  # each request's first sampler row
        prompts = self._prompt_ids([r.prompt for r in requests])
        split = iter(self.tokenize_pairs([(r.scored_context, c) for r in requests for c in r.continuations]))
        pairs = [[next(split) for _ in r.continuations] for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        with eval_mode(self.model):
            if self._cached():
                self._complete_cached(requests, prompts, pairs, first_samples, results,
                                      gen_batch=gen_batch, sample_tokens=sample_tokens, sampler=sampler)
            rest = [i for i, c in enumerate(results) if c is None]
            if rest:
                done = reference.complete(
                    self.hf, [prompts[i] for i in rest], [requests[i].greedy_tokens for i in rest],
                    [requests[i].samples for i in rest], [pairs[i] for i in rest], batch_size=self.batch_size,
                    gen_batch=gen_batch, sample_tokens=sample_tokens, sampler=sampler,
                    first_samples=[first_samples[i] for i in rest])
                for i, c in zip(rest, done):
                    results[i] = c
        return results  # type: ignore[return-value]

    def _complete_cached(self, requests: Sequence[PromptRequest], prompts: list[tuple[int, ...]],
                         pairs: list[list[Pair]], first_samples: list[int], results: list[Completion | None], *,
                         gen_batch: int, sample_tokens: int, sampler: Sampler | None) -> None:
        """Fill ``results`` for the requests the engine can take; leaves the others None."""
        max_len = self.max_length
        fast, rows = [], []
        for i, r in enumerate(requests):
            # In place: the continuations scored right after the prompt's tokens.
            here = tuple(cont if ctx == prompts[i] else None for ctx, cont in pairs[i])
            longest = max([r.greedy_tokens, sample_tokens if r.samples else 0] + [len(c) for c in here if c])
            if max_len is None or len(prompts[i]) + longest <= max_len:
                fast.append(i)
                rows.append(engine.Row(prompts[i], here, r.greedy_tokens, r.samples, first_samples[i]))
        # Continuations scored after another context than the prompt (a BPE merge across the
        # boundary cut the context back): loglikelihood, in one call.
        other = [(i, k) for i in fast for k, (ctx, _) in enumerate(pairs[i]) if ctx != prompts[i]]
        other_scores = dict(zip(other, self._loglikelihood([pairs[i][k] for i, k in other]))) if other else {}
        done = engine.run(self.hf, rows, max_rows=gen_batch, budget=self._budget, sample_tokens=sample_tokens,
                          sampler=sampler)
        for i, c in zip(fast, done):
            if c is not None:
                results[i] = c._replace(scores=[s if s is not None else other_scores[(i, k)]
                                                for k, s in enumerate(c.scores)])

