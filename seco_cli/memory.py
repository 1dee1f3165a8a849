"""Conquer-side memory (SPEC §4–§5): the reservoir of key embeddings with its tag pool, and
the class prototypes; and the running statistics that pick each class's CAM head.

All three (:class:`Reservoir`, :class:`Prototypes`, :class:`CamHeads`) are small modules
whose state lives in registered **buffers**, so a plain ``state_dict`` checkpoints them
exactly (pointer and fill count included) and loads with ``weights_only=True``. None
communicates: callers pass tensors already gathered from all ranks, in the same order on
every rank, so every rank holds identical state.

Tags: 0 = background, c ≥ 1 = class c (prototype row c − 1), −1 = uncertain / empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seco_cli.waits import gathers


class Reservoir(nn.Module):
    """FIFO queue of ``capacity`` key embeddings (dim ``dim``) with a matching tag pool."""

    keys: torch.Tensor  # (K, d) float
    tags: torch.Tensor  # (K,) long, −1 = empty or uncertain
    ptr: torch.Tensor  # () long, next slot to write
    filled: torch.Tensor  # () long, number of written slots (≤ K)

    def __init__(self, capacity: int, dim: int):
        super().__init__()
        if capacity < 1:
            raise ValueError("Reservoir capacity must be ≥ 1")
        self.capacity = capacity
        self.register_buffer("keys", torch.zeros(capacity, dim))
        self.register_buffer("tags", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._filled: int | None = 0  # host copy of ``filled``; None: read it on next use

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._filled = None  # a checkpoint's count: read once, when next needed

    def _fill_count(self) -> int:
        if self._filled is None:
            self._filled = int(self.filled)
        return self._filled

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, tags: torch.Tensor) -> None:
        """Write ``keys`` (N, d) and ``tags`` (N,) at the pointer, wrapping around.

        Same result as writing the rows one by one in order: when N > K only the last K rows
        survive, each in the slot sequential writing would have given it. The pointer moves
        on the device and the fill count is kept on the host as well, so neither a write nor
        :meth:`valid` waits for the device.
        """
        n, k = keys.shape[0], self.capacity
        if n == 0:
            return
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % k  # (N,)
        keys, tags, slots = keys[-k:], tags[-k:], slots[-k:]  # the last K only
        self.keys[slots] = keys.detach().to(self.keys)
        self.tags[slots] = tags.to(self.tags)
        self.ptr.copy_((self.ptr + n) % k)
        self._filled = min(self._fill_count() + n, k)
        self.filled.fill_(self._filled)

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (F, d), tags (F,)) of the filled slots (slot order, not age order)."""
        f = self._fill_count()
        return self.keys[:f], self.tags[:f]


class Prototypes(nn.Module):
    """Class prototypes P (C, d), random normal then L2-normalised; EMA-updated (paper eq. 3)."""

    P: torch.Tensor  # (C, d), unit rows

    def __init__(
        self, num_classes: int, dim: int, seed: int = 0, generator: torch.Generator | None = None
    ):
        super().__init__()
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.register_buffer("P", F.normalize(torch.randn(num_classes, dim, generator=gen), dim=1))

    @torch.no_grad()
    def update(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        momentum: float,
        mode: Literal["adaptive", "single"] = "adaptive",
        tau: float = 0.1,
        gather: bool | None = None,
    ) -> None:
        """p_c ← normalise(m·p_c + (1 − m)·w_c·z_b) for each label c of each image b.

        ``z`` (B, d): L2-normalised global-teacher class tokens (gathered from all ranks);
        ``labels`` (B, C) multi-hot. Single-label image: w = 1. Multi-label image: with
        ``mode='adaptive'`` w_c = softmax over the image's labels of cos(z_b, p_c)/τ;
        with ``mode='single'`` the image is skipped (upstream behaviour).

        Order: images are processed one after another in batch order (sequential semantics:
        image b sees the prototypes already updated by images < b, which matters when two
        images share a class); within one image all its labels are updated at once from the
        prototypes as they were before that image. Images without labels are skipped.

        Gather form (:mod:`seco_cli.waits`): each image updates just its own rows, found with
        ``nonzero``; select form: it computes every row and keeps its own.
        """
        if mode not in ("adaptive", "single"):
            raise ValueError(f"unknown prototype update mode: {mode!r}")
        z = z.detach().to(self.P)
        present = labels.detach() > 0  # (B, C) bool
        if not gathers(z, gather):
            if mode == "single":
                present = present & (present.sum(1, keepdim=True) == 1)
            for b in range(z.shape[0]):
                self._update_masked(z[b], present[b], momentum, tau)
            return
        for b in range(z.shape[0]):
            idx = present[b].nonzero().flatten()  # (L,) class rows of image b
            if idx.numel() == 0 or (mode == "single" and idx.numel() > 1):
                continue
            self._update_image(z[b], idx, momentum, tau)

    def _update_masked(self, z: torch.Tensor, mine: torch.Tensor, m: float, tau: float) -> None:
        """:meth:`_update_image` of the rows ``mine`` (C,) bool, computed for every row."""
        cos = F.cosine_similarity(self.P, z[None], dim=1)  # (C,)
        w = torch.softmax((cos / tau).masked_fill(~mine, float("-inf")), dim=0)  # NaN if none
        new = F.normalize(m * self.P + (1.0 - m) * w.nan_to_num(0.0)[:, None] * z[None], dim=1)
        self.P.copy_(torch.where(mine[:, None], new, self.P))

    def _update_image(self, z: torch.Tensor, idx: torch.Tensor, m: float, tau: float) -> None:
        p = self.P[idx]  # (L, d)
        cos = F.cosine_similarity(p, z[None], dim=1)  # (L,)
        w = torch.softmax(cos / tau, dim=0)  # (L,); exactly 1 for a single label
        self.P[idx] = F.normalize(m * p + (1.0 - m) * w[:, None] * z[None], dim=1)


class CamHeads(nn.Module):
    """Per class, which CAM labels the training step (``train.cam_select``, an option beyond
    the SPEC, README "Deviations from SPEC"), from an EMA per head and class over the images
    showing the class:

    - ``area``: the fraction of the valid image where the head's label-restricted normalised
      CAM exceeds ``high``; the head with the *smaller* area wins. A CAM that fires on
      everything but the object (an *inverted* CAM, which a from-scratch ViT's global max
      pooling allows) covers most of the image, a CAM on the object only the object.
    - ``agreement``: the correlation over the image's pixels between the head's CAM and its
      own tiles' logits (:mod:`seco_cli.tiles`); the *larger* wins. When neither head reaches
      ``min_agreement`` and ``fallback`` is ``tiles``, the class takes the final head's
      tile-logit map instead (``tiles``): no CAM of that class can be trusted. With a
      ``hysteresis`` h > 0 a class on the tiles leaves them only once a head reaches
      ``min_agreement + h`` (buffer ``held``: the classes on the tiles as of the last update),
      so a statistic wavering around the floor does not flip the class's labels step by step.
      The caller may start holding only at a later update (``update``'s ``hold``), so the
      classes a statistic still rising from its first CAMs catches are not kept.

    Ties, and classes not seen yet, go to the schedule's head. Row 0 of the statistic is the
    auxiliary head, row 1 the final one; its buffer is named after the rule (``area`` or
    ``agreement``).

    The caller may step the statistic only every few iterations (``train.cam_select_every``)
    and skip the tile forward in between when no class takes the tiles. It learns that
    without waiting for the device: the trainer reads :meth:`readout` with the rest of the
    step's values and hands them back to :meth:`observe`, which keeps a host copy of the
    fallback choice (:meth:`may_use_tiles`, :meth:`tile_images`)."""

    HEADS = ("aux", "final")
    TILES = "tiles"
    seen: torch.Tensor  # (C,) long, images seen per class

    def __init__(self, num_classes: int, rule: str = "area", min_agreement: float = 0.3,
                 fallback: str = "none", hysteresis: float = 0.0):
        super().__init__()
        if rule not in ("area", "agreement"):
            raise ValueError(f"unknown CAM head rule {rule!r}")
        if hysteresis < 0:
            raise ValueError(f"CAM head hysteresis must be >= 0, got {hysteresis}")
        self.rule, self.min_agreement, self.fallback = rule, min_agreement, fallback
        self.hysteresis = hysteresis
        self.register_buffer(rule, torch.zeros(2, num_classes))  # (2, C) float, the EMA
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("held", torch.zeros(num_classes, dtype=torch.bool))
        # the statistic (2, C), seen (C,) and held (C,) as the last observe() read them (host
        # tensors); None: not known yet
        self._host_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def stat(self) -> torch.Tensor:
        """(2, C): the rule's EMA, row 0 auxiliary, row 1 final."""
        return getattr(self, self.rule)

    @torch.no_grad()
    def update(self, values: torch.Tensor, present: torch.Tensor, momentum: float,
               hold: bool = True) -> None:
        """``values`` (B, 2, C): each image's statistic per head and class; ``present`` (B, C)
        where it counts (the image's labels; gathered from all ranks, the same on every rank).
        Per class, the batch mean over the images where it counts is one EMA step; the first
        one sets the EMA. Without ``hold`` (before ``train.cam_select_hold_start``) no class is
        held: until the next update each class is on the tiles only while under the floor."""
        stat = self.stat
        present = (present > 0).to(stat)  # (B, C)
        n = present.sum(0)  # (C,)
        has = n > 0
        mean = (values.to(stat) * present[:, None]).sum(0) / n.clamp(min=1)  # (2, C)
        first = has & (self.seen == 0)
        ema = momentum * stat + (1.0 - momentum) * mean
        stat.copy_(torch.where(first, mean, torch.where(has, ema, stat)))
        self.seen += n.long()
        self.held.copy_(self.use_tiles() if hold else torch.zeros_like(self.held))
        self.forget_host_copy()

    def use_aux(self, schedule_aux: bool) -> torch.Tensor:
        """(C,) bool: True where the class's CAM comes from the auxiliary head."""
        return self._aux_rule(self.stat, self.seen, schedule_aux)

    def _aux_rule(self, stat: torch.Tensor, seen: torch.Tensor, schedule_aux: bool
                  ) -> torch.Tensor:
        """:meth:`use_aux` of a statistic (2, C) and counts (C,), on the device or the host."""
        aux, final = stat
        tie = (aux == final) | (seen == 0)
        better = aux < final if self.rule == "area" else aux > final
        return torch.where(tie, torch.full_like(tie, schedule_aux), better)

    def use_tiles(self) -> torch.Tensor:
        """(C,) bool: True where the class takes the tile-logit map (``agreement`` with
        fallback ``tiles``, seen, and neither head reaching ``min_agreement``, or, for a class
        ``held`` on the tiles, ``min_agreement + hysteresis``)."""
        return self._tiles_rule(self.stat, self.seen, self.held)

    def _tiles_rule(self, stat: torch.Tensor, seen: torch.Tensor, held: torch.Tensor
                    ) -> torch.Tensor:
        """:meth:`use_tiles` of a statistic (2, C) float32, counts (C,) and held (C,) bool: on
        the device's tensors or on the host's copy of them. Applied to its own result it gives
        that result again, so a class's source between updates is the one the update set."""
        if self.rule != "agreement" or self.fallback != self.TILES:
            return torch.zeros_like(seen, dtype=torch.bool)
        best = stat.max(0).values
        stay = held & (best < self.min_agreement + self.hysteresis)
        return (seen > 0) & ((best < self.min_agreement) | stay)

    def readout(self) -> torch.Tensor:
        """(4·C,) float64 on the device: the statistic's rows, ``seen``, then ``held``: what
        :meth:`observe` takes back once the caller has read it (in its one read per step)."""
        return torch.cat([self.stat.detach().double().flatten(), self.seen.double(),
                          self.held.double()])

    def observe(self, values: Sequence[float]) -> list[list[float]]:
        """Take back :meth:`readout`'s values as read on the host: keeps the host's copy of
        the statistic (for :meth:`may_use_tiles`, :meth:`tile_images`,
        :meth:`observed_names`) and returns its rows (auxiliary, final) for logging."""
        c = self.seen.shape[0]
        if len(values) != 4 * c:
            raise ValueError(f"expected {4 * c} values (CamHeads.readout), got {len(values)}")
        rows = torch.tensor(values, dtype=torch.float64).view(4, c)
        # the statistic's own dtype, so the floor compares as it does on the device; a host
        # tensor, read through numpy (no device read: bench/train_step counts Tensor reads)
        self._host_rows = (rows[:2].to(self.stat.dtype), rows[2], rows[3] > 0)
        return [list(values[:c]), list(values[c:2 * c])]

    def observed_names(self, schedule_aux: bool) -> list[str]:
        """:meth:`names` as of the last :meth:`observe`, from the host's copy (no device
        read): what the trainer follows step by step to record when each class last changed
        its source."""
        if self._host_rows is None:
            raise RuntimeError("observed_names() before observe()")
        return self._names_of(*self._host_rows, schedule_aux)

    def _names_of(self, stat: torch.Tensor, seen: torch.Tensor, held: torch.Tensor,
                  schedule_aux: bool) -> list[str]:
        aux = self._aux_rule(stat, seen, schedule_aux).numpy().tolist()
        tiles = self._tiles_rule(stat, seen, held).numpy().tolist()
        return [self.TILES if t else self.HEADS[0] if a else self.HEADS[1]
                for a, t in zip(aux, tiles, strict=True)]

    def _host_tiles(self) -> list[bool] | None:
        """:meth:`use_tiles` from the host's copy of the last :meth:`observe`; None: unknown."""
        return (None if self._host_rows is None
                else self._tiles_rule(*self._host_rows).numpy().tolist())

    def may_use_tiles(self) -> bool:
        """False only when the host knows that no class takes the tile map (:meth:`observe`
        since the statistic last changed); True when one may, or when it is not known."""
        tiles = self._host_tiles()
        return tiles is None or any(tiles)

    def tile_images(self, labels: Sequence[Sequence[float]] | None) -> list[int] | None:
        """Between updates, the images (rows of the host's ``labels``) whose tiles must be
        classified: those showing a class that takes the tile map. None: every image (the
        host copy or the labels are not known); empty: none."""
        tiles = self._host_tiles()
        if tiles is not None and not any(tiles):
            return []
        if tiles is None or labels is None:
            return None
        return [i for i, row in enumerate(labels)
                if any(v > 0 and t for v, t in zip(row, tiles, strict=True))]

    def forget_host_copy(self) -> None:
        """The statistic changed without :meth:`observe` (an update, a loaded state)."""
        self._host_rows = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.forget_host_copy()  # a loaded statistic: the host copy is stale
        # a state saved before `held` existed: no class held (its use_tiles is unchanged)
        state_dict.setdefault(prefix + "held", torch.zeros_like(self.held))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def names(self, schedule_aux: bool) -> list[str]:
        """The source of each class, ``aux``, ``final`` or ``tiles`` (recorded in the trained
        model)."""
        return self._names_of(self.stat.detach().cpu(), self.seen.cpu(), self.held.cpu(),
                              schedule_aux)
