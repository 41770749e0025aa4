"""What every tool shares: one-line errors instead of tracebacks for what a user can cause."""

from __future__ import annotations

import sys
from collections.abc import Callable

from detector.base.errors import UserError


def run_tool(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a tool's ``main``; a :class:`UserError` becomes ``error: ...`` on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
