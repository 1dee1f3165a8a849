"""Stage `prepare`: a source dataset → the canonical prepared dataset (index, GT masks in
Zarr, co-occurrence counts) and a summary metrics file.

Every image is read and checked here (the later stages read only prepared data). A bad image
stops the stage with one line naming it, or with ``data.on_bad_image: skip`` is dropped and
listed under ``skipped`` in the metrics file.
"""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path
from typing import Any

from seco_cli.data.prepared import write_prepared
from seco_cli.data.sources import load_source
from seco_cli.errors import write_error
from seco_cli.jsonio import write_json
from seco_cli.params import Params
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance

log = logging.getLogger(__name__)


def run(params: Params, out: Path, metrics: Path, progress: Progress = Silent()) -> dict[str, Any]:
    seed = params.prepare.seed
    source = load_source(params.data, params.prepare, seed)
    record = provenance({"data": params.data.model_dump(mode="json"),
                         "prepare": params.prepare.model_dump(mode="json")}, seed)
    tracked = progress.track(source.attempts(), source.total, f"prepare ({params.data.source})")
    with closing(tracked) as samples:  # a failure ends the progress bar now, not at exit
        summary = write_prepared(out, source=params.data.source, classes=source.classes,
                                 splits=source.splits, samples=samples, provenance=record,
                                 on_bad_image=params.data.on_bad_image)
    if summary["skipped"]:
        first = summary["skipped"][0]
        log.warning("skipped %d bad image(s) (first: %s); all are listed in %s",
                    summary["skipped_images"], first["reason"], metrics)
    try:
        write_json(metrics, summary)
    except OSError as exc:
        raise write_error(exc, "the metrics file", str(metrics), "seco prepare",
                          state=f"the prepared dataset at '{out}' is complete") from exc
    return summary
