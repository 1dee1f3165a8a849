"""The prepared dataset: the one contract every stage after ``prepare`` reads.

Layout of a prepared folder::

    index.json          classes (background first), splits, image paths, image-level labels,
                        sizes, skipped bad images (id → reason), provenance
    masks/              ground-truth masks of the images that have one, ``<id>.png``: palette
                        PNGs of class indices (0 background, 1..C, 255 ignore), as VOC's
                        SegmentationClass; one flat folder, which DVC checks in one listing
    images/             images the source supplied as arrays (synthetic data), PNG
    cooccurrence.json   per split: images per class and per class pair

Sources read one :class:`Sample` per id (a :class:`BadImage` when that image is bad) and
``prepare`` hands them to :func:`write_prepared`, which decodes and checks every image before
anything is written; stages open a :class:`PreparedDataset`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from seco_cli.data.images import load_image, load_mask, save_png, voc_palette
from seco_cli.errors import DataError, MissingInputError, SecoError, write_error

INDEX = "index.json"
COOC = "cooccurrence.json"
MASKS = "masks"  # the ground-truth PNGs, one per image that has a mask
FORMAT_VERSION = 2  # 2: ground-truth masks as PNGs under masks/ (1: a Zarr store)
IGNORE = 255


def mask_path(root: Path, image_id: str) -> Path:
    """Where a prepared dataset at ``root`` keeps the mask of ``image_id``."""
    return root / MASKS / f"{image_id}.png"


@dataclass
class Sample:
    """One image as an importer sees it.

    ``image`` is a path to an image file (referenced, not copied) or an ``(H, W, 3) uint8``
    array (written under ``images/``). ``mask`` is ``(H, W) uint8`` or ``None`` (no ground
    truth, e.g. a test split). ``labels`` are class indices 1..C; ``None`` derives them from
    the mask.
    """

    id: str
    image: Path | np.ndarray
    mask: np.ndarray | None = None
    labels: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    values = np.unique(mask)
    return [int(v) for v in values if 1 <= v <= num_classes]


def _cooccurrence(labels: dict[str, list[int]], ids: list[str], num_classes: int) -> dict[str, Any]:
    pair = np.zeros((num_classes, num_classes), dtype=np.int64)  # foreground classes 1..C
    for i in ids:
        idx = np.asarray(labels[i], dtype=np.int64) - 1
        if idx.size:
            pair[np.ix_(idx, idx)] += 1
    return {"images": len(ids), "class_counts": np.diag(pair).tolist(), "pair_counts": pair.tolist()}


@dataclass
class BadImage:
    """An id whose image (or mask, or labels) could not be read: skipped or fatal."""

    id: str
    error: DataError


def _check_out(out_dir: Path) -> None:
    """Refuse, before any work, an output path that is not ours to replace."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise SecoError(f"output path '{out_dir}' exists and is not a folder", str(out_dir),
                        "move it away or choose another output path")
    if out_dir.is_dir() and not (out_dir / INDEX).exists() and any(out_dir.iterdir()):
        raise SecoError(f"refusing to overwrite '{out_dir}': not a prepared dataset", str(out_dir),
                        "move it away or choose another output path")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder in; an earlier prepared dataset survives until it is replaced."""
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _checked(s: Sample, num_classes: int, source: str) -> tuple[list[int], np.ndarray | None, list[int]]:
    """(size, mask, labels) of one sample; a :class:`DataError` when any part is bad.

    A referenced image file is decoded in full here, so a truncated or corrupt file is caught
    by ``prepare`` and never reaches training or inference.
    """
    if isinstance(s.image, np.ndarray):
        if s.image.ndim != 3 or s.image.shape[2] != 3 or s.image.dtype != np.uint8:
            raise SecoError(f"image '{s.id}' must be (H, W, 3) uint8", source)
        size = list(s.image.shape[:2])
        where = source
    else:
        size = list(load_image(s.image).shape[:2])
        where = str(s.extra.get("mask_path", s.image))
    mask = None
    if s.mask is not None:
        mask = np.asarray(s.mask)
        if list(mask.shape) != size:
            raise DataError(f"mask of '{s.id}' is {mask.shape[1]}x{mask.shape[0]}, its image "
                            f"{size[1]}x{size[0]}", where, "masks must match their images")
        bad = (mask > num_classes) & (mask != IGNORE)
        if bad.any():
            raise DataError(f"mask of '{s.id}' holds value {int(mask[bad][0])}, not a class index",
                            where, f"masks hold 0..{num_classes} and {IGNORE} (ignore)")
        mask = mask.astype(np.uint8)
    lab = s.labels if s.labels is not None else (
        labels_from_mask(mask, num_classes) if mask is not None else [])
    if any(not 1 <= c <= num_classes for c in lab):
        raise DataError(f"labels of '{s.id}' are outside 1..{num_classes}", where)
    return size, mask, sorted(set(int(c) for c in lab))


def write_prepared(
    out_dir: str | Path,
    *,
    source: str,
    classes: list[str],
    splits: dict[str, list[str]],
    samples: Iterable[Sample | BadImage],
    provenance: dict[str, Any],
    on_sample: Callable[[Sample], None] | None = None,
    on_bad_image: Literal["stop", "skip"] = "stop",
) -> dict[str, Any]:
    """Write a prepared dataset and return its summary (the ``prepare`` metrics).

    ``classes`` starts with ``background``. Every id in ``splits`` must be yielded exactly once
    by ``samples``. A bad image (a :class:`BadImage`, or a sample failing the checks here)
    stops the run, or with ``on_bad_image="skip"`` is left out of every split and listed in
    the summary's ``skipped``. The folder is written under a temporary name and moved into
    place at the end: an interrupted or failed ``prepare`` leaves no dataset that looks
    complete, and an earlier prepared dataset at ``out_dir`` stays until then.
    """
    out_dir = Path(out_dir)
    if not classes or classes[0] != "background":
        raise SecoError("class list must start with 'background'", source)
    _check_out(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        index, cooc, with_mask = _write(tmp, source, classes, splits, samples, provenance,
                                        on_sample, on_bad_image)
        _check_out(out_dir)  # the user may have put files there meanwhile
        _move_into_place(tmp, out_dir)
    except OSError as exc:
        raise write_error(exc, "the prepared dataset", str(out_dir), "seco prepare") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize(index, cooc, with_mask)


def _write(tmp: Path, source: str, classes: list[str], splits: dict[str, list[str]],
           samples: Iterable[Sample | BadImage], provenance: dict[str, Any],
           on_sample: Callable[[Sample], None] | None, on_bad_image: str,
           ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    num_classes = len(classes) - 1
    wanted = {i for ids in splits.values() for i in ids}
    (tmp / "images").mkdir(parents=True)
    (tmp / MASKS).mkdir()
    palette = voc_palette()
    images: dict[str, str] = {}
    labels: dict[str, list[int]] = {}
    sizes: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    with_mask: list[str] = []
    for s in samples:
        if s.id in images or s.id in skipped:
            raise DataError(f"duplicate image id '{s.id}'", source, "make ids unique in the lists")
        if s.id not in wanted:
            continue
        try:
            if isinstance(s, BadImage):
                raise s.error
            size, mask, lab = _checked(s, num_classes, source)
        except DataError as exc:
            if on_bad_image != "skip":
                raise
            skipped[s.id] = exc.line()
            continue
        if isinstance(s.image, np.ndarray):
            rel = f"images/{s.id}.png"
            save_png(tmp / rel, s.image)
            images[s.id] = rel
        else:
            images[s.id] = str(Path(s.image).resolve())
        sizes[s.id] = size
        if mask is not None:
            save_png(mask_path(tmp, s.id), mask, palette)
            with_mask.append(s.id)
        labels[s.id] = lab
        if on_sample:
            on_sample(s)
    missing = sorted(wanted - set(images) - set(skipped))
    if missing:
        raise DataError(f"{len(missing)} listed ids have no image (first: '{missing[0]}')", source,
                        "fix the split lists or add the images")
    if wanted and not images:
        first = next(iter(skipped.items()))
        raise DataError(f"every listed image is bad (first: {first[1]})", source,
                        "fix the dataset; on_bad_image: skip leaves no image to prepare")
    kept = {name: [i for i in ids if i in images] for name, ids in splits.items()}
    index = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "classes": classes,
        "splits": kept,
        "images": images,
        "labels": labels,
        "sizes": sizes,
        "masks": with_mask,
        "skipped": skipped,
        "provenance": provenance,
    }
    (tmp / INDEX).write_text(json.dumps(index))
    cooc = {"classes": classes[1:], **{
        name: _cooccurrence(labels, ids, num_classes) for name, ids in kept.items()}}
    (tmp / COOC).write_text(json.dumps(cooc))
    return index, cooc, with_mask


def summarize(index: dict[str, Any], cooc: dict[str, Any], with_mask: list[str]) -> dict[str, Any]:
    classes = index["classes"]
    skipped = index.get("skipped", {})
    summary: dict[str, Any] = {
        "source": index["source"],
        "num_classes": len(classes) - 1,
        "images_with_masks": len(with_mask),
        "skipped_images": len(skipped),
        "skipped": [{"id": i, "reason": why} for i, why in skipped.items()],
        "splits": {},
    }
    for name, ids in index["splits"].items():
        c = cooc[name]
        pairs = np.triu(np.asarray(c["pair_counts"]), k=1) if c["pair_counts"] else np.zeros((0, 0))
        top = [
            {"a": classes[a + 1], "b": classes[b + 1], "images": int(pairs[a, b])}
            for a, b in zip(*np.unravel_index(np.argsort(-pairs, axis=None)[:5], pairs.shape), strict=False)
            if pairs.size and pairs[a, b] > 0
        ]
        n_labels = [len(index["labels"][i]) for i in ids]
        summary["splits"][name] = {
            "images": len(ids),
            "empty_images": int(sum(n == 0 for n in n_labels)),
            "mean_labels_per_image": float(np.mean(n_labels)) if n_labels else 0.0,
            "class_counts": dict(zip(classes[1:], c["class_counts"], strict=False)),
            "top_pairs": top,
        }
    return summary


class PreparedDataset:
    """Read side of the contract. Images and masks are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise MissingInputError(f"prepared dataset '{self.path}' does not exist",
                                    str(self.path), "run `seco prepare` first")
        index = json.loads(index_file.read_text())
        if index.get("format_version") != FORMAT_VERSION:
            raise MissingInputError(f"prepared dataset '{self.path}' has an unknown format",
                                    str(self.path), "run `seco prepare` again")
        self.index = index
        self.classes: list[str] = index["classes"]
        self.num_classes = len(self.classes) - 1
        self.splits: dict[str, list[str]] = index["splits"]
        self._labels: dict[str, list[int]] = index["labels"]
        self._images: dict[str, str] = index["images"]
        self._with_mask = set(index["masks"])
        self.cooccurrence = json.loads((self.path / COOC).read_text())

    def ids(self, split: str) -> list[str]:
        if split not in self.splits:
            raise SecoError(f"split '{split}' is not in the prepared dataset", str(self.path),
                            f"use one of: {', '.join(self.splits)}")
        return list(self.splits[split])

    def labels(self, image_id: str) -> list[int]:
        return self._labels[image_id]

    def label_vector(self, image_id: str) -> np.ndarray:
        vec = np.zeros(self.num_classes, dtype=np.float32)
        for c in self._labels[image_id]:
            vec[c - 1] = 1.0
        return vec

    def image_path(self, image_id: str) -> Path:
        p = Path(self._images[image_id])
        return p if p.is_absolute() else self.path / p

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image as loaded (EXIF orientation applied)."""
        h, w = self.index["sizes"][image_id]
        return int(h), int(w)

    def image(self, image_id: str) -> np.ndarray:
        return load_image(self.image_path(image_id))

    def has_mask(self, image_id: str) -> bool:
        return image_id in self._with_mask

    def mask(self, image_id: str) -> np.ndarray:
        """``(H, W) uint8`` ground truth of an image that has one (:meth:`has_mask`)."""
        if image_id not in self._with_mask:
            raise MissingInputError(f"image '{image_id}' has no ground-truth mask", str(self.path),
                                    "score only the images with masks (has_mask)")
        path = mask_path(self.path, image_id)
        if not path.is_file():  # a prepared folder missing a file it lists: say how to fix
            raise MissingInputError(f"mask of '{image_id}' is missing from '{self.path}'",
                                    str(path), "run `seco prepare` again")
        return load_mask(path)
