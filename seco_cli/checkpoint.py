"""Checkpoints: written atomically, read weights-only (never arbitrary pickles).

``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers, so a file
whose pickle would run code (a malicious ``__reduce__``) is refused instead of executed. Every
failure to read or write one is a one-line :class:`SecoError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seco_cli.errors import MissingInputError, SecoError, write_error


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``: an earlier
    checkpoint stays intact when writing fails (a full disk) or is interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer fails with a RuntimeError
        state = "the previous file is kept" if path.exists() else "no partial file was kept"
        os_exc = exc if isinstance(exc, OSError) else OSError(
            f"torch could not write the file: {(str(exc).splitlines() or ['?'])[0]}")
        raise write_error(os_exc, "the checkpoint", str(path), "seco train", state) from exc
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, stage_hint: str = "train") -> dict[str, Any]:
    """A checkpoint written by ``seco train`` (a dict with ``meta``), read weights-only."""
    path = Path(path)
    redo = f"delete it and run `seco {stage_hint}` again"
    if not path.is_file():
        raise MissingInputError(f"checkpoint '{path}' does not exist", str(path),
                                f"run `seco {stage_hint}` first")
    if path.stat().st_size == 0:
        raise SecoError(f"checkpoint '{path}' is empty (0 bytes)", str(path), redo)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:  # the pickle names a Python callable: never imported, never run
            raise SecoError(f"checkpoint '{path}' refers to the Python object '{found.group(1)}' "
                            "and was refused (checkpoints are read weights-only)", str(path),
                            f"load only files written by `seco {stage_hint}`") from exc
        raise SecoError(f"checkpoint '{path}' is corrupt, truncated or not a checkpoint "
                        "(UnpicklingError)", str(path), redo) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
            IndexError) as exc:
        raise SecoError(f"checkpoint '{path}' is corrupt, truncated or not a checkpoint "
                        f"({exc.__class__.__name__})", str(path), redo) from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("meta"), dict):
        raise SecoError(f"'{path}' is a torch file but not a SeCo checkpoint (no 'meta' record)",
                        str(path), f"give a file written by `seco {stage_hint}`")
    return ckpt


def check_compatible(ckpt: dict[str, Any], backbone: str, num_classes: int, path: str | Path,
                     model: dict[str, Any] | None = None) -> None:
    """Refuse a checkpoint made for another backbone or class count, naming both.

    ``model`` (the current ``params.model`` as a dict), when given, is compared with the
    training params recorded in the checkpoint for the keys that shape the network.
    """
    made = ckpt.get("meta", {})
    if made.get("backbone") != backbone:
        raise SecoError(f"checkpoint was trained with backbone '{made.get('backbone')}', params ask "
                        f"for '{backbone}'", str(path), "retrain, or set model.backbone to match")
    if made.get("num_classes") != num_classes:
        raise SecoError(f"checkpoint has {made.get('num_classes')} classes, the dataset "
                        f"{num_classes}", str(path), "retrain on this dataset")
    trained = (made.get("params") or {}).get("model") or {}
    for key in ("backbone_kwargs", "aux_layer", "seg_dilations"):
        if model is not None and key in trained and trained[key] != model.get(key):
            raise SecoError(f"checkpoint was trained with model.{key} = {trained[key]!r}, params "
                            f"give {model.get(key)!r}", str(path),
                            f"set model.{key} to match, or retrain")


def load_weights(net: nn.Module, state: dict[str, Any], path: str | Path,
                 assign: bool = False) -> None:
    """``net.load_state_dict(state)`` with a one-line error naming the first mismatch;
    ``assign``: the state's tensors become the network's (a network built on the meta device)."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and hasattr(state[k], "shape")
             and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        first = (f"weight '{shape[0]}' is {tuple(state[shape[0]].shape)} in the checkpoint, "
                 f"{tuple(own[shape[0]].shape)} in the network" if shape else
                 f"{len(missing)} weights missing, {len(unexpected)} unexpected (first: "
                 f"'{(missing or unexpected)[0]}')")
        raise SecoError(f"checkpoint does not fit the network: {first}", str(path),
                        "use the model params it was trained with, or retrain")
    net.load_state_dict(state, assign=assign)
