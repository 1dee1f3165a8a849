"""The single-stage training loop (SPEC §6-7), baseline objective.

One iteration is a sequence of named phases: views (the batch), student forward, online
pseudo labels (no grad), losses (a dict of named terms, weighted by per-iteration schedule
arrays and summed), optimiser step. Checkpoints every ``ckpt_every`` iterations hold all
that exact resumption needs; the final model records params, seed and git revision.
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
import torch.nn.functional as F

from seco_cli.cams import fuse_cams, normalise_cams
from seco_cli.checkpoint import load_checkpoint, save_atomic
from seco_cli.data.loader import TrainSamples, train_loader
from seco_cli.data.prepared import PreparedDataset
from seco_cli.errors import SecoError
from seco_cli.losses.classification import multilabel_loss
from seco_cli.losses.segmentation import balanced_seg_loss
from seco_cli.models.network import SeCoNet
from seco_cli.params import Params
from seco_cli.pseudo_labels import cams_to_labels
from seco_cli.schedules import lr_multipliers, step_weights


class NonFiniteLoss(SecoError):
    """A loss term became NaN/inf; training stops and keeps the last good checkpoint."""


@dataclass
class Schedules:
    """Per-iteration arrays of every scheduled scalar."""

    lr: np.ndarray
    w_cls: np.ndarray
    w_aux: np.ndarray
    w_seg: np.ndarray

    @classmethod
    def build(cls, tp) -> Schedules:
        n = tp.iterations
        return cls(
            lr=lr_multipliers(n, tp.warmup_iters, tp.warmup_ratio, tp.poly_power),
            w_cls=step_weights(n, tp.w_cls, 0),
            w_aux=step_weights(n, tp.w_aux, 0),
            w_seg=step_weights(n, tp.w_seg, tp.seg_start),
        )


def build_optimizer(net: SeCoNet, params: Params) -> torch.optim.Optimizer:
    tp = params.train
    head = {id(p) for p in net.head_parameters()}
    backbone = [p for p in net.parameters() if id(p) not in head]
    groups = [
        {"params": backbone, "lr": tp.lr, "base_lr": tp.lr},
        {"params": net.head_parameters(), "lr": tp.lr * tp.head_lr_mult,
         "base_lr": tp.lr * tp.head_lr_mult},
    ]
    return torch.optim.AdamW(groups, lr=tp.lr, betas=tp.betas, weight_decay=tp.weight_decay)


class Trainer:
    def __init__(self, params: Params, data: PreparedDataset, device: torch.device,
                 meta: dict[str, Any]):
        self.params, self.data, self.device, self.meta = params, data, device, meta
        tp = params.train
        torch.manual_seed(tp.seed)
        self.net = SeCoNet(params.model, data.num_classes).to(device)
        self.optimizer = build_optimizer(self.net, params)
        self.sched = Schedules.build(tp)
        self.iteration = 0
        self.autocast = device.type == "cuda"  # bf16 on CUDA, float32 on CPU (SPEC §7)

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def online_labels(self, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                      it: int) -> torch.Tensor:
        """Multi-scale CAM → region map (SPEC §3.2-3.3); aux CAM before ``cam2mask``."""
        tp = self.params.train
        aux = it < tp.cam2mask
        was_training = self.net.training
        self.net.eval()
        cam = fuse_cams(lambda x: self.net.cams(x, aux=aux), images, tp.cam_scales, True,
                        images.shape[-2:])
        self.net.train(was_training)
        return cams_to_labels(normalise_cams(cam, labels), valid, tp.cam_high, tp.cam_low)

    def losses(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["labels"]
        s = self.sched
        want_seg = s.w_seg[it] > 0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.net(images, with_seg=want_seg)
        terms: dict[str, torch.Tensor] = {}
        if s.w_cls[it] > 0:
            terms["cls"] = multilabel_loss(out.logits, labels)
        if s.w_aux[it] > 0:
            terms["aux"] = multilabel_loss(out.aux_logits, labels)
        if want_seg:
            target = self.online_labels(images, labels, batch["valid"], it)
            seg = F.interpolate(out.seg.float(), size=images.shape[-2:], mode="bilinear",
                                align_corners=False)
            terms["seg"] = balanced_seg_loss(seg, target)
        return terms

    def step(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, float]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.net.train()
        terms = self.losses(batch, it)
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise NonFiniteLoss(
                    f"loss term '{name}' became {value.item()} at iteration {it}",
                    "train", "lower train.lr or check the data; the last checkpoint is kept")
        weights = {"cls": self.sched.w_cls[it], "aux": self.sched.w_aux[it], "seg": self.sched.w_seg[it]}
        total = sum(float(weights[k]) * v for k, v in terms.items())
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * float(self.sched.lr[it])
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        logged = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        logged["loss/total"] = float(total.detach())
        logged["lr"] = self.optimizer.param_groups[0]["lr"]
        return logged

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "torch_rng": torch.get_rng_state(),
            "meta": self.meta,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.iteration = int(ckpt["iteration"])
        torch.set_rng_state(ckpt["torch_rng"])

    def final(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "meta": self.meta}


def train(params: Params, data: PreparedDataset, device: torch.device, meta: dict[str, Any],
          ckpt_dir: Path, resume: bool, log: Callable[[int, dict[str, float]], None],
          progress: Callable[[int], None] | None = None) -> Trainer:
    """Run (or resume) training to ``train.iterations``; returns the trained :class:`Trainer`."""
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
    samples = TrainSamples(data, ids, tp.batch_size, tp.seed, params.model.crop_size,
                           tp.scale_range, params.data.mean, params.data.std)
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
            avg = {k: v / count for k, v in sums.items()}
            avg["sec_per_iter"] = (time.perf_counter() - t0) / count
            log(trainer.iteration, avg)
            sums, count, t0 = {}, 0, time.perf_counter()
        if trainer.iteration % tp.ckpt_every == 0 or trainer.iteration == tp.iterations:
            save_atomic(trainer.state(), last)
        if progress:
            progress(1)
    if not math.isfinite(sum(p.detach().float().sum().item() for p in trainer.net.parameters())):
        raise NonFiniteLoss("weights became non-finite", "train", "lower train.lr")
    return trainer
