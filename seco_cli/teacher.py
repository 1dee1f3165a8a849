"""The local teacher: an EMA copy of the student encoder + projection head (SPEC §2).

The teacher is frozen (no gradients), always in eval mode, and is **never wrapped in DDP**:
every rank applies the same EMA update to identical student weights (DDP keeps those in
sync), so the teachers stay identical without any communication.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def _unwrap(module: nn.Module) -> nn.Module:
    """The bare module under a (Distributed)DataParallel wrapper, so parameter names match."""
    return module.module if isinstance(module, (DataParallel, DistributedDataParallel)) else module


class EMATeacher(nn.Module):
    """Deep copy of ``student_modules`` updated as p_t ← m·p_t + (1 − m)·p_s.

    ``momentum`` is the default used by :meth:`update` when none is given (0.999 *(up)*);
    the trainer normally passes the scheduled value each step. Buffers (e.g. BatchNorm
    running statistics) are copied from the student, not averaged. Never wrap this in DDP.
    """

    def __init__(self, student_modules: nn.Module, momentum: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(_unwrap(student_modules))
        self.module.requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None
        self.momentum = momentum
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        """Ignores ``mode``: the teacher always stays in eval mode (SPEC §2)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """EMA step from ``student`` (same structure as the copy; DDP wrappers are unwrapped)."""
        m = self.momentum if momentum is None else momentum
        student = _unwrap(student)
        t_params = dict(self.module.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            raise ValueError("EMATeacher.update: student structure differs from the teacher's")
        for name, p_t in t_params.items():
            p_t.mul_(m).add_(s_params[name].detach().to(p_t.dtype), alpha=1.0 - m)
        s_buffers = dict(student.named_buffers())
        for name, b_t in self.module.named_buffers():
            b_t.copy_(s_buffers[name])

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy's forward, without autograd (keys are targets, SPEC §5)."""
        return self.module(*args, **kwargs)
