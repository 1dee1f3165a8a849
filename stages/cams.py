"""Stage `cams`: CAM seeds of the train split (scales + flip fused as SPEC §3.2) → Zarr,
float16, only the image's own classes, at ``cams.store_size``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from seco_cli.cams import fuse_cams, normalise_cams
from seco_cli.data.prepared import PreparedDataset
from seco_cli.device import resolve_device
from seco_cli.inference import batches, load_model, stored_size, to_original
from seco_cli.params import Params
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance
from seco_cli.store import StoreWriter


@torch.no_grad()
def run(params: Params, prepared: Path, model: Path, out: Path,
        progress: Progress = Silent()) -> dict[str, Any]:
    cp = params.cams
    data = PreparedDataset(prepared)
    device = resolve_device(cp.device, "cams.device")
    net, meta = load_model(model, params, data.num_classes, device)
    split = cp.split or params.data.train_split
    ids = data.ids(split)
    crop = params.model.crop_size
    attrs = {"provenance": provenance(params.dump(), meta.get("seed")), "split": split,
             "classes": data.classes, "model_revision": meta.get("git_revision")}
    writer = StoreWriter(out, "cams", attrs)
    stream = batches(data, ids, cp.batch_size, crop, params.data.mean, params.data.std)
    total = -(-len(ids) // cp.batch_size)
    for chunk, images, sizes in progress.track(stream, total, f"cams ({split})"):
        labels = torch.from_numpy(np.stack([data.label_vector(i) for i in chunk]))
        cam = fuse_cams(net.cams, images.to(device), cp.scales, cp.flip, (crop, crop))
        cam = normalise_cams(cam, labels.to(device)).cpu()
        for k, image_id in enumerate(chunk):
            own = data.labels(image_id)
            scores = cam[k, [c - 1 for c in own]]  # (K, crop, crop), K = own classes
            size = stored_size(sizes[k], cp.store_size)
            writer.write(image_id, to_original(scores, size).clip(0, 1), {"labels": own})
    writer.finish()
    return {"images": len(ids), "split": split}
