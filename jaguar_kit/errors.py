"""The one exception type users see as a one-line message."""


class JaguarKitError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The command line prints ``str(err)`` and exits with status 2; nothing that was
    already written is removed.
    """


_WRAPPED = "Original Traceback"  # how torch's DataLoader forwards an exception raised in a worker


def plain_message(err: BaseException) -> str:
    """The one-line message of ``err``, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole
    traceback as its message; the original message is that traceback's last line.
    """
    text = str(err)
    if _WRAPPED not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    for prefix in (f"{type(err).__module__}.{type(err).__qualname__}: ", f"{type(err).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last
