"""Helpers shared by the file-based sources (voc, yolo-seg, folder, coco): id checks, list
and class-file readers, image indexing, and the deterministic val hold-out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from seco_cli.data.images import image_size, load_mask
from seco_cli.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VAL = "val"
TRAIN = "train"


def check_id(image_id: str, where: str) -> str:
    """An id names files under the root: no separators, no relative parts, no control
    characters, so an id from a list file can never point outside the dataset root."""
    if (not image_id or "/" in image_id or "\\" in image_id or ".." in image_id
            or any(ord(ch) < 32 for ch in image_id)):
        shown = image_id.encode("unicode_escape").decode("ascii")
        raise DataError(f"image id '{shown}' is not a plain file name", where,
                        "ids must not be empty or contain '/', '\\', '..' or control characters")
    return image_id


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as (1-based line number, stripped text)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read '{path}' ({exc})", str(path), "fix the file") from exc
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_id_list(path: Path, parse: Callable[[str, str], str] | None = None) -> list[str]:
    """A split list: one id per line (``parse(line, where)`` extracts it), each once."""
    parse = parse or check_id
    ids: list[str] = []
    seen: dict[str, int] = {}
    for n, text in read_lines(path):
        image_id = parse(text, f"{path}:{n}")
        if image_id in seen:
            raise DataError(f"id '{image_id}' is listed twice (lines {seen[image_id]} and {n})",
                            str(path), "list each id once")
        seen[image_id] = n
        ids.append(image_id)
    return ids


def read_class_names(path: Path) -> list[str]:
    """Foreground class names, one per line; a leading ``background`` line is dropped."""
    names = [text for _, text in read_lines(path)]
    if names and names[0] == "background":
        names = names[1:]
    return check_class_names(names, str(path))


def check_class_names(names: list[str], where: str) -> list[str]:
    if not names:
        raise DataError("no class names found", where, "list one foreground class per line")
    if "background" in names:
        raise DataError("class name 'background' is reserved for index 0", where,
                        "remove it from the list (background is implicit)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"class '{dup[0]}' is named twice", where, "make class names unique")
    if len(names) > 254:
        raise DataError(f"{len(names)} classes do not fit in uint8 masks", where,
                        "use at most 254 foreground classes")
    return names


def index_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem (the id); two files with one stem is an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTS:
            continue
        if path.stem in found:
            raise DataError(f"two images share the id '{path.stem}' ({found[path.stem].name}, "
                            f"{path.name})", str(folder), "keep one file per id")
        found[path.stem] = path
    return found


def hold_out(ids: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split sorted ids into (kept, held out): evenly spaced picks, about ``fraction`` of them.

    Deterministic (no randomness): with n ids and k = round(n * fraction) held out, pick the
    ids at positions floor((j + 0.5) * n / k), i.e. every (n/k)-th id.
    """
    ordered = sorted(ids)
    n = len(ordered)
    k = min(max(round(n * fraction), 1), n - 1) if fraction > 0 and n >= 2 else 0
    picks = {int((j + 0.5) * n / k) for j in range(k)}
    kept = [i for p, i in enumerate(ordered) if p not in picks]
    held = [i for p, i in enumerate(ordered) if p in picks]
    return kept, held


def with_val_holdout(splits: dict[str, list[str]], fraction: float) -> dict[str, list[str]]:
    """Add a ``val`` split held out from the first split when none exists and fraction > 0."""
    if fraction <= 0 or VAL in splits or not splits:
        return splits
    first = next(iter(splits))
    kept, held = hold_out(splits[first], fraction)
    return {**splits, first: kept, VAL: held}


# --------------------------------------------------------------------------- folder source


def load_matching_mask(image_id: str, image: Path, mask_path: Path) -> np.ndarray:
    """The mask of ``image_id``, refused when its size differs from its image's."""
    mask = load_mask(mask_path)
    size = image_size(image)
    if mask.shape != size:
        raise DataError(f"mask of '{image_id}' is {mask.shape[1]}x{mask.shape[0]}, its image "
                        f"{size[1]}x{size[0]}", str(mask_path), "masks must match their images")
    return mask
