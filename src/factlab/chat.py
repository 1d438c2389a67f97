"""`factlab chat`: talk to a trained model in the terminal (and pick a run's stage model).

The conversation goes through the tokenizer's chat template, tokens stream as they are
generated (transformers' TextStreamer), the history is kept across turns; `/reset` clears it,
`/quit` (or end of input) ends. With a base model to compare, each question is answered by the
base model first and then by the tuned one, each with its own history.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

import torch
from rich.console import Console

from factlab.errors import FactlabError

HELP = "commands: /reset clears the conversation, /quit ends (so does end of input)"


def pick_target(model_or_run: str, stage: str | None = None, console: Console | None = None,
                runtime: str = "transformers") -> tuple:
    """The eval target (label, model folder[, adapter folder]) of a run's stage (default: the
    last finished stage), or of a model (alias, .gguf, folder, hub id); stages are resolved the
    way `factlab eval RUN` resolves them (with runtime "llama.cpp": the .gguf file itself)."""
    from factlab.experiment.evaluation import eval_targets

    targets = eval_targets(model_or_run, console, runtime)
    if stage is None:
        return targets[-1]
    for t in targets:
        if t[0] == stage:
            return t
    names = ", ".join(t[0] for t in targets)
    raise FactlabError(f"{model_or_run} has no finished stage '{stage}'; choose one of: {names}")


def _turn(model, tokenizer, history: list[dict], *, temperature: float, max_new_tokens: int, out: IO[str],
          seed: int = 0) -> str:
    """Generate one assistant answer to `history`, streaming it to `out`; return its text."""
    from transformers import TextStreamer

    if hasattr(model, "chat_stream"):  # a GGUF in llama.cpp (models.llama_cpp_lm.LlamaCppLM): its own template and sampler
        pieces = []
        for piece in model.chat_stream(history, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        return "".join(pieces).strip()

    enc = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}  # where the model is

    class _Stream(TextStreamer):
        # TextStreamer prints to sys.stdout; send the text to `out` instead (tests, pipes).
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    streamer = _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    # (1, prompt + new) -> the new tokens only
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_loop(models: list[tuple[str, object, object]], *, temperature: float = 0.7, max_new_tokens: int = 200,
              seed: int = 0, inp: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """Read questions from `inp` until /quit or end of input; answer each with every
    (label, model, tokenizer) in `models` in turn (one model, or base then tuned with --compare).
    Returns the number of questions answered."""
    inp = inp or sys.stdin
    out = out or sys.stdout
    for label, _, tok in models:
        if not getattr(tok, "chat_template", None):
            raise FactlabError(f"the {label} model's tokenizer has no chat template; chat needs an instruct (chat) model")
    if temperature < 0:
        raise FactlabError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if max_new_tokens < 1:
        raise FactlabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    torch.manual_seed(seed)  # sampled answers repeat for the same questions and seed
    histories: list[list[dict]] = [[] for _ in models]
    out.write(HELP + "\n")
    answered = 0
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            histories = [[] for _ in models]
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        for (label, model, tok), history in zip(models, histories):
            history.append({"role": "user", "content": text})
            out.write(f"{label}> ")
            out.flush()
            answer = _turn(model, tok, history, temperature=temperature, max_new_tokens=max_new_tokens, out=out,
                           seed=seed + answered)
            history.append({"role": "assistant", "content": answer})
        answered += 1
    return answered


def load_chat_models(model_or_run: str, stage: str | None = None, compare: bool = False,
                     console: Console | None = None, device="cpu", runtime: str = "transformers") -> list[tuple[str, object, object]]:
    """[(label, model, tokenizer)] for chat, on `device` (or a .gguf file in llama.cpp with runtime
    "llama.cpp"): the chosen stage's model, preceded by the base model with `compare` (for a run
    folder: its base model; for a model: itself, no comparison)."""
    from factlab.experiment.evaluation import eval_targets, load_target

    target = pick_target(model_or_run, stage, console, runtime)
    chosen = [target]
    if compare:
        base = eval_targets(model_or_run, console, runtime)[0]
        if base[0] == target[0] or (len(base) == 2 and len(target) == 2 and Path(base[1]) == Path(target[1])):
            raise FactlabError(f"--compare needs a run folder with a trained stage; {model_or_run} has only its base model")
        chosen = [base, target]
    loaded = []
    for t in chosen:
        model, tok = load_target(t, device, runtime)
        loaded.append((t[0], model, tok))
    return loaded
