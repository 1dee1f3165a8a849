"""Source ``folder``: a plain layout for users' own data.

Layout::

    root/images/<id>.<ext>   images (jpg, jpeg, png, bmp, webp, tif, tiff)
    root/masks/<id>.png      optional ground truth: class indices 0..C, 255 ignore
    root/classes.txt         foreground class names, one per line (background is index 0)
    root/labels.json         {id: [class names]}   -- or --
    root/labels.txt          lines ``id name1 name2 ...``
    root/<split>.txt         optional split lists, one id per line

An image without a mask needs labels; an image with a mask and no labels takes them from the
mask. Split lists are read for each of ``prepare.splits`` that exists; with none at all every
image forms ``train``. ``prepare.val_fraction`` holds out part of the first split as ``val``
when no ``val`` split exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from seco_cli.data.prepared import Sample
from seco_cli.data.sources import SourceData
from seco_cli.data.sources._common import (
    TRAIN,
    index_images,
    load_matching_mask,
    read_class_names,
    read_id_list,
    read_lines,
    with_val_holdout,
)
from seco_cli.errors import DataError
from seco_cli.params import PrepareParams


def _labels_json(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read '{path}' ({exc})", str(path), "fix the JSON") from exc
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values())
    if not ok:
        raise DataError("labels.json must map each id to a list of class names", str(path),
                        'write {"<id>": ["<class>", ...], ...}')
    return data


def _labels_txt(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n, text in read_lines(path):
        image_id, *names = text.split()
        if image_id in out:
            raise DataError(f"id '{image_id}' has two label lines (line {n})", str(path),
                            "give each id one line")
        out[image_id] = names
    return out


def _read_labels(root: Path, classes: list[str]) -> dict[str, list[int]]:
    """Image-level labels by id from labels.json or labels.txt (class names → 1..C)."""
    js, txt = root / "labels.json", root / "labels.txt"
    if js.is_file() and txt.is_file():
        raise DataError("both labels.json and labels.txt exist", str(root), "keep only one")
    path = js if js.is_file() else txt
    if not path.is_file():
        return {}
    by_name = {name: i for i, name in enumerate(classes[1:], 1)}
    raw = _labels_json(path) if path == js else _labels_txt(path)
    out: dict[str, list[int]] = {}
    for image_id, names in raw.items():
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataError(f"labels of '{image_id}' name unknown class '{unknown[0]}'", str(path),
                            "use names from classes.txt")
        out[image_id] = sorted({by_name[n] for n in names})
    return out


def _read_splits(root: Path, prep: PrepareParams, images: dict[str, Path]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    for name in prep.splits:
        path = root / f"{name}.txt"
        if not path.is_file():
            continue
        ids = read_id_list(path)
        unknown = [i for i in ids if i not in images]
        if unknown:
            raise DataError(f"split '{name}' names id '{unknown[0]}', which has no image in "
                            f"images/", str(path), "fix the list or add the image (ids are file "
                            "names without extension)")
        splits[name] = ids
    if not splits:
        splits = {TRAIN: sorted(images)}
    return with_val_holdout(splits, prep.val_fraction)


def _check_labels_present(splits: dict[str, list[str]], labels: dict[str, list[int]],
                          masks: Path, root: Path) -> None:
    for ids in splits.values():
        for image_id in ids:
            if image_id not in labels and not (masks / f"{image_id}.png").is_file():
                raise DataError(f"image '{image_id}' has neither labels nor a mask", str(root),
                                "add it to labels.json/labels.txt or add masks/<id>.png")


def _sample(image_id: str, image: Path, mask_path: Path, labels: list[int] | None) -> Sample:
    if not mask_path.is_file():
        return Sample(id=image_id, image=image, labels=labels or [])
    mask = load_matching_mask(image_id, image, mask_path)
    return Sample(id=image_id, image=image, mask=mask, labels=labels, extra={"mask_path": mask_path})


def read(root: Path, prep: PrepareParams) -> SourceData:
    """The ``folder`` dataset at ``root`` as a source for ``prepare``."""
    img_dir, cls_file = root / "images", root / "classes.txt"
    if not img_dir.is_dir():
        raise DataError(f"images folder '{img_dir}' does not exist", str(root),
                        "put the images in <root>/images/")
    if not cls_file.is_file():
        raise DataError(f"class list '{cls_file}' does not exist", str(root),
                        "write one foreground class name per line to <root>/classes.txt")
    classes = ["background", *read_class_names(cls_file)]
    images = index_images(img_dir)
    labels = _read_labels(root, classes)
    splits = _read_splits(root, prep, images)
    masks = root / "masks"
    _check_labels_present(splits, labels, masks, root)
    order = list(dict.fromkeys(i for ids in splits.values() for i in ids))

    def load(image_id: str) -> Sample:
        return _sample(image_id, images[image_id], masks / f"{image_id}.png", labels.get(image_id))

    return SourceData(classes=classes, splits=splits, order=order, load=load)
