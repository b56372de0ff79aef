"""The one exception type qlit raises for mistakes a user can fix (bad config, bad data, unreachable hub)."""


class QlitError(Exception):
    """A user-facing error: its message is one sentence that names the offending value and the fix.

    The CLI prints it without a traceback and exits non-zero.
    """


def qlit_error_in(err: BaseException | None) -> QlitError | None:
    """The QlitError that ``err`` is or was raised from, if any (jsonargparse and Lightning wrap what they catch)."""
    while err is not None and not isinstance(err, QlitError):
        err = err.__cause__ or err.__context__
    return err
