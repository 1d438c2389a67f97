"""`python -m factlab`: the same command as the `factlab` script."""

from factlab.cli import main

main()
