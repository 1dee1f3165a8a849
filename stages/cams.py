"""Stage `cams`: CAM seeds of the train split (scales + flip fused as SPEC §3.2) → Zarr,
``cams.dtype`` (uint8 levels q/255 or float16), only the image's own classes, at
``cams.store_size``.

The seed CAMs are the store's root arrays (``<id>``): the final classifier's, or the auxiliary
classifier's when ``cams.source`` says so (``auto``: the CAM training's online labels came from
at its last iteration, read from the checkpoint's recorded params, see
:func:`seco_cli.params.seed_cam_source`; recorded as the store's
``source`` attribute; ``select``: per class the source recorded by a model trained with
``train.cam_select`` ``area`` or ``agreement``, listed as the store's ``cam_heads``
attribute: a head, or ``tiles``, the final head's tile-logit map of
:mod:`seco_cli.tiles`, sharpened as training sharpened it, its tiling and power recorded as
``cam_tiles``). With ``cams.aux``
the auxiliary CAMs, made alike from the same forward pass, also go to the group ``aux``
(``aux/<id>``). Sharded runs (``shard``) write their share of the ids into the one store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from seco_cli.cams import fuse_cams, normalise_cams
from seco_cli.errors import SecoError
from seco_cli.inference import cam_fn, setup, stored_size, to_original
from seco_cli.params import Params, seed_cam_source
from seco_cli.progress import Progress, Silent
from seco_cli.shards import Shard
from seco_cli.store import WriteBehind, open_writer
from seco_cli.tiles import classify_tiles

AUX = "aux"
TILES = "tiles"  # a class whose seeds are the tile-logit map


@torch.no_grad()
def run(params: Params, prepared: Path, model: Path, out: Path, shard: Shard = Shard(),
        progress: Progress = Silent()) -> dict[str, Any]:
    cp = params.cams
    inf = setup(params, prepared, model, cp.device, "cams.device",
                cp.split or params.data.train_split, shard)
    source = seed_cam_source(params, inf.meta)
    attrs = {**inf.attrs, "scales": cp.scales, "flip": cp.flip, "aux": cp.aux, "dtype": cp.dtype,
             "source": source}
    heads = None
    if source == "select":  # per class the head training ended on; both from one pass
        heads = inf.meta["cam_heads"]
        if len(heads) != inf.data.num_classes:
            raise SecoError(f"the model records {len(heads)} CAM heads for "
                            f"{inf.data.num_classes} classes", str(model),
                            "cams.source: final or aux, or retrain on this dataset")
        attrs["cam_heads"] = heads
        use_aux = torch.tensor([h == "aux" for h in heads], device=inf.device)[None, :, None, None]
        use_tiles = torch.tensor([h == TILES for h in heads], device=inf.device)[None, :, None, None]
        # a `tiles` class: the final head's tile-logit map, tiles cut and the map sharpened as
        # training did (checkpoints from before the power: 1, the map as it was)
        tiling = {"power": 1.0, **(inf.meta.get("cam_tiles") or {
            "size": params.train.patch_size, "step": params.train.tile_step,
            "power": params.train.cam_select_fallback_power})}
        if TILES in heads:
            attrs["cam_tiles"] = tiling
    store = open_writer(out, "cams", attrs, shard=shard.index, num_shards=shard.count,
                        groups=[AUX] if cp.aux else [])
    with WriteBehind(store) as writer:  # an image's writes overlap the next batch's forward
        fn = cam_fn(inf.net, source, cp.aux)
        size = (inf.crop, inf.crop)
        total = -(-len(inf.ids) // cp.batch_size)
        stream = progress.track(inf.batches(cp.batch_size, params.data.mean, params.data.std),
                                total, f"cams ({inf.split}){shard.label}")
        for chunk, images, originals in stream:
            labels = torch.from_numpy(np.stack([inf.data.label_vector(i) for i in chunk]))
            labels = labels.to(inf.device)                                  # (B, C)
            fused = fuse_cams(fn, images.to(inf.device), cp.scales, cp.flip, size,
                              inf.net.backbone.stride)
            if source == "aux":
                seeds = aux = fused
            elif heads:
                final, aux = fused
                seeds = torch.where(use_aux, aux, final)
                if TILES in heads:
                    tiles = classify_tiles(inf.net, images.to(inf.device), tiling["size"],
                                           tiling["step"]).fallback(tiling["power"])
                    seeds = torch.where(use_tiles, tiles, seeds)
            else:
                seeds, aux = fused if cp.aux else (fused, None)
            # root[, group aux], each (B, C, crop, crop), left on the device: each image's own
            # classes are taken and resized to the stored size there, and only those leave it
            maps = [normalise_cams(seeds, labels)]
            if cp.aux:  # the seeds themselves when they are the auxiliary CAMs
                maps.append(maps[0] if aux is seeds else normalise_cams(aux, labels))
            for k, image_id in enumerate(chunk):
                own = inf.data.labels(image_id)
                stored = stored_size(originals[k].shape[:2], cp.store_size)
                for cam, group in zip(maps, [None, AUX], strict=False):
                    scores = cam[k, [c - 1 for c in own]]  # (K, crop, crop), K = own classes
                    writer.write(image_id, to_original(scores, stored).clip(0, 1),
                                 {"labels": own}, group=group, dtype=cp.dtype)
        complete = writer.finish()
    return {"images": len(inf.ids), "split": inf.split, "shard": str(shard), "complete": complete}

