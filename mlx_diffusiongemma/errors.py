"""The one exception type for mistakes a user can fix.

Its message is a single line naming what is wrong and what to do; the CLI prints it
without a traceback and exits non-zero.
"""


class UserError(ValueError):
    """A problem with the user's input (files, settings, prompt), not a bug."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if it has none), for
    quoting a library's error inside one of ours."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
