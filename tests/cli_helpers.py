"""The in-process way tests call the `factlab` entry point (cli.main), shared by the test files."""

from __future__ import annotations

import sys


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `factlab ARGS` run through cli.main() in this process."""
    from factlab import cli

    monkeypatch.setattr(sys, "argv", ["factlab", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
