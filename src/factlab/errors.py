"""User-facing errors.

A ``FactlabError`` is bad input or a missing resource the user can fix. The CLI prints its
message as one line and exits with code 2, without a traceback. The message names the
problem and the fix.
"""


class FactlabError(Exception):
    """Bad input or a missing resource; the message says what is wrong and how to fix it."""
