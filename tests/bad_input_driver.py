"""Run many `factlab` command lines through the real entry point `factlab.cli.main()` in one
process (one python + torch import instead of one per case) and record for each: the exit code,
stdout, stderr, whether an exception escaped main() (what would be a traceback), and which
files under the lab folder appeared, disappeared or changed.

Usage: python tests/bad_input_driver.py CASES.json RESULTS.json   (used by test_bad_input.py)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import traceback
from pathlib import Path


def snapshot(root: Path, own: Path) -> dict[str, str]:
    """Every file and folder under `root` -> a hash of its bytes ("dir" for folders); of the
    per-case folders under root/cases only the case's `own` (other processes run the others)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root / "cases":
            dirnames[:] = [d for d in dirnames if root / "cases" / d == own]
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha1(Path(p).read_bytes()).hexdigest()
    return out


def run_case(case: dict, root: Path) -> dict:
    from factlab import cli

    before = snapshot(root, Path(case["cwd"]))
    os.chdir(case["cwd"])
    saved_env = {k: os.environ.get(k) for k in case.get("env", {})}  # a case's own variables, e.g. FACTLAB_CACHE
    os.environ.update(case.get("env", {}))
    old = sys.argv, sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    sys.argv, sys.stdout, sys.stderr = ["factlab", *case["args"]], out, err
    code, escaped = 0, None
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what the installed command would show as a traceback
        escaped = traceback.format_exc()
        code = 1
    finally:
        sys.argv, sys.stdout, sys.stderr = old
        getattr(cli, "_interrupt_note", []).clear()  # what a command registered for Ctrl-C
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    after = snapshot(root, Path(case["cwd"]))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return {"id": case["id"], "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "traceback": escaped, "changed": changed}


def main() -> None:
    cases_path, results_path = sys.argv[1], sys.argv[2]
    payload = json.loads(Path(cases_path).read_text())
    root = Path(payload["root"])
    results = [run_case(c, root) for c in payload["cases"]]
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
