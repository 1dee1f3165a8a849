"""All Zarr I/O of the pipeline: per-image arrays with a completion marker.

A store is a Zarr v3 group holding one array per image (named by the image id), each one
chunk, so an image costs a constant number of files (its ``zarr.json`` and one chunk) and DVC
hashing stays fast. CAMs are float16 and compressed, masks uint8. The group attributes record
what made the store (params, seed, package version, git revision).

A store is *complete* only when the marker file ``COMPLETE`` exists; it is written by
:meth:`StoreWriter.finish` after every image is in (and, when sharded, after every shard
reported in). Readers refuse an incomplete store, so an interrupted stage never leaves one
that looks complete. Creating a store replaces an earlier store of ours (a stage re-run) but
never a folder we did not make.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from seco_cli.errors import MissingInputError, SecoError

COMPLETE = "COMPLETE"
_KIND_ATTR = "seco_store"


def _check_id(image_id: str) -> str:
    """Ids become array names: no path separators or relative parts."""
    if not image_id or "/" in image_id or "\\" in image_id or image_id in {".", ".."}:
        raise SecoError(f"image id '{image_id}' cannot be stored", "artifact store",
                        "ids must not contain '/' or '\\'")
    return image_id


def _is_ours(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return _KIND_ATTR in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _clear(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        raise SecoError(f"output path '{path}' exists and is not a folder", str(path),
                        "move it away or choose another output path")
    if path.exists():
        if not _is_ours(path) and any(path.iterdir()):
            raise SecoError(
                f"refusing to overwrite '{path}': it is not a SeCo artifact store", str(path),
                "move it away or choose another output path",
            )
        shutil.rmtree(path)


OUTPUT_MARKER = ".seco-output"


def fresh_output_dir(path: str | Path) -> Path:
    """An empty folder for a stage's plain-file output (PNGs, plot data).

    A folder from an earlier run (it carries our marker file) is replaced; a non-empty folder
    without the marker belongs to the user and is refused, never deleted.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir() or (any(path.iterdir()) and not (path / OUTPUT_MARKER).exists()):
            raise SecoError(f"refusing to overwrite '{path}': it was not written by seco", str(path),
                            "move it away or choose another output path")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / OUTPUT_MARKER).write_text("written by seco; replaced when its stage re-runs\n")
    return path


class StoreWriter:
    """Writes one store. ``kind`` is e.g. ``cams``, ``masks``; ``attrs`` its provenance."""

    def __init__(self, path: str | Path, kind: str, attrs: dict[str, Any], *, shard: int = 0,
                 num_shards: int = 1, create: bool = True):
        self.path = Path(path)
        self.kind = kind
        self.shard, self.num_shards = shard, num_shards
        if create:
            _clear(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(self.path, mode="w")
            self.group.attrs.update({_KIND_ATTR: kind, "num_shards": num_shards, **attrs})
        else:
            self.group = zarr.open_group(self.path, mode="r+")
        (self.path / COMPLETE).unlink(missing_ok=True)
        self.count = 0

    def write(self, image_id: str, array: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Store one image's array as a single chunk (float → float16, compressed)."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float16)
        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle" if array.dtype == np.uint8 else "shuffle")
        arr = self.group.create_array(
            _check_id(image_id), shape=array.shape, dtype=array.dtype,
            chunks=tuple(max(1, d) for d in array.shape), compressors=compressor, overwrite=True,
            fill_value=0,
        )
        arr[...] = array
        if attrs:
            arr.attrs.update(attrs)
        self.count += 1

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Mark this shard done; the store is complete once every shard is."""
        done = self.path / f".shard-{self.shard}-of-{self.num_shards}.done"
        done.write_text(json.dumps({"images": self.count, **(summary or {})}))
        shards = [self.path / f".shard-{i}-of-{self.num_shards}.done" for i in range(self.num_shards)]
        if all(p.exists() for p in shards):
            (self.path / COMPLETE).write_text(json.dumps({"kind": self.kind, "shards": self.num_shards}))


class StoreReader:
    """Reads a complete store; refuses an incomplete or foreign one."""

    def __init__(self, path: str | Path, kind: str | None = None, stage_hint: str | None = None):
        self.path = Path(path)
        hint = f"run `seco {stage_hint}` first" if stage_hint else "re-run the stage that makes it"
        if not self.path.exists():
            raise MissingInputError(f"artifact store '{self.path}' does not exist", str(self.path), hint)
        if not _is_ours(self.path):
            raise MissingInputError(f"'{self.path}' is not a SeCo artifact store", str(self.path), hint)
        if not (self.path / COMPLETE).exists():
            raise MissingInputError(
                f"artifact store '{self.path}' is incomplete (its stage was interrupted)",
                str(self.path), hint,
            )
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)
        if kind is not None and self.attrs.get(_KIND_ATTR) != kind:
            raise MissingInputError(
                f"'{self.path}' holds '{self.attrs.get(_KIND_ATTR)}', expected '{kind}'",
                str(self.path), hint,
            )

    def ids(self) -> list[str]:
        # Listed from the folder: the marker files are not Zarr nodes (and zarr warns on them).
        return sorted(p.name for p in self.path.iterdir() if (p / "zarr.json").is_file())

    def __contains__(self, image_id: str) -> bool:
        return (self.path / image_id / "zarr.json").exists()

    def read(self, image_id: str) -> np.ndarray:
        return self.group[_check_id(image_id)][...]

    def read_with_attrs(self, image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
        arr = self.group[_check_id(image_id)]
        return arr[...], dict(arr.attrs)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for image_id in self.ids():
            yield image_id, self.read(image_id)
