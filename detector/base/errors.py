"""Errors a user can cause. Their message is one line: what, which file or line, what to do.

Tools catch :class:`UserError` (see :func:`detector.base.cli.run_tool`) and print it as one line on stderr
with a non-zero exit code; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, a flag or a value the project cannot use."""

    exit_code = 2
