"""The one exception type users see: a clear message naming the problem."""


class NeurosalError(Exception):
    """Bad input or state (unknown rule, missing dataset, corrupt checkpoint, ...).

    The CLI prints the message and exits with status 2; library users can catch it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
