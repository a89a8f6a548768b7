"""The exception types the CLI turns into a one-line message and an exit status (2, or 4 for VerifyError)."""


class QmergeError(Exception):
    """Bad input or settings: the message names the cause and the fix, on one line."""


class VerifyError(QmergeError):
    """A merged checkpoint that differs from the independent recomputation beyond tolerance: not bad
    input but a wrong result, so the CLI gives it its own exit status."""
