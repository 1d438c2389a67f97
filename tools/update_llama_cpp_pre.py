"""Write src/factlab/models/llama_cpp_pre.py: llama.cpp's table of BPE pre-tokenizers.

Why generated: llama.cpp names a byte-level BPE tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)
by the sha256 of the token ids that the tokenizer gives for one fixed check text; the table of
known hashes is data inside its converter (`get_vocab_base_pre`, generated there by
`convert_hf_to_gguf_update.py`), not in the `gguf` package. factlab's GGUF export needs the same
table as the llama.cpp it is checked against, so this script copies it out of that llama.cpp's
sources instead of anyone retyping 100 hashes.

Run with the llama.cpp source folder the runtime was built from, e.g. the one vendored in the
xllamacpp sdist pinned in requirements.txt:

    pip download --no-deps --no-binary :all: xllamacpp==VERSION -d /tmp/x && tar xzf /tmp/x/*.tar.gz -C /tmp/x
    .venv/bin/python tools/update_llama_cpp_pre.py /tmp/x/xllamacpp-VERSION/thirdparty/llama.cpp "xllamacpp VERSION"
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "factlab" / "models" / "llama_cpp_pre.py"


def read_table(llama_cpp: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """(check text, {hash: (pre-tokenizer name, reference model)}) from a llama.cpp source tree."""
    candidates = [llama_cpp / "conversion" / "base.py", llama_cpp / "convert_hf_to_gguf.py"]
    src = next((p.read_text(encoding="utf-8") for p in candidates if p.is_file() and "chkhsh ==" in p.read_text(encoding="utf-8")), None)
    if src is None:
        sys.exit(f"no get_vocab_base_pre table in {llama_cpp} (looked in {', '.join(str(c) for c in candidates)})")
    check = ast.literal_eval(re.search(r"^\s*chktxt = ('.*')$", src, re.M).group(1))
    table: dict[str, tuple[str, str]] = {}
    entries = re.findall(r'if chkhsh == "([0-9a-f]{64})":\n\s+# ref: (\S+)\n\s+res = "([^"]+)"', src)
    if len(entries) != src.count("if chkhsh =="):
        sys.exit("the table's layout changed: not every `if chkhsh ==` entry was read; update this script")
    for h, ref, name in entries:
        table[h] = (name, ref.rsplit("huggingface.co/", 1)[-1])  # an `if` chain: a repeated hash's last entry wins
    return check, table


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    check, table = read_table(Path(sys.argv[1]))
    lines = [
        f'"""llama.cpp\'s BPE pre-tokenizer table, copied by tools/update_llama_cpp_pre.py from {sys.argv[2]}.',
        "",
        "Do not edit by hand: rerun the tool against the llama.cpp the runtime is pinned to. A tokenizer's",
        "`tokenizer.ggml.pre` is PRE_TOKENIZERS[sha256(str(tokenizer.encode(CHECK_TEXT)))] (llama.cpp's",
        '`get_vocab_base_pre`); each entry is (name, the model it was computed on)."""',
        "",
        f"SOURCE = {sys.argv[2]!r}",
        "",
        f"CHECK_TEXT = {check!r}",
        "",
        "PRE_TOKENIZERS: dict[str, tuple[str, str]] = {",
        *(f"    {h!r}: ({name!r}, {ref!r})," for h, (name, ref) in table.items()),
        "}",
        "",
    ]
    OUT.write_text("\n".join(lines), encoding="utf-8")
    print(f"{OUT}: {len(table)} pre-tokenizer hashes from {sys.argv[2]}")


if __name__ == "__main__":
    main()
