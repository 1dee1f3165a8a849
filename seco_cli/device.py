"""Device selection: one clear error when CUDA is asked for but absent."""

from __future__ import annotations

import torch

from seco_cli.errors import SecoError


def resolve_device(name: str, where: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SecoError(f"unknown device '{name}'", where, "use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SecoError("CUDA was asked for but no CUDA device is available", where,
                            "set it to cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SecoError(f"CUDA device {device.index} does not exist "
                            f"({torch.cuda.device_count()} present)", where, "use an existing index")
    return device
