"""User-facing errors: one line saying what went wrong, where, and how to fix it.

The CLI turns a :class:`SecoError` into that single line and exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re


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
        # One line whatever the parts hold (a wrapped library message may span several).
        return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


class ParamsError(SecoError):
    """Invalid parameter file or override."""


class DataError(SecoError):
    """Invalid or missing dataset content."""


class MissingInputError(SecoError):
    """A stage's input artifact does not exist or is incomplete."""


class WriteError(SecoError):
    """An output could not be written (disk full, read-only, no permission)."""


_WRITE_FIXES = {
    errno.ENOSPC: "free disk space or write elsewhere",
    errno.EDQUOT: "free space within your disk quota or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "make the folder writable or write elsewhere",
    errno.EPERM: "make the folder writable or write elsewhere",
}


def write_error(exc: OSError, what: str, where: str, rerun: str,
                state: str = "no partial output was kept") -> WriteError:
    """A one-line :class:`WriteError` for an ``OSError`` raised while writing ``what``."""
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    fix = _WRITE_FIXES.get(exc.errno or -1, "check the output location")
    return WriteError(f"cannot write {what} ({reason}; {state})", where,
                      f"{fix}, then run `{rerun}` again")
