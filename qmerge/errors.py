"""The one exception type the CLI turns into a one-line message and exit status 2."""


class QmergeError(Exception):
    """Bad input or settings: the message names the cause and the fix, on one line."""
