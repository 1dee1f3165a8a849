"""All Zarr I/O of the pipeline: per-image arrays with a completion marker.

A store is a Zarr v3 group holding one array per image (named by the image id), each one
chunk, so an image costs a constant number of files (its ``zarr.json`` and one chunk) and DVC
hashing stays fast. Chunk keys use the ``.`` separator (``<id>/c.0.0``, not ``<id>/c/0/0``):
an image is then one folder instead of three or four, and DVC, which pays per folder it walks,
checks a no-op ``dvc repro`` about a third faster (stores written with ``/`` still read). Float
arrays are stored float16, or, with ``dtype="uint8"`` (CAMs by default, ``cams.dtype``), as
8-bit levels: q = round(clip(x, 0, 1) · 255) with the array attribute ``divide_by: 255``, read
back as float32 q / 255 (error ≤ 1/510 ≈ 0.002 for x in [0, 1]; float16 errs ≤ 1/4096 there).
Readers undo it transparently: :meth:`StoreReader.read` gives float32 for a uint8 CAM, float16
for a float16 one (stores written before keep reading as they did). Masks are uint8 as they
are; every array is compressed. The group attributes record what made the store
(params, seed, package version, git revision). A store may also hold named sub-groups
declared when it is created (``groups``), each again one array per image: the segmentation's
``raw/<id>`` and ``ms_crf/<id>``, the auxiliary CAMs ``aux/<id>``.

A store is *complete* only when the marker file ``COMPLETE`` exists; it is written by
:meth:`StoreWriter.finish` after every image is in (and, when sharded, after every shard
reported in). Readers refuse an incomplete store, so an interrupted stage never leaves one
that looks complete. Creating a store replaces an earlier store of ours (a stage re-run) but
never a folder we did not make.

Sharding (:func:`open_writer`): shard 0 of n creates the store, unless a store of the same run
(same attributes, hence the same params, inputs and shard count) is there already; the other
shards wait for that store and add their images to it. Each shard drops a marker when done;
the shard that finds every marker in writes ``COMPLETE`` (exclusively, so exactly one shard
learns that it completed the store).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from seco_cli.errors import MissingInputError, SecoError

COMPLETE = "COMPLETE"
_KIND_ATTR = "seco_store"
SHARD_WAIT_S = 600.0  # how long shard i > 0 waits for shard 0 to create the store
_POLL_S = 0.2
# the chunk file sits in the array's folder: one folder per image (see the module doc)
_CHUNK_KEYS = {"name": "default", "separator": "."}
FLOAT_DTYPES = ("uint8", "float16")  # how a float array may be stored (``StoreWriter.write``)
_DIVIDE_BY = "divide_by"  # array attribute of 8-bit levels: the stored value is x · divide_by
_LEVELS = 255


def quantise(array: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] as 8-bit levels: round(clip(x, 0, 1) · 255), uint8."""
    return np.rint(np.clip(array, 0, 1) * np.float32(_LEVELS)).astype(np.uint8)


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


def _marker(path: Path, shard: int, num_shards: int) -> Path:
    return path / f".shard-{shard}-of-{num_shards}.done"


def input_stamp(path: str | Path) -> str:
    """Identity of a stage input for a run fingerprint: size and mtime of a file, or of a
    store's ``COMPLETE`` marker (rewritten each time the store completes)."""
    path = Path(path)
    target = path / COMPLETE if path.is_dir() else path
    try:
        st = target.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}-{st.st_mtime_ns}"


class StoreWriter:
    """Writes one store. ``kind`` is e.g. ``cams``, ``masks``; ``attrs`` its provenance;
    ``groups`` the sub-groups it holds besides the root (made here, before any shard writes)."""

    def __init__(self, path: str | Path, kind: str, attrs: dict[str, Any], *, shard: int = 0,
                 num_shards: int = 1, create: bool = True, groups: Sequence[str] = ()):
        self.path = Path(path)
        self.kind = kind
        self.shard, self.num_shards = shard, num_shards
        if create:
            _clear(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(self.path, mode="w")
            for name in groups:
                self.group.create_group(_check_id(name))
            # attributes last: a waiting shard joins once it sees them (open_writer)
            self.group.attrs.update({_KIND_ATTR: kind, "num_shards": num_shards,
                                     "groups": list(groups), **attrs})
        else:
            self.group = zarr.open_group(self.path, mode="r+")
        self.groups = set(self.group.attrs.get("groups", []))
        (self.path / COMPLETE).unlink(missing_ok=True)
        _marker(self.path, shard, num_shards).unlink(missing_ok=True)
        self.count = 0

    def write(self, image_id: str, array: np.ndarray, attrs: dict[str, Any] | None = None,
              *, group: str | None = None, dtype: str = "float16") -> None:
        """Store one image's array as a single chunk, compressed, at the root or in one of the
        store's ``group``s. A float array is stored as ``dtype``: float16, or uint8 levels of
        scores in [0, 1] (see the module doc); other arrays as they are."""
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"float arrays are stored as one of {FLOAT_DTYPES}, not '{dtype}'")
        array = np.asarray(array)
        attrs = dict(attrs or {})
        if array.dtype.kind == "f" and dtype == "uint8":
            array = quantise(array)
            attrs[_DIVIDE_BY] = _LEVELS
        elif array.dtype.kind == "f":
            array = array.astype(np.float16)
        if group is not None and group not in self.groups:
            raise ValueError(f"store '{self.path}' has no group '{group}' ({sorted(self.groups)})")
        parent = self.group if group is None else self.group[group]
        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle" if array.dtype == np.uint8 else "shuffle")
        arr = parent.create_array(
            _check_id(image_id), shape=array.shape, dtype=array.dtype,
            chunks=tuple(max(1, d) for d in array.shape), compressors=compressor, overwrite=True,
            fill_value=0, chunk_key_encoding=_CHUNK_KEYS,
        )
        arr[...] = array
        if attrs:
            arr.attrs.update(attrs)
        self.count += 1

    def finish(self, summary: dict[str, Any] | None = None) -> bool:
        """Mark this shard done; the store is complete once every shard is. True only for the
        one call that completed the store (it may then export the whole store)."""
        run = self.group.attrs.get("run")
        _marker(self.path, self.shard, self.num_shards).write_text(
            json.dumps({"images": self.count, "run": run, **(summary or {})}))
        if not all(_marker(self.path, i, self.num_shards).exists() for i in range(self.num_shards)):
            return False
        try:
            with (self.path / COMPLETE).open("x") as f:  # exclusive: one shard wins
                f.write(json.dumps({"kind": self.kind, "shards": self.num_shards}))
        except FileExistsError:
            return False
        return True


class WriteBehind:
    """A :class:`StoreWriter` whose writes run on one background thread, at most ``depth``
    images pending: quantising, compressing and storing one batch overlaps the next batch's
    forward pass (on a GPU the stage otherwise idles through them). Writes keep their order;
    the first failed write is raised at a later :meth:`write` or at :meth:`finish`, which
    waits for every write before it marks the shard done. Leaving the ``with`` block on an
    error drops the writes not started: the store stays incomplete, as after an interruption.
    The arrays handed over must not be changed afterwards."""

    def __init__(self, writer: StoreWriter, depth: int = 32):
        self.writer, self.depth = writer, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="seco-store")
        self._pending: deque[Future[None]] = deque()

    def write(self, *args: Any, **kwargs: Any) -> None:
        self._pending.append(self._pool.submit(self.writer.write, *args, **kwargs))
        while self._pending and (self._pending[0].done() or len(self._pending) > self.depth):
            self._pending.popleft().result()

    def finish(self, summary: dict[str, Any] | None = None) -> bool:
        while self._pending:
            self._pending.popleft().result()
        return self.writer.finish(summary)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _run_of(path: Path) -> str | None:
    """The run fingerprint recorded in a store's attributes (None: absent or being written)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("run")
    except (OSError, ValueError):
        return None


def open_writer(path: str | Path, kind: str, attrs: dict[str, Any], *, shard: int = 0,
                num_shards: int = 1, groups: Sequence[str] = (),
                wait_s: float = SHARD_WAIT_S) -> StoreWriter:
    """The writer of shard ``shard`` of ``num_shards`` of one stage run (see the module doc).

    A single shard always starts a fresh store. Shard 0 of several starts a fresh store unless
    one of the same run exists (then it rewrites its own images into it); shard i > 0 waits
    up to ``wait_s`` seconds for the store of its run and joins it.
    """
    if not 0 <= shard < num_shards:
        raise SecoError(f"shard {shard} is outside 0..{num_shards - 1}", "--shard",
                        "give i/n with 0 <= i < n")
    path = Path(path)
    key = {"kind": kind, "attrs": attrs, "num_shards": num_shards, "groups": list(groups)}
    run = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    attrs = {**attrs, "run": run}
    if num_shards == 1 or (shard == 0 and _run_of(path) != run):
        return StoreWriter(path, kind, attrs, shard=shard, num_shards=num_shards, groups=groups)
    deadline = time.monotonic() + wait_s
    while _run_of(path) != run:
        if time.monotonic() > deadline:
            raise SecoError(f"shard {shard}/{num_shards} found no store of its run at '{path}' "
                            f"after {wait_s:.0f} s", str(path),
                            f"start shard 0/{num_shards} with the same params and inputs")
        time.sleep(_POLL_S)
    return StoreWriter(path, kind, attrs, shard=shard, num_shards=num_shards, create=False)


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
            raise MissingInputError(self._incomplete(), str(self.path), hint)
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)
        self.groups: list[str] = list(self.attrs.get("groups", []))
        if kind is not None and self.attrs.get(_KIND_ATTR) != kind:
            raise MissingInputError(
                f"'{self.path}' holds '{self.attrs.get(_KIND_ATTR)}', expected '{kind}'",
                str(self.path), hint,
            )

    def _incomplete(self) -> str:
        what = f"artifact store '{self.path}' is incomplete"
        try:
            n = int(json.loads((self.path / "zarr.json").read_text())["attributes"]["num_shards"])
        except (OSError, ValueError, KeyError, TypeError):
            n = 1
        missing = [i for i in range(n) if not _marker(self.path, i, n).exists()]
        if n > 1:
            return f"{what}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} not done"
        return f"{what} (its stage was interrupted)"

    def _folder(self, group: str | None) -> Path:
        if group is not None and group not in self.groups:
            raise MissingInputError(f"store '{self.path}' has no group '{group}'", str(self.path),
                                    "re-run the stage that makes it")
        return self.path if group is None else self.path / group

    def ids(self, group: str | None = None) -> list[str]:
        # Listed from the folder: the marker files are not Zarr nodes (and zarr warns on them).
        skip = set(self.groups) if group is None else set()
        return sorted(p.name for p in self._folder(group).iterdir()
                      if (p / "zarr.json").is_file() and p.name not in skip)

    def __contains__(self, image_id: str) -> bool:
        return self.has(image_id)

    def has(self, image_id: str, group: str | None = None) -> bool:
        if group is None and image_id in self.groups:
            return False
        return (self._folder(group) / image_id / "zarr.json").exists()

    def _array(self, image_id: str, group: str | None) -> Any:
        self._folder(group)
        parent = self.group if group is None else self.group[group]
        return parent[_check_id(image_id)]

    def read(self, image_id: str, group: str | None = None) -> np.ndarray:
        return self.read_with_attrs(image_id, group)[0]

    def read_with_attrs(self, image_id: str, group: str | None = None,
                        ) -> tuple[np.ndarray, dict[str, Any]]:
        """The array as written (8-bit levels back as float32 q / divide_by) and its attributes
        (without the storage's own ``divide_by``)."""
        arr = self._array(image_id, group)
        attrs = dict(arr.attrs)
        divide_by = attrs.pop(_DIVIDE_BY, None)
        data = arr[...]
        if divide_by is not None:
            data = data.astype(np.float32) / np.float32(divide_by)
        return data, attrs

    def items(self, group: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
        for image_id in self.ids(group):
            yield image_id, self.read(image_id, group)
