"""Stage `segment`: segmentation of the eval split (scales + flip, SPEC §8) → Zarr and
VOC-palette PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from seco_cli.data.images import save_png, voc_palette
from seco_cli.data.prepared import PreparedDataset
from seco_cli.device import resolve_device
from seco_cli.inference import batches, load_model, seg_logits, to_original
from seco_cli.params import Params
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance
from seco_cli.store import StoreWriter, fresh_output_dir


@torch.no_grad()
def run(params: Params, prepared: Path, model: Path, out: Path, png_dir: Path,
        progress: Progress = Silent()) -> dict[str, Any]:
    sp = params.segment
    data = PreparedDataset(prepared)
    device = resolve_device(sp.device, "segment.device")
    net, meta = load_model(model, params, data.num_classes, device)
    split = sp.split or params.data.eval_split
    ids = data.ids(split)
    crop = params.model.crop_size
    attrs = {"provenance": provenance(params.dump(), meta.get("seed")), "split": split,
             "classes": data.classes, "variants": ["raw"]}
    writer = StoreWriter(out, "segment", attrs)
    if sp.palette_png:
        fresh_output_dir(png_dir)
    palette = voc_palette()
    stream = batches(data, ids, sp.batch_size, crop, params.data.mean, params.data.std)
    total = -(-len(ids) // sp.batch_size)
    for chunk, images, sizes in progress.track(stream, total, f"segment ({split})"):
        logits = seg_logits(net, images.to(device), sp.scales, sp.flip).cpu()
        for k, image_id in enumerate(chunk):
            pred = to_original(logits[k], sizes[k]).argmax(0).astype("uint8")
            writer.write(image_id, pred)
            if sp.palette_png:
                save_png(png_dir / f"{image_id}.png", pred, palette)
    writer.finish()
    return {"images": len(ids), "split": split}
