"""Device selection: one clear error when CUDA is asked for but absent."""

from __future__ import annotations

import torch

from seco_cli.errors import SecoError


def resolve_device(name: str, where: str, local_rank: int | None = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device.

    ``local_rank`` is given for a process of a multi-process run (:mod:`seco_cli.distributed`):
    ``cuda`` and ``auto`` (when GPUs exist) then mean ``cuda:local_rank``, one GPU per process,
    and naming one GPU is refused since every process would take it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SecoError(f"unknown device '{name}'", where, "use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SecoError("CUDA was asked for but no CUDA device is available", where,
                            "set it to cpu or auto")
        if local_rank is not None:
            if device.index is not None:
                raise SecoError(f"'{name}' names one GPU for every process of a multi-process run",
                                where, "set it to cuda or auto: each process takes cuda:LOCAL_RANK")
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SecoError(f"CUDA device {device.index} does not exist "
                            f"({torch.cuda.device_count()} present)", where,
                            "use an existing index, or start at most that many processes per node")
    return device
