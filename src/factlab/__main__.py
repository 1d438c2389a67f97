"""`python -m factlab` runs the command line."""

from factlab.cli import main

main()
