"""Stage `segment`: segmentation of the eval split (SPEC §8) → Zarr with two variants, and
VOC-palette PNGs of the final one (also for a split without ground truth).

- ``raw/<id>``: scale 1, no flip, no CRF;
- ``ms_crf/<id>``: ``segment.scales`` with the flip pair (logits summed over the pair, max over
  scales), then the dense CRF (``segment.crf``, over ``segment.workers`` processes; over
  every label, or with ``segment.crf_labels: present`` over those that win a pixel before it).

Sharded runs (``shard``) write their share of the ids into the one store.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from seco_cli.export import export_pngs
from seco_cli.inference import Inference, seg_variants, setup
from seco_cli.params import Params
from seco_cli.pool import imap, resolve_workers
from seco_cli.postprocess import crf_kwargs, segment_job, segment_labels
from seco_cli.progress import Progress, Silent
from seco_cli.shards import Shard
from seco_cli.store import open_writer

RAW, MS_CRF = "raw", "ms_crf"
VARIANTS = (RAW, MS_CRF)


@torch.no_grad()
def _forward(inf: Inference, params: Params, raw: dict[str, Any]) -> Iterator[tuple]:
    """Jobs (id, image, multi-scale logits) for the CRF pool; the raw labels go to ``raw``."""
    sp = params.segment
    for chunk, images, originals in inf.batches(sp.batch_size, params.data.mean, params.data.std):
        raw_logits, ms_logits = seg_variants(inf.net, images.to(inf.device), sp.scales, sp.flip)
        raw_logits, ms_logits = raw_logits.cpu().numpy(), ms_logits.cpu().numpy()
        for k, (image_id, image) in enumerate(zip(chunk, originals, strict=True)):
            raw[image_id] = segment_labels(image, raw_logits[k], {})
            yield image_id, image, ms_logits[k]  # (C+1, crop, crop)


def run(params: Params, prepared: Path, model: Path, out: Path, png_dir: Path,
        shard: Shard = Shard(), progress: Progress = Silent()) -> dict[str, Any]:
    sp = params.segment
    inf = setup(params, prepared, model, sp.device, "segment.device",
                sp.split or params.data.eval_split, shard)
    variants = {RAW: {"scales": [1.0], "flip": False, "crf": False},
                MS_CRF: {"scales": sp.scales, "flip": sp.flip, "crf": sp.crf.iterations > 0,
                         "crf_labels": sp.crf_labels}}
    writer = open_writer(out, "segment", {**inf.attrs, "variants": variants},
                         shard=shard.index, num_shards=shard.count, groups=VARIANTS)
    crf = crf_kwargs(sp.crf)
    workers = resolve_workers(sp.workers) if crf else 1
    raw: dict[str, Any] = {}
    preds = imap(partial(segment_job, crf=crf, labels=sp.crf_labels),
                 _forward(inf, params, raw), workers)
    what = f"segment ({inf.split}){shard.label}"
    for image_id, pred in progress.track(preds, len(inf.ids), what):
        writer.write(image_id, raw.pop(image_id), group=RAW)
        writer.write(image_id, pred, group=MS_CRF)
    result = {"images": len(inf.ids), "split": inf.split, "workers": workers,
              "shard": str(shard), "complete": writer.finish()}
    if result["complete"]:  # the shard that completed the store exports all of it
        result["pngs"] = export_pngs(out, png_dir, MS_CRF, enabled=sp.palette_png)
    return result
