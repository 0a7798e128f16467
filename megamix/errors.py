"""The errors megamix explains in one line, and how commands report them.

Bad input — a config value, a corrupt checkpoint, a corpus that does not fit the model, an export
target that must not be replaced — raises a subclass of :class:`MegamixError` whose message names
the file or field and says what to do.  Commands (``megamix ...`` and ``tools/*.py``) run their
body through :func:`run_command`, which prints that message as one line and exits with the error's
code (2 for config errors, 1 otherwise); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class MegamixError(Exception):
    """A failure megamix explains in its message; ``exit_code`` is what a command exits with."""

    exit_code = 1


def run_command(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """``body()``'s exit code; a :class:`MegamixError` is printed as ``prog: message`` (config
    errors as ``prog: config error: message``) with its exit code, unless ``debug``."""
    try:
        return body()
    except MegamixError as e:
        if debug:
            raise
        from megamix.config import ConfigError

        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"{prog}: {kind}{e}", file=sys.stderr)
        return e.exit_code
