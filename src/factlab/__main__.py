"""`python -m factlab`: the same entry point as the installed `factlab` command."""

from factlab.cli import main

if __name__ == "__main__":
    main()
