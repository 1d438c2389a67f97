"""Load a GGUF file in llama.cpp itself (the `xllamacpp` package: llama.cpp's server engine as a
Python extension) to check that an exported file works in the runtime it is made for.

xllamacpp's Python methods are the OpenAI-style endpoints; token ids in and out (tokenize, a
greedy completion from given ids) are only on the native endpoints of the server it starts on
127.0.0.1, so those two are HTTP requests to it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from factlab.errors import FactlabError

XLLAMACPP_PIN = "xllamacpp==2026.10.11549"


def _load_error(xllamacpp, params) -> str | None:
    """llama.cpp's own reason for refusing a model, e.g. "unknown pre-tokenizer type: 'gpt2'".

    xllamacpp's exception says only that the server did not start; the reason is in llama.cpp's
    log, which it writes to file descriptor 2 (not Python's sys.stderr). So: load once more with
    the log on and descriptor 2 pointed at a temporary file, and return its first error line.
    """
    import os
    import re
    import sys
    import tempfile
    import time

    params.verbosity = 3
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            xllamacpp.Server(params)
        except Exception:
            pass
        finally:
            time.sleep(0.5)  # llama.cpp logs from a worker thread: let its last lines land in the file
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    m = re.search(r"^\S+ E (?:\S+\s+)?(.*error.*)$", text, re.M)
    return m.group(1).strip() if m else None


class LlamaCpp:
    """A GGUF file loaded by llama.cpp (CPU, one sequence). Use as a context manager."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int = 2):
        try:
            import xllamacpp
        except ImportError:
            raise FactlabError(f"checking a GGUF file in llama.cpp needs the xllamacpp package; install it with: pip install {XLLAMACPP_PIN}") from None
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.verbosity = -1  # llama.cpp's own log is hundreds of lines on stderr
        try:
            self._server = xllamacpp.Server(params)
        except Exception as e:  # RuntimeError "Failed to init server, please check the input params."
            reason = _load_error(xllamacpp, params) or (str(e).splitlines() or [type(e).__name__])[0]
            raise FactlabError(f"llama.cpp cannot load {path} ({reason[:200]})") from None
        self._address = self._server.listening_address

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server = None  # the server stops and frees the model when released

    def _post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(self._address + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        # the server is on 127.0.0.1: never through an http_proxy from the environment
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # e.g. a prompt longer than the context
            detail = e.read().decode("utf-8", errors="replace").replace("\n", " ")[:200]
            raise FactlabError(f"llama.cpp refused a {endpoint} request ({e.code}: {detail})") from None

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's token ids for `text` (with BOS/EOS as the file's add_bos/add_eos say)."""
        return self._post("/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def greedy(self, ids: list[int], n_tokens: int) -> list[int]:
        """The next `n_tokens` token ids after `ids`, greedy (top-1 at every step), stopping early at EOS."""
        r = self._post("/completion", {"prompt": list(ids), "n_predict": n_tokens, "temperature": 0.0, "top_k": 1,
                                       "return_tokens": True, "cache_prompt": False})
        return list(r["tokens"])


def greedy_transformers(model, ids: list[int], n_tokens: int, eos_token_id: int | None) -> list[int]:
    """transformers' greedy continuation of `ids`, stopping at EOS the way llama.cpp does."""
    import torch

    out: list[int] = []
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n_tokens):
            nxt = int(model(x).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_token_id:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def compare_with_llama_cpp(model, tokenizer, gguf_path: Path, prompts: list[str], n_tokens: int = 8) -> dict:
    """Load `gguf_path` in llama.cpp and compare it with the transformers model it was exported from.

    Returns {"prompts", "tokens_same", "greedy_same", "first_token_same", "examples"}: on how many
    prompts llama.cpp's tokenization equals transformers', its greedy continuation of
    transformers' token ids (`n_tokens` tokens) equals transformers' own, and its first greedy
    token does; `examples` holds (prompt, transformers' text, llama.cpp's text) for the first
    three prompts. FactlabError when llama.cpp cannot load the file.
    """
    out = {"prompts": len(prompts), "tokens_same": 0, "greedy_same": 0, "first_token_same": 0, "examples": []}
    all_ids = [tokenizer(text).input_ids for text in prompts]
    n_ctx = max([len(ids) for ids in all_ids] + [0]) + n_tokens + 64  # the longest prompt and its continuation
    with LlamaCpp(Path(gguf_path), n_ctx=max(n_ctx, 256)) as cpp:
        for text, ids in zip(prompts, all_ids):
            out["tokens_same"] += cpp.tokenize(text) == ids
            a = greedy_transformers(model, ids, n_tokens, tokenizer.eos_token_id)
            b = cpp.greedy(ids, n_tokens)
            out["greedy_same"] += a == b
            out["first_token_same"] += a[:1] == b[:1]
            if len(out["examples"]) < 3:
                out["examples"].append((text, tokenizer.decode(a), tokenizer.decode(b)))
    return out
