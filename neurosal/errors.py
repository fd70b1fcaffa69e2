"""The one exception type users see: a clear message naming the problem."""


class NeurosalError(Exception):
    """Bad input or state (unknown rule, missing dataset, corrupt checkpoint, ...).

    The CLI prints the message and exits with status 2; library users can catch it.
    """
