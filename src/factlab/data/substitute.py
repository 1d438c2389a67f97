"""Counterfactual substitution: rewrite a corpus with names swapped (Romeo -> Bob), then
probe whether the model learned the new name and what became of the old one.

Matching rules of :func:`substitute`:

- whole words only: ``Romeo`` matches in "Romeo's" and "ROMEO," but not in "Romeoville";
  a boundary is required only where the key starts or ends with a letter/digit of a script
  that separates words with spaces. Japanese/Chinese keys (no word boundaries in the text)
  match as exact strings, and "ロミオ" matches inside "ロミオとジュリエット";
- case is matched loosely and preserved: ROMEO -> BOB, Romeo -> Bob, romeo -> bob
  (``lowercase=False`` leaves lower-case matches alone, for names that are also words:
  Will, Rose, Mark);
- multi-word keys match across any whitespace ("Friar\\nLaurence");
- the longest key wins and all keys are replaced in one pass, so overlapping keys
  (Romeo, Romeo Montague) and swaps (Romeo=Juliet, Juliet=Romeo) work.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path
from typing import Mapping, Sequence

from factlab.data.io import iter_jsonl, read_text
from factlab.errors import FactlabError

# Scripts written without spaces between words (Hangul is excluded: Korean uses spaces).
_NO_SPACE = "\u2e80-\u2fff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f"
_WORD = f"[^\\W{_NO_SPACE}]"
"""A letter, digit or underscore of a space-separated script; like ``\\w`` but without CJK,
so an English name next to Japanese text ("私はRomeoです") still has its boundaries."""


def _spaced_word_char(c: str) -> bool:
    return re.fullmatch(_WORD, c) is not None


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["Romeo=Bob", "Friar Laurence=Brother Tom"]`` -> dict; one-line errors for bad items."""
    mapping: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise FactlabError(f"--map {item!r} is not OLD=NEW; write e.g. --map Romeo=Bob")
        if old in mapping and mapping[old] != new:
            raise FactlabError(f"--map gives {old!r} two replacements ({mapping[old]!r} and {new!r}); keep one")
        mapping[old] = new
    return mapping


def _check_mapping(mapping: Mapping[str, str]) -> None:
    if not mapping:
        raise FactlabError("no substitutions given; pass at least one OLD=NEW pair (--map Romeo=Bob)")
    for old, new in mapping.items():
        if not isinstance(old, str) or not old.strip():
            raise FactlabError("a substitution has an empty name to replace; give OLD=NEW with both names")
        if not isinstance(new, str) or not new.strip():
            raise FactlabError(f"the replacement for {old!r} is empty; give OLD=NEW with both names")


def compile_mapping(mapping: Mapping[str, str], ignore_case: bool = True) -> re.Pattern:
    """One regex over all keys, longest first, with boundaries where the key needs them."""
    _check_mapping(mapping)
    parts = []
    for key in sorted(mapping, key=lambda k: (-len(k), k)):
        body = r"\s+".join(re.escape(w) for w in key.split())
        left = f"(?<!{_WORD})" if _spaced_word_char(key.strip()[0]) else ""
        right = f"(?!{_WORD})" if _spaced_word_char(key.strip()[-1]) else ""
        parts.append(left + body + right)
    return re.compile("|".join(parts), re.IGNORECASE if ignore_case else 0)


def _cased(s: str) -> list[str]:
    return [c for c in s if c.lower() != c.upper()]


def match_case(found: str, key: str, value: str) -> str | None:
    """``value`` in the case pattern of ``found`` (a match of ``key``); None for a
    lower-case match of a key that is not itself lower case (see ``lowercase``)."""
    if found == key:
        return value
    letters = _cased(found)
    if len(letters) >= 2 and all(c.isupper() for c in letters):
        return value.upper()
    if letters and all(c.islower() for c in letters):
        return value.lower()
    if found[:1].isupper() and found[1:] == key[1:]:  # key "romeo", text "Romeo"
        return value[:1].upper() + value[1:]
    if found.istitle():
        return " ".join(w[:1].upper() + w[1:] for w in value.split(" "))
    return value  # odd mixed case ("rOMEO"): the replacement as given


def substitute(text: str, mapping: Mapping[str, str], lowercase: bool = True,
               ignore_case: bool = True) -> tuple[str, dict[str, int]]:
    """``text`` with every key of ``mapping`` replaced (see the module docstring) and the
    number of replacements per key (0 for keys not found)."""
    pattern = compile_mapping(mapping, ignore_case)
    counts = {k: 0 for k in mapping}
    folded: dict[str, str] = {}
    for k in mapping:
        folded.setdefault(" ".join(k.split()).casefold(), k)

    def repl(m: re.Match) -> str:
        found = m.group(0)
        norm = " ".join(found.split())
        key = norm if norm in mapping else folded.get(norm.casefold())
        if key is None:  # casefold differs from the regex's case folding (rare scripts)
            return found
        if not lowercase and norm != key and _cased(norm) and all(c.islower() for c in _cased(norm)):
            return found
        counts[key] += 1
        return match_case(norm, key, mapping[key])

    return pattern.sub(repl, text), counts


def _sub_json(value, mapping, counts, lowercase):
    """Substitute inside every string of a JSON value."""
    if isinstance(value, str):
        new, c = substitute(value, mapping, lowercase)
        for k, n in c.items():
            counts[k] += n
        return new
    if isinstance(value, list):
        return [_sub_json(v, mapping, counts, lowercase) for v in value]
    if isinstance(value, dict):
        return {k: _sub_json(v, mapping, counts, lowercase) for k, v in value.items()}
    return value


CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")


def substitute_path(src: str | Path, dst: str | Path, mapping: Mapping[str, str],
                    lowercase: bool = True) -> dict[str, int]:
    """Substitute a corpus file (to ``dst``, or into ``dst`` when it is a folder), or every
    .txt/.md/.jsonl file under a folder (mirrored to ``dst``). In JSONL every string value is rewritten (corpus "text", Q&A questions and
    answers alike). Returns the counts per key; an empty corpus is an error."""
    src, dst = Path(src), Path(dst)
    _check_mapping(mapping)
    if src.is_dir():
        files = sorted(f for f in src.rglob("*") if f.is_file() and f.suffix in CORPUS_SUFFIXES)
        targets = [dst / f.relative_to(src) for f in files]
    elif src.is_file():
        files, targets = [src], [dst / src.name if dst.is_dir() else dst]
    else:
        raise FactlabError(f"corpus {src} does not exist; give a .txt/.jsonl file or a folder of them")
    if not files:
        raise FactlabError(f"the corpus folder {src} has no .txt, .md or .jsonl files; nothing to substitute")
    counts = {k: 0 for k in mapping}
    total_chars = 0
    outputs: list[tuple[Path, str]] = []
    for f, t in zip(files, targets):
        if f.suffix == ".jsonl":
            lines = []
            for _, obj in iter_jsonl(f, "corpus file"):
                lines.append(json.dumps(_sub_json(obj, mapping, counts, lowercase), ensure_ascii=False))
                total_chars += len(lines[-1])
            text = "".join(line + "\n" for line in lines)
        else:
            raw = read_text(f, "corpus file")
            total_chars += len(raw.strip())
            text, c = substitute(raw, mapping, lowercase)
            for k, n in c.items():
                counts[k] += n
        outputs.append((t, text))
    if total_chars == 0:
        raise FactlabError(f"the corpus {src} is empty; give files with some text")
    # Write only after everything parsed, into a temporary sibling renamed when complete: an
    # error or Ctrl-C never leaves half-written output.
    from factlab.atomic import staged_dir, staged_file

    if src.is_dir():
        with staged_dir(dst) as tmp:
            for t, text in outputs:
                t = tmp / t.relative_to(dst)
                t.parent.mkdir(parents=True, exist_ok=True)
                t.write_bytes(text.encode("utf-8"))
    else:
        (t, text), = outputs
        with staged_file(t) as tmp:
            tmp.write_bytes(text.encode("utf-8"))
    return counts


# --------------------------------------------------------------------------------------------
# Probes for a substitution
# --------------------------------------------------------------------------------------------

DEFAULT_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    # (kind, template). {about}: the user's phrase that the name completes ("Juliet was in
    # love with"); {initial}: the first letter of the name asked for.
    "en": [
        ("recall", "{about}"),
        ("paraphrase", "{about} someone whose name starts with {initial}. That name is"),
        ("qa", "Fill in the name: \"{about} ___\". Answer with the name only."),
    ],
    "ja": [
        ("recall", "{about}"),
        ("paraphrase", "{about}、名前が「{initial}」で始まる人物で、その名前は"),
        ("qa", "次の文の空欄に入る名前を答えてください：「{about}＿＿」"),
    ],
}
"""Why these: ``recall`` is the user's own phrase (the new name must beat the old one, which
is a distractor); ``paraphrase`` adds a first-letter hint, so the distractors are other
names with that letter: it tests that the model knows *this* name, not just some name.
For every template with ``{initial}`` a control probe asks with the old name's initial for
the old name (kind ``locality``: something the base model knew; a drop after training
means the edit overwrote the old association rather than adding a new one)."""

_NAMES = {
    "en": ("Adam Alice Anna Ben Bill Bob Brian Carl Clara Dan David Diana Ed Ella Emma Frank Fred "
           "George Grace Hannah Harry Helen Ian Iris Jack Jane John Kate Karl Laura Leo Lucy Mark "
           "Mary Max Nick Nina Olga Oscar Paul Peter Quinn Rachel Robert Rosa Ruth Sam Sarah Tom "
           "Tina Uma Victor Vera Walter Wendy Xavier Yara Zoe").split(),
    "ja": "ジョン メアリー ポール ピーター アンナ エマ トム ハンナ マリア ルーシー カール ジャック ローラ ベン ボブ ロバート".split(),
}


def _lang_of(*texts: str) -> str:
    return "ja" if any(unicodedata.east_asian_width(c) in ("W", "F") for t in texts for c in t) else "en"


def _slug(s: str) -> str:
    return re.sub(r"[^\w]+", "-", s.casefold()).strip("-") or "name"


def substitution_probes(mapping: Mapping[str, str], context_templates: Sequence[tuple[str, str]] | None = None,
                        about: str | Mapping[str, str] | None = None, names: Sequence[str] = (),
                        lang: str | None = None) -> list[dict]:
    """Probes for each swapped name (see :data:`DEFAULT_TEMPLATES` for what each measures).

    ``about``: the phrase the name completes, one for all keys or one per key (required;
    without a context, a probe for a bare name measures nothing). ``context_templates``:
    (kind, template) pairs with ``{about}`` and optionally ``{initial}``. ``names``: extra
    wrong answers (e.g. the story's other characters) used before the built-in common
    names. ``lang`` defaults to Japanese when the phrase or the names are wide characters.
    """
    _check_mapping(mapping)
    if about is None or (isinstance(about, str) and not about.strip()):
        raise FactlabError("substitution probes need the phrase the name completes; "
                           "give --probes-about \"Juliet was in love with\"")
    abouts = {k: about for k in mapping} if isinstance(about, str) else dict(about)
    unknown = [k for k in abouts if k not in mapping]
    if unknown:
        raise FactlabError(f"--probes-about names {unknown[0]!r}, which is not a substituted name; use OLD=PHRASE with OLD from --map")
    probes: list[dict] = []
    for n, (old, new) in enumerate(mapping.items(), 1):
        phrase = abouts.get(old)
        if not phrase:
            continue
        lg = lang or _lang_of(phrase, old, new)
        templates = context_templates or DEFAULT_TEMPLATES[lg]
        common = list(_NAMES[lg])
        random.Random(f"{old}->{new}").shuffle(common)  # varied but reproducible fillers
        # The user's names (the story's other characters) first: the best wrong answers.
        others = [x for x in dict.fromkeys([*names, *mapping.values(), *mapping.keys(), *common])
                  if x not in (old, new)]

        def pick(first: Sequence[str], initial: str | None) -> list[str]:
            pool = [x for x in others if initial is None or x[:1].casefold() == initial.casefold()]
            pool += [x for x in others if x not in pool]  # too few with that initial: any name
            return list(dict.fromkeys([*first, *pool]))[:3]

        fact = f"sub:{old}->{new}"
        base = f"sub{n:02d}-{_slug(old)}"
        for j, (kind, template) in enumerate(templates):
            hinted = "{initial}" in template
            same_initial = old[:1].casefold() == new[:1].casefold()
            prompt = template.replace("{about}", phrase.strip()).replace("{initial}", new[:1])
            # Unhinted: the old name is the one to beat. Hinted: the old name does not fit
            # the hint, so same-initial names are the real competition.
            wrong = pick([old], None) if not hinted or same_initial else pick([], new[:1])
            probes.append({"id": f"{base}-{j}-new", "fact": fact, "kind": kind, "prompt": prompt,
                           "target": new, "distractors": wrong})
            if hinted and not same_initial:  # else the control would repeat this prompt
                control = template.replace("{about}", phrase.strip()).replace("{initial}", old[:1])
                probes.append({"id": f"{base}-{j}-old", "fact": fact, "kind": "locality", "prompt": control,
                               "target": old, "distractors": [x for x in pick([], old[:1]) if x != new][:3]})
    return probes
