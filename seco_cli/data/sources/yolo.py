"""Source ``yolo-seg``: an Ultralytics YOLO segmentation dataset.

Layout::

    root/images/<split>/<stem>.jpg|png|...
    root/labels/<split>/<stem>.txt     lines ``class_id x1 y1 x2 y2 ...`` (normalised polygon)
    root/classes.txt                   line i names class i (or a *.yaml with ``names:``)

Splits are the ``prepare.splits`` entries present under ``images/``; with
``prepare.val_fraction > 0`` and no ``val`` folder, part of the first split is held out as
``val``. An image without a label file is all background; a label file without an image is
skipped. Masks: each image's polygons are filled with PIL on the pixel grid, largest area
first so small objects stay on top, class ``class_id + 1``. Image-level labels are the classes
of the image's polygons.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from seco_cli.data.images import image_size
from seco_cli.data.prepared import Sample
from seco_cli.data.sources import SourceData
from seco_cli.data.sources._common import (
    check_class_names,
    index_images,
    read_lines,
    with_val_holdout,
)
from seco_cli.errors import DataError
from seco_cli.params import PrepareParams

Polygon = tuple[int, np.ndarray]  # (class id, (K, 2) normalised x, y)


# --------------------------------------------------------------------------- classes
def _yaml_names(path: Path) -> list[str] | None:
    """Class names of a ``names:`` entry (a list, or a dict keyed 0..n-1); None if absent."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read '{path}' ({exc})", str(path), "fix the YAML") from exc
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError("'names' keys must be 0..n-1", str(path), "number the classes from 0")
        names = [names[i] for i in range(len(names))]
    if names is None:
        return None
    if not isinstance(names, list):
        raise DataError("'names' must be a list or a dict", str(path), "list the class names")
    return [str(n) for n in names]


def read_classes(root: Path) -> list[str]:
    """Foreground class names from classes.txt, else from data.yaml / any *.yaml."""
    txt = root / "classes.txt"
    if txt.is_file():
        return check_class_names([text for _, text in read_lines(txt)], str(txt))
    yamls = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    yamls.sort(key=lambda p: p.stem != "data")  # data.yaml first
    for path in yamls:
        names = _yaml_names(path)
        if names is not None:
            return check_class_names(names, str(path))
    raise DataError(f"no class list in '{root}'", str(root),
                    "add classes.txt (line i = class i) or a data.yaml with 'names:'")


# --------------------------------------------------------------------------- labels
def _parse_line(text: str, path: Path, n: int, num_classes: int) -> Polygon:
    tokens = text.split()
    try:
        cls = int(tokens[0])
        coords = np.asarray([float(t) for t in tokens[1:]], dtype=np.float64)
    except ValueError:
        cls, coords = -1, np.zeros(0)
    if cls < 0 or coords.size < 6 or coords.size % 2 or not np.isfinite(coords).all():
        raise DataError(f"line {n} is not 'class_id x1 y1 x2 y2 x3 y3 ...'", f"{path}:{n}",
                        "write one polygon per line (YOLO-seg; detection boxes are not masks)")
    if cls >= num_classes:
        raise DataError(f"line {n} has class id {cls}, but there are {num_classes} classes",
                        f"{path}:{n}", "fix the label or the class list")
    return cls, coords.reshape(-1, 2)


def read_polygons(path: Path, num_classes: int) -> list[Polygon]:
    """The polygons of one label file (none when the file does not exist)."""
    if not path.is_file():
        return []
    return [_parse_line(text, path, n, num_classes) for n, text in read_lines(path)]


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterise(polygons: list[Polygon], height: int, width: int) -> np.ndarray:
    """Class-index mask: polygons filled largest (pixel) area first, class id + 1."""
    scaled = [(cls, pts * np.asarray([width, height])) for cls, pts in polygons]
    scaled.sort(key=lambda p: -_area(p[1]))  # stable: equal areas keep file order
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for cls, pts in scaled:
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=cls + 1)
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------- splits
def _split_names(root: Path, prep: PrepareParams) -> list[str]:
    present = [s for s in dict.fromkeys(prep.splits) if (root / "images" / s).is_dir()]
    if not present:
        found = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
        raise DataError(f"none of the splits {prep.splits} is a folder of '{root / 'images'}'",
                        str(root), f"set prepare.splits to the folders there ({found or 'none'})")
    return present


def _index(root: Path, names: list[str]) -> dict[str, tuple[str, Path]]:
    """id → (split folder, image path) over all split folders; ids must be unique."""
    out: dict[str, tuple[str, Path]] = {}
    for split in names:
        for stem, path in index_images(root / "images" / split).items():
            if stem in out:
                raise DataError(f"image id '{stem}' is in both '{out[stem][0]}' and '{split}'",
                                str(root / "images"), "give images unique file names")
            out[stem] = (split, path)
    return out


def _sample(image_id: str, split: str, image: Path, root: Path, num_classes: int) -> Sample:
    polygons = read_polygons(root / "labels" / split / f"{image_id}.txt", num_classes)
    height, width = image_size(image)
    mask = rasterise(polygons, height, width)
    return Sample(id=image_id, image=image, mask=mask, labels=sorted({c + 1 for c, _ in polygons}))


def read(root: Path, prep: PrepareParams) -> SourceData:
    """The YOLO-seg dataset at ``root`` as a source for ``prepare``."""
    if not (root / "images").is_dir():
        raise DataError(f"images folder '{root / 'images'}' does not exist", str(root),
                        "point data.root at the folder holding images/ and labels/")
    classes = read_classes(root)
    names = _split_names(root, prep)
    index = _index(root, names)
    splits = with_val_holdout({s: sorted(i for i, v in index.items() if v[0] == s) for s in names},
                              prep.val_fraction)
    order = list(dict.fromkeys(i for ids in splits.values() for i in ids))

    def load(image_id: str) -> Sample:
        split, path = index[image_id]
        return _sample(image_id, split, path, root, len(classes))

    return SourceData(classes=["background", *classes], splits=splits, order=order, load=load)
