"""Gather or select: the two forms of an op that picks the rows of a tensor by a condition.

*Gather* picks them (boolean indexing, ``nonzero``, or a size read with ``int()``/``any()``)
and computes just those; *select* computes every row and keeps or weights the picked ones
(``torch.where``, masked sums). Both give the same result up to rounding. On a GPU every
gather makes the host wait for the device (the size of the pick lives there), so the host
stops queueing kernels; select never waits, at the price of arithmetic on the rows not
picked, which is small next to the network. On a CPU a wait costs nothing, so the CPU keeps
the gather form, whose results earlier runs reproduce bit for bit.

Functions with both forms take ``gather: bool | None``; ``None`` asks :func:`gathers`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_forced: bool | None = None


def gathers(x: torch.Tensor, gather: bool | None = None) -> bool:
    """The form for tensors on ``x``'s device: ``gather`` when given; else gather on a CPU,
    select elsewhere (unless :func:`select_everywhere` is on)."""
    if gather is not None:
        return gather
    if _forced is not None:
        return _forced
    return x.device.type == "cpu"


@contextlib.contextmanager
def select_everywhere() -> Iterator[None]:
    """Run the select forms on every device, the CPU included: what a GPU step runs, for
    counting its waits on a machine without one (``bench/train_step.py --host-reads``) and
    for testing the select forms end to end."""
    global _forced
    before, _forced = _forced, False
    try:
        yield
    finally:
        _forced = before
