"""Several training processes (SPEC §7): the process group, the rank's device and share of
the data, and the few collectives the method needs.

``torchrun --nproc_per_node N -m seco_cli.cli train`` (or ``$(which seco)`` where ``seco`` is
a Python console script) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`session` learns rank, world size and local rank from
:func:`seco_cli.shards.resolve_shard` (the one reader of the launcher's environment, shared
with the inference stages, which need no process group; torch.distributed itself reads the
master address): it joins the process group (gloo
on CPU, nccl on CUDA) and gives each rank its device (``cuda:LOCAL_RANK`` for
``cuda``/``auto`` when GPUs exist). Everything else asks :func:`rank`, :func:`world_size` or
:func:`is_main_process`, which read ``torch.distributed``.

A plain run (no torchrun, or ``WORLD_SIZE=1``) joins no group: every helper here is then the
identity and nothing communicates, so the single-process results are exactly those of a
program without this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from seco_cli.device import resolve_device
from seco_cli.shards import resolve_shard


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, the model and dvclive logs; the others only train."""
    return rank() == 0


@contextmanager
def session(device_name: str, where: str) -> Iterator[torch.device]:
    """Join the process group torchrun asked for, for the duration of a stage; yields the
    rank's device. A group that already exists (started by a caller) is used and left open."""
    launcher = resolve_shard(None)  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else 0/1
    if _active() or launcher.count == 1:
        several = _active() and world_size() > 1
        local = launcher.local_rank if launcher.local_rank is not None else rank()
        yield resolve_device(device_name, where, local_rank=local if several else None)
        return
    device = resolve_device(device_name, where, local_rank=launcher.local_rank or 0)
    if device.type == "cuda":  # nccl, each rank bound to its GPU before the group forms
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where small bookkeeping tensors must live for the group's backend (nccl: the GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_cat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's tensors concatenated along dim 0 in rank order, the same on every rank.

    Each rank must pass tensors of equal shape and dtype (the per-rank batch is fixed). No
    gradient flows through; with one process the inputs come back unchanged.
    """
    if world_size() == 1:
        return tensors
    out = []
    for x in tensors:
        src = x.detach().contiguous()
        wire = src.to(torch.uint8) if src.dtype == torch.bool else src  # gloo/nccl: no bool
        parts = [torch.empty_like(wire) for _ in range(world_size())]
        dist.all_gather(parts, wire)
        out.append(torch.cat(parts).to(src.dtype))  # (world × N, ...)
    return tuple(out)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (every rank must pass the same keys)."""
    if world_size() == 1:
        return values
    names = sorted(values)
    t = torch.tensor([values[k] for k in names], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(names, t.tolist(), strict=True)}


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` under DistributedDataParallel: gradients averaged over ranks.

    ``find_unused_parameters``: loss terms switch on by schedule (the decoder before
    ``seg_start``, the projection head before ``contrast_start``; the classifiers never in
    ``fully_supervised``), so the set of parameters with a gradient changes between
    iterations. A parameter unused on every rank keeps ``grad = None``, so AdamW skips it
    exactly as in a single process. Buffers (BatchNorm statistics of CNN backbones) are
    broadcast from rank 0 before each forward (DDP's default), so the EMA teacher that
    copies them stays identical on every rank.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=None, find_unused_parameters=True)


class RankShard(Dataset):
    """This rank's share of the global sample stream (a DistributedSampler by position).

    ``samples`` numbers positions ``g = iteration × (B × W) + slot`` with the global batch
    B × W (B per rank, W ranks) and draws each sample's randomness from (seed, iteration,
    slot). Rank r's local position ``p = iteration × B + s`` maps to global slot ``r × B + s``:
    the ranks' batches are disjoint, together form the global batch, and each rank's sample
    seeds differ. ``batch_size`` is the per-rank B, which the loader batches by.
    """

    def __init__(self, samples: Any, rank: int, world: int, batch_size: int):
        self.samples, self.rank, self.world, self.batch_size = samples, rank, world, batch_size

    def global_position(self, p: int) -> int:
        iteration, s = divmod(p, self.batch_size)
        return (iteration * self.world + self.rank) * self.batch_size + s

    def __len__(self) -> int:  # positions are unbounded; the sampler decides the range
        return len(self.samples)

    def __getitem__(self, p: int) -> dict[str, torch.Tensor]:
        return self.samples[self.global_position(p)]
