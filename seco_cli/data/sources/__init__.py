"""Dataset sources that ``prepare`` converts into the prepared-dataset contract.

Each source module exposes ``read(root, prep) -> SourceData``; :func:`load_source` picks one
by ``data.source``. Samples are yielded lazily so large datasets stream through ``prepare``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from seco_cli.data.prepared import Sample
from seco_cli.errors import DataError
from seco_cli.params import DataParams, PrepareParams

_MODULES = {
    "synthetic": "seco_cli.data.synthetic",
    "voc": "seco_cli.data.sources.voc",
    "coco": "seco_cli.data.sources.coco",
    "yolo-seg": "seco_cli.data.sources.yolo",
    "folder": "seco_cli.data.sources.folder",
}


@dataclass
class SourceData:
    classes: list[str]  # background first
    splits: dict[str, list[str]]  # split name -> ids
    samples: Iterable[Sample]  # every id of every split, once
    total: int | None = None  # number of samples, for progress bars


def load_source(data: DataParams, prep: PrepareParams, seed: int) -> SourceData:
    if data.source == "synthetic":
        return importlib.import_module(_MODULES["synthetic"]).read(prep.synthetic, seed)
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' does not exist", "data.root",
                        f"point data.root at your {data.source} dataset (see README)")
    return importlib.import_module(_MODULES[data.source]).read(root, prep)
