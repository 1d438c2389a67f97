"""The evaluation step run on the base model and after every stage (and by `factlab eval`).

One call scores the probes (log-probs, greedy answers, samples), answers the general priming
prompts, and measures the perplexity of the held-out general text, writes the per-probe rows
into the run folder, and returns an EvalRecord. Forgetting is then computed from two saved records (base, stage) without touching
a model.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from factlab.config import EvalSpec
from factlab.data.io import read_text
from factlab.errors import FactlabError
from factlab.evaluate.facts import probe_requests, probe_rows, summarize
from factlab.evaluate.lm import LM, Generation, PromptRequest
from factlab.evaluate.textmetrics import eos_summary, style_summary
from factlab.evaluate.perplexity import builtin_general_text, forgetting_summary, perplexity
from factlab.evaluate.priming import PRIMING_TOKENS, builtin_priming_prompts, find_objects, priming_record, watched_objects
from factlab.evaluate.probes import Probe, load_probes
from factlab.experiment.run_folder import BASE, CONTEXT, EvalRecord, RunFolder


def load_probe_files(paths: list[str]) -> list[Probe]:
    probes: list[Probe] = []
    for p in paths:
        probes.extend(load_probes(p))
    ids = [p.id for p in probes]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise FactlabError(f"probe ids repeat across the probe files: {dup}; make ids unique")
    return probes


def general_texts(spec: EvalSpec) -> dict[str, str]:
    """Held-out texts whose perplexity measures forgetting: {name: text}."""
    texts = {"builtin-general": builtin_general_text()} if spec.builtin_general_text else {}
    for p in spec.general_text:
        text = read_text(Path(p), "general-text file")
        if not text.strip():
            raise FactlabError(f"general-text file {p} is empty; give some held-out text or remove it from eval.general_text")
        texts[Path(p).stem] = text
    return texts


class Evaluator:
    """Scores one model at a time with fixed probes and texts; writes the rows into `folder`
    (scores/<label>.jsonl, scores/<label>.style.jsonl, scores/<label>.priming.jsonl) when given."""

    def __init__(self, spec: EvalSpec, probes: list[Probe], tokenizer, *, seed: int = 0,
                 folder: RunFolder | None = None, console: Console | None = None,
                 conversations: list[list[dict]] | None = None):
        """`conversations`: SFT training conversations; when given, every evaluation also
        answers their prompts and measures style against the training answers and the chat
        format (EOS within the budget, length)."""
        self.spec, self.probes, self.tokenizer, self.seed = spec, probes, tokenizer, seed
        self.conversations = conversations or []
        self.texts = general_texts(spec)
        self.folder = folder
        self.console = console or Console(stderr=True)
        # The style prompts in the chat template, rendered once for every evaluation.
        self.style_prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False)
                              for c in self.conversations]
        # Priming: the trained names to look for, and the general prompts answered to find them
        # (none when there are no fact probes to take names from, or eval.priming is off).
        self.priming_objects, self.priming_skipped = watched_objects(probes) if spec.priming else ([], [])
        self.priming_prompts = builtin_priming_prompts() if self.priming_objects else []

    def evaluate(self, label: str, model, context: str | None = None, with_perplexity: bool = True) -> EvalRecord:
        """The model's EvalRecord: summarize(rows) per probe kind, perplexity per held-out text,
        style (answers to the SFT training prompts) when there are conversations, and the
        priming record (evaluate.priming) when there are fact probes.

        The probes, the training prompts and the general priming prompts go through the model
        in one ``LM.complete`` call, so their answers decode together. With `context` (the
        in-context baseline) no samples are drawn and no training or priming prompts
        answered: sampling after a prompt of a whole corpus adds little to that reference.
        """
        t0 = time.perf_counter()
        out = EvalRecord(label)
        spec, s = self.spec, self.spec.sampling
        # A model that answers LM's requests itself (a GGUF in llama.cpp, models.llama_cpp_lm) is used as it is.
        from factlab.models.llama_cpp_lm import LlamaCppLM

        lm = model if isinstance(model, LlamaCppLM) else LM(model, self.tokenizer, batch_size=spec.batch_size)
        requests = probe_requests(lm, self.probes, greedy_tokens=spec.greedy_tokens, qa_tokens=spec.qa_tokens,
                                  samples=0 if context else s.n, context=context)
        prompts = self.style_prompts if context is None else []
        requests += [PromptRequest(p, greedy_tokens=spec.style_tokens) for p in prompts]
        general = self.priming_prompts if context is None else []
        requests += [PromptRequest(p, greedy_tokens=PRIMING_TOKENS) for p in general]
        if requests:
            what = ", ".join(x for x in (f"{len(self.probes)} probes" if self.probes else "",
                                         f"{len(prompts)} training prompts" if prompts else "",
                                         f"{len(general)} priming prompts" if general else "") if x)
            with self.console.status(f"scoring {what} on {label} ..."):
                done = lm.complete(requests, temperature=s.temperature, sample_tokens=s.max_new_tokens, seed=self.seed,
                                   gen_batch=max(512, spec.batch_size))
            rows: list[dict] = []
            if self.probes:
                rows = probe_rows(self.probes, done[:len(self.probes)])
                if self.folder is not None:
                    self.folder.write_scores(label, rows)
                out.summaries = summarize(rows)
            if prompts:
                out.style = self.style(label, [d.greedy for d in done[len(self.probes):len(self.probes) + len(prompts)]])
            if general:
                out.priming = self.priming(label, rows, [d.greedy for d in done[len(self.probes) + len(prompts):]])
        if with_perplexity:
            with self.console.status(f"perplexity of held-out text on {label} ..."):
                for name, text in self.texts.items():
                    out.perplexity[name] = perplexity(model, self.tokenizer, text, seq_len=spec.perplexity_seq_len,
                                                      batch_size=spec.batch_size)
        self.console.print(f"[dim]evaluated {label} in {time.perf_counter() - t0:.1f} s[/dim]")
        return out

    def priming(self, label: str, rows: list[dict], gens: list[Generation]) -> dict:
        """The priming record (evaluate.priming.priming_record) of the greedy answers to the
        locality probes (from the probe ``rows``) and ``gens``, those to the general prompts;
        every answer is written to scores/<label>.priming.jsonl."""
        answers = [{"set": "locality", "prompt": r["prompt"], "answer": r["greedy"]} for r in rows if r["kind"] == "locality"]
        answers += [{"set": "general", "prompt": p, "answer": g.text} for p, g in zip(self.priming_prompts, gens, strict=True)]
        if self.folder is not None:
            self.folder.write_priming(label, [{**a, "objects": find_objects(a["answer"], self.priming_objects)} for a in answers])
        return priming_record(answers, self.priming_objects, self.priming_skipped)

    def style(self, label: str, gens: list[Generation]) -> dict:
        """Style of the greedy answers ``gens`` to the SFT training prompts against the training
        answers (ROUGE-L, BLEU, repetition, diversity on a fixed-length prefix) and chat format."""
        refs = [[c[-1]["content"]] for c in self.conversations]
        if self.folder is not None:
            self.folder.write_style(label,
                       [{"prompt": c[-2]["content"], "reference": r[0], "answer": g.text, "tokens": g.n_tokens,
                         "eos": g.ended_with_eos} for c, r, g in zip(self.conversations, refs, gens)])
        return {**style_summary([g.text for g in gens], refs),
                **{f"chat_{k}": v for k, v in eos_summary([g.ended_with_eos for g in gens], [g.n_tokens for g in gens]).items()}}


def forgetting(base: EvalRecord, after: EvalRecord) -> dict:
    """Forgetting of a stage from two saved evaluations (see Evaluator.evaluate)."""

    def view(ev: EvalRecord) -> dict:
        loc = ev.summaries.get("locality", {})
        return {"perplexity": ev.perplexity, "locality": loc.get("accuracy"), "locality_greedy": loc.get("greedy_match"),
                "priming": ev.priming}

    return forgetting_summary(view(base), view(after))


def eval_targets(model_or_run: str, console: Console | None = None, runtime: str = "transformers") -> list[tuple]:
    """What `factlab eval` scores: a run folder gives its base model and every finished
    stage: its merged model, or for a stage that was not merged (a prompt method, or
    `merge: false`) the model it trained on plus its adapter, as (label, model, adapter);
    anything else is one model (alias, folder or hub id), as (label, model). With runtime
    "llama.cpp" the model is a .gguf file, run as it is (label, file)."""
    from factlab.models.loading import resolve_model

    path = Path(model_or_run)
    if runtime == "llama.cpp":
        from factlab.models.llama_cpp_lm import check_gguf_target

        return [(path.name, check_gguf_target(path))]
    if RunFolder.is_run(path) and RunFolder(path).config_path.is_file():
        run = RunFolder(path)
        model = run.read_config().get("model")
        if not isinstance(model, str):
            raise FactlabError(f"{run.config_path} names no model; restore the file")
        targets: list[tuple] = [(BASE, resolve_model(model, console))]
        previous = targets[0][1]  # the model the next stage trained on
        for stage in run.read_results().stages:
            merged, adapter = run.merged_model(stage), run.adapter(stage)
            if merged is not None:
                targets.append((stage.name, merged))
                previous = merged
            elif adapter is not None:
                targets.append((stage.name, previous, adapter))
        return targets
    return [(path.name if path.is_dir() else model_or_run, resolve_model(model_or_run, console))]


def load_target(target: tuple, device="cpu", runtime: str = "transformers"):
    """(model, tokenizer) for an eval target, on `device`: a model folder, or a model folder
    plus a PEFT adapter (prompt methods get their logits aligned with the input ids, as in a run).
    With runtime "llama.cpp": the GGUF file loaded in llama.cpp (models.llama_cpp_lm.LlamaCppLM,
    which answers LM's requests itself) and its llama.cpp tokenizer."""
    from factlab.models.loading import load_model

    if runtime == "llama.cpp":
        from factlab.models.llama_cpp_lm import LlamaCppLM

        lm = LlamaCppLM(Path(target[1]))
        return lm, lm.tokenizer
    model, tokenizer = load_model(target[1], device=device)
    if len(target) > 2 and target[2] is not None:
        from peft import PeftModel

        from factlab.train.peft_methods import align_virtual_token_logits

        model = PeftModel.from_pretrained(model, target[2])
        model.eval()
        align_virtual_token_logits(model)
    return model, tokenizer


def evaluate_models(targets: list[tuple], spec: EvalSpec, *, context: str | None = None,
                    seed: int = 0, folder: RunFolder | None = None, console: Console | None = None,
                    device="cpu", runtime: str = "transformers") -> dict:
    """Evaluate each (label, model folder[, adapter folder]) with the same probes and texts; the first is the
    baseline for forgetting. With `context`, the first model is also scored with the source
    text in the prompt (label "<first>+context"). Returns {"summaries", "perplexity",
    "forgetting"}, each by label (what `factlab eval -o` saves). Models are loaded on `device`, or
    in llama.cpp with runtime "llama.cpp" (targets are then GGUF files)."""
    from factlab.data.sft import require_chat_template

    console = console or Console(stderr=True)
    probes = load_probe_files(spec.probes)
    results: dict = {"summaries": {}, "perplexity": {}, "forgetting": {}}
    evaluator = base = None
    for i, target in enumerate(targets):
        label = target[0]
        model, tokenizer = load_target(target, device, runtime)
        if i == 0:
            if any(p.kind == "qa" for p in probes):
                require_chat_template(tokenizer, "qa probes")
            evaluator = Evaluator(spec, probes, tokenizer, seed=seed, folder=folder, console=console)
        ev = evaluator.evaluate(label, model)
        results["summaries"][label], results["perplexity"][label] = ev.summaries, ev.perplexity
        if i == 0:
            base = ev
            if context is not None:
                ctx = evaluator.evaluate(f"{label}{CONTEXT}", model, context=context, with_perplexity=False)
                results["summaries"][ctx.label] = ctx.summaries
        else:
            results["forgetting"][label] = forgetting(base, ev)
        if hasattr(model, "close"):  # llama.cpp: stop its server now, not whenever it is collected
            model.close()
        del model
    return results
