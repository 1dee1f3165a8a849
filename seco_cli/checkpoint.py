"""Checkpoints: written atomically, read weights-only (never arbitrary pickles)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from seco_cli.errors import MissingInputError, SecoError


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, stage_hint: str = "train") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint '{path}' does not exist", str(path),
                                f"run `seco {stage_hint}` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SecoError(f"checkpoint '{path}' is corrupt or not a SeCo checkpoint ({exc.__class__.__name__})",
                        str(path), f"delete it and run `seco {stage_hint}` again") from exc


def check_compatible(ckpt: dict[str, Any], backbone: str, num_classes: int, path: str | Path) -> None:
    """Refuse a checkpoint made for another backbone or class count, naming both."""
    made = ckpt.get("meta", {})
    if made.get("backbone") != backbone:
        raise SecoError(f"checkpoint was trained with backbone '{made.get('backbone')}', params ask "
                        f"for '{backbone}'", str(path), "retrain, or set model.backbone to match")
    if made.get("num_classes") != num_classes:
        raise SecoError(f"checkpoint has {made.get('num_classes')} classes, the dataset "
                        f"{num_classes}", str(path), "retrain on this dataset")
