"""What made an artifact: package version, git revision, params and seed."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from seco_cli import __version__


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The checkout's commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(params: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """The record every artifact and checkpoint carries."""
    return {
        "seco_version": __version__,
        "git_revision": git_revision(),
        "seed": seed,
        "params": params,
    }
