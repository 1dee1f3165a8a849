"""`dvc status` with the stores in bundles ÷ the same arrays in a folder per image, side by side.

What DVC pays on a no-op ``dvc status`` / ``dvc repro`` is walking each stage's outputs and
dependencies; the stores (``cams.zarr``, ``pseudo.zarr``, ``segment.zarr``) are the outputs of
one stage and dependencies of the next. This bench copies the repository with its up-to-date
workspace twice into a scratch folder, rewrites the stores of one copy in the layout seco wrote
before the bundles (one Zarr array folder per image, ``.`` chunk keys, same arrays, same
compression), records both copies with ``dvc commit -f`` against one scratch cache, and times
``dvc status`` in the two alternately (median of ``--runs`` each). Nothing in the repository
is changed.

    python bench/store_layout.py              # needs an up-to-date workspace: dvc repro first
    python bench/store_layout.py --runs 9 --keep /tmp/layouts

It also times writing the workspace's CAMs (upscaled to VOC size) into each layout.

``bench/speed.py``'s ``dvc`` part reports the same measurement as a row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from seco_cli.store import COMPLETE, StoreReader, compressor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORES = ("cams.zarr", "pseudo.zarr", "segment.zarr")
_FOLDER_KEYS = {"name": "default", "separator": "."}  # the earlier layout's chunk keys


def write_folder_layout(src: Path, dst: Path) -> int:
    """The store ``src`` (any layout) rewritten at ``dst`` in the folder-per-image layout:
    a Zarr array folder per image (``<id>/zarr.json`` and ``<id>/c.0.0``), the same stored
    arrays, attributes and compression. Returns the number of arrays written."""
    reader = StoreReader(src)
    root = zarr.open_group(dst, mode="w")
    for name in reader.groups:
        root.create_group(name)
    count = 0
    for where in [None, *reader.groups]:
        parent = root if where is None else root[where]
        for image_id in reader.ids(where):
            array, attrs = reader.read_stored(image_id, where)
            arr = parent.create_array(
                image_id, shape=array.shape, dtype=array.dtype,
                chunks=tuple(max(1, d) for d in array.shape), fill_value=0,
                compressors=compressor(array.dtype), chunk_key_encoding=_FOLDER_KEYS,
                attributes=attrs)
            arr[...] = array
            count += 1
    root.attrs.update({k: v for k, v in reader.attrs.items() if k != "layout"})
    for marker in [*src.glob(".shard-*.done"), src / COMPLETE]:
        shutil.copy2(marker, dst / marker.name)
    return count


def _dvc(args: list[str], repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=900)


def _changed(repo: Path) -> dict[str, Any]:
    done = _dvc(["status", "--json"], repo)
    if done.returncode:
        raise RuntimeError(f"dvc status failed in {repo}: {(done.stderr or done.stdout)[-300:]}")
    return json.loads(done.stdout or "{}")


def _counts(path: Path) -> dict[str, int]:
    found = list(path.rglob("*"))
    return {"files": sum(p.is_file() for p in found), "folders": sum(p.is_dir() for p in found)}


def measure(repo: Path = ROOT, runs: int = 5, keep: Path | None = None) -> dict[str, Any]:
    """Median seconds of ``dvc status`` (nothing changed) on the workspace's stores in bundles
    and on the same arrays in a folder per image, run alternately; raises when the workspace
    is not up to date or holds no bundled stores."""
    changed = _changed(repo)
    if changed:
        raise RuntimeError(f"the pipeline is not up to date (changed: {', '.join(changed)}); "
                           "run `dvc repro` first")
    art = repo / "artifacts"
    for name in STORES:
        if not StoreReader(art / name).bundled:
            raise RuntimeError(f"{art / name} is not a store of bundles; run `dvc repro` first")
    scratch = Path(tempfile.mkdtemp(prefix="seco-layout-", dir=keep))
    ignore = shutil.ignore_patterns("cache", "tmp", "config.local", "artifacts")
    copies = {"bundles": scratch / "bundles", "folders": scratch / "folders"}
    arrays = 0
    for name, copy in copies.items():
        shutil.copytree(repo, copy, ignore=ignore, symlinks=True)
        shutil.copytree(art, copy / "artifacts", symlinks=True)
        if name == "folders":
            for store in STORES:
                target = copy / "artifacts" / store
                shutil.rmtree(target)
                arrays += write_folder_layout(art / store, target)
        _dvc(["cache", "dir", "--local", str(scratch / "cache")], copy)
        done = _dvc(["commit", "-f", "-q"], copy)
        if done.returncode:
            raise RuntimeError(f"dvc commit failed in {copy}: {(done.stderr or done.stdout)[-300:]}")
        left = _changed(copy)
        if left:
            raise RuntimeError(f"the {name} copy is not up to date after commit: {left}")
    seconds: dict[str, list[float]] = {name: [] for name in copies}
    for _ in range(runs):
        for name, copy in copies.items():
            start = time.perf_counter()
            done = _dvc(["status", "-q"], copy)
            seconds[name].append(time.perf_counter() - start)
            if done.returncode:
                raise RuntimeError(f"dvc status failed in {copy}")
    result = {
        "runs": runs, "arrays": arrays,
        "seconds": seconds,
        "median_s": {name: statistics.median(v) for name, v in seconds.items()},
        "stores": {name: {store: _counts(copy / "artifacts" / store) for store in STORES}
                   for name, copy in copies.items()},
    }
    result["totals"] = {name: {k: sum(c[k] for c in stores.values()) for k in ("files", "folders")}
                        for name, stores in result["stores"].items()}
    result["ratio"] = result["median_s"]["bundles"] / result["median_s"]["folders"]
    if keep is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def measure_writes(repo: Path = ROOT, images: int = 150, upscale: int = 4,
                   rounds: int = 3) -> dict[str, Any]:
    """Milliseconds per image to write the first ``images`` CAMs of the workspace's
    ``cams.zarr`` (each side ``upscale`` × larger: VOC-sized maps) as a store of bundles
    (:class:`StoreWriter`, 8-bit levels) and in a folder per image (the writer before the
    bundles: same levels and compression, attributes set after the data), alternately."""
    from seco_cli.store import StoreWriter, quantise

    reader = StoreReader(repo / "artifacts" / "cams.zarr", "cams")
    cams = [(i, np.repeat(np.repeat(reader.read(i), upscale, -2), upscale, -1))
            for i in reader.ids()[:images]]

    def bundles(path: Path) -> None:
        w = StoreWriter(path, "cams", {})
        for image_id, cam in cams:
            w.write(image_id, cam, {"labels": [1]}, dtype="uint8")
        w.finish()

    def folders(path: Path) -> None:
        root = zarr.open_group(path, mode="w")
        for image_id, cam in cams:
            q = quantise(cam)
            arr = root.create_array(
                image_id, shape=q.shape, dtype=q.dtype, chunks=q.shape, fill_value=0,
                compressors=compressor(q.dtype), chunk_key_encoding=_FOLDER_KEYS)
            arr[...] = q
            arr.attrs.update({"labels": [1], "divide_by": 255})

    ms: dict[str, list[float]] = {"bundles": [], "folders": []}
    with tempfile.TemporaryDirectory(prefix="seco-writes-") as tmp:
        for k in range(rounds):
            for name, write in (("bundles", bundles), ("folders", folders)):
                start = time.perf_counter()
                write(Path(tmp) / f"{name}-{k}.zarr")
                ms[name].append(1000 * (time.perf_counter() - start) / len(cams))
    return {"images": len(cams), "shape": list(cams[0][1].shape), "ms_per_image": ms,
            "median_ms": {name: statistics.median(v) for name, v in ms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT)
    ap.add_argument("--runs", type=int, default=5, help="dvc status runs per layout")
    ap.add_argument("--keep", type=Path, help="make the copies in this folder and keep them")
    args = ap.parse_args()
    r = measure(args.repo, args.runs, args.keep)
    for name in ("bundles", "folders"):
        files, folders = r["totals"][name]["files"], r["totals"][name]["folders"]
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"][name])
        print(f"{name:8s} stores: {files:5d} files, {folders:5d} folders; dvc status "
              f"{r['median_s'][name]:.2f} s median ({runs})")
    print(f"bundles ÷ folder per image: {r['ratio']:.2f} ({r['arrays']} arrays)")
    w = measure_writes(args.repo)
    for name in ("bundles", "folders"):
        runs = ", ".join(f"{s:.2f}" for s in w["ms_per_image"][name])
        print(f"{name:8s} writes: {w['median_ms'][name]:.2f} ms per CAM of {w['shape']} "
              f"({runs}; {w['images']} CAMs)")


if __name__ == "__main__":
    main()
