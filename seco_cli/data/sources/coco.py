"""Source ``coco``: MS COCO 2014/2017 instance annotations, read with pycocotools.

Layout::

    root/annotations/instances_<split><year>.json
    root/<split><year>/<file_name>                 file_name as given in the json

Splits are ``prepare.coco_splits`` for year ``prepare.coco_year``; ids are the image file
stems, sorted. The 80 classes follow category-id order, named from the json, background first.

Masks: every annotation (polygons or RLE) is rasterised with ``annToMask``, larger areas
first so small objects stay on top. Crowd regions (``iscrowd=1``) become 255 (ignore) where
no non-crowd object covers them. Image-level labels are the categories annotated in the
image, crowd annotations included (the objects are there even where their pixels are
ignored).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from seco_cli.data.images import image_size
from seco_cli.data.prepared import IGNORE, Sample
from seco_cli.data.sources import SourceData
from seco_cli.data.sources._common import check_id
from seco_cli.errors import DataError
from seco_cli.params import PrepareParams


def _ann_file(root: Path, split: str, year: str) -> Path:
    path = root / "annotations" / f"instances_{split}{year}.json"
    if not path.is_file():
        raise DataError(f"annotation file '{path}' does not exist", str(root),
                        "check prepare.coco_year and prepare.coco_splits, or data.root")
    return path


def _load(path: Path) -> Any:
    """A quiet ``COCO`` object (pycocotools prints progress to stdout)."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"cannot read annotation file '{path}' ({exc})", str(path),
                        "replace it with the official instances_*.json") from exc


def _categories(coco: Any) -> list[tuple[int, str]]:
    return sorted((int(c["id"]), str(c["name"])) for c in coco.dataset.get("categories", []))


def _classes(cocos: dict[str, Any], files: dict[str, Path]) -> list[tuple[int, str]]:
    """Categories shared by every split's json, in id order."""
    first = next(iter(cocos))
    cats = _categories(cocos[first])
    if not cats:
        raise DataError("annotation file lists no categories", str(files[first]),
                        "use the official instances_*.json")
    for split, coco in cocos.items():
        if _categories(coco) != cats:
            raise DataError(f"categories of split '{split}' differ from split '{first}'",
                            str(files[split]), "use annotation files of one COCO release")
    return cats


def _relative_name(name: str, where: Path) -> str:
    """A ``file_name`` naming a file inside the split folder (sub-folders allowed)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise DataError(f"file_name '{name}' points outside the image folder", str(where),
                        "file names must be relative, without '..'")
    return "/".join(parts)


def _image_ids(coco: Any, split: str, year: str, root: Path, where: Path) -> dict[str, tuple[int, Path]]:
    """Stem → (COCO image id, image path) for one split."""
    out: dict[str, tuple[int, Path]] = {}
    for img in coco.dataset.get("images", []):
        name = _relative_name(str(img["file_name"]), where)
        stem = check_id(PurePosixPath(name).stem, str(where))
        if stem in out:
            raise DataError(f"two images share the id '{stem}'", str(where), "make file names unique")
        out[stem] = (int(img["id"]), root / f"{split}{year}" / name)
    return out


def _ann_mask(coco: Any, ann: dict[str, Any], where: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            return coco.annToMask(ann).astype(bool)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise DataError(f"annotation {ann.get('id')} has an unreadable segmentation ({exc})",
                        str(where), "fix or remove that annotation") from exc


def rasterise(coco: Any, image_id: int, cat_index: dict[int, int], where: Path) -> tuple[np.ndarray, list[int]]:
    """(mask, labels) of one image: larger areas first, crowd → ignore where uncovered."""
    info = coco.imgs[image_id]
    mask = np.zeros((int(info["height"]), int(info["width"])), dtype=np.uint8)
    crowd = np.zeros(mask.shape, dtype=bool)
    labels: set[int] = set()
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    for ann in sorted(anns, key=lambda a: -float(a.get("area", 0.0))):
        if ann["category_id"] not in cat_index:
            raise DataError(f"annotation {ann.get('id')} has unknown category {ann['category_id']}",
                            str(where), "use the official instances_*.json")
        cls = cat_index[ann["category_id"]]
        labels.add(cls)
        if ann.get("iscrowd", 0):
            crowd |= _ann_mask(coco, ann, where)
        else:
            mask[_ann_mask(coco, ann, where)] = cls
    mask[crowd & (mask == 0)] = IGNORE
    return mask, sorted(labels)


def _sample(stem: str, entry: tuple[int, Path], coco: Any, cat_index: dict[int, int],
            where: Path) -> Sample:
    image_id, path = entry
    mask, labels = rasterise(coco, image_id, cat_index, where)
    size = image_size(path)
    if mask.shape != size:
        raise DataError(f"image '{path.name}' is {size[1]}x{size[0]}, its annotation says "
                        f"{mask.shape[1]}x{mask.shape[0]}", str(path),
                        "use the images of the same COCO release")
    return Sample(id=stem, image=path, mask=mask, labels=labels)


def _check_disjoint(entries: dict[str, dict[str, tuple[int, Path]]], files: dict[str, Path]) -> None:
    seen: dict[str, str] = {}
    for split, ids in entries.items():
        for stem in ids:
            if stem in seen:
                raise DataError(f"id '{stem}' is in both split '{seen[stem]}' and '{split}'",
                                str(files[split]), "use COCO splits with distinct images")
            seen[stem] = split


def read(root: Path, prep: PrepareParams) -> SourceData:
    """The COCO dataset at ``root`` as a source for ``prepare``."""
    names = list(dict.fromkeys(prep.coco_splits))
    files = {s: _ann_file(root, s, prep.coco_year) for s in names}
    cocos = {s: _load(files[s]) for s in names}
    cats = _classes(cocos, files)
    cat_index = {cid: i for i, (cid, _) in enumerate(cats, 1)}
    entries = {s: _image_ids(cocos[s], s, prep.coco_year, root, files[s]) for s in names}
    _check_disjoint(entries, files)
    splits = {s: sorted(entries[s]) for s in names}
    split_of = {stem: s for s in names for stem in splits[s]}

    def load(stem: str) -> Sample:
        s = split_of[stem]
        return _sample(stem, entries[s][stem], cocos[s], cat_index, files[s])

    return SourceData(classes=["background", *(n for _, n in cats)], splits=splits,
                      order=[stem for s in names for stem in splits[s]], load=load)
