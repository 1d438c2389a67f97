"""User-facing errors.

A ``FactlabError`` is bad input or a missing resource the user can fix. The CLI prints its
message as one line and exits with code 2, without a traceback. The message names the
problem and the fix.
"""


class FactlabError(Exception):
    """Bad input or a missing resource; the message says what is wrong and how to fix it."""

    def __init__(self, message: object = "") -> None:
        # One line, always: a key or value quoted into the message may hold a newline or tab.
        super().__init__(" ".join(str(message).split()))
