"""`python -m factlab`: the same command as the `factlab` script (and the module that
`accelerate launch -m factlab run EXP.yaml` starts in every process).

Guarded: a sweep's worker processes (`factlab sweep --workers N`) are started with the
`spawn` method, which imports the main module of the parent again; unguarded, each worker
would run the whole command once more."""

from factlab.cli import main

if __name__ == "__main__":
    main()
