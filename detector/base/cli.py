"""What every tool shares: one-line errors instead of tracebacks for what a user can cause.

- :class:`ToolParser`: an ``argparse`` parser whose errors (a bad flag, a value its ``type=`` from
  :mod:`detector.base.options` refuses) are a :class:`UserError`, not a usage block.
- :func:`run_tool`: runs a tool's ``main``; a :class:`UserError`, or an :class:`OSError` a user can cause
  (disk full, permission denied, read-only folder, missing file), is one line on stderr and a non-zero
  exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from detector.base.errors import UserError

_FULL = "free some space (or write elsewhere) and rerun; finished work is kept"
_DENIED = "check the permissions, or choose another path"
# errno -> what the user does about it; an OSError with another errno (or none) is not the user's doing
OS_ERROR_ADVICE = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EFBIG: "the file is too large for this file system; write elsewhere",
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EEXIST: "it is in the way; remove it or choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer workers",
    errno.ENFILE: "too many open files on the machine; retry when fewer are open",
    errno.EIO: "the disk reported an input/output error; check it and rerun",
    errno.EBUSY: "it is in use by another program; retry when it is free",
}


class ToolParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a :class:`UserError`: under :func:`run_tool` one line,
    ``error: argument --lr: expected a finite number > 0, got 'nan' (see PROG --help)``, exit code 2
    (as argparse's own), without the usage block; a tool's ``main`` called from Python raises it."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def os_error_line(err: OSError) -> str | None:
    """``"<file>: <what> (<ERRNO>); <what to do>"`` for an OSError a user can cause, else None."""
    advice = OS_ERROR_ADVICE.get(err.errno)
    if advice is None:
        return None
    what = err.strerror or str(err)
    where = err.filename
    if where is not None and err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    name = errno.errorcode.get(err.errno, str(err.errno))
    return f"{where}: {what} ({name}); {advice}" if where is not None else f"{what} ({name}); {advice}"


def _never_fail_printing() -> None:
    """Print any text, even on a strict ASCII stdout: a character the stream cannot encode (an image
    named with non-UTF-8 bytes, an accent) is written as a backslash escape instead of raising."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or unusual stream: leave it
                pass


def run_tool(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, *,
             print_errors: bool = True) -> int:
    """Run a tool's ``main``: a :class:`UserError` becomes ``error: ...`` on stderr and its exit code (2
    unless it says otherwise); an :class:`OSError` in :data:`OS_ERROR_ADVICE` becomes one line naming the
    file, exit code 2 (as a UserError); other exceptions are bugs and keep their traceback.
    print_errors: False in all but one of several processes (ranks > 0), so that a line is printed once;
    the exit code is the same."""
    _never_fail_printing()
    try:
        code = main(argv)
    except UserError as err:
        if print_errors:
            print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        line = os_error_line(err)
        if line is None:
            raise
        if print_errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return int(code or 0)
