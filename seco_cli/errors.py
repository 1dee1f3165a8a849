"""User-facing errors: one line saying what went wrong, where, and how to fix it.

The CLI turns a :class:`SecoError` into that single line and exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class SecoError(Exception):
    """An error caused by the user's input (paths, parameters, data), not by a bug."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"at {self.where}")
        text = " ".join(parts)
        if self.fix:
            text += f"; {self.fix}"
        return text


class ParamsError(SecoError):
    """Invalid parameter file or override."""


class DataError(SecoError):
    """Invalid or missing dataset content."""


class MissingInputError(SecoError):
    """A stage's input artifact does not exist or is incomplete."""
