"""Dataset sources that ``prepare`` converts into the prepared-dataset contract.

Each source module exposes ``read(root, prep) -> SourceData``; :func:`load_source` picks one
by ``data.source``. Samples are read lazily, one id at a time, so large datasets stream
through ``prepare`` and one bad image can be skipped (``data.on_bad_image: skip``) without
ending the stream.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from seco_cli.data.prepared import BadImage, Sample
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
    order: list[str]  # every id of every split, once, in reading order
    load: Callable[[str], Sample]  # one sample by id; a DataError when that image is bad

    @property
    def total(self) -> int:
        return len(self.order)

    @property
    def samples(self) -> Iterator[Sample]:
        """Every sample in order; the first bad image raises its DataError."""
        return (self.load(i) for i in self.order)

    def attempts(self) -> Iterator[Sample | BadImage]:
        """Every sample in order; a bad image comes as a :class:`BadImage` and reading goes on."""
        for image_id in self.order:
            try:
                yield self.load(image_id)
            except DataError as exc:
                yield BadImage(image_id, exc)


def load_source(data: DataParams, prep: PrepareParams, seed: int) -> SourceData:
    if data.source == "synthetic":
        return importlib.import_module(_MODULES["synthetic"]).read(prep.synthetic, seed)
    root = Path(data.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root '{root}' does not exist", "data.root",
                        f"point data.root at your {data.source} dataset (see README)")
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' is a file, not a folder", "data.root",
                        f"point data.root at the folder of your {data.source} dataset")
    return importlib.import_module(_MODULES[data.source]).read(root, prep)
