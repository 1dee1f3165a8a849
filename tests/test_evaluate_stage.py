"""Stage `evaluate` on a tiny hand-made dataset and hand-made stores: exact numbers out."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from seco_cli.data.prepared import Sample, write_prepared
from seco_cli.errors import MissingInputError, SecoError
from seco_cli.params import PairSpec, Params
from seco_cli.store import StoreWriter
from stages import evaluate

CLASSES = ["background", "boat", "horse", "person"]
MASKS = {  # (2, 4) ground truth; t3 has none
    "t1": [[0, 0, 1, 1], [0, 0, 1, 1]],
    "t2": [[2, 2, 3, 3], [0, 0, 3, 3]],
    "v1": [[0, 1, 1, 255], [0, 0, 1, 1]],
    "v2": [[2, 2, 3, 0], [2, 3, 3, 0]],
}
LABELS = {"t1": [1], "t2": [2, 3], "t3": [1], "v1": [1], "v2": [2, 3]}


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    samples = [Sample(i, np.zeros((2, 4, 3), np.uint8),
                      np.asarray(MASKS[i], np.uint8) if i in MASKS else None, LABELS[i])
               for i in LABELS]
    write_prepared(tmp_path / "prepared", source="synthetic", classes=CLASSES,
                   splits={"train": ["t1", "t2", "t3"], "val": ["v1", "v2"]},
                   samples=samples, provenance={})
    cams = StoreWriter(tmp_path / "cams.zarr", "cams", {"split": "train"})
    # t1 at half size: bilinear to (2, 4) gives columns 0, 0.25, 0.75, 1 (exact mask at 0.45)
    cams.write("t1", np.array([[[0.0, 1.0]]]), {"labels": [1]})
    cams.write("t2", np.array([
        [[0.75, 0.75, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0]],  # horse
        [[0.0, 0.25, 0.75, 0.75], [0.0, 0.25, 0.75, 0.75]],  # person
    ]), {"labels": [2, 3]})
    cams.write("t3", np.ones((1, 2, 4)), {"labels": [1]})
    cams.finish()
    pseudo = StoreWriter(tmp_path / "pseudo.zarr", "pseudo", {})
    pseudo.write("t1", np.asarray(MASKS["t1"], np.uint8))
    pseudo.write("t2", np.array([[2, 2, 2, 3], [0, 0, 3, 3]], np.uint8))
    pseudo.write("t3", np.ones((2, 4), np.uint8))
    pseudo.finish()
    seg = StoreWriter(tmp_path / "segment.zarr", "segment", {}, groups=["raw", "ms_crf"])
    seg.write("v1", np.array([[0, 1, 1, 1], [1, 0, 1, 1]], np.uint8), group="ms_crf")
    seg.write("v2", np.array([[2, 3, 3, 0], [2, 3, 3, 0]], np.uint8), group="ms_crf")
    for i in ("v1", "v2"):  # raw: all background
        seg.write(i, np.zeros((2, 4), np.uint8), group="raw")
    seg.finish()
    return {"prepared": tmp_path / "prepared", "cams": tmp_path / "cams.zarr",
            "pseudo": tmp_path / "pseudo.zarr", "segment": tmp_path / "segment.zarr",
            "metrics": tmp_path / "m" / "evaluate.json", "plots": tmp_path / "plots"}


def _params(pairs: list[tuple[str, str]]) -> Params:
    p = Params()
    p.evaluate.pairs = [PairSpec(victim=v, partner=w) for v, w in pairs]
    p.evaluate.cam_bkg = 0.45
    p.evaluate.bkg_sweep = [0.2, 0.45, 0.5]
    return p


def _run(paths: dict[str, Path], params: Params, **kw) -> dict:
    return evaluate.run(params, paths["prepared"], paths["cams"], paths["pseudo"],
                        paths["segment"], paths["metrics"], paths["plots"], **kw)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


PAIRS = [("boat", "background"), ("horse", "background"), ("horse", "person")]


def test_metrics_json_exact(paths):
    steps = []
    out = _run(paths, _params(PAIRS), progress=steps.append)
    assert sum(steps) == 2 + 2 + 2 + 2  # images with masks: cams, pseudo (train), 2 × segment (val)
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics == out
    assert list(metrics) == ["cams", "pseudo", "segment_raw", "segment_ms_crf", "pairs"]
    cams = metrics["cams"]
    assert set(cams) == {"miou", "precision", "recall", "fp_tp", "images", "skipped_no_mask",
                         "bkg", "best_bkg", "best_miou"}
    # cams at 0.45: rows [5,0,1,0] [0,4,0,0] [0,0,2,0] [0,0,0,4] (one bg pixel taken as horse)
    assert cams["miou"] == pytest.approx((5 / 6 + 1 + 2 / 3 + 1) / 4)
    assert cams["precision"] == pytest.approx((1 + 1 + 2 / 3 + 1) / 4)
    assert cams["recall"] == pytest.approx((5 / 6 + 3) / 4)
    assert cams["fp_tp"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert (cams["images"], cams["skipped_no_mask"]) == (2, 1)
    assert (cams["bkg"], cams["best_bkg"], cams["best_miou"]) == (0.45, 0.5, 1.0)
    # pseudo: rows [6,0,0,0] [0,4,0,0] [0,0,2,0] [0,0,1,3]
    assert metrics["pseudo"]["miou"] == pytest.approx((1 + 1 + 2 / 3 + 3 / 4) / 4)
    assert metrics["pseudo"]["fp_tp"] == pytest.approx(0.5 / 3)
    # segment raw, all background: column 0 = [5, 4, 3, 3]; only background has an IoU, 5/15
    assert metrics["segment_raw"]["miou"] == pytest.approx(1 / 3 / 4)
    assert metrics["segment_raw"]["recall"] == pytest.approx(1 / 4)
    # segment ms_crf: rows [4,1,0,0] [0,4,0,0] [0,0,2,1] [0,0,0,3]; the 255 pixel of v1 is ignored
    seg = metrics["segment_ms_crf"]
    assert seg["miou"] == pytest.approx((0.8 + 0.8 + 2 / 3 + 0.75) / 4)
    assert seg["precision"] == pytest.approx((1 + 0.8 + 1 + 0.75) / 4)
    assert seg["recall"] == pytest.approx((0.8 + 1 + 2 / 3 + 1) / 4)
    assert seg["fp_tp"] == pytest.approx((0.25 + 0 + 1 / 3) / 3)
    assert (seg["images"], seg["skipped_no_mask"]) == (2, 0)
    pairs = metrics["pairs"]
    assert list(pairs) == ["boat/background", "horse/background", "horse/person"]
    assert pairs["horse/background"]["cams"] == pytest.approx(
        {"iou": 2 / 3, "fp_tp": 0.5, "fp_share_on_partner": 1.0})
    assert pairs["horse/person"]["cams"]["fp_share_on_partner"] == 0.0
    assert pairs["boat/background"]["segment_ms_crf"] == pytest.approx(
        {"iou": 0.8, "fp_tp": 0.25, "fp_share_on_partner": 1.0})
    assert pairs["horse/person"]["segment_ms_crf"] == {
        "iou": pytest.approx(2 / 3), "fp_tp": 0.0, "fp_share_on_partner": None}
    assert set(pairs["boat/background"]) == {"cams", "pseudo", "segment_raw", "segment_ms_crf"}


def test_plot_files_exact(paths):
    _run(paths, _params(PAIRS))
    plots = paths["plots"]
    names = {p.name for p in plots.iterdir() if not p.name.startswith(".")}
    assert names == {f"{s}_{k}.csv" for s in ("cams", "pseudo", "segment_raw", "segment_ms_crf")
                     for k in ("per_class", "confusion")} | {"cam_bkg_sweep.csv", "report.json",
                                                             "samples.png"}
    sweep = _csv(plots / "cam_bkg_sweep.csv")
    assert [float(r["bkg"]) for r in sweep] == [0.2, 0.45, 0.5]
    # at 0.2: rows [2,2,1,1] [0,4,0,0] [0,0,2,0] [0,0,0,4]
    assert [float(r["miou"]) for r in sweep] == pytest.approx(
        [(1 / 3 + 2 / 3 + 2 / 3 + 0.8) / 4, 0.875, 1.0])
    per_class = {r["class"]: r for r in _csv(plots / "segment_ms_crf_per_class.csv")}
    assert list(per_class) == CLASSES
    assert float(per_class["person"]["iou"]) == pytest.approx(0.75)
    assert float(per_class["person"]["precision"]) == pytest.approx(0.75)
    assert float(per_class["horse"]["recall"]) == pytest.approx(2 / 3)
    assert float(per_class["boat"]["fp_tp"]) == pytest.approx(0.25)
    assert per_class["background"]["fp_tp"] == "0.0"
    rows = Counter((r["actual"], r["predicted"]) for r in _csv(plots / "segment_ms_crf_confusion.csv"))
    assert rows == {("background", "background"): 800, ("background", "boat"): 200,
                    ("boat", "boat"): 1000, ("horse", "horse"): 667, ("horse", "person"): 333,
                    ("person", "person"): 1000}
    report = json.loads((plots / "report.json").read_text())
    assert report["pairs_from"] == "params"
    assert report["sources"]["segment_ms_crf"]["confusion"] == [[4, 1, 0, 0], [0, 4, 0, 0],
                                                         [0, 0, 2, 1], [0, 0, 0, 3]]
    assert report["sources"]["cams"]["split"] == "train"
    assert report["sources"]["segment_ms_crf"]["split"] == "val"


def test_report_records_its_params_and_revision_and_what_each_store_recorded(paths):
    import zarr

    from seco_cli.provenance import git_revision

    made = {"seco_version": "0.0.9", "git_revision": "abc123", "seed": 7, "params": {}}
    zarr.open_group(str(paths["cams"]), mode="r+").attrs["provenance"] = made
    params = _params(PAIRS)
    params.train.seed = 3
    _run(paths, params)
    report = json.loads((paths["plots"] / "report.json").read_text())
    assert report["provenance"]["git_revision"] == git_revision()
    assert report["provenance"]["seed"] == 3
    assert report["provenance"]["params"]["evaluate"]["cam_bkg"] == 0.45
    assert report["inputs"]["cams"] == {"seco_version": "0.0.9", "git_revision": "abc123",
                                        "seed": 7}
    # the hand-made pseudo and segment stores record nothing: said, not invented
    assert report["inputs"]["pseudo"] == {"seco_version": None, "git_revision": None,
                                          "seed": None}
    assert set(report["inputs"]) == {"cams", "pseudo", "segment"}
    # the dvc metrics summary stays numbers only
    metrics = json.loads(paths["metrics"].read_text())
    assert "provenance" not in metrics and "inputs" not in metrics


def test_pairs_default_to_cooccurrence(paths):
    metrics = _run(paths, _params([]))
    assert list(metrics["pairs"]) == ["horse/person", "person/horse"]  # the only pair seen
    assert metrics["pairs"]["person/horse"]["segment_ms_crf"]["fp_share_on_partner"] == 1.0
    report = json.loads((paths["plots"] / "report.json").read_text())
    assert report["pairs_from"] == "cooccurrence"


def test_unknown_pair_class_fails_before_writing(paths):
    with pytest.raises(SecoError, match="unknown class 'train'.*background, boat, horse, person"):
        _run(paths, _params([("train", "background")]))
    assert not paths["plots"].exists() and not paths["metrics"].exists()


def test_missing_store_names_the_stage_to_run(paths):
    paths["pseudo"] = paths["pseudo"].with_name("nowhere.zarr")
    with pytest.raises(MissingInputError, match="seco pseudo"):
        _run(paths, _params(PAIRS))


def test_store_lacking_a_split_image_is_refused(paths):
    seg = StoreWriter(paths["segment"], "segment", {}, groups=["raw", "ms_crf"])
    for group in ("raw", "ms_crf"):
        seg.write("v1", np.zeros((2, 4), np.uint8), group=group)
    seg.finish()
    with pytest.raises(SecoError, match="1 image\\(s\\) of split 'val'.*'v2'"):
        _run(paths, _params(PAIRS))


def test_probe_without_a_model_fails_before_writing(paths):
    params = _params(PAIRS)
    progress = []  # no image is scored before the check
    with pytest.raises(MissingInputError, match="model") as err:
        _run(paths, params, progress=progress.append,
             model=paths["prepared"].parent / "no-model.pt")
    assert progress == []
    assert "evaluate.probe_images=0" in str(err.value.fix)
    assert not paths["metrics"].exists() and not paths["plots"].exists()
    params.evaluate.probe_images = 0  # off: the model is not read
    assert "probe" not in _run(paths, params, model=paths["prepared"].parent / "no-model.pt")


def test_probe_ids_spread_evenly_over_the_masked_ids(paths):
    from seco_cli.data.prepared import PreparedDataset

    data = PreparedDataset(paths["prepared"])
    assert evaluate.probe_ids(data, "train", 5) == ["t1", "t2"]  # t3 has no mask
    assert evaluate.probe_ids(data, "val", 1) == ["v1"]
