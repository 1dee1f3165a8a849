"""The real-data importers of ``seco prepare``: voc, coco, yolo-seg and folder.

Each source is built as a tiny fixture in ``tmp_path``, read, written as a prepared dataset and
read back. A last test runs the YOLO-seg importer on the real coco128-seg sample and compares
its masks with the VOC-form masks made from the same polygons.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seco_cli.data.images import load_mask
from seco_cli.data.prepared import PreparedDataset, write_prepared
from seco_cli.data.sources import SourceData, _common, coco, folder, load_source, voc, yolo
from seco_cli.errors import DataError, MissingInputError
from seco_cli.params import DataParams, PrepareParams

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- helpers
def _image(path: Path, h: int, w: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(path.name)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _mask(path: Path, mask: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8))
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _prepare(src: SourceData, out: Path) -> PreparedDataset:
    write_prepared(out, source="test", classes=src.classes, splits=src.splits,
                   samples=src.samples, provenance={})
    return PreparedDataset(out)


def _block_mask(h: int, w: int, blocks: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    for y0, y1, x0, x1, value in blocks:
        mask[y0:y1, x0:x1] = value
    return mask


# --------------------------------------------------------------------------- voc
def _voc_tree(root: Path, aug: bool = True) -> Path:
    """VOCdevkit/VOC2012 with images a, b, c, t (8x10); a and b have masks."""
    v = root / "VOC2012"
    for i in "abct":
        _image(v / "JPEGImages" / f"{i}.jpg", 8, 10)
    masks = {"a": _block_mask(8, 10, [(0, 4, 0, 5, 15), (6, 8, 0, 10, 255)]),
             "b": _block_mask(8, 10, [(2, 6, 2, 6, 1), (0, 2, 8, 10, 20)]),
             "c": _block_mask(8, 10, [])}
    for i, m in masks.items():
        _mask(v / "SegmentationClass" / f"{i}.png", m, palette=True)
        if aug:
            _mask(v / "SegmentationClassAug" / f"{i}.png", m)
    sets = v / "ImageSets" / "Segmentation"
    _write(sets / "train.txt", "a\n")
    _write(sets / "val.txt", "b\nc\n")
    _write(sets / "test.txt", "t\n")
    if aug:  # beside SegmentationClassAug, in the DeepLab "image mask" form
        _write(v / "train_aug.txt", "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n"
                                    "/JPEGImages/b.jpg /SegmentationClassAug/b.png\n")
    return v


def test_voc_devkit_with_aug_masks(tmp_path: Path) -> None:
    _voc_tree(tmp_path / "VOCdevkit")
    prep = PrepareParams(voc_splits=["train_aug", "val", "test"])
    src = voc.read(tmp_path / "VOCdevkit", prep)
    assert src.total == 4  # b is in train_aug and val: one sample
    ds = _prepare(src, tmp_path / "out")
    assert ds.classes[0] == "background" and ds.classes[15] == "person" and len(ds.classes) == 21
    assert ds.splits == {"train_aug": ["a", "b"], "val": ["b", "c"], "test": ["t"]}
    assert ds.labels("a") == [15] and ds.labels("b") == [1, 20] and ds.labels("c") == []
    assert ds.labels("t") == [] and not ds.has_mask("t")
    a = ds.mask("a")
    assert a[0, 0] == 15 and a[7, 9] == 255 and a[5, 9] == 0
    assert ds.image_size("a") == (8, 10)
    # ground truth: one palette PNG per image with a mask, in one flat folder
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "b.png",
                                                                               "c.png"]
    assert Image.open(tmp_path / "out" / "masks" / "a.png").mode == "P"
    with pytest.raises(MissingInputError, match="image 't' has no ground-truth mask"):
        ds.mask("t")
    (tmp_path / "out" / "masks" / "c.png").unlink()
    with pytest.raises(MissingInputError, match="mask of 'c' is missing") as exc:
        ds.mask("c")
    assert "seco prepare" in exc.value.line()


def test_prepared_dataset_of_the_zarr_mask_format_is_refused(tmp_path: Path) -> None:
    ds_dir = tmp_path / "out"
    _prepare(voc.read(_voc_tree(tmp_path, aug=False), PrepareParams(voc_splits=["val"])), ds_dir)
    index = json.loads((ds_dir / "index.json").read_text())
    (ds_dir / "index.json").write_text(json.dumps({**index, "format_version": 1}))
    with pytest.raises(MissingInputError, match="unknown format") as exc:
        PreparedDataset(ds_dir)
    assert "seco prepare" in exc.value.line()


def test_voc2012_root_falls_back_to_segmentation_class(tmp_path: Path) -> None:
    v = _voc_tree(tmp_path, aug=False)
    ds = _prepare(voc.read(v, PrepareParams(voc_splits=["train", "val"])), tmp_path / "out")
    assert ds.splits == {"train": ["a"], "val": ["b", "c"]}
    assert ds.mask("b")[3, 3] == 1 and ds.labels("b") == [1, 20]  # palette indices


def test_voc_errors(tmp_path: Path) -> None:
    v = _voc_tree(tmp_path, aug=False)
    with pytest.raises(DataError, match="SegmentationClassAug") as exc:
        voc.read(v, PrepareParams(voc_splits=["train_aug"]))
    assert "train_aug" in exc.value.line()
    with pytest.raises(DataError, match="trainval.txt") as exc:
        voc.read(v, PrepareParams(voc_splits=["train", "trainval"]))
    assert exc.value.fix
    _write(v / "ImageSets" / "Segmentation" / "bad.txt", "a\n../../etc/passwd\n")
    with pytest.raises(DataError, match="plain file name"):
        voc.read(v, PrepareParams(voc_splits=["bad"]))
    _write(v / "ImageSets" / "Segmentation" / "dup.txt", "a\nb\na\n")
    with pytest.raises(DataError, match="listed twice"):
        voc.read(v, PrepareParams(voc_splits=["dup"]))
    with pytest.raises(DataError, match="JPEGImages"):
        voc.read(tmp_path / "VOC2012" / "ImageSets", PrepareParams())


def test_voc_size_mismatch(tmp_path: Path) -> None:
    v = _voc_tree(tmp_path, aug=False)
    _mask(v / "SegmentationClass" / "a.png", np.zeros((8, 9), np.uint8))
    src = voc.read(v, PrepareParams(voc_splits=["train"]))
    with pytest.raises(DataError, match="9x8, its image 10x8") as exc:
        list(src.samples)
    assert exc.value.where.endswith("a.png")


# --------------------------------------------------------------------------- coco
def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int64)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _coco_tree(root: Path) -> None:
    h, w = 16, 20
    _image(root / "train2017" / "000000000007.jpg", h, w)
    _image(root / "val2017" / "000000000003.jpg", 12, 12)
    small = _block_mask(h, w, [(5, 9, 6, 10, 1)])  # inside the big polygon
    crowd = _block_mask(h, w, [(0, 16, 12, 20, 1)])  # right part, partly over the polygon
    cats = [{"id": 5, "name": "dog"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "bird"}]
    train = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": h, "width": w}],
        "categories": cats,
        "annotations": [  # the small object comes first in the file but must end on top
            {"id": 1, "image_id": 7, "category_id": 5, "iscrowd": 0, "area": 16.0,
             "segmentation": {"size": [h, w], "counts": _rle_counts(small)}},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 120.0,
             "segmentation": [[2.0, 2.0, 14.0, 2.0, 14.0, 12.0, 2.0, 12.0]]},
            {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": 128.0,
             "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}},
        ],
    }
    val = {"images": [{"id": 3, "file_name": "000000000003.jpg", "height": 12, "width": 12}],
           "categories": cats, "annotations": []}
    _write(root / "annotations" / "instances_train2017.json", json.dumps(train))
    _write(root / "annotations" / "instances_val2017.json", json.dumps(val))


def test_coco_polygon_rle_and_crowd(tmp_path: Path) -> None:
    _coco_tree(tmp_path / "coco")
    src = coco.read(tmp_path / "coco", PrepareParams(coco_year="2017"))
    assert src.classes == ["background", "cat", "bird", "dog"]  # category-id order
    ds = _prepare(src, tmp_path / "out")
    assert ds.splits == {"train": ["000000000007"], "val": ["000000000003"]}
    m = ds.mask("000000000007")
    assert m[7, 8] == 3  # small dog (RLE) on top of the large cat polygon
    assert m[4, 4] == 1  # cat polygon
    assert m[4, 12] == 1  # crowd under a non-crowd object keeps the object
    assert m[14, 16] == 255  # crowd only: ignore
    assert m[14, 4] == 0  # background
    assert ds.labels("000000000007") == [1, 2, 3]  # the crowd class is present too
    assert ds.labels("000000000003") == [] and not ds.mask("000000000003").any()


def test_coco_errors(tmp_path: Path) -> None:
    _coco_tree(tmp_path / "coco")
    with pytest.raises(DataError, match="instances_train2014.json"):
        coco.read(tmp_path / "coco", PrepareParams(coco_year="2014"))
    _write(tmp_path / "coco" / "annotations" / "instances_val2017.json", "{not json")
    with pytest.raises(DataError, match="cannot read annotation file"):
        coco.read(tmp_path / "coco", PrepareParams(coco_year="2017"))


# --------------------------------------------------------------------------- yolo-seg
def _yolo_tree(root: Path, split: str = "train") -> None:
    _write(root / "classes.txt", "person\ncar\npotted plant\n")
    _image(root / "images" / split / "a.png", 10, 20)
    _image(root / "images" / split / "b.jpg", 10, 20)
    _image(root / "images" / split / "c.png", 10, 20)
    _image(root / "images" / split / "d.png", 10, 20)
    _write(root / "labels" / split / "a.txt",  # small (class 2) first, large (class 0) second
           "2 0.4 0.4 0.6 0.4 0.6 0.8 0.4 0.8\n0 0.0 0.0 1.0 0.0 1.0 1.0 0.0 1.0\n")
    _write(root / "labels" / split / "c.txt", "1 0.0 0.0 0.25 0.0 0.25 0.5 0.0 0.5\n\n")
    _write(root / "labels" / split / "d.txt", "")
    _write(root / "labels" / split / "zz.txt", "0 0 0 1 0 1 1\n")  # no image: skipped


def test_yolo_largest_first_and_missing_labels(tmp_path: Path) -> None:
    _yolo_tree(tmp_path)
    src = yolo.read(tmp_path, PrepareParams(splits=["train", "val"]))
    ds = _prepare(src, tmp_path / "out")
    assert ds.classes == ["background", "person", "car", "potted plant"]
    assert ds.splits == {"train": ["a", "b", "c", "d"]}
    a = ds.mask("a")
    assert a.shape == (10, 20) and a[6, 10] == 3 and a[1, 1] == 1
    assert ds.labels("a") == [1, 3]
    assert ds.labels("b") == [] and not ds.mask("b").any()  # no label file: background
    c = ds.mask("c")
    assert c[2, 2] == 2 and c[8, 15] == 0 and ds.labels("c") == [2]


def test_yolo_val_holdout_and_yaml_names(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, split="train2017")
    (tmp_path / "classes.txt").unlink()
    _write(tmp_path / "data.yaml", "path: .\nnames:\n  0: person\n  1: car\n  2: potted plant\n")
    prep = PrepareParams(splits=["train2017", "val2017"], val_fraction=0.25)
    src = yolo.read(tmp_path, prep)
    assert src.classes[1:] == ["person", "car", "potted plant"]
    assert src.splits == {"train2017": ["a", "b", "d"], "val": ["c"]}
    again = yolo.read(tmp_path, prep)
    assert again.splits == src.splits  # deterministic


def test_yolo_through_load_source(tmp_path: Path) -> None:
    _yolo_tree(tmp_path)
    data = DataParams(source="yolo-seg", root=str(tmp_path))
    src = load_source(data, PrepareParams(), seed=0)
    assert src.total == 4


def test_yolo_errors(tmp_path: Path) -> None:
    _yolo_tree(tmp_path)
    _write(tmp_path / "labels" / "train" / "c.txt", "1 0 0 1 0 1 1\n1 0.1 0.2 0.3\n")
    with pytest.raises(DataError, match="line 2") as exc:
        list(yolo.read(tmp_path, PrepareParams()).samples)
    assert exc.value.where.endswith("c.txt:2")
    _write(tmp_path / "labels" / "train" / "c.txt", "3 0 0 1 0 1 1\n")
    with pytest.raises(DataError, match="class id 3, but there are 3 classes"):
        list(yolo.read(tmp_path, PrepareParams()).samples)
    with pytest.raises(DataError, match="set prepare.splits"):
        yolo.read(tmp_path, PrepareParams(splits=["train2017"]))
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match="no class list"):
        yolo.read(tmp_path, PrepareParams())


# --------------------------------------------------------------------------- folder
def _folder_tree(root: Path) -> None:
    _write(root / "classes.txt", "background\ncat\ndog\n")
    _image(root / "images" / "a.png", 6, 7)
    _image(root / "images" / "b.png", 6, 7)
    _image(root / "images" / "c.jpg", 5, 5)
    _mask(root / "masks" / "a.png", _block_mask(6, 7, [(0, 3, 0, 3, 2), (5, 6, 0, 7, 255)]))
    _write(root / "labels.json", json.dumps({"b": ["dog", "cat"], "c": []}))
    _write(root / "train.txt", "a\nb\n")
    _write(root / "val.txt", "c\n")


def test_folder_masks_labels_and_lists(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    ds = _prepare(folder.read(tmp_path, PrepareParams()), tmp_path / "out")
    assert ds.classes == ["background", "cat", "dog"]  # 'background' not duplicated
    assert ds.splits == {"train": ["a", "b"], "val": ["c"]}
    assert ds.labels("a") == [2] and ds.mask("a")[0, 0] == 2 and ds.mask("a")[5, 3] == 255
    assert ds.labels("b") == [1, 2] and not ds.has_mask("b")
    assert ds.labels("c") == []


def test_folder_labels_txt_without_lists(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    for name in ("labels.json", "train.txt", "val.txt"):
        (tmp_path / name).unlink()
    _write(tmp_path / "classes.txt", "cat\ndog\n")
    _write(tmp_path / "labels.txt", "b dog\nc cat dog\na cat\n")
    ds = _prepare(folder.read(tmp_path, PrepareParams()), tmp_path / "out")
    assert ds.splits == {"train": ["a", "b", "c"]}
    assert ds.labels("a") == [1]  # given labels win over the mask
    assert ds.labels("c") == [1, 2]


def test_folder_errors(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    _write(tmp_path / "labels.json", json.dumps({"b": ["horse"], "c": []}))
    with pytest.raises(DataError, match="unknown class 'horse'"):
        folder.read(tmp_path, PrepareParams())
    _write(tmp_path / "labels.json", json.dumps({"b": ["dog"]}))
    with pytest.raises(DataError, match="'c' has neither labels nor a mask"):
        folder.read(tmp_path, PrepareParams())
    _write(tmp_path / "labels.json", json.dumps({"b": ["dog"], "c": []}))
    _write(tmp_path / "val.txt", "c\nx\n")
    with pytest.raises(DataError, match="names id 'x'") as exc:
        folder.read(tmp_path, PrepareParams())
    assert exc.value.where.endswith("val.txt")
    _write(tmp_path / "val.txt", "c\nc\n")
    with pytest.raises(DataError, match="listed twice"):
        folder.read(tmp_path, PrepareParams())
    _write(tmp_path / "val.txt", "c\n")
    _mask(tmp_path / "masks" / "a.png", np.zeros((7, 6), np.uint8))
    with pytest.raises(DataError, match="masks must match"):
        list(folder.read(tmp_path, PrepareParams()).samples)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt"):
        folder.read(tmp_path, PrepareParams())


def test_hold_out_is_even_and_exact() -> None:
    ids = [f"{i:03d}" for i in range(10)]
    kept, held = _common.hold_out(ids, 0.2)
    assert held == ["002", "007"] and len(kept) == 8
    assert _common.hold_out(["a"], 0.5) == (["a"], [])


# --------------------------------------------------------------------------- real data
VOC_NAMES = {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa",
             "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor"}


def _coco_to_voc(classes: list[str]) -> np.ndarray:
    """Lookup table: prepared COCO class index → VOC index (non-VOC objects → 255)."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for i, name in enumerate(classes[1:], 1):
        name = VOC_NAMES.get(name, name)
        if name in voc.VOC_CLASSES:
            lut[i] = voc.VOC_CLASSES.index(name)
    return lut


def test_yolo_on_coco128_matches_voc_masks(tmp_path: Path) -> None:
    src_root, ref_dir = SHARED_DATA / "coco128-seg", SHARED_DATA / "coco128_voc20" / "SegmentationClass"
    if not src_root.is_dir() or not ref_dir.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA} (coco128-seg, coco128_voc20)")
    ds = _prepare(yolo.read(src_root, PrepareParams(splits=["train2017"])), tmp_path / "out")
    ids = ds.ids("train2017")
    assert len(ds.classes) == 81 and len(ids) == 128
    lut = _coco_to_voc(ds.classes)
    assert (lut[1:] != 255).sum() == 20  # every VOC class has its COCO counterpart
    agreement = {i: float((lut[ds.mask(i)] == load_mask(ref_dir / f"{i}.png")).mean()) for i in ids}
    worst = min(agreement, key=agreement.get)
    assert agreement[worst] >= 0.99, f"{worst}: {agreement[worst]:.4f}"
    assert sum(not ds.labels(i) for i in ids) >= 2  # the images without a label file
