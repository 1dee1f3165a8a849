"""All Zarr I/O of the pipeline: per-image arrays, packed into bundles, with a completion marker.

A store is a folder holding a Zarr v3 group (``zarr.json``: the attributes that record what
made the store: params, seed, package version, git revision) and its images in *bundles*:
``bundle-<shard>-of-<n>-<k>.zip``, each a Zarr v3 group in a zip file (readable on its own with
``zarr.open_group(zarr.storage.ZipStore(path, mode="r"))``) of up to
:data:`ARRAYS_PER_BUNDLE` arrays, one per image (named by the image id), each one chunk. A
store of N images is then about N / 256 files and no sub-folders: DVC, which pays per file and
per folder it walks (a store is the output of one stage and a dependency of the next), checks a
no-op ``dvc repro`` in a fraction of the time the earlier layout (one folder per image, two
files each) took. Stores of that layout (``layout`` attribute absent) still read. Zip entries
are written uncompressed with a fixed time stamp, so a store's bytes depend only on its
arrays and the order they were written in: a stage that re-runs and makes the same arrays
makes the same files, and DVC skips the stages after it.

Float arrays are stored float16, or, with ``dtype="uint8"`` (CAMs by default, ``cams.dtype``),
as 8-bit levels: q = round(clip(x, 0, 1) · 255) with the array attribute ``divide_by: 255``,
read back as float32 q / 255 (error ≤ 1/510 ≈ 0.002 for x in [0, 1]; float16 errs ≤ 1/4096
there). Readers undo it transparently: :meth:`StoreReader.read` gives float32 for a uint8 CAM,
float16 for a float16 one. Masks are uint8 as they are; every array is compressed (Blosc zstd).
A store may also hold named sub-groups declared when it is created (``groups``), each again one
array per image: the segmentation's ``raw/<id>`` and ``ms_crf/<id>``, the auxiliary CAMs
``aux/<id>`` (inside the bundles, beside the root's images).

A store is *complete* only when the marker file ``COMPLETE`` exists; it is written by
:meth:`StoreWriter.finish` after every image is in (and, when sharded, after every shard
reported in). Readers refuse an incomplete store, so an interrupted stage never leaves one
that looks complete. Creating a store replaces an earlier store of ours (a stage re-run) but
never a folder we did not make.

Sharding (:func:`open_writer`): shard 0 of n creates the store, unless a store of the same run
(same attributes, hence the same params, inputs and shard count) is there already; the other
shards wait for that store and add their images to it, each into bundles of its own (a shard
that joins again first drops the bundles it wrote before). Each shard drops a marker when
done; the shard that finds every marker in writes ``COMPLETE`` (exclusively, so exactly one
shard learns that it completed the store).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import zipfile
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore, ZipStore

from seco_cli.errors import MissingInputError, SecoError

COMPLETE = "COMPLETE"
_KIND_ATTR = "seco_store"
SHARD_WAIT_S = 600.0  # how long shard i > 0 waits for shard 0 to create the store
_POLL_S = 0.2
ARRAYS_PER_BUNDLE = 256  # arrays (images, or an image's array in a sub-group) per bundle file
OPEN_BUNDLES = 16  # bundles a reader keeps open (a COCO-sized store has hundreds)
LAYOUT = "bundles"  # the ``layout`` attribute of a store of bundles (absent: folder per image)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every zip entry's time stamp: same arrays, same bytes
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


def compressor(dtype: Any) -> BloscCodec:
    """The codec every stored array is compressed with: Blosc zstd level 5, bit-shuffled for
    uint8 (CAM levels, masks), byte-shuffled otherwise."""
    shuffle = "bitshuffle" if np.dtype(dtype) == np.uint8 else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def _bundle_name(shard: int, num_shards: int, k: int) -> str:
    return f"bundle-{shard}-of-{num_shards}-{k:05d}.zip"


class _Bundle:
    """One bundle being written: a zip holding a Zarr v3 group (with the store's sub-groups)
    and its arrays. Each array is made in memory by zarr and its keys (``zarr.json`` and the
    chunk) are added to the zip in sorted order with a fixed time stamp."""

    def __init__(self, path: Path, groups: Sequence[str]):
        self.zf = zipfile.ZipFile(path, "x", compression=zipfile.ZIP_STORED)
        self.count = 0
        entries: dict[str, Any] = {}
        root = zarr.open_group(MemoryStore(entries), mode="w")
        for name in groups:
            root.create_group(name)
        self._add(entries, "")

    def _add(self, entries: dict[str, Any], prefix: str) -> None:
        for key in sorted(entries):
            info = zipfile.ZipInfo(prefix + key, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            self.zf.writestr(info, entries[key].to_bytes())

    def add(self, key: str, array: np.ndarray, attrs: dict[str, Any]) -> None:
        entries: dict[str, Any] = {}
        arr = zarr.create_array(
            MemoryStore(entries), shape=array.shape, dtype=array.dtype,
            chunks=tuple(max(1, d) for d in array.shape), compressors=compressor(array.dtype),
            fill_value=0,
            attributes=attrs,
        )
        arr[...] = array
        self._add(entries, key + "/")
        self.count += 1

    def close(self) -> None:
        self.zf.close()


class StoreWriter:
    """Writes one store. ``kind`` is e.g. ``cams``, ``masks``; ``attrs`` its provenance;
    ``groups`` the sub-groups it holds besides the root (declared here, before any shard
    writes); ``per_bundle`` the arrays per bundle file."""

    def __init__(self, path: str | Path, kind: str, attrs: dict[str, Any], *, shard: int = 0,
                 num_shards: int = 1, create: bool = True, groups: Sequence[str] = (),
                 per_bundle: int = ARRAYS_PER_BUNDLE):
        self.path = Path(path)
        self.kind = kind
        self.shard, self.num_shards = shard, num_shards
        if per_bundle < 1:
            raise ValueError(f"a bundle holds at least one array, not {per_bundle}")
        self.per_bundle = per_bundle
        if create:
            _clear(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(self.path, mode="w")
            # attributes last: a waiting shard joins once it sees them (open_writer)
            group.attrs.update({_KIND_ATTR: kind, "num_shards": num_shards,
                                "groups": [_check_id(g) for g in groups], "layout": LAYOUT,
                                **attrs})
        else:
            group = zarr.open_group(self.path, mode="r")
            if group.attrs.get("layout") != LAYOUT:
                raise SecoError(f"store '{self.path}' was written by an earlier version",
                                str(self.path), "delete it and run the stage again")
        self.groups = set(group.attrs.get("groups", []))
        (self.path / COMPLETE).unlink(missing_ok=True)
        _marker(self.path, shard, num_shards).unlink(missing_ok=True)
        for stale in self.path.glob(f"bundle-{shard}-of-{num_shards}-*.zip"):
            stale.unlink()  # this shard's bundles of an earlier attempt: written again now
        self._bundle: _Bundle | None = None
        self._bundles = 0
        self._written: set[str] = set()
        self.count = 0

    def write(self, image_id: str, array: np.ndarray, attrs: dict[str, Any] | None = None,
              *, group: str | None = None, dtype: str = "float16") -> None:
        """Store one image's array as a single chunk, compressed, at the root or in one of the
        store's ``group``s. A float array is stored as ``dtype``: float16, or uint8 levels of
        scores in [0, 1] (see the module doc); other arrays as they are."""
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"float arrays are stored as one of {FLOAT_DTYPES}, not '{dtype}'")
        if group is not None and group not in self.groups:
            raise ValueError(f"store '{self.path}' has no group '{group}' ({sorted(self.groups)})")
        _check_id(image_id)
        if group is None and image_id in self.groups:
            raise ValueError(f"image id '{image_id}' is the name of a group of '{self.path}'")
        key = image_id if group is None else f"{group}/{image_id}"
        if key in self._written:
            raise ValueError(f"'{key}' is already in store '{self.path}'")
        array = np.asarray(array)
        attrs = dict(attrs or {})
        if array.dtype.kind == "f" and dtype == "uint8":
            array = quantise(array)
            attrs[_DIVIDE_BY] = _LEVELS
        elif array.dtype.kind == "f":
            array = array.astype(np.float16)
        if self._bundle is None:
            name = _bundle_name(self.shard, self.num_shards, self._bundles)
            self._bundle = _Bundle(self.path / name, sorted(self.groups))
            self._bundles += 1
        self._bundle.add(key, array, attrs)
        self._written.add(key)
        if self._bundle.count >= self.per_bundle:
            self._close_bundle()
        self.count += 1

    def _close_bundle(self) -> None:
        if self._bundle is not None:
            self._bundle.close()
            self._bundle = None

    def finish(self, summary: dict[str, Any] | None = None) -> bool:
        """Mark this shard done; the store is complete once every shard is. True only for the
        one call that completed the store (it may then export the whole store)."""
        self._close_bundle()
        run = json.loads((self.path / "zarr.json").read_text())["attributes"].get("run")
        _marker(self.path, self.shard, self.num_shards).write_text(
            json.dumps({"images": self.count, "bundles": self._bundles, "run": run,
                        **(summary or {})}))
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
    """Reads a complete store; refuses an incomplete or foreign one. Stores of bundles and of
    the earlier folder-per-image layout read alike."""

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
        self.bundled = self.attrs.get("layout") == LAYOUT
        self._index: dict[str | None, dict[str, str]] | None = None
        # the bundles open now, least recently read first: at most OPEN_BUNDLES file handles
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

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

    def _check_group(self, group: str | None) -> None:
        if group is not None and group not in self.groups:
            raise MissingInputError(f"store '{self.path}' has no group '{group}'", str(self.path),
                                    "re-run the stage that makes it")

    def _entries(self, group: str | None) -> dict[str, str]:
        """Image id -> the bundle that holds it, for the root (None) or a sub-group; for a
        store of the folder layout, image id -> its folder."""
        self._check_group(group)
        if self._index is None:
            index: dict[str | None, dict[str, str]] = {None: {}, **{g: {} for g in self.groups}}
            if self.bundled:
                for bundle in sorted(self.path.glob("bundle-*.zip")):
                    with zipfile.ZipFile(bundle) as zf:
                        for name in zf.namelist():
                            parts = name.split("/")
                            if parts[-1] != "zarr.json" or len(parts) not in (2, 3):
                                continue
                            where = None if len(parts) == 2 else parts[0]
                            if where is None and parts[0] in self.groups:
                                continue  # a sub-group's own metadata
                            index.setdefault(where, {})[parts[-2]] = bundle.name
            else:  # one folder per image; the marker files are not Zarr nodes
                for where in index:
                    folder = self.path if where is None else self.path / where
                    index[where] = {p.name: p.name for p in folder.iterdir()
                                    if (p / "zarr.json").is_file()
                                    and not (where is None and p.name in self.groups)}
            self._index = index
        return self._index.get(group, {})

    def ids(self, group: str | None = None) -> list[str]:
        return sorted(self._entries(group))

    def __contains__(self, image_id: str) -> bool:
        return self.has(image_id)

    def has(self, image_id: str, group: str | None = None) -> bool:
        return image_id in self._entries(group)

    def _array(self, image_id: str, group: str | None) -> Any:
        key = _check_id(image_id) if group is None else f"{group}/{_check_id(image_id)}"
        entries = self._entries(group)
        if not self.bundled:
            return self.group[key]
        if image_id not in entries:
            raise KeyError(f"'{key}' is not in store '{self.path}'")
        bundle = entries[image_id]
        if bundle in self._open:
            self._open.move_to_end(bundle)
        else:
            while len(self._open) >= OPEN_BUNDLES:
                self._open.popitem(last=False)[1].store.close()
            self._open[bundle] = zarr.open_group(ZipStore(self.path / bundle, mode="r"), mode="r")
        return self._open[bundle][key]

    def close(self) -> None:
        """Close the bundles this reader has open (reading again reopens them)."""
        with self._lock:
            while self._open:
                self._open.popitem(last=False)[1].store.close()

    def stored_bytes(self, group: str | None = None) -> tuple[int, int]:
        """(bytes on disk of the per-image arrays, metadata and zip headers included, number of
        images) of the root or a sub-group."""
        entries = self._entries(group)
        total = 0
        if self.bundled:
            prefix = "" if group is None else f"{group}/"
            for bundle in sorted(set(entries.values())):
                with zipfile.ZipFile(self.path / bundle) as zf:
                    for info in zf.infolist():
                        head, _, _ = info.filename[len(prefix):].partition("/")
                        if info.filename.startswith(prefix) and entries.get(head) == bundle:
                            # the data, its local header (30 B) and directory entry (46 B)
                            total += info.compress_size + 76 + 2 * len(info.filename)
        else:
            folder = self.path if group is None else self.path / group
            total = sum(f.stat().st_size for image_id in entries
                        for f in (folder / image_id).rglob("*") if f.is_file())
        return total, len(entries)

    def read(self, image_id: str, group: str | None = None) -> np.ndarray:
        return self.read_with_attrs(image_id, group)[0]

    def read_stored(self, image_id: str, group: str | None = None,
                    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The array and its attributes exactly as stored (8-bit levels stay uint8, with their
        ``divide_by`` attribute): for copying a store, not for computing with it."""
        with self._lock:  # a bundle is not closed under a read (readers may be shared by threads)
            arr = self._array(image_id, group)
            return arr[...], dict(arr.attrs)

    def read_with_attrs(self, image_id: str, group: str | None = None,
                        ) -> tuple[np.ndarray, dict[str, Any]]:
        """The array as written (8-bit levels back as float32 q / divide_by) and its attributes
        (without the storage's own ``divide_by``)."""
        data, attrs = self.read_stored(image_id, group)
        divide_by = attrs.pop(_DIVIDE_BY, None)
        if divide_by is not None:
            data = data.astype(np.float32) / np.float32(divide_by)
        return data, attrs

    def items(self, group: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
        for image_id in self.ids(group):
            yield image_id, self.read(image_id, group)
