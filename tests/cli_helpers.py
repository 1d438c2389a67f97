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


def kill_when(proc, ready, what: str, bound: float = 1800.0, poll: float = 0.02) -> None:
    """SIGKILL `proc` in the state `ready()` describes (read from the files the process writes).

    No timing assumption: the process is polled until `ready()` holds, frozen (SIGSTOP), and
    killed only if `ready()` still holds on the frozen process; otherwise it goes on and the
    polling with it. `bound` (seconds) only keeps a hung process from hanging the test run; it
    is far above what a loaded machine needs."""
    import signal
    import time

    import pytest

    end = time.monotonic() + bound
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: " + proc.stderr.read()[-1500:])
        if ready():
            proc.send_signal(signal.SIGSTOP)
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"{what}: not reached in {bound:.0f} s")
