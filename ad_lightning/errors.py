"""Errors that are the user's input, not a bug: the command line prints their message alone (no
traceback) and exits with 2 for a usage error, 1 for bad data or files."""

from __future__ import annotations


class UsageError(ValueError):
    """An option or argument that cannot be used as given; the message names it and says how to fix it."""


class BadInputError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the fix."""
