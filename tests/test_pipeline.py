"""One end-to-end run of the six stages on the tiny profile, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from seco_cli.cli import app
from seco_cli.data.prepared import PreparedDataset
from seco_cli.store import StoreReader
from tests.conftest import ROOT, TINY

runner = CliRunner()


def _invoke(*args: str) -> None:
    sets = [x for item in TINY for x in ("--set", item)]
    result = runner.invoke(app, [*args, "--params", str(ROOT / "params.yaml"), *sets])
    assert result.exit_code == 0, result.output


def _pipeline(a: Path) -> dict:
    """The six stages into ``a``; returns evaluate.json."""
    _invoke("prepare", "--out", str(a / "prepared"), "--metrics", str(a / "m/prepare.json"))
    _invoke("train", "--prepared", str(a / "prepared"), "--model", str(a / "train/model.pt"),
            "--live", str(a / "train/live"), "--checkpoints", str(a / "ckpt"))
    _invoke("cams", "--prepared", str(a / "prepared"), "--model", str(a / "train/model.pt"),
            "--out", str(a / "cams.zarr"))
    _invoke("pseudo", "--prepared", str(a / "prepared"), "--cams", str(a / "cams.zarr"),
            "--out", str(a / "pseudo.zarr"), "--png-dir", str(a / "pseudo_png"))
    _invoke("segment", "--prepared", str(a / "prepared"), "--model", str(a / "train/model.pt"),
            "--out", str(a / "segment.zarr"), "--png-dir", str(a / "png"))
    _invoke("evaluate", "--prepared", str(a / "prepared"), "--cams", str(a / "cams.zarr"),
            "--pseudo", str(a / "pseudo.zarr"), "--segment", str(a / "segment.zarr"),
            "--model", str(a / "train/model.pt"), "--metrics", str(a / "m/evaluate.json"),
            "--plots", str(a / "plots"))
    return json.loads((a / "m/evaluate.json").read_text())


def test_same_seed_twice_gives_identical_metrics_and_weights(tmp_path: Path):
    """Determinism on CPU (same seed, same thread count): every metric and weight is equal."""
    first, second = _pipeline(tmp_path / "one"), _pipeline(tmp_path / "two")
    assert first == second
    a = torch.load(tmp_path / "one/train/model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two/train/model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_six_stages_end_to_end(tmp_path: Path):
    a = tmp_path / "artifacts"
    _pipeline(a)

    data = PreparedDataset(a / "prepared")
    assert len(data.ids("train")) == 24 and len(data.ids("val")) == 8
    # CAMs: one array per train image (uint8 levels, read as float32), only its own classes
    cams = StoreReader(a / "cams.zarr", "cams")
    assert cams.ids() == sorted(data.ids("train"))
    for image_id in cams.ids()[:5]:
        cam, attrs = cams.read_with_attrs(image_id)
        assert attrs["labels"] == data.labels(image_id)
        assert cam.dtype == np.float32 and cam.shape[0] == len(attrs["labels"])
        assert cam.shape[1:] == data.image_size(image_id)
    # every artifact records what made it
    for store in (cams, StoreReader(a / "pseudo.zarr"), StoreReader(a / "segment.zarr")):
        prov = store.attrs["provenance"]
        assert prov["params"]["train"]["iterations"] == 6
        assert prov["seed"] == 0 and prov["git_revision"] and prov["seco_version"]
    seg = StoreReader(a / "segment.zarr", "segment")
    assert seg.ids() == [] and seg.groups == ["raw", "ms_crf"]
    assert seg.ids("raw") == seg.ids("ms_crf") == sorted(data.ids("val"))
    assert len(list((a / "png").glob("*.png"))) == 8
    assert (a / "plots/samples.png").is_file()
    ckpt = torch.load(a / "train/model.pt", weights_only=True)
    assert ckpt["meta"]["params"]["train"]["iterations"] == 6
    metrics = json.loads((a / "m/evaluate.json").read_text())
    for name in ("cams", "pseudo", "segment_raw", "segment_ms_crf"):
        assert 0.0 <= metrics[name]["miou"] <= 1.0
    # the isolated-patch probe: every train image (fewer than probe_images), each pair
    probe = metrics["probe"]
    assert probe["images"] == 24 and probe["patch"] == ckpt["meta"]["params"]["train"][
        "patch_size"]
    assert set(probe["pairs"]) == set(metrics["pairs"])
    for pair in probe["pairs"].values():
        assert pair["object_tiles"] > 0
        for head in ("final", "aux"):
            assert pair[head]["object_fire"] is not None and 0 <= pair[head]["object_fire"] <= 1
            assert pair[head]["auc"] is None or 0 <= pair[head]["auc"] <= 1
    rows = (a / "train/prototype_similarity.csv").read_text().splitlines()
    assert rows[0] == "a,b,similarity" and len(rows) == 1 + 6 * 6
    assert rows[1].startswith("boat,boat,1.0") or rows[1].startswith("boat,boat,0.99")
    live = json.loads((a / "train/live/metrics.json").read_text())
    assert live["step"] == 6 and np.isfinite(live["loss"]["total"])
    # train.cam_select (agreement by default): the trainer's record per class, as the model's
    meta, names = ckpt["meta"], data.classes[1:]
    assert [live["cam_since"][n] for n in names] == meta["cam_heads_since"]
    assert [live["cam_switches"][n] for n in names] == meta["cam_heads_switches"]
    assert [live["cam_tiles"][n] for n in names] == [int(s == "tiles") for s in meta["cam_heads"]]
    # the object pairs' prototype similarities (the quality benchmark's evidence) = the CSV's
    csv = {tuple(r.split(",")[:2]): float(r.split(",")[2]) for r in rows[1:]}
    assert live["proto"]["horse~person"] == pytest.approx(csv["horse", "person"], abs=1e-6)
    assert "boat~background" not in live["proto"]
    off = [v for (x, y), v in csv.items() if x != y]
    assert live["proto"]["mean_off_diagonal"] == pytest.approx(sum(off) / len(off), abs=1e-5)
