"""The error raised for bad input: its message names the file, row or key and what to do."""

from __future__ import annotations

import contextlib
import sys


class InputError(ValueError):
    """Bad input data or configuration; the message is meant for the user, not a traceback."""

    @staticmethod
    @contextlib.contextmanager
    def exit_cleanly():
        """In a CLI: print an InputError's message and exit with status 2, without a traceback."""
        try:
            yield
        except InputError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
