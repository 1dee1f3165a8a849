"""The single-stage training loop (SPEC §6-7).

One iteration: the batch, the method's phases (student forward, online CAM, separate,
conquer, pseudo labels; :mod:`seco_cli.method`) returning named loss terms, weighted by
per-iteration schedule arrays and summed, the optimiser step, the teacher's EMA. Checkpoints
every ``ckpt_every`` iterations hold all that exact resumption needs; the final model records
params, seed and git revision.

Several processes (torchrun, :mod:`seco_cli.distributed`): each rank trains on its own
``batch_size`` images (global batch = batch_size × world size), the student (network +
projection head) is wrapped in DDP, the teacher, reservoir and prototypes stay outside it and
are kept identical by identical inputs; rank 0 alone writes checkpoints and logs, the logged
values being means over the ranks. One process takes none of these paths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seco_cli import distributed
from seco_cli.checkpoint import load_checkpoint, save_atomic
from seco_cli.data.loader import TrainSamples, train_loader
from seco_cli.data.prepared import PreparedDataset
from seco_cli.errors import SecoError
from seco_cli.method import SeCo, StepWeights
from seco_cli.params import Params, TrainParams
from seco_cli.schedules import lr_multipliers, step_weights


class NonFiniteLoss(SecoError):
    """A loss term became NaN/inf; training stops and keeps the last good checkpoint."""


# Which terms each preset trains (SPEC §6). fully_supervised trains the segmentation head on
# ground-truth masks only: the upper bound of the weakly / fully supervised ratio (SPEC §8).
PRESETS: dict[str, set[str]] = {
    "baseline": {"cls", "aux", "seg", "reg"},
    "toco_like": {"cls", "aux", "seg", "reg", "ptc"},
    "no_lig": {"cls", "aux", "seg", "reg", "ptc", "lil", "rectify"},
    "no_lil": {"cls", "aux", "seg", "reg", "ptc", "lig"},
    "no_rectify": {"cls", "aux", "seg", "reg", "ptc", "lig", "lil"},
    "seco": {"cls", "aux", "seg", "reg", "ptc", "lig", "lil", "rectify"},
    "fully_supervised": {"seg", "gt_seg"},
}


@dataclass
class Schedules:
    """Per-iteration arrays of every scheduled scalar (a weight of 0 skips its term)."""

    lr: np.ndarray
    weights: dict[str, np.ndarray]
    rectify: bool
    rectify_start: int
    gt_seg: bool
    proto_start: int

    @classmethod
    def build(cls, tp) -> Schedules:
        n, on = tp.iterations, PRESETS[tp.preset]
        gt = "gt_seg" in on

        def term(name: str, weight: float, start: int) -> np.ndarray:
            return step_weights(n, weight if name in on else 0.0, start)

        weights = {
            "cls": term("cls", tp.w_cls, 0),
            "aux": term("aux", tp.w_aux, 0),
            "seg": term("seg", tp.w_seg if not gt else 1.0, tp.seg_start if not gt else 0),
            "reg": term("reg", tp.w_reg, tp.seg_start),
            "ptc": term("ptc", tp.w_ptc, tp.ptc_start),
            "lig": term("lig", tp.w_lig, tp.contrast_start),
            "lil": term("lil", tp.w_lil, tp.contrast_start),
        }
        return cls(lr=lr_multipliers(n, tp.warmup_iters, tp.warmup_ratio, tp.poly_power),
                   weights=weights, rectify="rectify" in on, rectify_start=tp.rectify_start,
                   gt_seg=gt, proto_start=tp.proto_start)

    def at(self, it: int) -> StepWeights:
        w = {k: float(v[it]) for k, v in self.weights.items()}
        return StepWeights(**w, rectify=self.rectify and it >= self.rectify_start,
                           proto=it >= self.proto_start,
                           gt_seg=self.gt_seg)

    @property
    def uses_teacher(self) -> bool:
        return bool(self.weights["lig"].any() or self.weights["lil"].any())


def build_optimizer(method: SeCo, params: Params) -> torch.optim.Optimizer:
    tp = params.train
    head = {id(p) for p in method.head_parameters()}
    backbone = [p for p in method.trainable_parameters() if id(p) not in head]
    groups = [
        {"params": backbone, "lr": tp.lr, "base_lr": tp.lr},
        {"params": method.head_parameters(), "lr": tp.lr * tp.head_lr_mult,
         "base_lr": tp.lr * tp.head_lr_mult},
    ]
    return torch.optim.AdamW(groups, lr=tp.lr, betas=tp.betas, weight_decay=tp.weight_decay)


def check_reservoir_capacity(tp: TrainParams, sched: Schedules, world: int) -> None:
    """The reservoir holds whole steps of every rank's keys (SPEC §5): its capacity must be a
    multiple of batch_size × (num_patches + 2) × world size whenever L_iL uses it."""
    per_step = tp.keys_per_step * world
    if sched.weights["lil"].any() and tp.reservoir_capacity % per_step:
        raise SecoError(
            f"train.reservoir_capacity ({tp.reservoir_capacity}) must be a multiple of the keys "
            f"enqueued per step by all ranks, batch_size × (num_patches + 2) × world size = "
            f"{tp.batch_size} × {tp.num_patches + 2} × {world} = {per_step}",
            "train.reservoir_capacity", f"set it to a multiple of {per_step}")


class _Student(nn.Module):
    """What DDP wraps: the student network and projection head as submodules; its forward is
    the method's step. The method itself (teacher, reservoir, prototypes) is held outside the
    module tree, so DDP neither syncs nor wraps it (SPEC §2)."""

    def __init__(self, method: SeCo):
        super().__init__()
        self.net, self.proj = method.net, method.proj
        self._method = (method,)  # a tuple: not registered as a submodule

    def forward(self, *args: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return self._method[0].losses(*args)


class Trainer:
    def __init__(self, params: Params, data: PreparedDataset, device: torch.device,
                 meta: dict[str, Any]):
        self.params, self.data, self.device, self.meta = params, data, device, meta
        tp = params.train
        torch.manual_seed(tp.seed)  # the same initial weights on every rank
        self.method = SeCo(params, data.num_classes).to(device)
        self.net = self.method.net
        self.optimizer = build_optimizer(self.method, params)
        self.sched = Schedules.build(tp)
        self.iteration = 0
        # train.cam_select: each class's CAM source as of the last step, the iteration from
        # which it has held it, and how often it has changed (None: no step yet, or the
        # schedule)
        self.cam_sources: list[str] | None = None
        self.cam_since: list[int] | None = None
        self.cam_switches: list[int] | None = None
        self.world, self.rank = distributed.world_size(), distributed.rank()
        check_reservoir_capacity(tp, self.sched, self.world)
        self.losses = (self.method.losses if self.world == 1
                       else distributed.wrap_ddp(_Student(self.method)))
        self.autocast = device.type == "cuda"  # bf16 on CUDA, float32 on CPU (SPEC §7)
        self.mean = torch.tensor(params.data.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(params.data.std, device=device).view(1, 3, 1, 1)

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    def _generator(self, it: int) -> torch.Generator:
        """Randomness of the step's views and patches from (seed, iteration, rank) (SPEC §3.8);
        rank 0 draws what a single process draws, rank r is offset by r · 2⁴⁰."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.params.train.seed * 1_000_003 + it + (self.rank << 40))
        return gen

    def step(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, float]:
        # the loader's labels are host memory on every device: reading them waits for nothing;
        # only the steps between statistic updates use them (CamHeads.tile_images)
        labels = batch["labels"]
        host_labels = (labels.numpy().tolist() if labels.device.type == "cpu"
                       and self.params.train.cam_select_every > 1 else None)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.method.train()
        w = self.sched.at(it)
        raw = (batch["image"] * self.std + self.mean).clamp(0, 1)  # un-normalised, for views
        terms, stats = self.losses(batch, it, w, raw, self._generator(it), self._normalise,
                                   self.autocast, host_labels)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        # one read of the device for the finiteness check and everything logged (each read
        # makes the CPU wait for the GPU), train.cam_select's per-class statistic included;
        # float64 keeps every value as float() gave it; the heads take theirs back (they skip
        # the tile forward while no class takes the tiles, without asking the device)
        heads = self.method.cam_heads
        head_stat = heads.readout() if heads is not None else None
        scalars = torch.stack([v.detach().double() for v in (*terms.values(), total,
                                                             *stats.values())])
        values = (scalars if head_stat is None else torch.cat([scalars, head_stat])).tolist()
        values, head_values = values[:len(scalars)], values[len(scalars):]
        head_rows = heads.observe(head_values) if heads is not None else []
        if heads is not None:  # the sources this step's online CAM took (no device read)
            self._follow_sources(heads.observed_names(it < self.params.train.cam2mask), it)
        term_values = dict(zip(terms, values, strict=False))
        bad = [name for name, value in term_values.items() if not math.isfinite(value)]
        if distributed.any_rank(bool(bad)):  # every rank stops, none waits in backward
            what = (f"loss term '{bad[0]}' became {term_values[bad[0]]}" if bad
                    else f"a loss term became non-finite on another rank than {self.rank}")
            raise NonFiniteLoss(f"{what} at iteration {it}", "train",
                                "lower train.lr or check the data; the last checkpoint is kept")
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * float(self.sched.lr[it])
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.sched.uses_teacher:
            self.method.update_teacher()
        logged = {f"loss/{k}": v for k, v in term_values.items()}
        logged["loss/total"] = values[len(terms)]
        logged["lr"] = self.optimizer.param_groups[0]["lr"]
        logged.update({f"seco/{k}": v for k, v in zip(stats, values[len(terms) + 1:],
                                                        strict=True)})
        if heads is not None:  # train.cam_select: the evidence of each class's choice
            names = self.data.classes[1:]
            for head, row in zip(heads.HEADS, head_rows, strict=True):
                logged.update({f"cam_{heads.rule}/{head}/{name}": a
                               for name, a in zip(names, row, strict=True)})
        return logged

    def _follow_sources(self, names: list[str], it: int) -> None:
        """Keep, per class, the iteration from which it has taken its current CAM source
        (``aux``, ``final``, ``tiles``), i.e. when the class last switched (e.g. to the
        tiles), and how many times it has switched (a statistic wavering around a boundary
        flips the class's labels: ``train.cam_select_hysteresis``)."""
        if self.cam_sources is None:  # set together with cam_since and cam_switches
            self.cam_sources, self.cam_since = list(names), [it] * len(names)
            self.cam_switches = [0] * len(names)
            return
        changed = [was != now for was, now in zip(self.cam_sources, names, strict=True)]
        self.cam_since = [it if c else since for c, since in
                          zip(changed, self.cam_since, strict=True)]
        self.cam_switches = [n + c for c, n in zip(changed, self.cam_switches, strict=True)]
        self.cam_sources = list(names)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Everything exact resumption needs. Identical on every rank (weights, optimiser,
        teacher, reservoir, prototypes; the global RNG is seeded alike), so rank 0's is saved."""
        return {
            "method": self.method.state_dict(),  # unwrapped names: loadable without DDP
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "torch_rng": torch.get_rng_state(),
            "world_size": self.world,
            "cam_sources": self.cam_sources,
            "cam_since": self.cam_since,
            "cam_switches": self.cam_switches,
            "meta": self.meta,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        made = int(ckpt.get("world_size", 1))
        if made != self.world:  # the data stream and the reservoir depend on it
            raise SecoError(f"cannot resume: the checkpoint was made by {made} process(es), this "
                            f"run has {self.world}", "train --resume",
                            f"resume with {made} process(es), or train without --resume")
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.iteration = int(ckpt["iteration"])
        torch.set_rng_state(ckpt["torch_rng"])
        # checkpoints before they were kept: followed afresh from the next step
        self.cam_sources, self.cam_since = ckpt.get("cam_sources"), ckpt.get("cam_since")
        self.cam_switches = ckpt.get("cam_switches")
        if self.cam_switches is None and self.cam_sources is not None:  # before switches
            self.cam_sources = self.cam_since = None  # were counted: the record restarts

    def final(self) -> dict[str, Any]:
        meta = dict(self.meta)
        heads = self.method.cam_heads
        if heads is not None:  # per class, the CAM head training ended on (cams: source auto)
            schedule_aux = self.iteration <= self.params.train.cam2mask
            meta["cam_heads"] = heads.names(schedule_aux)
            meta[f"cam_head_{heads.rule}"] = heads.stat.tolist()
            if self.cam_since is not None:  # per class, the iteration its source began
                meta["cam_heads_since"] = list(self.cam_since)
                meta["cam_heads_switches"] = list(self.cam_switches)
            if heads.rule == "agreement":  # the tile map of a `tiles` class (cams stage)
                meta["cam_tiles"] = {"size": self.params.train.patch_size,
                                     "step": self.params.train.tile_step,
                                     "power": self.params.train.cam_select_fallback_power}
        return {"model": self.net.state_dict(), "prototypes": self.method.prototypes.P.clone(),
                "meta": meta}


def train(params: Params, data: PreparedDataset, device: torch.device, meta: dict[str, Any],
          ckpt_dir: Path, resume: bool, log: Callable[[int, dict[str, float]], None],
          progress: Callable[[int], None] | None = None) -> Trainer:
    """Run (or resume) training to ``train.iterations``; returns the trained :class:`Trainer`.

    Under several processes every rank calls this; ``log`` and ``progress`` are called on
    rank 0 only, with values averaged over the ranks, and rank 0 alone writes checkpoints.
    """
    tp = params.train
    trainer = Trainer(params, data, device, meta)
    last = ckpt_dir / "last.pt"
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        if ckpt.get("meta", {}).get("params") != meta["params"]:
            raise SecoError("cannot resume: the checkpoint was made with other params", str(last),
                            "resume with the same params, or train without --resume")
        trainer.load_state(ckpt)
    ids = data.ids(params.data.train_split)
    if not ids:
        raise SecoError(f"split '{params.data.train_split}' is empty", "data.train_split",
                        "choose a split with images")
    world, main = trainer.world, distributed.is_main_process()
    # one global stream of batch_size × world samples per iteration, this rank's share of it
    samples = TrainSamples(data, ids, tp.batch_size * world, tp.seed, params.model.crop_size,
                           tp.scale_range, params.data.mean, params.data.std,
                           with_masks=trainer.sched.gt_seg)
    if world > 1:
        samples = distributed.RankShard(samples, trainer.rank, world, tp.batch_size)
    loader = train_loader(samples, trainer.iteration, tp.iterations, tp.num_workers)
    sums: dict[str, float] = {}
    count, t0 = 0, time.perf_counter()
    for batch in loader:
        it = trainer.iteration
        logged = trainer.step(batch, it)
        trainer.iteration = it + 1
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if trainer.iteration % tp.log_every == 0 or trainer.iteration == tp.iterations:
            avg = distributed.mean_over_ranks({k: v / count for k, v in sums.items()})
            avg["sec_per_iter"] = (time.perf_counter() - t0) / count  # rank 0's
            if main:
                log(trainer.iteration, avg)
            sums, count, t0 = {}, 0, time.perf_counter()
        if trainer.iteration % tp.ckpt_every == 0 or trainer.iteration == tp.iterations:
            if main:
                save_atomic(trainer.state(), last)
            distributed.barrier()  # no rank runs ahead of a checkpoint being written
        if progress and main:
            progress(1)
    if not math.isfinite(sum(p.detach().float().sum().item() for p in trainer.net.parameters())):
        raise NonFiniteLoss("weights became non-finite", "train", "lower train.lr")
    return trainer
