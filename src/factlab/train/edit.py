"""Editing instead of training (`kind: edit`): MEMIT and AlphaEdit write facts into the MLP
output projections (`down_proj`) of a band of early-middle layers in closed form.

The picture both methods share (Meng et al. 2023, arXiv 2210.07229): an MLP output projection
W (hidden x inner) is a key-value memory, v = W k, and the key k a layer reads at a subject's
last token recalls what the model knows about that subject. An edit finds, for each subject,
the residual-stream change delta that makes the model say the new objects, then changes the W
of several layers so that their values add up to that change at the subject's keys:

  1. values     one delta per subject name (an alias is a name of its own: its key differs),
                optimised with Adam and added to the output of the last edit layer at the
                subject's last token, so that the model predicts every object of the subject's
                facts after each training wording of their relation (the relation's `doc`
                templates; held-out wordings are never used) with a few short generated
                contexts before it; a KL term keeps the prediction after "<subject> is a",
                a norm penalty and a clamp keep delta small. Grouped by subject (MEMIT's
                requests are per fact): the key is the subject's, so per-fact values at one key
                would be averaged by the solve below, while one delta can carry all of them.
  2. keys       k at the subject's last token, averaged over the contexts, per distinct text up
                to the subject (a wording that starts with the subject and one that does not
                give different keys), read from the model as it is when the layer is edited.
  3. update     for each edit layer l in order (i = 0 .. L-1), the residual still missing at
                the last edit layer, R = (h_orig + delta - h_now) / (L - i), is written by
                  memit      dW = R K^T (lambda C + K K^T)^-1
                  alphaedit  dW = R K^T P ((K K^T + K_p K_p^T) P + l2 I)^-1
                where C = E[k k^T] is the key covariance of general text (per token), P the
                projection onto the eigenvectors of C with eigenvalues below
                `nullspace_threshold` (its null space: dW k = 0 for every k outside it, so
                the outputs of general-text keys stay as they were; Fang et al. 2025, arXiv
                2410.02355) and K_p the keys of earlier batches (sequential editing).

memit's dW is the minimiser of ||dW K - R||^2 + lambda tr(dW C dW^T) (tests/test_edit.py checks
it against torch.linalg.lstsq of that objective). C is estimated once per model, layer and
token count from general text (`edit.cov_source`; by default factlab/builtin/replay.txt for
SmolLM2, text sampled from the model itself for other models; 1e5 tokens by default, far below
MEMIT's 44M tokens: arXiv 2506.04226 finds small samples enough) and cached under
<cache>/edit-stats/ by the model's fingerprint (factlab.fingerprint), the text's hash, the
token count and the layer. Facts are edited in batches (`edit.batch_size`, default all at
once), each batch on the model the previous one left; a subject that comes back in a later
batch has its earlier facts in that batch's value optimisation too, so they are kept.

Written by hand: no maintained library implements these on transformers 5 models (EasyEdit and
the papers' code are research repositories pinned to older transformers and CUDA), and the
algorithm is a few hundred lines of linear algebra. Everything is computed in fp32, the solves
in float64 on the CPU (any device holds the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from factlab.config import EditSpec, StageSpec
from factlab.errors import FactlabError
from factlab.evaluate.tokens import TokenCache

SUPPORTED = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3", "smollm3")
"""Model types with a layer-group table (factlab.models.targets) whose MLP output projection is
a Linear named last in the table's `mlp` group (down_proj): the ones edit can write into."""

CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
"""Openings of the generated contexts (MEMIT's)."""
STOP_LOSS = 5e-2
"""A value optimisation stops once its loss is below this (MEMIT's)."""
COV_SEQ_LEN = 256
COV_BATCH = 8
READ_BATCH = 32


# ---------------------------------------------------------------------------------------
# Inputs and requests (no model)


@dataclass
class EditInputs:
    """The facts an edit stage writes, their subjects' aliases and the relation wordings."""

    facts: list
    aliases: dict = field(default_factory=dict)
    relations: dict = field(default_factory=dict)
    lang: str = "en"


def load_edit_inputs(spec: EditSpec) -> EditInputs:
    """Read edit.facts (fact table or synth world) and edit.relations; the one-line errors of a
    misconfigured edit stage are raised here, before any model is loaded."""
    from factlab.data.augment import load_facts_input
    from factlab.data.templates import load_relations_file

    facts, aliases, lang = load_facts_input(spec.facts)
    if spec.n_facts is not None:
        if spec.n_facts > len(facts):
            raise FactlabError(f"edit.n_facts is {spec.n_facts}, but {spec.facts} has {len(facts)} facts; "
                               f"give at most {len(facts)}")
        facts = facts[:spec.n_facts]
    relations = load_relations_file(spec.relations) if spec.relations else {}
    return EditInputs(facts, aliases, relations, lang)


def edit_requests(spec: EditSpec, inputs: EditInputs) -> list[dict]:
    """One request per (batch, subject name): {"batch", "subject", "items": [{"fact", "prompt",
    "span", "object"}]}. `prompt` is a training wording cut before the object, `span` the
    subject's characters in it. The facts are cut into batches of edit.batch_size in file
    order; a subject's request in a batch holds its facts of that batch and of every earlier
    one (see the module docstring). JSON-serialisable (the sweep cache hashes them)."""
    from factlab.data.templates import fill, relation_wordings

    size = spec.batch_size or len(inputs.facts)
    out: list[dict] = []
    seen: dict[str, list] = {}  # subject name -> its facts edited so far
    for b, start in enumerate(range(0, len(inputs.facts), size)):
        names: list[str] = []
        for f in inputs.facts[start:start + size]:
            for name in (f.subject, *inputs.aliases.get(f.id, ())):
                seen.setdefault(name, []).append(f)
                if name not in names:
                    names.append(name)
        for name in names:
            items = []
            for f in seen[name]:
                templates, _ = relation_wordings(f.relation, inputs.lang, inputs.relations, generic=True)
                for t in templates.doc[:spec.wordings] if spec.wordings else templates.doc:
                    head = fill(t[:t.index("{s}")], s=name, o=f.object)
                    prompt = fill(t[:t.index("{o}")], s=name, o=f.object).rstrip()
                    items.append({"fact": f.id, "prompt": prompt, "span": [len(head), len(head) + len(name)],
                                  "object": f.object})
            out.append({"batch": b, "subject": name, "items": items})
    return out


# ---------------------------------------------------------------------------------------
# Where to edit


@dataclass(frozen=True)
class EditTarget:
    """The layers an edit writes into and their module names."""

    layers: tuple[int, ...]
    modules: tuple[str, ...]
    """Full names of the edited MLP output projections, one per layer."""
    blocks: str
    """Prefix of the decoder blocks (block i is f"{blocks}.{i}")."""

    @property
    def z_layer(self) -> int:
        return self.layers[-1]


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The band from 1/8 to 1/4 of the depth: 4-8 of 30 or 32 layers (EasyEdit's Llama band),
    layer 1 of 4."""
    hi = min(n_layers - 1, max(0, int(n_layers / 4 + 0.5)))
    lo = min(hi, int(n_layers / 8 + 0.5))
    return tuple(range(lo, hi + 1))


def edit_target(model, spec: EditSpec) -> EditTarget:
    """The edit's layers and modules for this model; FactlabError (one line) for an
    architecture edit does not support or a layer range it does not have."""
    from factlab.models.targets import arch_table, parse_layers

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise FactlabError(f"kind: edit does not support model type '{model_type}' (it supports {', '.join(SUPPORTED)}); "
                           "use a training stage (kind: cpt or distill) for this model")
    table = arch_table(model)
    blocks = model.get_submodule(table.layers_path)
    n = len(blocks)
    layers = parse_layers(spec.layers, n) if spec.layers else default_layers(n)
    modules = tuple(f"{table.layers_path}.{i}.{table.mlp[-1]}" for i in layers)
    for name in modules:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            m = None
        if not isinstance(m, torch.nn.Linear):
            raise FactlabError(f"kind: edit: {name} is not a Linear layer in this model; it cannot be edited")
    return EditTarget(tuple(layers), modules, table.layers_path)


# ---------------------------------------------------------------------------------------
# The linear algebra (pure functions; tests check them)


def memit_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """dW (hidden x inner) = R K^T (lam C + K K^T)^-1: the minimiser of
    ||dW K - R||_F^2 + lam tr(dW C dW^T). K (inner, n) keys, R (hidden, n) residuals, C (inner,
    inner) the key covariance. Float64 on the CPU."""
    K, R, C = (x.detach().to("cpu", torch.float64) for x in (K, R, C))
    return torch.linalg.solve(lam * C + K @ K.T, K @ R.T).T


def null_space_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, its rank): the projection onto the eigenvectors of the symmetric C whose eigenvalues
    are below `threshold` (AlphaEdit's null space of the preserved keys)."""
    w, U = torch.linalg.eigh(C.detach().to("cpu", torch.float64))
    small = U[:, w < threshold]
    return small @ small.T, small.shape[1]


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, Kp_cov: torch.Tensor, l2: float) -> torch.Tensor:
    """dW (hidden x inner) = R K^T P ((K K^T + K_p K_p^T) P + l2 I)^-1 (AlphaEdit): dW k = 0 for
    every key k with P k = 0. `Kp_cov` = K_p K_p^T of the keys edited before (zeros at first)."""
    K, R, P, Kp_cov = (x.detach().to("cpu", torch.float64) for x in (K, R, P, Kp_cov))
    A = P @ (K @ K.T + Kp_cov) + l2 * torch.eye(P.shape[0], dtype=torch.float64)
    # A^-1 maps range(P) into itself, so dW^T = A^-1 P K R^T has its columns in range(P).
    return torch.linalg.solve(A, P @ K @ R.T).T


# ---------------------------------------------------------------------------------------
# Reading activations


class _Stop(Exception):
    """Raised by a hook once what a forward pass was for has been read: the layers after it
    are not computed."""


def _pad_right(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _read(model, tokenizer, seqs: list[list[int]], idx: list[int], key_module, block_module) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (n, inner), block outputs (n, hidden)) at position idx[r] of each sequence: the
    input of `key_module` and the output of `block_module` (the last edit layer, which is never
    before the key's layer, so the forward stops there)."""
    device = next(model.parameters()).device
    keys, outs = [], []
    for s in range(0, len(seqs), READ_BATCH):
        rows = torch.arange(len(seqs[s:s + READ_BATCH]), device=device)
        pos = torch.tensor(idx[s:s + READ_BATCH], device=device)
        got = {}

        def key_hook(module, args):
            got["k"] = args[0][rows, pos].float().cpu()

        def block_hook(module, args, out):
            got["h"] = _hidden(out)[rows, pos].float().cpu()
            raise _Stop

        handles = [key_module.register_forward_pre_hook(key_hook), block_module.register_forward_hook(block_hook)]
        ids, mask = _pad_right(seqs[s:s + READ_BATCH], _pad_id(tokenizer), device)
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        keys.append(got["k"])
        outs.append(got["h"])
    return torch.cat(keys), torch.cat(outs)


def subject_index(cache: TokenCache, text: str, end: int) -> int:
    """Index of the token of encode(text) that holds the subject's last character (text[end-1]):
    the last token of encode(text[:end]), cut back where a BPE merge crosses `end`."""
    whole, head = cache.encode(text), cache.encode(text[:end])
    k = 0
    while k < min(len(whole), len(head)) and whole[k] == head[k]:
        k += 1
    return max(0, (len(head) if k == len(head) else k + 1) - 1)


# ---------------------------------------------------------------------------------------
# Key covariance (cached per model)


def _cov_path(folder: Path, fingerprint: str, text_hash: str, n_tokens: int, module: str) -> Path:
    return folder / f"{fingerprint[:24]}-{text_hash[:12]}-{n_tokens}-{module}.safetensors"


def stats_folder() -> Path:
    """<cache>/edit-stats ($FACTLAB_CACHE, else $XDG_CACHE_HOME/factlab, else ~/.cache/factlab)."""
    from factlab.models.loading import cache_root

    return cache_root() / "edit-stats"


def key_covariances(model, tokenizer, target: EditTarget, docs: list[str], n_tokens: int,
                    folder: Path | None = None, console: Console | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """C = E[k k^T] (per token, fp32 on the CPU) of the inputs of each edited module over the
    first `n_tokens` tokens of `docs` (packed into blocks, EOS between documents), read from the
    cache when there: keyed by the model's fingerprint, the text's hash, n_tokens and the
    module. Returns ({module: C}, {"tokens", "computed", "cached", "seconds"})."""
    from filelock import FileLock
    from safetensors.torch import load_file, save_file

    from factlab.data.corpus import pack_documents
    from factlab.fingerprint import model_fingerprint

    if not docs:
        raise FactlabError("kind: edit needs general text for its key covariance; edit.cov_source gave none "
                           "(use general, corpus or text files)")
    folder = folder or stats_folder()
    t0 = time.perf_counter()
    fp = model_fingerprint(model, tokenizer)
    text_hash = hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    paths = {m: _cov_path(folder, fp, text_hash, n_tokens, m) for m in target.modules}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"{fp[:24]}.lock"))  # sweep workers on one model compute it once
        lock.acquire()
    except OSError as e:
        raise FactlabError(f"cannot write the edit statistics cache {folder} ({e.strerror or e}); set FACTLAB_CACHE "
                           "to a writable folder") from None
    try:
        missing = [m for m in target.modules if not paths[m].exists()]
        tokens = 0
        if missing:
            if console is not None:
                console.print(f"edit: key covariance of {len(missing)} layer(s) from up to {n_tokens:,} general-text "
                              f"tokens (once per model; cached in {folder})", markup=False, highlight=False)
            acc, tokens = _accumulate(model, pack_documents(tokenizer, docs, COV_SEQ_LEN), missing, n_tokens,
                                      _pad_id(tokenizer))
            for m in missing:
                save = paths[m].with_name(paths[m].name + f".{os.getpid()}.tmp")
                save_file({"cov": (acc[m] / tokens).float().contiguous()}, str(save), metadata={"tokens": str(tokens)})
                os.replace(save, paths[m])
        covs, counts = {}, []
        for m in target.modules:
            from safetensors import safe_open

            with safe_open(str(paths[m]), "pt") as f:
                counts.append(int(f.metadata()["tokens"]))
            covs[m] = load_file(str(paths[m]))["cov"]
    finally:
        lock.release()
    return covs, {"tokens": min(counts), "computed": len(missing), "cached": len(target.modules) - len(missing),
                  "seconds": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def _accumulate(model, blocks: list[dict], modules: list[str], n_tokens: int, pad: int) -> tuple[dict, int]:
    """Sum of k k^T (float64) over the real tokens of the blocks, up to n_tokens; the forward
    stops after the last module that is read."""
    device = next(model.parameters()).device
    acc = {m: None for m in modules}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    last = max(modules, key=order.get)
    state = {"mask": None}

    def hook_for(name):
        def hook(module, args):
            x = args[0][state["mask"]].float()  # (tokens, inner)
            xtx = (x.T @ x).to("cpu", torch.float64)
            acc[name] = xtx if acc[name] is None else acc[name] + xtx
            if name == last:
                raise _Stop
        return hook

    handles = [model.get_submodule(m).register_forward_pre_hook(hook_for(m)) for m in modules]
    was = model.training
    model.eval()
    total = 0
    try:
        for s in range(0, len(blocks), COV_BATCH):
            if total >= n_tokens:
                break
            seqs = []
            for b in blocks[s:s + COV_BATCH]:
                take = b["input_ids"][:n_tokens - total - sum(map(len, seqs))]
                if take:
                    seqs.append(take)
            if not seqs:
                break
            ids, mask = _pad_right(seqs, pad, device)
            state["mask"] = mask.bool()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            total += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if total == 0:
        raise FactlabError("kind: edit: the covariance text has no tokens; give edit.cov_source some text")
    return acc, total


# ---------------------------------------------------------------------------------------
# Contexts and target values


@torch.no_grad()
def generate_contexts(model, tokenizer, n: int, tokens: int) -> list[str]:
    """n short texts the model writes greedily from "The", "Therefore", ... (MEMIT samples them;
    greedy keeps them the same on every device), each ending in ". " so a prompt follows."""
    from transformers import GenerationConfig

    if n == 0:
        return []
    device = next(model.parameters()).device
    cache = TokenCache(tokenizer)
    out = []
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                              top_k=None, repetition_penalty=1.0, pad_token_id=_pad_id(tokenizer),
                              eos_token_id=None)
    for i in range(n):
        ids = torch.tensor([cache.encode(CONTEXT_STARTS[i % len(CONTEXT_STARTS)])], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        text = tokenizer.decode(gen[0], skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        out.append(text + ". ")
    return out


@dataclass
class _Rows:
    """The rows of one subject's value optimisation (right-padded by _pad_right)."""

    seqs: list[list[int]]
    lookup: list[int]
    """Position of the subject's last token in each row."""
    targets: list[list[tuple[int, int]]]
    """(position, token) pairs whose log-prob is maximised, per row (empty for the KL row)."""


def _value_rows(cache: TokenCache, request: dict, contexts: list[str]) -> _Rows:
    seqs, lookup, targets = [], [], []
    for it in request["items"]:
        for ctx in ["", *contexts]:
            text = ctx + it["prompt"]
            ids, cont = cache.split_pair(text, " " + it["object"])
            seq = ids + cont[:-1]
            seqs.append(seq)
            lookup.append(min(subject_index(cache, text, len(ctx) + it["span"][1]), len(ids) - 1))
            targets.append([(len(ids) - 1 + j, t) for j, t in enumerate(cont)])
    kl_text = f"{request['subject']} is a"
    seqs.append(cache.encode(kl_text))
    lookup.append(subject_index(cache, kl_text, len(request["subject"])))
    targets.append([])
    return _Rows(seqs, lookup, targets)


def _logits_at(model, ids, mask, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) at (rows[i], pos[i]): lm_head on those positions of the body's output
    where the model's logits are just that, else the model's full logits."""
    from factlab.train.loss import body_and_head

    body, head = body_and_head(model)
    if body is not None and getattr(model.config, "final_logit_softcapping", None) is None:
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        return head(hidden[rows, pos])
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, pos]


def target_nll(model, tokenizer, requests: list[dict]) -> float:
    """Mean NLL per target token of the objects after their edit prompts (no context): the
    stage's first / final `loss`."""
    cache = TokenCache(tokenizer)
    device = next(model.parameters()).device
    rows = []  # (token ids, [(position, target token)])
    for q in requests:
        r = _value_rows(cache, q, [])
        rows += list(zip(r.seqs[:-1], r.targets[:-1]))  # the last row is the KL prompt
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), READ_BATCH):
            chunk = rows[s:s + READ_BATCH]
            ids, mask = _pad_right([seq for seq, _ in chunk], _pad_id(tokenizer), device)
            at = torch.tensor([r for r, (_, ts) in enumerate(chunk) for _ in ts], device=device)
            pos = torch.tensor([p for _, ts in chunk for p, _ in ts], device=device)
            tok = torch.tensor([t for _, ts in chunk for _, t in ts], device=device)
            logp = torch.log_softmax(_logits_at(model, ids, mask, at, pos).float(), -1)
            total += float(-logp.gather(1, tok[:, None]).sum())
            count += len(tok)
    return total / max(count, 1)


def optimise_value(model, tokenizer, request: dict, contexts: list[str], block, spec: EditSpec) -> tuple[torch.Tensor, dict]:
    """delta (hidden,) for one subject: added to `block`'s output at the subject's last token of
    every row, it makes the objects likely (module docstring, step 1). Returns (delta, stats)."""
    cache = TokenCache(tokenizer)
    device = next(model.parameters()).device
    r = _value_rows(cache, request, contexts)
    ids, mask = _pad_right(r.seqs, _pad_id(tokenizer), device)
    n_rows = len(r.seqs)
    look_rows, look_pos = torch.arange(n_rows, device=device), torch.tensor(r.lookup, device=device)
    t_rows = torch.tensor([i for i, ts in enumerate(r.targets) for _ in ts], device=device)
    t_pos = torch.tensor([p for ts in r.targets for p, _ in ts], device=device)
    t_tok = torch.tensor([t for ts in r.targets for _, t in ts], device=device)
    per_row = torch.tensor([len(ts) for ts in r.targets[:-1]], device=device, dtype=torch.float32)
    kl_row, kl_pos = n_rows - 1, r.lookup[-1]
    hidden = model.get_output_embeddings().weight.shape[1]
    delta = torch.zeros(hidden, device=device, requires_grad=True)
    state: dict = {"h0": None}

    def add_delta(module, args, out):
        h = _hidden(out)
        if state["h0"] is None:
            state["h0"] = h[0, r.lookup[0]].detach().clone()
        add = torch.zeros_like(h)
        add[look_rows, look_pos] = delta.to(h.dtype)
        h = h + add
        return (h, *out[1:]) if isinstance(out, tuple) else h

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    handle = block.register_forward_hook(add_delta)
    opt = torch.optim.Adam([delta], lr=spec.lr)
    kl_init = None
    first = last = None
    steps = 0
    try:
        for step in range(spec.steps):
            opt.zero_grad()
            rows = torch.cat([t_rows, torch.tensor([kl_row], device=device)])
            pos = torch.cat([t_pos, torch.tensor([kl_pos], device=device)])
            logp = torch.log_softmax(_logits_at(model, ids, mask, rows, pos).float(), -1)
            tok_logp = logp[:-1].gather(1, t_tok[:, None]).squeeze(1)
            row_nll = torch.zeros(n_rows - 1, device=device).index_add(0, t_rows, -tok_logp) / per_row
            nll = row_nll.mean()
            kl_logp = logp[-1]
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_init.exp() * (kl_init - kl_logp)).sum()
            decay = delta.norm() / state["h0"].norm() ** 2
            loss = nll + spec.kl * kl + spec.weight_decay * decay
            first = float(nll.detach()) if first is None else first
            last = float(nll.detach())
            steps = step + 1
            if float(loss.detach()) < STOP_LOSS or step == spec.steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():  # the clamp: ||delta|| <= clamp_norm ||h||
                cap = spec.clamp_norm * state["h0"].norm()
                if delta.norm() > cap:
                    delta.mul_(cap / delta.norm())
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)
    return delta.detach(), {"nll_first": first, "nll_last": last, "steps": steps,
                            "delta_norm": float(delta.detach().norm()), "h_norm": float(state["h0"].norm())}


# ---------------------------------------------------------------------------------------
# Applying a batch of edits


def _columns(cache: TokenCache, requests: list[dict], contexts: list[str]) -> tuple[list[int], list[list[list[int]]], list[list[int]]]:
    """The update's columns: per request, each distinct text up to the subject's end. Returns
    (request index per column, token ids per column and context, subject position likewise)."""
    owner, seqs, idx = [], [], []
    for q, req in enumerate(requests):
        for head in dict.fromkeys(it["prompt"][:it["span"][1]] for it in req["items"]):
            owner.append(q)
            texts = [ctx + head for ctx in ["", *contexts]]
            seqs.append([cache.encode(t) for t in texts])
            idx.append([len(s) - 1 for s in seqs[-1]])
    return owner, seqs, idx


def _keys_and_outputs(model, tokenizer, seqs, idx, key_module, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(K (inner, n): keys averaged over the contexts, H (hidden, n): block outputs without context)."""
    flat = [s for col in seqs for s in col]
    flat_idx = [i for col in idx for i in col]
    keys, outs = _read(model, tokenizer, flat, flat_idx, key_module, block)
    per = len(seqs[0])
    K = keys.view(len(seqs), per, -1).mean(1)
    H = outs.view(len(seqs), per, -1)[:, 0]
    return K.T.double(), H.T.double()


def apply_edits(model, tokenizer, requests: list[dict], spec: EditSpec, target: EditTarget,
                covs: dict[str, torch.Tensor], contexts: list[str], console: Console | None = None) -> dict:
    """Edit `model` in place, batch by batch (module docstring); returns the edit's record."""
    cache = TokenCache(tokenizer)
    block = model.get_submodule(f"{target.blocks}.{target.z_layer}")
    mods = [model.get_submodule(m) for m in target.modules]
    L = len(target.layers)
    record: dict = {"batches": [], "nullspace_dims": None}
    projectors, kp_cov = {}, {}
    if spec.method == "alphaedit":
        dims = {}
        for m in target.modules:
            projectors[m], dims[m] = null_space_projector(covs[m], spec.nullspace_threshold)
            if dims[m] == 0:
                w = torch.linalg.eigvalsh(covs[m].double())
                raise FactlabError(f"alphaedit: no eigenvalue of {m}'s key covariance is below edit.nullspace_threshold "
                                   f"({spec.nullspace_threshold:g}; they run from {float(w[0]):.3g} to {float(w[-1]):.3g}); "
                                   "raise the threshold")
            kp_cov[m] = torch.zeros_like(projectors[m])
        record["nullspace_dims"] = dims
    model.eval()
    for b in sorted({q["batch"] for q in requests}):
        batch = [q for q in requests if q["batch"] == b]
        t0 = time.perf_counter()
        deltas, stats = [], []
        for q in batch:
            d, st = optimise_value(model, tokenizer, q, contexts, block, spec)
            deltas.append(d.cpu().double())
            stats.append(st)
        t_values = time.perf_counter() - t0
        owner, seqs, idx = _columns(cache, batch, contexts)
        _, h_orig = _keys_and_outputs(model, tokenizer, seqs, idx, mods[0], block)
        goal = h_orig + torch.stack(deltas)[owner].T  # (hidden, n)
        norms = []
        for i, (name, mod) in enumerate(zip(target.modules, mods)):
            K, h_now = _keys_and_outputs(model, tokenizer, seqs, idx, mod, block)
            R = (goal - h_now) / (L - i)  # the residual still missing, spread over the layers left
            if spec.method == "memit":
                dW = memit_update(K, R, covs[name], spec.mom2_weight)
            else:
                dW = alphaedit_update(K, R, projectors[name], kp_cov[name], spec.l2)
            with torch.no_grad():
                mod.weight += dW.to(mod.weight.device, mod.weight.dtype)
            norms.append(round(float(dW.norm()), 4))
        if spec.method == "alphaedit":  # keys of this batch are protected in the next ones
            for name, mod in zip(target.modules, mods):
                K, _ = _keys_and_outputs(model, tokenizer, seqs, idx, mod, block)
                kp_cov[name] += K @ K.T
        _, h_end = _keys_and_outputs(model, tokenizer, seqs, idx, mods[0], block)
        missing = float((goal - h_end).norm(dim=0).mean() / (goal - h_orig).norm(dim=0).mean().clamp_min(1e-12))
        record["batches"].append({
            "subjects": len(batch), "columns": len(owner),
            "value_nll_first": round(sum(s["nll_first"] for s in stats) / len(stats), 4),
            "value_nll_last": round(sum(s["nll_last"] for s in stats) / len(stats), 4),
            "value_steps": sum(s["steps"] for s in stats), "update_norms": norms,
            "residual_left": round(missing, 4), "seconds_values": round(t_values, 2),
            "seconds": round(time.perf_counter() - t0, 2)})
        if console is not None:
            console.print(f"edit batch {b + 1}: {len(batch)} subject(s), value NLL {record['batches'][-1]['value_nll_first']:.3f}"
                          f" → {record['batches'][-1]['value_nll_last']:.3f}, residual left {missing:.1%}, "
                          f"{time.perf_counter() - t0:.1f} s", markup=False, highlight=False)
    return record


# ---------------------------------------------------------------------------------------
# The stage


def edit_stage(model, tokenizer, stage: StageSpec, name: str, out_dir: Path, requests: list[dict], seed: int,
               console: Console) -> tuple[object, "object"]:
    """Edit the model, save merged/ (plain transformers; the edited weights are the model) and
    train.json through a `.partial` folder, like every stage. Returns (model, StageResult)."""
    from factlab.train import distributed
    from factlab.train.merge import folder_bytes
    from factlab.train.progress import peak_rss_mb, reset_peak_rss
    from factlab.train.stage import StageResult, check_fresh_model

    spec = stage.edit
    check_fresh_model(model, name)
    target = edit_target(model, spec)
    if not requests:
        raise FactlabError("the edit stage has no facts to write; check edit.facts")
    docs = getattr(requests, "general_docs", None)
    if docs is None:  # requests built by hand (tests, benchmarks): the builtin general text
        from factlab.data.corpus import builtin_replay_documents

        docs = builtin_replay_documents()
    n_facts = len({it["fact"] for q in requests for it in q["items"]})
    console.print(f"stage {name}: {spec.method} edit of {n_facts} facts ({len(requests)} subject requests in "
                  f"{len({q['batch'] for q in requests})} batch(es)) into {', '.join(target.modules)}",
                  markup=False, highlight=False)
    own_peak = reset_peak_rss()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    try:
        contexts = generate_contexts(model, tokenizer, spec.contexts, spec.context_tokens)
        covs, cov_info = key_covariances(model, tokenizer, target, docs, spec.cov_tokens, console=console)
        # each subject's last request holds all of its facts (requests are in batch order)
        final = list({q["subject"]: q for q in requests}.values())
        first_loss = target_nll(model, tokenizer, final)
        record = apply_edits(model, tokenizer, requests, spec, target, covs, contexts, console)
        final_loss = target_nll(model, tokenizer, final)
    finally:
        model.train(was)
    model.eval()
    seconds = time.perf_counter() - t0
    edited = sum(model.get_submodule(m).weight.numel() for m in target.modules)
    total = sum(p.numel() for p in model.parameters())
    record.update({"method": spec.method, "layers": list(target.layers), "modules": list(target.modules),
                   "facts": n_facts, "subjects": len({q["subject"] for q in requests}), "contexts": contexts,
                   "covariance": cov_info, "seconds_per_fact": round(seconds / max(n_facts, 1), 3)})
    partial = out_dir.with_name(out_dir.name + ".partial")
    size = 0
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        model.save_pretrained(partial / "merged")
        size = folder_bytes(partial / "merged")
        tokenizer.save_pretrained(partial / "merged")
    device = next(model.parameters()).device
    result = StageResult(
        name=name, kind="edit", steps=len(record["batches"]), examples=len(requests), heldout_examples=0,
        train_tokens=0, seconds=round(seconds, 2), tokens_per_second=0.0, bf16=False, trainable_params=edited,
        total_params=total, target_modules=len(target.modules), first_loss=first_loss, final_loss=final_loss,
        eval_loss=None, train_loss_after=None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), stopped_early=False,
        merged=True, method=spec.method, trainable_share=edited / max(total, 1), artifact="model", artifact_bytes=size,
        train_peak_rss_mb=peak_rss_mb() if own_peak else None, loss_history=[], precision="fp32",
        device=device.type, edit=record)
    if distributed.is_main():
        (partial / "train.json").write_text(json.dumps(asdict(result), indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
    distributed.barrier()
    return model, result
