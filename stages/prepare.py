"""Stage `prepare`: a source dataset → the canonical prepared dataset (index, GT masks in
Zarr, co-occurrence counts) and a summary metrics file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seco_cli.data.prepared import write_prepared
from seco_cli.data.sources import load_source
from seco_cli.jsonio import write_json
from seco_cli.params import Params
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance


def run(params: Params, out: Path, metrics: Path, progress: Progress = Silent()) -> dict[str, Any]:
    seed = params.prepare.seed
    source = load_source(params.data, params.prepare, seed)
    record = provenance({"data": params.data.model_dump(mode="json"),
                         "prepare": params.prepare.model_dump(mode="json")}, seed)
    samples = progress.track(source.samples, source.total, f"prepare ({params.data.source})")
    summary = write_prepared(out, source=params.data.source, classes=source.classes,
                             splits=source.splits, samples=samples, provenance=record)
    write_json(metrics, summary)
    return summary
