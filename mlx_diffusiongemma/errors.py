"""The one exception type for mistakes a user can fix.

Its message is a single line naming what is wrong and what to do; the CLI prints it
without a traceback and exits non-zero.
"""


class UserError(Exception):
    """A problem with the user's input (files, settings, prompt), not a bug."""
