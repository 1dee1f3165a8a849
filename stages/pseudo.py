"""Stage `pseudo`: CAM seeds → pseudo masks (SPEC §8): a constant background score, optional
PAR, then the dense CRF, over ``pseudo.workers`` processes; masks → Zarr, and optionally
VOC-palette PNGs (for users who train a separate segmentation network)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from seco_cli.data.prepared import PreparedDataset
from seco_cli.export import export_pngs
from seco_cli.params import Params
from seco_cli.pool import imap, resolve_workers
from seco_cli.postprocess import MaskSettings, crf_kwargs, pseudo_job
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance
from seco_cli.shards import Shard
from seco_cli.store import StoreReader, input_stamp, open_writer


def settings(params: Params) -> MaskSettings:
    pp = params.pseudo
    return MaskSettings(pp.bkg, pp.par_iterations, tuple(pp.par_dilations), crf_kwargs(pp.crf),
                        params.data.mean, params.data.std)


def _jobs(data: PreparedDataset, reader: StoreReader, ids: list[str]) -> Iterator[tuple]:
    for image_id in ids:
        cam, attrs = reader.read_with_attrs(image_id)
        yield image_id, data.image(image_id), cam, list(attrs["labels"])


def run(params: Params, prepared: Path, cams: Path, out: Path, png_dir: Path,
        shard: Shard = Shard(), progress: Progress = Silent()) -> dict[str, Any]:
    pp = params.pseudo
    data = PreparedDataset(prepared)
    reader = StoreReader(cams, "cams", stage_hint="cams")
    attrs = {"provenance": provenance(params.dump(), params.train.seed),
             "split": reader.attrs.get("split"), "classes": data.classes,
             "inputs": {"cams": input_stamp(cams)}}
    writer = open_writer(out, "pseudo", attrs, shard=shard.index, num_shards=shard.count)
    ids = shard.take(reader.ids())
    workers = resolve_workers(pp.workers) if (pp.crf.iterations or pp.par_iterations) else 1
    masks = imap(partial(pseudo_job, settings=settings(params)), _jobs(data, reader, ids), workers)
    for image_id, mask in progress.track(masks, len(ids), f"pseudo{shard.label}"):
        writer.write(image_id, mask)
    result = {"images": len(ids), "workers": workers, "shard": str(shard),
              "complete": writer.finish()}
    if result["complete"]:  # the shard that completed the store exports all of it
        result["pngs"] = export_pngs(out, png_dir, enabled=pp.palette_png)
    return result
