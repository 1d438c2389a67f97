"""The model interface (``evaluate.lm.LM``'s requests) answered by llama.cpp itself: a GGUF file
scored, continued and sampled in the runtime users deploy it in (xllamacpp, see llama_cpp.py).

``LlamaCppLM`` has ``LM``'s public methods with the same signatures and results
(``loglikelihood``, ``loglikelihood_rolling``, ``generate``, ``complete``, ``tokenize_pairs``),
so the evaluator, the probe scoring and perplexity run on it unchanged. Strings become tokens
through the same code as for ``LM`` (``evaluate.tokens``: ``split_pair``, ``encode``,
``chat_prompt``), but with llama.cpp's tokenizer and chat template (``LlamaCppTokenizer``), so
what is scored is what llama.cpp would feed the model.

How each request runs in llama.cpp:

- a continuation's log-prob: its tokens forced after the context (``LlamaCpp.force``: one
  request per run of ordinary tokens, a token-id grammar; one per special token, a logit bias),
  each token's log-softmax of the raw logits and whether it was the argmax; the context's
  key/value cache is reused from the previous request when it starts the same way
  (``cache_prompt``), so a probe's candidates and greedy answer pay for its prompt once;
- ``loglikelihood_rolling``: the same windows as ``LM`` (``evaluate.lm.rolling_windows``), each
  window's scored tokens forced after its context tokens. Generated one token at a time, so it
  costs a decoding step per token rather than one batched forward per window (llama.cpp's
  server returns no prompt log-probs);
- greedy answers: llama.cpp's greedy sampler (top-1), stopping at any end-of-generation token;
- samples: llama.cpp's temperature and top-p samplers (nothing else), seeded per (seed, prompt,
  sample). The same seed gives the same samples here, but not the same as ``LM``'s: llama.cpp
  draws from its own generator, so sample hit rates are a fresh draw of the same distribution.

One request at a time (one llama.cpp slot); ``batch_size`` arguments are accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import BatchEncoding

from factlab.errors import FactlabError
from factlab.evaluate.decoding import prompt_seed
from factlab.evaluate.interface import generate_by_complete
from factlab.evaluate.lm import Completion, Generation, LogLik, PromptRequest, RollingLogLik
from factlab.evaluate.rolling import rolling_plan
from factlab.evaluate.tokens import TokenCache, encode, prefix_id
from factlab.models.llama_cpp import LlamaCpp

RUNTIMES = ("transformers", "llama.cpp")
"""What `factlab eval` / `factlab chat` run a model in (--runtime)."""

_NORMAL_TYPES = (1, 6)  # gguf.TokenType NORMAL and BYTE: tokens a grammar can force


def read_gguf_meta(path: Path) -> dict:
    """What a GGUF file says about its tokenizer and context, read with the `gguf` package:
    {"tokens", "types", "bos_id", "eos_id", "pad_id", "add_bos", "chat_template", "context_length",
    "architecture", "name"}."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # not a GGUF file, truncated, ...
        raise FactlabError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                           "give a .gguf model file") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture", "")
    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise FactlabError(f"{path} holds no tokenizer (tokenizer.ggml.tokens); give a GGUF model file with its vocabulary")
    return {"tokens": tokens, "types": field("tokenizer.ggml.token_type") or [1] * len(tokens),
            "bos_id": field("tokenizer.ggml.bos_token_id"), "eos_id": field("tokenizer.ggml.eos_token_id"),
            "pad_id": field("tokenizer.ggml.padding_token_id"), "add_bos": bool(field("tokenizer.ggml.add_bos_token", False)),
            "chat_template": field("tokenizer.chat_template"), "context_length": field(f"{arch}.context_length"),
            "architecture": arch, "name": field("general.name", Path(path).stem)}


class LlamaCppTokenizer:
    """The part of a transformers tokenizer that factlab's scoring uses (``encode``, calling it,
    ``decode``, ``apply_chat_template``, the special tokens), answered by llama.cpp: its
    tokenizer, its detokenizer and its rendering of the GGUF's chat template."""

    def __init__(self, cpp: LlamaCpp, meta: dict, name: str):
        self._cpp = cpp
        self.name_or_path = name
        tokens, types = meta["tokens"], meta["types"]
        self.special_ids = frozenset(i for i, t in enumerate(types) if t not in _NORMAL_TYPES)
        self.bos_token_id, self.eos_token_id = meta["bos_id"], meta["eos_id"]
        self.pad_token_id = meta["pad_id"] if meta["pad_id"] is not None else self.eos_token_id
        self.bos_token = tokens[self.bos_token_id] if self.bos_token_id is not None else None
        self.eos_token = tokens[self.eos_token_id] if self.eos_token_id is not None else None
        self.chat_template = meta["chat_template"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """llama.cpp's token ids of `text` (special tokens in the text parsed; BOS added when
        `add_special_tokens` and the file says so)."""
        return self._cpp.tokenize(text, add_special=add_special_tokens)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, **_) -> BatchEncoding:
        if isinstance(text, str):
            return BatchEncoding({"input_ids": self.encode(text, add_special_tokens)})
        return BatchEncoding({"input_ids": [self.encode(t, add_special_tokens) for t in text]})

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        return self._cpp.detokenize(ids) if ids else ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            **_) -> str | list[int]:
        if not self.chat_template:
            raise FactlabError(f"{self.name_or_path} has no chat template (tokenizer.chat_template); chat and qa probes need a chat model")
        text = self._cpp.apply_template(messages, add_generation_prompt)
        return encode(self, text) if tokenize else text


class LlamaCppLM:
    """A GGUF file in llama.cpp behind ``LM``'s requests (see the module docstring).

    ``model`` is None (there is no torch model); ``tokenizer`` is a ``LlamaCppTokenizer``. Close
    it (or use it as a context manager) to stop the llama.cpp server and free the model.
    """

    def __init__(self, path: Path, batch_size: int = 16, *, n_ctx: int | None = None, threads: int | None = None,
                 lora: Path | None = None):
        import os

        path = Path(path)
        if not path.is_file():
            raise FactlabError(f"GGUF file {path} does not exist; give the path of a .gguf file")
        meta = read_gguf_meta(path)
        self.path, self.batch_size, self.model = path, batch_size, None
        trained = int(meta["context_length"] or 4096)
        # The file's context, at most 8192 tokens (the key/value cache is allocated for all of it).
        self.n_ctx = n_ctx or min(trained, 8192)
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._cpp = LlamaCpp(path, n_ctx=self.n_ctx, threads=threads, lora=lora)
        self.tokenizer = LlamaCppTokenizer(self._cpp, meta, meta["name"] or path.stem)
        self._tokens = TokenCache(self.tokenizer)

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cpp.close()

    @property
    def max_length(self) -> int:
        """The context llama.cpp was started with, in tokens."""
        return self.n_ctx

    @property
    def prefix_id(self) -> int:
        return prefix_id(self.tokenizer)

    # -- scoring -----------------------------------------------------------------------------

    def token_logprobs(self, ctx: Sequence[int], cont: Sequence[int]) -> list[tuple[float, bool]]:
        """(log-prob, is the argmax) of each token of `cont` after the token ids `ctx`, in llama.cpp."""
        ctx, cont = list(ctx), list(cont)
        if len(ctx) + len(cont) > self.n_ctx:
            raise FactlabError(f"a request of {len(ctx) + len(cont)} tokens is longer than llama.cpp's context "
                               f"({self.n_ctx}); shorten the prompt")
        out: list[tuple[float, bool]] = []
        i = 0
        while i < len(cont):
            special = cont[i] in self.tokenizer.special_ids
            j = i + 1
            while not special and j < len(cont) and cont[j] not in self.tokenizer.special_ids:
                j += 1
            out += [(lp, top == t) for (lp, top), t in zip(self._cpp.force(ctx + cont[:i], cont[i:j], special), cont[i:j])]
            i = j
        return out

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(context ids, continuation ids) of each pair as ``loglikelihood`` scores it."""
        out = []
        for context, continuation in pairs:
            ctx, cont = self._tokens.split_pair(context, continuation)
            out.append((tuple(ctx) or (self.prefix_id,), tuple(cont)))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """Score each (context, continuation) pair (``LM.loglikelihood``), in llama.cpp."""
        results = []
        for ctx, cont in self.tokenize_pairs(pairs):
            scored = self.token_logprobs(ctx, cont)
            results.append(LogLik(sum(lp for lp, _ in scored), len(cont), all(g for _, g in scored)))
        return results

    def loglikelihood_rolling(self, texts: Sequence[str | Sequence[int]], seq_len: int, stride: int | None = None, *,
                              batch_size: int | None = None) -> list[RollingLogLik]:
        """Log-likelihood of each whole text in windows of ``seq_len`` tokens (``LM.loglikelihood_rolling``:
        the same windows and the same tokens scored), in llama.cpp."""
        streams, plans = rolling_plan(self.tokenizer, texts, seq_len, stride, self.n_ctx, "llama.cpp's")
        out = []
        for ids, windows in zip(streams, plans):
            total, count = 0.0, 0
            for start, end, score_from in windows:
                scored = self.token_logprobs(ids[start:score_from], ids[score_from:end])
                total += sum(lp for lp, _ in scored)
                count += len(scored)
            out.append(RollingLogLik(total, count))
        return out

    # -- generation --------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self._tokens.encode(prompt) or [self.prefix_id]

    def _generation(self, tokens: list[int], ended: bool) -> Generation:
        text_ids = tokens[:-1] if ended else tokens
        return Generation(text=self.tokenizer.decode(text_ids, skip_special_tokens=True), n_tokens=len(tokens),
                          ended_with_eos=ended)

    def _generate_one(self, ids: list[int], n_tokens: int, **sampling) -> Generation:
        if len(ids) + n_tokens > self.n_ctx:
            raise FactlabError(f"a prompt of {len(ids)} tokens plus {n_tokens} new ones is longer than llama.cpp's "
                               f"context ({self.n_ctx}); shorten the prompt")
        tokens, ended = self._cpp.generate(ids, n_tokens, **sampling)
        return self._generation(tokens, ended)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, n: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int | None = None) -> list[list[Generation]]:
        """``n`` generations per prompt (``LM.generate``), in llama.cpp."""
        return generate_by_complete(self, prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature,
                                    top_p=top_p, seed=seed)

    def complete(self, requests: Sequence[PromptRequest], *, temperature: float = 1.0, top_p: float = 1.0,
                 sample_tokens: int = 24, seed: int = 0, gen_batch: int | None = None) -> list[Completion]:
        """Per request: its continuations' log-likelihoods, its greedy answer and its samples
        (``LM.complete``), in llama.cpp. Sample j of a prompt is seeded by (seed, prompt, j)."""
        if any(r.samples < 0 or r.greedy_tokens < 0 for r in requests):
            raise FactlabError("greedy_tokens and samples must be 0 (none) or more")
        if any(r.samples for r in requests) and (temperature <= 0 or sample_tokens < 1):
            raise FactlabError("sampling needs temperature > 0 and sample_tokens >= 1; "
                               f"got temperature {temperature}, sample_tokens {sample_tokens}")
        out = []
        # Per request, candidates then the greedy answer then the samples: each starts with the
        # prompt's tokens, so llama.cpp reuses their cache from the request before.
        for r in requests:
            scores = self.loglikelihood([(r.scored_context, c) for c in r.continuations]) if r.continuations else []
            ids = self._prompt_ids(r.prompt)
            greedy = self._generate_one(ids, r.greedy_tokens) if r.greedy_tokens else None
            base = prompt_seed(seed, r.prompt)
            samples = [self._generate_one(ids, sample_tokens, temperature=temperature, top_p=top_p, seed=base + j)
                       for j in range(r.samples)]
            out.append(Completion(scores, greedy, samples))
        return out

    # -- chat --------------------------------------------------------------------------------

    def chat_stream(self, history: list[dict], *, temperature: float, max_new_tokens: int, seed: int = 0) -> Iterator[str]:
        """The assistant's answer to `history` (rendered by the GGUF's chat template in llama.cpp),
        as text pieces while llama.cpp generates them; stops at an end-of-generation token."""
        ids = encode(self.tokenizer, self.tokenizer.apply_chat_template(history, add_generation_prompt=True))
        if len(ids) + max_new_tokens > self.n_ctx:
            raise FactlabError(f"the conversation ({len(ids)} tokens) and its answer no longer fit llama.cpp's context "
                               f"({self.n_ctx}); /reset the conversation")
        for piece, _, _ in self._cpp.stream(ids, max_new_tokens, temperature=temperature, seed=seed):
            if piece:
                yield piece


def check_runtime(runtime: str) -> str:
    """`runtime` if it is one of RUNTIMES, else FactlabError naming them."""
    if runtime not in RUNTIMES:
        raise FactlabError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    return runtime


def check_gguf_target(path: Path) -> Path:
    """`path` if it is a GGUF file llama.cpp can be given, else FactlabError saying what to give."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise FactlabError(f"--runtime llama.cpp runs a .gguf file and {path} is not one; export a run's stage with "
                           "`factlab export RUN --gguf FILE.gguf` and give that file")
    if not path.is_file():
        raise FactlabError(f"GGUF file {path} does not exist; give the path of a .gguf file")
    return path
