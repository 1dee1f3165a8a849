"""Source ``voc``: PASCAL VOC 2012 (with the SBD-augmented ``train_aug`` masks).

Layout (``root`` is the ``VOCdevkit`` folder or the ``VOC2012`` folder itself)::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/<prepare.voc_mask_dir>/<id>.png         default SegmentationClassAug
    VOC2012/SegmentationClass/<id>.png              used when SegmentationClassAug is absent
    VOC2012/ImageSets/Segmentation/<split>.txt      one list per prepare.voc_splits entry

``train_aug.txt`` may also sit beside the mask folder (the usual SegmentationClassAug
download). A ``test`` split has no masks; its images get no labels. Other images take their
labels from their masks. An id listed in several splits is one sample.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from seco_cli.data.prepared import Sample
from seco_cli.data.sources import SourceData
from seco_cli.data.sources._common import check_id, load_matching_mask, read_id_list
from seco_cli.errors import DataError
from seco_cli.params import PrepareParams

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
AUG_SPLIT = "train_aug"
AUG_DIR = "SegmentationClassAug"
PLAIN_DIR = "SegmentationClass"
TEST_SPLIT = "test"


def _voc_dir(root: Path) -> Path:
    """The folder holding JPEGImages: ``root`` itself or ``root/VOC2012``."""
    for candidate in (root, root / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"no JPEGImages folder in '{root}' or '{root / 'VOC2012'}'", str(root),
                    "point data.root at VOCdevkit or VOCdevkit/VOC2012")


def _mask_dir(voc: Path, root: Path, prep: PrepareParams) -> Path | None:
    """The mask folder for all non-test splits (None when only ``test`` is listed)."""
    if all(s == TEST_SPLIT for s in prep.voc_splits):
        return None
    for candidate in dict.fromkeys((voc / prep.voc_mask_dir, root / prep.voc_mask_dir)):
        if candidate.is_dir():
            return candidate
    wanted = voc / prep.voc_mask_dir
    if AUG_SPLIT in prep.voc_splits:
        raise DataError(f"mask folder '{wanted}' does not exist (split '{AUG_SPLIT}' needs it)",
                        str(voc), f"add {AUG_DIR} or drop '{AUG_SPLIT}' from prepare.voc_splits")
    if prep.voc_mask_dir == AUG_DIR and (voc / PLAIN_DIR).is_dir():
        return voc / PLAIN_DIR
    raise DataError(f"mask folder '{wanted}' does not exist", str(voc),
                    "set prepare.voc_mask_dir to the folder of class-index PNG masks")


def _find_list(voc: Path, split: str, masks: Path | None) -> Path:
    primary = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    candidates = [primary] + ([masks.parent / f"{split}.txt"] if masks is not None else [])
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"split list '{primary}' does not exist", str(voc),
                    "add the list or remove the split from prepare.voc_splits")


def _parse_line(text: str, where: str) -> str:
    """An id, or the DeepLab form ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``."""
    token = text.split()[0]
    if token.startswith("/JPEGImages/") and token.endswith(".jpg"):
        token = PurePosixPath(token).stem
    return check_id(token, where)


def _read_list(path: Path) -> list[str]:
    return read_id_list(path, _parse_line)


def _sample(image_id: str, voc: Path, masks: Path | None) -> Sample:
    image = voc / "JPEGImages" / f"{image_id}.jpg"
    if masks is None:
        return Sample(id=image_id, image=image, labels=[])
    mask = load_matching_mask(image_id, image, masks / f"{image_id}.png")
    return Sample(id=image_id, image=image, mask=mask, labels=None,
                  extra={"mask_path": masks / f"{image_id}.png"})


def read(root: Path, prep: PrepareParams) -> SourceData:
    """The VOC dataset at ``root`` as a source for ``prepare``."""
    voc = _voc_dir(root)
    masks = _mask_dir(voc, root, prep)
    splits = {s: _read_list(_find_list(voc, s, masks)) for s in dict.fromkeys(prep.voc_splits)}
    with_mask = {i for s, ids in splits.items() if s != TEST_SPLIT for i in ids}
    order = list(dict.fromkeys(i for ids in splits.values() for i in ids))

    def load(image_id: str) -> Sample:
        return _sample(image_id, voc, masks if image_id in with_mask else None)

    return SourceData(classes=list(VOC_CLASSES), splits=splits, order=order, load=load)
