"""Replay text sampled from the model itself: ``factlab data replay`` and the `general` replay
source of a model that is not the embedded SmolLM2.

Why the model's own text: cross-entropy on text a model samples from itself at temperature 1
(from BOS alone or a short generic prompt) is an unbiased estimate of the KL divergence from
that model (Bansal & Sanghavi 2025, arXiv 2505.13811), so training on it pulls a fine-tuned
model back towards the base model's distribution rather than towards someone else's text.
factlab/builtin/replay.txt is such text for SmolLM2-135M-Instruct; for any other model the
text is sampled here, once, and cached by the model's fingerprint.

The file is JSONL, one sample per line ({"text", "sample", "seed", "prompt", "tokens", "eos",
"model"}): what `replay: {source: FILE}` and `data.corpus` read ({"text"} per line). Sample i
is drawn with uniforms from a generator seeded by (seed, i) alone (factlab.evaluate.decoding),
so it does not depend on the batch size or on where a resumed run starts. Each sample is
appended as one line in one write; a kill can leave at most a last line without its newline,
which the next run cuts off before it continues with the next sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from factlab.errors import FactlabError
from factlab.fingerprint import model_fingerprint  # noqa: F401  (re-exported: the cache key)

DEFAULT_REPLAY_TOKENS = 20_000
"""Tokens of replay text sampled for a model's cache: modest, since sampling is paid once per
model before its first run (the builtin SmolLM2 replay text is about 38k words)."""

EMBEDDED_MODEL = "smollm2-135m"
"""The model whose own text ships as factlab/builtin/replay.txt."""

# Short generic openings; every other sample starts from BOS alone.
GENERIC_PROMPTS = (
    "Once upon a time",
    "The history of",
    "In this article we",
    "Q:",
    "Here is how to",
    "Dear",
    "One of the most important",
    "The results show that",
    "Chapter 1\n\n",
    "I think that",
    "How does",
    "The following",
)


def prompt_of(i: int) -> str:
    """The prompt of sample ``i``: BOS alone for even i, a generic opening for odd i."""
    return "" if i % 2 == 0 else GENERIC_PROMPTS[(i // 2) % len(GENERIC_PROMPTS)]


def sample_seed(seed: int, i: int) -> int:
    """The generator seed of sample ``i`` under ``seed``."""
    from factlab.evaluate.decoding import prompt_seed

    return prompt_seed(seed, f"replay sample {i}")


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


@dataclass
class ReplayFile:
    """What a replay file holds: its samples in order and their tokens in all."""

    samples: list[dict]

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.samples)

    def texts(self, n_tokens: int | None = None) -> list[str]:
        """The non-empty texts of the first samples that hold ``n_tokens`` (all: None)."""
        out, total = [], 0
        for s in self.samples:
            if n_tokens is not None and total >= n_tokens:
                break
            total += s["tokens"]
            if s["text"].strip():
                out.append(s["text"].strip())
        return out


def check_output_path(path: Path) -> None:
    """FactlabError unless ``path`` is a .jsonl file that can be created or appended to."""
    if path.suffix != ".jsonl":
        raise FactlabError(f"replay output {path} must end in .jsonl (one {{\"text\": ...}} per line, what replay "
                           "sources and data.corpus read); e.g. -o replay.jsonl")
    if path.is_dir():
        raise FactlabError(f"replay output {path} is a folder; give a file name ending in .jsonl")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise FactlabError(f"replay output {path} is not writable; choose another file or fix its permissions")
        return
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FactlabError(f"cannot create {path}: {parent} is not a writable folder; choose another path")


def read_replay_file(path: Path, seed: int | None = None, model: str | None = None, repair: bool = False) -> ReplayFile:
    """The samples of a replay file (none if it does not exist). A last line without its newline
    (a run killed while writing) is ignored, and cut off with ``repair``. FactlabError for a
    file that ``factlab data replay`` did not write, or wrote with another seed or model."""
    if not path.exists():
        return ReplayFile([])
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    samples: list[dict] = []
    for lineno, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), 1):
        try:
            s = json.loads(line)
        except ValueError:
            s = None
        if not (isinstance(s, dict) and isinstance(s.get("text"), str) and s.get("sample") == len(samples)
                and isinstance(s.get("tokens"), int)):
            raise FactlabError(f"{path}:{lineno} is not a sample written by `factlab data replay`; "
                               "give a new file (-o) to sample into")
        if seed is not None and s.get("seed") != seed:
            raise FactlabError(f"{path} was sampled with --seed {s.get('seed')}; pass that seed to continue it, "
                               "or give a new file")
        if model is not None and s.get("model") != model:
            raise FactlabError(f"{path} was sampled from another model (fingerprint {s.get('model')}, this one "
                               f"{model}); give a new file for this model")
        samples.append(s)
    return ReplayFile(samples)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _sample_batch(model, tokenizer, first: int, count: int, seed: int, max_new_tokens: int) -> list[dict]:
    """Samples first .. first + count - 1: transformers' ``generate`` in one left-padded batch,
    each row's tokens drawn at temperature 1 (no top-k, top-p 1) from its own seeded uniforms."""
    from transformers import GenerationConfig, LogitsProcessorList

    from factlab.evaluate.decoding import Sampler, SamplerProcessor
    from factlab.evaluate.lm import eos_ids, max_positions, pad
    from factlab.evaluate.tokens import prefix_id

    start = prefix_id(tokenizer)
    prompts = [prompt_of(i) for i in range(first, first + count)]
    encoded = [[start] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    limit = max_positions(model)
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - max(map(len, encoded)))
    if budget < 1:
        raise FactlabError(f"the model's context ({limit} tokens) leaves no room to sample after the prompts")
    stops = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    device = next(model.parameters()).device
    uniforms = torch.stack([torch.rand(budget, generator=torch.Generator().manual_seed(sample_seed(seed, i)),
                                       dtype=torch.float64) for i in range(first, first + count)])  # (B, budget)
    processor = SamplerProcessor(Sampler(uniforms, temperature=1.0, top_p=1.0))
    ids, mask = pad(encoded, pad_id, "left", device)  # (B, T)
    processor.rows, processor.width = list(range(count)), ids.shape[1]
    # Greedy generate over the sampler's one finite score per row = sampling at temperature 1;
    # a fresh config and neutral penalties, so the model's shipped sampling defaults do not apply.
    config = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1, temperature=None, top_p=None,
                              top_k=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                              eos_token_id=stops or None, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             logits_processor=LogitsProcessorList([processor]))  # (B, T + new)
    samples = []
    for b, row in enumerate(out[:, ids.shape[1]:].tolist()):
        cut = next((k for k, t in enumerate(row) if t in stops), None)
        new = row if cut is None else row[:cut]
        body = encoded[b][1:] + new  # the prompt's tokens and the sampled ones, without the start token
        samples.append({"text": tokenizer.decode(body, skip_special_tokens=True), "sample": first + b, "seed": seed,
                        "prompt": prompts[b], "tokens": len(body), "eos": cut is not None})
    return samples


def check_sampling_args(n_tokens: int, max_new_tokens: int, batch_size: int) -> None:
    """FactlabError naming the option when a count is below 1 (checked before any model loads)."""
    if n_tokens < 1:
        raise FactlabError(f"--tokens {n_tokens} is out of range; give the number of tokens to sample (1 or more)")
    if max_new_tokens < 1:
        raise FactlabError(f"--max-new-tokens {max_new_tokens} is out of range; give 1 or more")
    if batch_size < 1:
        raise FactlabError(f"--batch-size {batch_size} is out of range; give 1 or more")


def sample_replay(model, tokenizer, path: Path, n_tokens: int, *, seed: int = 0, max_new_tokens: int = 192,
                  batch_size: int = 16, fingerprint: str | None = None, console: Console | None = None,
                  on_sample: Callable[[dict], None] | None = None) -> tuple[ReplayFile, int]:
    """Append samples to the replay file ``path`` until it holds at least ``n_tokens`` tokens,
    continuing after the samples it already has (same ``seed`` and model ``fingerprint``).
    Returns the file's contents and how many samples this call added."""
    check_sampling_args(n_tokens, max_new_tokens, batch_size)
    check_output_path(path)
    fingerprint = fingerprint or model_fingerprint(model, tokenizer)[:16]
    have = read_replay_file(path, seed=seed, model=fingerprint, repair=True)
    if have.tokens >= n_tokens:
        return have, 0
    from factlab.progress import progress_bar

    path.parent.mkdir(parents=True, exist_ok=True)
    total, added = have.tokens, 0
    was_training = model.training
    model.eval()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise FactlabError(f"cannot write {path} ({e.strerror}); choose another path") from None
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("replay tokens", total=n_tokens, completed=min(total, n_tokens))
            while total < n_tokens:
                for s in _sample_batch(model, tokenizer, len(have.samples), batch_size, seed, max_new_tokens):
                    s["model"] = fingerprint
                    # One line, one write: a kill leaves whole lines and at most one partial last line.
                    os.write(fd, (json.dumps(s, ensure_ascii=False) + "\n").encode("utf-8"))
                    have.samples.append(s)
                    total += s["tokens"]
                    added += 1
                    bar.update(task, completed=min(total, n_tokens))
                    if on_sample is not None:
                        on_sample(s)
                    if total >= n_tokens:
                        break
                os.fsync(fd)
    finally:
        os.close(fd)
        model.train(was_training)
    return have, added


# --------------------------------------------------------------------------------------------
# The `general` replay source
# --------------------------------------------------------------------------------------------


def uses_builtin_replay(model_ref: str) -> bool:
    """Whether ``model_ref`` (an experiment's `model:`) is the model factlab/builtin/replay.txt
    was sampled from: the embedded alias, or its converted cache folder."""
    from factlab.models.loading import cache_root

    if model_ref == EMBEDDED_MODEL:
        return True
    try:
        return Path(model_ref).expanduser().resolve() == (cache_root() / "models" / EMBEDDED_MODEL).resolve()
    except OSError:
        return False


def replay_cache_path(fingerprint: str) -> Path:
    """Where a model's sampled replay text is cached: <cache>/replay/<fingerprint>.jsonl (cache:
    $FACTLAB_CACHE, else $XDG_CACHE_HOME/factlab, else ~/.cache/factlab)."""
    from factlab.models.loading import cache_root

    return cache_root() / "replay" / f"{fingerprint[:24]}.jsonl"


def replay_documents_for(model_ref: str, model, tokenizer, n_tokens: int | None = None, *,
                         seed: int = 0, console: Console | None = None) -> list[str]:
    """General text for replay (and a KL anchor) of the model ``model_ref``: the shipped
    builtin replay text for the embedded SmolLM2, else the first ``n_tokens`` (default
    DEFAULT_REPLAY_TOKENS) tokens' worth of text sampled from ``model`` itself, sampled once
    and cached by the model's fingerprint (a second call, or another process, reads the cache;
    a cache with fewer tokens is extended)."""
    n_tokens = DEFAULT_REPLAY_TOKENS if n_tokens is None else n_tokens
    if uses_builtin_replay(model_ref):
        from factlab.data.corpus import builtin_replay_documents

        return builtin_replay_documents()
    from filelock import FileLock

    console = console or Console(stderr=True)
    fingerprint = model_fingerprint(model, tokenizer)
    path = replay_cache_path(fingerprint)
    lock = FileLock(str(path) + ".lock")  # sweep workers sharing a model sample it once
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        raise FactlabError(f"cannot write the replay cache {path.parent} ({e.strerror or e}); set FACTLAB_CACHE to a "
                           "writable folder, or give replay files (factlab data replay) instead of source general") from None
    try:
        have = read_replay_file(path, seed=seed, model=fingerprint[:16], repair=True)
        if have.tokens < n_tokens:
            console.print(f"replay text for {model_ref}: sampling {n_tokens - have.tokens:,} tokens from the model "
                          f"itself (temperature 1, seed {seed}; once per model) into {path}")
            have, _ = sample_replay(model, tokenizer, path, n_tokens, seed=seed, fingerprint=fingerprint[:16],
                                    console=console)
        else:
            console.print(f"[dim]replay text for {model_ref}: {n_tokens:,} sampled tokens from {path}[/dim]")
    finally:
        lock.release()
    return have.texts(n_tokens)
