"""The one exception type users see as a one-line message."""


class JaguarKitError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The command line prints ``str(err)`` and exits with status 2; nothing that was
    already written is removed.
    """
