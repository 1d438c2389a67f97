"""A `factlab tune` worker for tests/test_tune_storage.py: the real command line (cli.main),
with each trial held after its first stage until the test creates GATE/go-<trial>; on
arriving there it creates GATE/at-<trial>-<pid>. So the test, not timing, decides when a
trial finishes and can SIGKILL a worker in the middle of one.

    python tests/tune_worker.py GATE tune EXP.yaml --storage URL ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    gate = Path(sys.argv[1])
    import factlab.experiment.runner as runner

    real = runner.run_experiment

    def gated(texp, options, events):
        number = options.point["trial"]
        on_stage = events.on_stage

        def held(folder, record):
            if on_stage is not None:
                on_stage(folder, record)  # tune's own callback (the pruning report) first
            if record.name == texp.stage_names()[0]:
                (gate / f"at-{number}-{os.getpid()}").touch()
                while not (gate / f"go-{number}").exists():
                    time.sleep(0.05)

        events.on_stage = held  # events: the trial's own copy (experiment.tune.TrialObjective)
        return real(texp, options, events)

    runner.run_experiment = gated  # run_tune imports it at call time
    from factlab import cli

    sys.argv = ["factlab", *sys.argv[2:]]
    cli.main()


if __name__ == "__main__":
    main()
