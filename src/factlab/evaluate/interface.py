"""The model interface as a contract: what a language model backend takes and gives.

``LanguageModel`` is the protocol every backend implements (``lm.LM`` for transformers
models; a llama.cpp runtime can stand behind the same four methods). Its shape is
lm-evaluation-harness's ``LM`` (``lm_eval/api/model.py``): ``loglikelihood`` scores
(context, continuation) pairs, ``loglikelihood_rolling`` whole texts in windows (perplexity),
``generate`` continues prompts; ``complete`` is all a probe needs from one prompt (its
candidates' scores, its greedy answer, its samples) in one request. The request and result
types are here too. Torch-free: reports and type hints import it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class LogLik(NamedTuple):
    """Log-likelihood of one continuation given its context."""

    logprob: float
    """Sum of the continuation tokens' log-probabilities (natural log)."""
    n_tokens: int
    """Number of continuation tokens."""
    is_greedy: bool
    """Every continuation token is the model's argmax at its position."""

    @property
    def mean_logprob(self) -> float:
        """Log-probability per token (compares candidates of different token lengths)."""
        return self.logprob / self.n_tokens


class RollingLogLik(NamedTuple):
    """Log-likelihood of a whole text, scored in windows (``loglikelihood_rolling``)."""

    logprob: float
    """Sum of the scored tokens' log-probabilities (natural log, summed in float64)."""
    n_tokens: int
    """Number of scored tokens."""


@dataclass(frozen=True)
class Generation:
    """One generated continuation of a prompt."""

    text: str
    """Decoded new text, special tokens removed, cut at the first EOS."""
    n_tokens: int
    """New tokens up to and including EOS (or the budget, if it never stopped)."""
    ended_with_eos: bool


@dataclass(frozen=True)
class PromptRequest:
    """One prompt of ``complete``: candidates to score after it, a greedy answer, samples."""

    prompt: str
    """The text the greedy answer and the samples continue."""
    continuations: tuple[str, ...] = ()
    """Scored after ``context``; the greedy answer may start with the first one's tokens."""
    context: str | None = None
    """What the continuations are scored after (default: ``prompt``); ``split_pair`` moves its
    trailing spaces into the continuation, so a context that is the prompt plus trailing
    spaces is scored right after the prompt's tokens."""
    greedy_tokens: int = 0
    """Budget of the greedy answer in new tokens (0: no greedy answer)."""
    samples: int = 0
    """Sampled continuations (settings in ``complete``)."""

    @property
    def scored_context(self) -> str:
        return self.prompt if self.context is None else self.context


class Completion(NamedTuple):
    """What ``complete`` gives for one request."""

    scores: list[LogLik]
    """One per continuation, in order."""
    greedy: Generation | None
    """The greedy answer (None when ``greedy_tokens`` was 0)."""
    samples: list[Generation]


@runtime_checkable
class LanguageModel(Protocol):
    """What factlab asks of a language model backend (``lm.LM`` is the transformers one).

    Every method takes a batch and returns one result per input, in input order. A pair's
    continuation carries its word-separating space, and its tokens are those of
    ``encode(context + continuation)`` after the context's (``tokens.split_pair``); an empty
    context or prompt is scored after BOS. Sampling is seeded per prompt (the same seed and
    prompt give the same samples whatever else is in the call).
    """

    tokenizer: PreTrainedTokenizerBase
    """Chat templates and token counts (``facts.probe_requests`` reads both)."""

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """Log-likelihood of each continuation after its context."""
        ...

    def loglikelihood_rolling(self, texts: Sequence[str | Sequence[int]], seq_len: int,
                              stride: int | None = None, *,
                              batch_size: int | None = None) -> list[RollingLogLik]:
        """Log-likelihood of each whole text (a string or token ids) in windows of ``seq_len``
        tokens (``stride``: sliding windows; None: non-overlapping)."""
        ...

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int | None = None) -> list[list[Generation]]:
        """``n`` continuations per prompt; temperature 0 is greedy (then n is 1)."""
        ...

    def complete(self, requests: Sequence[PromptRequest], *, temperature: float = 1.0, top_p: float = 1.0,
                 sample_tokens: int = 24, seed: int = 0, gen_batch: int | None = None) -> list[Completion]:
        """Per request: its continuations' scores, its greedy answer and its samples."""
        ...

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(context ids, continuation ids) of each pair, as ``loglikelihood`` scores it."""
        ...


def generate_by_complete(model: LanguageModel, prompts: Sequence[str], *, max_new_tokens: int, n: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, **complete_kw) -> list[list[Generation]]:
    """``generate`` in terms of ``complete`` (prompts only), for every backend: ``n`` answers per
    prompt, greedy (one) at temperature <= 0, else ``n`` samples; `complete_kw` goes to complete."""
    from factlab.errors import FactlabError

    if max_new_tokens < 1:
        raise FactlabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    greedy = temperature <= 0
    if greedy and n != 1:
        raise FactlabError("greedy decoding gives one answer per prompt; set temperature > 0 for n > 1 samples")
    if not greedy and n < 1:
        raise FactlabError(f"n must be at least 1, got {n}")
    requests = [PromptRequest(p, greedy_tokens=max_new_tokens if greedy else 0, samples=0 if greedy else n)
                for p in prompts]
    out = model.complete(requests, temperature=temperature if not greedy else 1.0, top_p=top_p,
                         sample_tokens=max_new_tokens, seed=seed, **complete_kw)
    return [[c.greedy] if greedy else c.samples for c in out]  # type: ignore[list-item]
