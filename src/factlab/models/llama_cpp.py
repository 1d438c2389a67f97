"""Load a GGUF file in llama.cpp itself (the `xllamacpp` package: llama.cpp's server engine as a
Python extension) to check that an exported file works in the runtime it is made for.

xllamacpp's Python methods are the OpenAI-style endpoints; token ids in and out (tokenize, a
completion from given ids, the log-probs of given tokens) are only on the native endpoints of the
server it starts on 127.0.0.1, so those are HTTP requests to it (``LlamaCpp.post``).

Log-probs of given tokens: llama.cpp's server reports, for every token it generates, the
log-softmax of the model's raw logits at that position (``n_probs``: computed before any sampler,
so a grammar or a logit bias that forces the token does not change the number) and the top
token there. Forcing a continuation's tokens with a token-id grammar (``root ::= <[12]> <[34]>``)
therefore scores all of them in one request, decoding them one after another after the context
(see ``LlamaCpp.force``). The server has no prompt log-probs (``echo``; llama.cpp PR 15189 was
never merged), which is why the tokens are generated rather than read off the prompt.
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

    def __init__(self, path: Path, n_ctx: int = 512, threads: int = 2, lora: Path | None = None):
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
        params.use_jinja = True  # the GGUF's own chat template, rendered by llama.cpp's Jinja engine
        if lora is not None:  # a LoRA adapter GGUF, applied at scale 1 (llama.cpp's --lora)
            adapter = xllamacpp.CommonAdapterLoraInfo()
            adapter.path = str(lora)
            adapter.scale = 1.0
            params.lora_adapters = [adapter]
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

    def post(self, endpoint: str, body: dict) -> dict:
        """POST `body` as JSON to the server's native `endpoint` (e.g. "/completion"); its JSON answer."""
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
        return self.post("/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, special tokens spelled out (as llama.cpp prints them)."""
        return self.post("/detokenize", {"tokens": list(ids)})["content"]

    def apply_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the GGUF's chat template in llama.cpp (what llama-server's
        chat endpoint feeds the model)."""
        return self.post("/apply-template", {"messages": messages, "add_generation_prompt": add_generation_prompt})["prompt"]

    def force(self, ids: list[int], tokens: list[int], special: bool = False) -> list[tuple[float, int]]:
        """(log-prob, top token id) of each of `tokens` after `ids`, the tokens forced one after
        another: by a token-id grammar, or for one `special` token (an end-of-generation token
        cannot be forced by a grammar, llama.cpp then stops) by a logit bias. The log-prob is
        llama.cpp's log-softmax of the raw logits; the top id is its argmax there."""
        if special:
            assert len(tokens) == 1
            body = {"logit_bias": [[tokens[0], 1e6]]}
        else:
            body = {"grammar": "root ::= " + " ".join(f"<[{t}]>" for t in tokens)}
        r = self.post("/completion", {"prompt": list(ids), "n_predict": len(tokens), "n_probs": 1, "samplers": ["top_k"],
                                      "top_k": 1, "return_tokens": True, "cache_prompt": True, **body})
        probs = r.get("completion_probabilities") or []
        got = [p["id"] for p in probs]
        if got != list(tokens):
            raise FactlabError(f"llama.cpp did not score the tokens it was given ({got[:8]} for {list(tokens)[:8]}); "
                               "check that the GGUF file and llama.cpp build match (xllamacpp " + XLLAMACPP_PIN + ")")
        return [(float(p["logprob"]), int(p["top_logprobs"][0]["id"])) for p in probs]

    def generate(self, ids: list[int], n_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> tuple[list[int], bool]:
        """(new token ids, ended at an end-of-generation token) after `ids`: greedy at temperature
        0, else sampled from softmax(logits / temperature) after top-p filtering (llama.cpp's
        temperature then top_p samplers and nothing else: no top-k, min-p or penalties), with
        llama.cpp's own generator seeded by `seed`. The last id is the end token when it ended."""
        if temperature <= 0:
            sampling = {"samplers": ["top_k"], "top_k": 1}
        else:
            sampling = {"samplers": ["temperature", "top_p"], "temperature": temperature, "top_p": top_p,
                        "seed": int(seed) % 0xFFFFFFFF}  # 0xFFFFFFFF means "random" to llama.cpp
        r = self.post("/completion", {"prompt": list(ids), "n_predict": n_tokens, "return_tokens": True,
                                      "cache_prompt": True, **sampling})
        return list(r["tokens"]), r.get("stop_type") == "eos"

    def stream(self, ids: list[int], n_tokens: int, *, temperature: float = 0.0, seed: int = 0):
        """`generate` as it happens: yields (text piece, token ids, stop type or None) per server event."""
        sampling = ({"samplers": ["top_k"], "top_k": 1} if temperature <= 0 else
                    {"samplers": ["temperature"], "temperature": temperature, "seed": int(seed) % 0xFFFFFFFF})
        body = {"prompt": list(ids), "n_predict": n_tokens, "return_tokens": True, "cache_prompt": True, "stream": True, **sampling}
        req = urllib.request.Request(self._address + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=600) as r:
            for line in r:  # server-sent events: "data: {json}" lines
                line = line.strip()
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    yield event.get("content", ""), list(event.get("tokens") or []), (event.get("stop_type") if event.get("stop") else None)

    def greedy(self, ids: list[int], n_tokens: int) -> list[int]:
        """The next `n_tokens` token ids after `ids`, greedy (top-1 at every step), stopping early at EOS."""
        r = self.post("/completion", {"prompt": list(ids), "n_predict": n_tokens, "temperature": 0.0, "top_k": 1,
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
