"""The one exception type qlit raises for mistakes a user can fix (bad config, bad data, unreachable hub)."""


class QlitError(Exception):
    """A user-facing error: its message is one sentence that names the offending value and the fix.

    The CLI prints it without a traceback and exits non-zero.
    """
