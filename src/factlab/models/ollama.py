"""`factlab export --ollama DIR`: the GGUF file and a Modelfile that `ollama create NAME -f DIR/Modelfile`
takes as it is (Ollama's documented Modelfile format: FROM, TEMPLATE, PARAMETER lines, triple-quoted
multi-line values).

Ollama renders prompts with Go templates, not Jinja, so the chat template is translated. Not by
parsing Jinja (a general translation is not possible): the template is rendered by transformers
for a few conversations with marker texts, and cut at the markers into what comes before and after
each role's content. That holds for the templates that wrap every message the same way (ChatML,
Llama 3, Gemma, SmolLM2, Qwen2, ...), and is checked: the Go template's pieces, assembled for a
conversation of every role, must give exactly transformers' text, or the export is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from factlab.errors import FactlabError

_S, _U, _U2, _A = "SYSTEMx7q", "USERx7q", "USER2x7q", "ASSISTANTx7q"  # marker texts no template contains


@dataclass(frozen=True)
class ChatPieces:
    """A chat template cut at the messages' contents (see the module docstring)."""

    head: str
    """Before the first message when there is no system message (e.g. a default system prompt)."""
    system: tuple[str, str]
    """Before and after a leading system message's content (in place of `head`)."""
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    """After the last message, where the answer starts."""

    def render(self, messages: list[dict]) -> str:
        """The prompt these pieces give (what the Go template renders in Ollama)."""
        out = ""
        if messages and messages[0]["role"] == "system":
            out += self.system[0] + messages[0]["content"] + self.system[1]
            messages = messages[1:]
        else:
            out += self.head
        for m in messages:
            before, after = self.user if m["role"] == "user" else self.assistant
            out += before + m["content"] + after
        return out + self.generation

    def go_template(self) -> str:
        """The pieces as an Ollama (Go text/template) TEMPLATE over `.Messages`."""
        for piece in (self.head, *self.system, *self.user, *self.assistant, self.generation):
            if "{{" in piece or '"""' in piece:
                raise FactlabError('the chat template holds "{{" or """, which an Ollama TEMPLATE cannot carry; '
                                   "write the Modelfile's TEMPLATE by hand")
        return ('{{ if and .Messages (eq (index .Messages 0).Role "system") }}'
                f'{self.system[0]}{{{{ (index .Messages 0).Content }}}}{self.system[1]}'
                f'{{{{ else }}}}{self.head}{{{{ end }}}}'
                '{{ range .Messages }}'
                f'{{{{ if eq .Role "user" }}}}{self.user[0]}{{{{ .Content }}}}{self.user[1]}'
                f'{{{{ else if eq .Role "assistant" }}}}{self.assistant[0]}{{{{ .Content }}}}{self.assistant[1]}'
                '{{ end }}{{ end }}'
                f'{self.generation}')


def chat_pieces(tokenizer, strip_bos: bool = False) -> ChatPieces:
    """Cut the tokenizer's chat template at the messages' contents; FactlabError when it does not
    wrap every message the same way (see the module docstring). `strip_bos`: drop a leading BOS
    token from the text (llama.cpp, under Ollama, adds it itself)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FactlabError("the model's tokenizer has no chat template; --ollama needs an instruct (chat) model")

    def render(msgs, gen=False):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        bos = getattr(tokenizer, "bos_token", None)
        return text[len(bos):] if strip_bos and bos and text.startswith(bos) else text

    u, a, s = {"role": "user", "content": _U}, {"role": "assistant", "content": _A}, {"role": "system", "content": _S}
    refused = FactlabError("the chat template does not wrap every message the same way, so it cannot be translated "
                           "to an Ollama TEMPLATE; write the Modelfile's TEMPLATE by hand")
    try:
        r_ua = render([u, a])
        r_uau = render([u, a, {"role": "user", "content": _U2}])
        r_u, r_u_gen, r_su = render([u]), render([u], True), render([s, u])
        if not r_uau.startswith(r_ua) or not r_u_gen.startswith(r_u):
            raise refused
        tail = r_uau[len(r_ua):]  # user prefix + U2 + user suffix
        user = (tail[:tail.index(_U2)], tail[tail.index(_U2) + len(_U2):])
        head = r_ua[:r_ua.index(user[0] + _U)]
        rest = r_ua[len(head) + len(user[0]) + len(_U) + len(user[1]):]
        assistant = (rest[:rest.index(_A)], rest[rest.index(_A) + len(_A):])
        sys_part = r_su[:len(r_su) - len(user[0] + _U + user[1])]
        system = (sys_part[:sys_part.index(_S)], sys_part[sys_part.index(_S) + len(_S):])
    except ValueError:  # a marker was not where a uniform template puts it
        raise refused from None
    pieces = ChatPieces(head, system, user, assistant, r_u_gen[len(r_u):])
    check = [s, u, a, {"role": "user", "content": _U2}]
    if pieces.render(check) != render(check, True) or pieces.render(check[1:]) != render(check[1:], True):
        raise refused
    return pieces


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a double-quoted string, as Ollama's parser reads it


def modelfile(tokenizer, gguf_name: str, *, add_bos: bool, context_length: int | None,
              generation_config: dict | None = None) -> str:
    """The Modelfile text for a GGUF file named `gguf_name` beside it."""
    pieces = chat_pieces(tokenizer, strip_bos=add_bos)
    stops = []
    for tid in sorted({tokenizer.eos_token_id, *((generation_config or {}).get("eos_token_id") or [])} - {None}):
        stops.append(tokenizer.convert_ids_to_tokens(int(tid)))
    # special tokens that end an assistant turn in the template (e.g. <|im_end|>)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or []) | {str(t) for t in tokenizer.added_tokens_decoder.values()}
    stops += [t for t in sorted(specials) if t and t in pieces.assistant[1] and t not in stops]
    lines = ["# Written by factlab export --ollama: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}",
             f'TEMPLATE """{pieces.go_template()}"""']
    lines += [f"PARAMETER stop {_quote(t)}" for t in dict.fromkeys(stops)]
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(int(context_length), 8192)}")
    gen = generation_config or {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("repetition_penalty", "repeat_penalty")):
        if gen.get("do_sample") and isinstance(gen.get(ours), (int, float)):
            lines.append(f"PARAMETER {theirs} {gen[ours]}")
    return "\n".join(lines) + "\n"


def export_ollama(model_dir: Path, out_dir: Path, gguf_type: str = "f16", console=None) -> Path:
    """Write `out_dir`/model.gguf (export_gguf) and `out_dir`/Modelfile; returns the Modelfile's path.
    The Modelfile is made first, so a template that cannot be translated writes nothing."""
    from transformers import AutoConfig, AutoTokenizer

    from factlab.models.gguf_export import export_gguf

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    plain, full = tok("a b", add_special_tokens=False).input_ids, tok("a b").input_ids
    add_bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    if isinstance(gen.get("eos_token_id"), int):
        gen["eos_token_id"] = [gen["eos_token_id"]]
    text = modelfile(tok, "model.gguf", add_bos=add_bos, context_length=getattr(config, "max_position_embeddings", None),
                     generation_config=gen)
    export_gguf(model_dir, out_dir / "model.gguf", gguf_type, console=console)
    (out_dir / "Modelfile").write_text(text, encoding="utf-8")
    return out_dir / "Modelfile"
