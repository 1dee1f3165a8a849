"""What made an artifact: package version, git revision, params and seed."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from seco_cli import __version__

# Files a run rewrites itself: DVC writes dvc.lock after every stage of a ``dvc repro``, so
# counting it would mark every stage after the first as made from uncommitted code.
NOT_CODE = ("dvc.lock",)


def revision(root: Path, exclude: tuple[str, ...] = NOT_CODE) -> str:
    """``root``'s HEAD commit, with ``-dirty`` when a tracked file other than ``exclude``
    (paths relative to the repository root) differs from it; ``unknown`` outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
             *(f":(top,exclude){path}" for path in exclude)],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """This checkout's commit (``-dirty`` when its code or params differ), or ``unknown``."""
    return revision(Path(__file__).resolve().parent.parent)


def provenance(params: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """The record every artifact and checkpoint carries."""
    return {
        "seco_version": __version__,
        "git_revision": git_revision(),
        "seed": seed,
        "params": params,
    }
