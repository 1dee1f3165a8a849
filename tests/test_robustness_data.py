"""Robustness of `seco prepare` (issue 6): bad datasets give one line and exit 2, leave no
output that looks complete and never touch the user's files; odd but valid images go through.

Every dataset is built tiny in ``tmp_path``; most cases run through the CLI (CliRunner) so the
line the user sees and the exit code are what is checked.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import seco_cli.data.prepared as prepared_mod
from seco_cli.cli import app
from seco_cli.data.images import load_image
from seco_cli.data.loader import TrainSamples
from seco_cli.data.prepared import PreparedDataset
from seco_cli.data.sources import coco, folder
from seco_cli.errors import DataError, SecoError
from seco_cli.params import PrepareParams
from tests.conftest import ROOT, one_error_line, tiny_params

runner = CliRunner()


# --------------------------------------------------------------------------- helpers
def _rgb(path: Path, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _gray(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)
    return path


def _folder(root: Path, ids: str = "abcd", h: int = 12, w: int = 10) -> Path:
    """A `folder` dataset: classes cat, dog; every image has a mask (class 1 or 2 block)."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    for k, i in enumerate(ids):
        _rgb(root / "images" / f"{i}.png", h, w, seed=k)
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2, : w // 2] = 1 + k % 2
        _gray(root / "masks" / f"{i}.png", mask)
    return root


def _prepare(root: Path, tmp: Path, source: str = "folder", *sets: str):
    out, metrics = tmp / "prepared", tmp / "metrics" / "prepare.json"
    args = ["prepare", "--params", str(ROOT / "params.yaml"), "--out", str(out),
            "--metrics", str(metrics), "--set", f"data.source={source}",
            "--set", f"data.root={root}"]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args), out, metrics


PROGRESS = re.compile(r"prepare \([\w-]+\) [━╸╺ ]+ *\d+/\d+ .*")


def _one_line(result, *needles: str) -> str:
    return one_error_line(result, PROGRESS, *needles)


def _nothing_written(out: Path, metrics: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()
    assert not metrics.exists()


# --------------------------------------------------------------------------- root and layout
def test_root_is_a_file_not_a_folder(tmp_path: Path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    result, out, metrics = _prepare(tmp_path / "data.zip", tmp_path)
    _one_line(result, "is a file, not a folder", "data.root")
    _nothing_written(out, metrics)


def _voc_like(root: Path) -> Path:
    _rgb(root / "JPEGImages" / "a.jpg")
    return root


@pytest.mark.parametrize(("source", "needle"), [
    ("voc", "no JPEGImages folder"),
    ("coco", "annotation file"),
    ("yolo-seg", "images folder"),
    ("folder", "images folder"),
])
def test_wrong_layout_for_the_source(tmp_path: Path, source: str, needle: str):
    root = _folder(tmp_path / "ds") if source in ("voc", "coco") else _voc_like(tmp_path / "ds")
    result, out, metrics = _prepare(root, tmp_path, source)
    _one_line(result, needle, "does not exist" if source != "voc" else "data.root")
    _nothing_written(out, metrics)


def test_listed_id_whose_image_is_missing(tmp_path: Path):
    v = tmp_path / "VOC2012"
    _rgb(v / "JPEGImages" / "a.jpg")
    _gray(v / "SegmentationClass" / "a.png", np.zeros((12, 10)))
    _gray(v / "SegmentationClass" / "zzz.png", np.zeros((12, 10)))
    (v / "ImageSets" / "Segmentation").mkdir(parents=True)
    (v / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nzzz\n")
    result, out, metrics = _prepare(v, tmp_path, "voc", "prepare.voc_splits=[train]")
    _one_line(result, "zzz.jpg' does not exist", "check the dataset root and its lists")
    _nothing_written(out, metrics)


def test_unreadable_split_list(tmp_path: Path):
    root = _folder(tmp_path / "ds")
    (root / "train.txt").write_bytes(b"a\n\xff\xfe\x00b\n")
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "cannot read", "train.txt")
    _nothing_written(out, metrics)


# --------------------------------------------------------------------------- bad image files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_pixel_png(path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("damage", "needle"), [
    ("random_bytes", "corrupt or not an image"),
    ("truncated", "truncated"),
    ("zero_bytes", "is empty (0 bytes)"),
    ("zero_pixels", "has no pixels"),
])
def test_bad_image_stops_prepare_naming_it(tmp_path: Path, damage: str, needle: str):
    root = _folder(tmp_path / "ds", h=64, w=64)
    bad = root / "images" / "c.jpg"
    (root / "images" / "c.png").unlink()
    _rgb(bad, 64, 64)
    if damage == "random_bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(2000))
    elif damage == "truncated":  # the header is intact: only a full decode finds it
        _truncate(bad)
    elif damage == "zero_bytes":
        bad.write_bytes(b"")
    else:
        bad.unlink()
        bad = root / "images" / "c.png"
        _zero_pixel_png(bad)
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, needle, f"'{bad}'", "remove")
    _nothing_written(out, metrics)


def test_decompression_bomb_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _rgb(tmp_path / "big.png", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 × limit: PIL refuses
    with pytest.raises(DataError, match="too many pixels to decode safely"):
        load_image(tmp_path / "big.png")


def _save_mode(path: Path, mode: str, base: np.ndarray) -> None:
    img = Image.fromarray(base)
    if mode == "I;16":
        img = Image.fromarray(base[..., 0].astype(np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(base[..., 0].astype(np.float32) / 255.0)
    elif mode == "P+transparency":
        img = img.convert("P")
        img.info["transparency"] = 0
    else:
        img = img.convert(mode)
    img.save(path)


MODES = {"L": "png", "LA": "png", "RGBA": "png", "P": "png", "P+transparency": "png", "1": "png",
         "I;16": "png", "F": "tif", "CMYK": "jpg", "YCbCr": "jpg"}


def test_image_modes_are_converted_to_rgb_not_refused(tmp_path: Path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\n")
    base = np.full((9, 7, 3), 200, np.uint8)
    base[:3] = 40
    for mode, ext in MODES.items():
        name = mode.replace(";", "").replace("+", "_")
        _save_mode(root / "images" / f"{name}.{ext}", mode, base)
    (root / "labels.txt").write_text("".join(f"{m.replace(';', '').replace('+', '_')} cat\n" for m in MODES))
    result, out, _ = _prepare(root, tmp_path)
    assert result.exit_code == 0, result.output
    ds = PreparedDataset(out)
    assert len(ds.ids("train")) == len(MODES)
    for image_id in ds.ids("train"):
        img = ds.image(image_id)
        assert img.shape == (9, 7, 3) and img.dtype == np.uint8, image_id
        assert ds.image_size(image_id) == (9, 7)
        if image_id in ("L", "I16", "F", "RGBA", "LA"):  # gray levels kept (not clipped/black)
            assert abs(int(img[5, 3, 0]) - 200) <= 2 and abs(int(img[0, 3, 0]) - 40) <= 2, image_id


def test_exif_rotated_jpeg_keeps_mask_alignment(tmp_path: Path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\n")
    stored = np.zeros((32, 48, 3), np.uint8)  # as stored: 32 rows, 48 columns
    stored[:16, :16] = 255  # a bright block at the stored top-left
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    img.save(root / "images" / "r.jpg", exif=exif, quality=95)
    shown = np.rot90(stored[..., 0], k=-1)  # (48, 32): what a viewer shows
    _gray(root / "masks" / "r.png", (shown > 127).astype(np.uint8))  # mask drawn on the shown image
    result, out, _ = _prepare(root, tmp_path)
    assert result.exit_code == 0, result.output
    ds = PreparedDataset(out)
    image, mask = ds.image("r"), ds.mask("r")
    assert image.shape == (48, 32, 3) and mask.shape == (48, 32) and ds.image_size("r") == (48, 32)
    assert image[..., 0][mask == 1].mean() > 200 and image[..., 0][mask == 0].mean() < 30
    # a mask drawn on the stored (unrotated) pixels no longer fits: refused, not misaligned
    _gray(root / "masks" / "r.png", (stored[..., 0] > 127).astype(np.uint8))
    result, out2, _ = _prepare(root, tmp_path / "again")
    _one_line(result, "mask of 'r' is 48x32, its image 32x48", "masks must match their images")


# --------------------------------------------------------------------------- masks and labels
def test_mask_value_outside_the_classes(tmp_path: Path):
    root = _folder(tmp_path / "ds")
    mask = np.zeros((12, 10), np.uint8)
    mask[0, 0], mask[1, 1] = 255, 7  # 255 (ignore) is fine, 7 is not a class of 2
    _gray(root / "masks" / "b.png", mask)
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "mask of 'b' holds value 7, not a class index", "b.png", "0..2 and 255")
    _nothing_written(out, metrics)


def test_colour_mask_is_refused_not_misread(tmp_path: Path):
    root = _folder(tmp_path / "ds")
    colour = np.zeros((12, 10, 3), np.uint8)
    colour[:6, :5] = (128, 0, 0)  # a VOC colour saved as RGB instead of a palette index
    Image.fromarray(colour).save(root / "masks" / "a.png")
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "a.png' is a colour image, not class indices", "palette or grayscale")
    _nothing_written(out, metrics)


def test_unknown_class_name_in_labels_txt(tmp_path: Path):
    root = _folder(tmp_path / "ds")
    (root / "masks" / "d.png").unlink()
    (root / "labels.txt").write_text("d dog zebra\n")
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "labels of 'd' name unknown class 'zebra'", "labels.txt", "classes.txt")
    _nothing_written(out, metrics)


def test_two_image_files_share_an_id(tmp_path: Path):
    root = _folder(tmp_path / "ds")
    _rgb(root / "images" / "a.jpg")
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "two images share the id 'a' (a.jpg, a.png)", "keep one file per id")
    _nothing_written(out, metrics)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "sub/../../x", "..\\..\\x", "a\x00b"])
def test_list_ids_cannot_name_paths_outside_the_root(tmp_path: Path, bad: str):
    root = _folder(tmp_path / "ds")
    (root / "train.txt").write_text(f"a\n{bad}\n")
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "is not a plain file name", "train.txt:2")
    _nothing_written(out, metrics)


@pytest.mark.parametrize("name", ["../../etc/passwd.jpg", "/etc/passwd.jpg", "..\\x.jpg"])
def test_coco_file_names_cannot_leave_the_image_folder(tmp_path: Path, name: str):
    ann = {"images": [{"id": 1, "file_name": name, "height": 4, "width": 4}],
           "categories": [{"id": 1, "name": "cat"}], "annotations": []}
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(ann))
    with pytest.raises(DataError, match="points outside the image folder"):
        coco.read(tmp_path, PrepareParams(coco_year="2017", coco_splits=["train"]))


# --------------------------------------------------------------------------- small images
def test_images_smaller_than_the_crop_are_padded_not_refused(tmp_path: Path):
    from seco_cli.trainer import train

    root = _folder(tmp_path / "ds", ids="abcdef", h=10, w=13)  # crop is 48
    result, out, _ = _prepare(root, tmp_path)
    assert result.exit_code == 0, result.output
    p = tiny_params("train.iterations=2", "train.ckpt_every=1", "train.seg_start=0")
    data = PreparedDataset(out)
    samples = TrainSamples(data, data.ids("train"), 4, 0, 48, (1.0, 1.0), p.data.mean, p.data.std,
                           with_masks=True)
    item = samples[0]
    assert item["image"].shape == (3, 48, 48) and int(item["valid"].sum()) == 10 * 13
    assert (item["image"][:, ~item["valid"]] == 0).all() and (item["mask"][~item["valid"]] == 255).all()
    meta = {"backbone": p.model.backbone, "num_classes": data.num_classes, "params": p.dump()}
    trainer = train(p, data, torch.device("cpu"), meta, tmp_path / "ckpt", False, lambda *_: None)
    assert trainer.iteration == 2
    assert all(torch.isfinite(v).all() for v in trainer.net.state_dict().values())


# --------------------------------------------------------------------------- on_bad_image
def _with_bad_images(root: Path) -> dict[str, str]:
    """Four bad images beside good ones; returns id → a phrase of its reason."""
    _folder(root, ids="abcdefgh", h=64, w=64)
    (root / "images" / "b.png").write_bytes(b"garbage")
    _truncate(root / "images" / "c.png")
    _gray(root / "masks" / "d.png", np.zeros((5, 5)))
    bad_value = np.zeros((64, 64), np.uint8)
    bad_value[3, 3] = 9
    _gray(root / "masks" / "e.png", bad_value)
    return {"b": "corrupt", "c": "truncated", "d": "is 5x5, its image 64x64", "e": "holds value 9"}


def test_skip_drops_bad_images_and_lists_them(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    bad = _with_bad_images(tmp_path / "ds")
    result, out, metrics = _prepare(tmp_path / "ds", tmp_path, "folder", "data.on_bad_image=skip")
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.name == "stages.prepare"]
    assert len(warned) == 1 and warned[0].startswith("skipped 4 bad image(s) (first: image file")
    assert warned[0].endswith(f"all are listed in {metrics}")
    summary = json.loads(metrics.read_text())
    assert summary["skipped_images"] == 4
    reasons = {s["id"]: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == sorted(bad)
    for image_id, phrase in bad.items():
        assert phrase in reasons[image_id] and "\n" not in reasons[image_id]
    ds = PreparedDataset(out)
    assert ds.ids("train") == ["a", "f", "g", "h"] and summary["splits"]["train"]["images"] == 4
    assert sorted(ds.index["skipped"]) == sorted(bad)
    assert all(ds.has_mask(i) for i in ds.ids("train")) and not ds.has_mask("b")


def test_stop_is_the_default_and_names_the_first_bad_image(tmp_path: Path):
    _with_bad_images(tmp_path / "ds")
    result, out, metrics = _prepare(tmp_path / "ds", tmp_path)
    _one_line(result, "b.png' is corrupt or not an image")
    _nothing_written(out, metrics)


def test_skip_with_every_image_bad_is_an_error(tmp_path: Path):
    root = _folder(tmp_path / "ds", ids="ab")
    for i in "ab":
        (root / "images" / f"{i}.png").write_bytes(b"garbage")
    result, out, metrics = _prepare(root, tmp_path, "folder", "data.on_bad_image=skip")
    _one_line(result, "every listed image is bad", "a.png")
    _nothing_written(out, metrics)


# --------------------------------------------------------------------------- writing safely
def _full_disk_after(n: int):
    """A stand-in for prepare's PNG writer whose disk fills after ``n`` mask files."""
    real, calls = prepared_mod.save_png, {"n": 0}

    def write(path, array, palette=None):
        if Path(path).parent.name == "masks":
            calls["n"] += 1
            if calls["n"] > n:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, array, palette)

    return write


def test_full_disk_during_prepare_keeps_the_earlier_dataset(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    root = _folder(tmp_path / "ds")
    result, out, metrics = _prepare(root, tmp_path)
    assert result.exit_code == 0, result.output
    before = (out / "index.json").read_text(), metrics.read_text()
    _rgb(root / "images" / "e.png")  # the dataset grew; the disk fills on the third mask
    _gray(root / "masks" / "e.png", np.ones((12, 10)))
    monkeypatch.setattr(prepared_mod, "save_png", _full_disk_after(2))
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "cannot write the prepared dataset", "No space left on device",
              "no partial output was kept", "free disk space", "`seco prepare`")
    assert (out / "index.json").read_text() == before[0] and metrics.read_text() == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "metrics", "prepared"]


def test_full_disk_on_a_first_prepare_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(prepared_mod, "save_png", _full_disk_after(1))
    result, out, metrics = _prepare(_folder(tmp_path / "ds"), tmp_path)
    _one_line(result, "No space left on device")
    _nothing_written(out, metrics)


def test_full_disk_writing_the_metrics_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import stages.prepare

    def no_space(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(stages.prepare, "write_json", no_space)
    result, out, metrics = _prepare(_folder(tmp_path / "ds"), tmp_path)
    _one_line(result, "cannot write the metrics file", "the prepared dataset at", "is complete")
    assert PreparedDataset(out).ids("train") == list("abcd") and not metrics.exists()


def test_interrupted_prepare_leaves_nothing_and_keeps_the_earlier_dataset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _folder(tmp_path / "ds")
    result, out, _ = _prepare(root, tmp_path)
    before = (out / "index.json").read_text()

    def interrupted(path, array, palette=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared_mod, "save_png", interrupted)
    result, out, _ = _prepare(root, tmp_path)
    assert result.exit_code == 130 and "no output of this stage is marked complete" in result.output
    assert (out / "index.json").read_text() == before
    assert not out.with_name("prepared.partial").exists()


def test_user_folder_at_the_output_is_refused_before_any_work(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    import seco_cli.data.sources.folder as folder_mod

    root = _folder(tmp_path / "ds")
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    monkeypatch.setattr(folder_mod, "load_matching_mask",
                        lambda *a: pytest.fail("read images before checking --out"))
    result, out, metrics = _prepare(root, tmp_path)
    _one_line(result, "refusing to overwrite", "not a prepared dataset", "choose another output path")
    assert (out / "thesis.tex").read_text() == "mine" and not metrics.exists()


# --------------------------------------------------------------------------- error lines
def test_error_line_is_one_line_whatever_the_parts_hold():
    err = SecoError("cannot read 'x' (first line\nsecond line\r\n  third)", "a\nb", "fix\nit")
    assert err.line() == "cannot read 'x' (first line second line third) at a b; fix it"


def test_folder_source_read_directly_reports_the_list_line(tmp_path: Path):
    root = _folder(tmp_path / "ds")
    (root / "val.txt").write_text("a\n\n../b\n")
    with pytest.raises(DataError) as exc:
        folder.read(root, PrepareParams())
    assert exc.value.where.endswith("val.txt:3")
