"""The one exception type users see: a clear message naming the problem."""


class NeurosalError(Exception):
    """Bad input or state (unknown rule, missing dataset, corrupt checkpoint, ...).

    The CLI prints the message and exits with status 2; library users can catch it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


#: what a conv model's refusal of (N, H, W) data adds: greyscale images without their channel axis
GREY_HINT = " (greyscale images (N, H, W)? save them with a channel axis: x[:, None], shape (N, 1, H, W))"
