"""Stage `pseudo`: CAM seeds → pseudo masks with a constant background score (SPEC §8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seco_cli.cams import cam_to_mask
from seco_cli.data.prepared import PreparedDataset
from seco_cli.params import Params
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance
from seco_cli.store import StoreReader, StoreWriter


def run(params: Params, prepared: Path, cams: Path, out: Path,
        progress: Progress = Silent()) -> dict[str, Any]:
    data = PreparedDataset(prepared)
    reader = StoreReader(cams, "cams", stage_hint="cams")
    attrs = {"provenance": provenance(params.dump(), params.train.seed),
             "split": reader.attrs.get("split"), "classes": data.classes}
    writer = StoreWriter(out, "pseudo", attrs)
    ids = reader.ids()
    for image_id in progress.track(ids, len(ids), "pseudo"):
        cam, cam_attrs = reader.read_with_attrs(image_id)
        size = data.image_size(image_id)
        writer.write(image_id, cam_to_mask(cam, cam_attrs["labels"], params.pseudo.bkg, size))
    writer.finish()
    return {"images": len(ids)}
