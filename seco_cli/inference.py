"""Inference helpers shared by the ``cams`` and ``segment`` stages (SPEC §8): one setup
(dataset, device, model, split, this shard's ids, store attributes), the image batches (made
ahead in a background thread), CAMs of one forward pass, and the segmentation variants."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from seco_cli.cams import rescale
from seco_cli.checkpoint import check_compatible, load_checkpoint, load_weights
from seco_cli.data.prepared import INDEX, PreparedDataset
from seco_cli.data.transforms import resize_square, to_tensor
from seco_cli.device import resolve_device
from seco_cli.models.network import SeCoNet
from seco_cli.params import ModelParams, Params
from seco_cli.provenance import provenance
from seco_cli.shards import Shard
from seco_cli.store import input_stamp

T = TypeVar("T")


def load_model(path: Path, params: Params, num_classes: int, device: torch.device,
               ) -> tuple[SeCoNet, dict]:
    """The trained network in eval mode, checked against the params and dataset."""
    ckpt = load_checkpoint(path, stage_hint="train")
    check_compatible(ckpt, params.model.backbone, num_classes, path,
                     params.model.model_dump(mode="json"))
    mp = params.model.model_copy(update={"pretrained": False})  # weights come from the checkpoint
    return build_loaded(mp, num_classes, ckpt["model"], path).to(device).eval(), ckpt.get("meta", {})


def build_loaded(mp: ModelParams, num_classes: int, state: dict[str, Any], path: Path) -> SeCoNet:
    """The network holding ``state``'s weights. Built on the meta device, the checkpoint's
    tensors then assigned: no random initialisation of weights about to be replaced (about a
    second of CPU for a ViT-B/16 at every start of cams and segment). Built the plain way when
    that fails or leaves a tensor unset (a buffer the checkpoint does not hold)."""
    try:
        with torch.device("meta"):
            net = SeCoNet(mp, num_classes)
    except Exception:  # noqa: BLE001 - a model that needs real tensors to build: plain build
        net = None
    if net is not None:
        load_weights(net, state, path, assign=True)
        if not any(t.is_meta for t in (*net.parameters(), *net.buffers())):
            return net
    net = SeCoNet(mp, num_classes)
    load_weights(net, state, path)
    return net


@dataclass
class Inference:
    """Everything a model-running stage needs before its loop."""

    data: PreparedDataset
    device: torch.device
    net: SeCoNet
    split: str
    ids: list[str]  # this shard's ids of the split
    crop: int  # inference input side (SPEC §8)
    attrs: dict[str, Any]  # store attributes: provenance, split, classes, model identity
    meta: dict[str, Any]  # the checkpoint's ``meta`` record (training params, seed, revision)

    def batches(self, size: int, mean, std,
                ) -> Iterator[tuple[list[str], torch.Tensor, list[np.ndarray]]]:
        """This shard's batches, read and resized in a background thread ahead of the
        network (:func:`prefetch`)."""
        return prefetch(batches(self.data, self.ids, size, self.crop, mean, std))


def setup(params: Params, prepared: Path, model: Path, device: str, where: str, split: str,
          shard: Shard = Shard()) -> Inference:
    """Dataset, device (``cuda:LOCAL_RANK`` under torchrun), model in eval mode,
    the split's ids of this shard, and the attributes of the store the stage writes."""
    data = PreparedDataset(prepared)
    dev = resolve_device(device, where, local_rank=shard.local_rank)
    net, meta = load_model(model, params, data.num_classes, dev)
    attrs = {"provenance": provenance(params.dump(), meta.get("seed")), "split": split,
             "classes": data.classes, "model_revision": meta.get("git_revision"),
             "inputs": {"model": input_stamp(model),
                        "prepared": input_stamp(Path(prepared) / INDEX)}}
    return Inference(data, dev, net, split, shard.take(data.ids(split)),
                     params.model.crop_size, attrs, meta)


def cam_fn(net: SeCoNet, source: str, aux: bool):
    """The cams stage's CAM function for seeds from ``source`` (SPEC §2, §8). Final seeds:
    ``x → final CAM``, or with ``aux`` ``x → (final, auxiliary CAM)`` from one backbone pass;
    per-class ``select`` seeds need both, so they always get the pair.
    Auxiliary seeds are the auxiliary CAMs themselves, whatever ``aux`` says: ``x → auxiliary
    CAM``, the backbone run only up to block ``aux_layer``."""
    if source == "aux":
        return partial(net.cams, aux=True)
    return net.both_cams if aux or source == "select" else net.cams


def batches(data: PreparedDataset, ids: list[str], size: int, crop: int, mean, std,
            ) -> Iterator[tuple[list[str], torch.Tensor, list[np.ndarray]]]:
    """(ids, images resized to crop×crop (B, 3, crop, crop), the decoded images (H, W, 3))."""
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        originals = [data.image(image_id) for image_id in chunk]
        images = [resize_square(to_tensor(img, mean, std), crop) for img in originals]
        yield chunk, torch.stack(images), originals


_END = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` made in a background thread, at most ``depth`` ahead of the consumer: the
    next batches are decoded and resized while the network runs on this one (on a GPU the
    stages otherwise wait on image decoding, single-threaded). Same items in the same order;
    an exception of ``items`` is raised here at its place in the stream; a consumer that
    stops early (or fails) stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, exc))
            return
        put((False, _END))

    thread = threading.Thread(target=produce, name="seco-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if ok:
                yield item
            elif item is _END:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()


def stored_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """``size`` scaled so its longest side is ``longest`` (0 keeps it)."""
    h, w = size
    if longest <= 0 or max(h, w) <= longest:
        return h, w
    r = longest / max(h, w)
    return max(1, round(h * r)), max(1, round(w * r))


def seg_logits(net: SeCoNet, images: torch.Tensor, scales: list[float], flip: bool) -> torch.Tensor:
    """Segmentation logits at the input size (SPEC §8): summed over the flip pair, max over
    scales. (B, C+1, H, W)."""
    return seg_variants(net, images, scales, flip)[1]


def seg_variants(net: SeCoNet, images: torch.Tensor, scales: list[float], flip: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, multi-scale) segmentation logits at the input size, each (B, C+1, H, W).

    raw: scale 1, no flip. multi-scale (SPEC §8): per scale the logits of the image and of its
    flip (flipped back) **summed**, upsampled, then the element-wise **max** over scales. When
    1.0 is among the scales, raw comes from the same forward pass. Scaled sides are rounded to
    a multiple of the backbone's stride (:func:`seco_cli.cams.rescale`).
    """
    b, _, h, w = images.shape

    def logits_at(x: torch.Tensor) -> torch.Tensor:
        tokens, _, _ = net.backbone(x)
        return F.interpolate(net.decoder(tokens).float(), size=(h, w), mode="bilinear",
                             align_corners=False)

    raw = best = None
    for s in scales:
        x = rescale(images, s, net.backbone.stride)
        logits = logits_at(torch.cat([x, x.flip(-1)]) if flip else x)  # (B or 2B, C+1, H, W)
        if s == 1.0:
            raw = logits[:b]
        if flip:
            logits = logits[:b] + logits[b:].flip(-1)
        best = logits if best is None else torch.maximum(best, logits)
    if raw is None:
        raw = logits_at(images)
    return raw, best


def to_original(scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) → (K, H, W) float32 numpy, bilinear (K may be 0: an image without labels)."""
    if scores.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.float32)
    return F.interpolate(scores[None].float(), size=size, mode="bilinear",
                         align_corners=False)[0].cpu().numpy()
