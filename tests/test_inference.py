"""Inference at the paper's protocol (SPEC §3.2, §8): CAM fusion and flips, segmentation
variants, pseudo masks with PAR/CRF over a process pool, sharded stages, PNG export, the
background sweep and the picture grid."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seco_cli.cams import fuse_cams
from seco_cli.data.images import load_mask
from seco_cli.data.prepared import PreparedDataset, Sample, write_prepared
from seco_cli.data.transforms import resize_square, to_tensor
from seco_cli.errors import MissingInputError, SecoError
from seco_cli.inference import build_loaded, load_model, prefetch, seg_logits, seg_variants
from seco_cli.metrics import BkgSweep, best_threshold
from seco_cli.models.network import SeCoNet
from seco_cli.pictures import CAPTION, COLUMNS, GridRow, grid_size, sample_grid
from seco_cli.postprocess import MaskSettings, cam_to_mask, pseudo_mask, resize_scores
from seco_cli.shards import Shard, parse_shard, resolve_shard
from seco_cli.store import COMPLETE, StoreReader, StoreWriter, open_writer
from stages import cams as cams_stage
from stages import evaluate as evaluate_stage
from stages import pseudo as pseudo_stage
from stages import segment as segment_stage
from tests.conftest import tiny_params

CRF = {"iterations": 5, "gauss_sxy": 1.0, "gauss_compat": 1.0, "bilateral_sxy": 20.0,
       "bilateral_srgb": 10.0, "bilateral_compat": 4.0}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A prepared TINY dataset and a (randomly initialised) model checkpoint for it."""
    from stages import prepare

    root = tmp_path_factory.mktemp("inference")
    params = tiny_params()
    prepare.run(params, root / "prepared", root / "prepare.json")
    data = PreparedDataset(root / "prepared")
    torch.manual_seed(0)
    net = SeCoNet(params.model, data.num_classes)
    torch.save({"model": net.state_dict(),
                "meta": {"backbone": params.model.backbone, "num_classes": data.num_classes,
                         "params": params.dump(), "seed": 0}}, root / "model.pt")
    return {"root": root, "prepared": root / "prepared", "model": root / "model.pt"}


def _arrays(path: Path, group: str | None = None) -> dict[str, np.ndarray]:
    reader = StoreReader(path)
    return dict(reader.items(group))


def _assert_same_store(a: Path, b: Path, groups: list[str | None]) -> None:
    for group in groups:
        left, right = _arrays(a, group), _arrays(b, group)
        assert sorted(left) == sorted(right) and left
        for image_id, arr in left.items():
            np.testing.assert_array_equal(arr, right[image_id], err_msg=f"{group}/{image_id}")


# --------------------------------------------------------------------------- fusion and flips
def _ramp_net_cam(x: torch.Tensor) -> torch.Tensor:
    """A CAM that is not flip-equivariant: channel 0 of the input times w(x) = x / (W - 1)."""
    w = torch.linspace(0, 1, x.shape[-1])
    return x[:, :1] * w


def test_flip_is_undone_on_an_asymmetric_input():
    a = torch.linspace(0.5, 2.0, 8)                      # the image's channel 0 along x
    images = a.expand(1, 3, 4, 8).clone()
    w = torch.linspace(0, 1, 8)
    got = fuse_cams(_ramp_net_cam, images, [1.0], True, (4, 8))
    # cam(image) = a·w; cam(flip image) flipped back = a·flip(w); max over the pair
    expected = (a * torch.maximum(w, w.flip(0))).expand(1, 1, 4, 8)
    torch.testing.assert_close(got, expected)
    # a missing flip-back would give w·max(a, flip(a)) instead
    assert not torch.allclose(got, (w * torch.maximum(a, a.flip(0))).expand(1, 1, 4, 8))


class _RampNet(torch.nn.Module):
    """``seg_variants``' view of a network: backbone → tokens, decoder → logits."""

    def __init__(self):
        super().__init__()
        self.backbone = self
        self.stride = 1
        self.decoder = torch.nn.Identity()

    def forward(self, x):
        return _ramp_net_cam(x).repeat(1, 2, 1, 1), None, None  # (B, 2, H, W)


def test_segmentation_sums_logits_over_the_flip_pair():
    a = torch.linspace(0.5, 2.0, 8)
    images = a.expand(1, 3, 4, 8).clone()
    w = torch.linspace(0, 1, 8)
    raw, ms = seg_variants(_RampNet(), images, [1.0], True)
    torch.testing.assert_close(ms[0, 0], (a * (w + w.flip(0))).expand(4, 8))
    torch.testing.assert_close(raw[0, 0], (a * w).expand(4, 8))  # scale 1, no flip


def test_single_scale_without_flip_equals_the_plain_forward(case):
    params = tiny_params()
    net, _ = load_model(case["model"], params, 6, torch.device("cpu"))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        tokens, _, _ = net.backbone(x)
        cam = torch.nn.functional.interpolate(net.classifier.cam(tokens), size=(48, 48),
                                              mode="bilinear", align_corners=False).relu()
        torch.testing.assert_close(fuse_cams(net.cams, x, [1.0], False, (48, 48)), cam)
        seg = torch.nn.functional.interpolate(net.decoder(tokens), size=(48, 48),
                                              mode="bilinear", align_corners=False)
        raw, ms = seg_variants(net, x, [1.0], False)
    torch.testing.assert_close(raw, seg)
    torch.testing.assert_close(ms, seg)


def test_multi_scale_is_the_max_over_scales(case):
    params = tiny_params()
    net, _ = load_model(case["model"], params, 6, torch.device("cpu"))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        each = [seg_variants(net, x, [s], True)[1] for s in (1.0, 1.5)]
        _, both = seg_variants(net, x, [1.0, 1.5], True)
        # 0.75 × 48 = 36 is not a multiple of the patch size 8: rounded to 40, no error
        assert seg_variants(net, x, [0.75], False)[1].shape == (1, 7, 48, 48)
    torch.testing.assert_close(both, torch.maximum(*each))


# --------------------------------------------------------------------------- pseudo masks
def _two_region_case(seed: int = 0):
    """Left half red (class 1), right half blue (class 2); CAMs right in expectation, noisy."""
    rng = np.random.default_rng(seed)
    truth = np.ones((32, 40), np.uint8)
    truth[:, 20:] = 2
    colours = np.array([[0, 0, 0], [200, 40, 40], [40, 60, 200]], np.int16)
    image = np.clip(colours[truth] + rng.integers(-3, 4, (32, 40, 3)), 0, 255).astype(np.uint8)
    # own class 0.55 + 0.45·u, the other class u' (u, u' uniform): ~22 % of pixels flipped
    u = rng.random((2, 32, 40))
    cam = np.where(np.stack([truth == 1, truth == 2]), 0.55 + 0.45 * u, u)
    return image, truth, cam.astype(np.float32)


def test_pseudo_mask_without_refinement_is_cam_to_mask():
    image, _, cam = _two_region_case()
    got = pseudo_mask(image, cam[:, ::2, ::2], [1, 2], MaskSettings(bkg=0.1))
    np.testing.assert_array_equal(got, cam_to_mask(cam[:, ::2, ::2], [1, 2], 0.1, (32, 40)))


def test_crf_cleans_a_noisy_pseudo_mask():
    image, truth, cam = _two_region_case()
    plain = pseudo_mask(image, cam, [1, 2], MaskSettings(bkg=0.05))
    crf = pseudo_mask(image, cam, [1, 2], MaskSettings(bkg=0.05, crf=CRF))
    before, after = (plain == truth).mean(), (crf == truth).mean()
    assert before < 0.85 and after > 0.97


def test_par_then_crf_keeps_labels_of_the_image():
    image, truth, cam = _two_region_case(1)
    s = MaskSettings(bkg=0.05, par_iterations=3, par_dilations=(1, 2), crf=CRF)
    mask = pseudo_mask(image, cam, [4, 6], s)
    assert set(np.unique(mask)) <= {0, 4, 6}
    assert ((mask == 4) == (truth == 1)).mean() > 0.95


# --------------------------------------------------------------------------- the stages
def _run_cams(case, out: Path, shard: Shard = Shard(), *extra: str) -> dict:
    return cams_stage.run(tiny_params(*extra), case["prepared"], case["model"], out, shard)


def test_cams_stage_stores_own_classes_and_aux(case):
    out = case["root"] / "cams_aux.zarr"
    _run_cams(case, out, Shard(), "cams.aux=true", "cams.store_size=24")
    store = StoreReader(out, "cams")
    data = PreparedDataset(case["prepared"])
    assert store.groups == ["aux"] and store.ids() == store.ids("aux") == sorted(data.ids("train"))
    for image_id in store.ids()[:4]:
        final, attrs = store.read_with_attrs(image_id)
        aux, aux_attrs = store.read_with_attrs(image_id, "aux")
        assert attrs["labels"] == aux_attrs["labels"] == data.labels(image_id)
        assert final.dtype == aux.dtype == np.float32  # uint8 levels (cams.dtype) read as q/255
        assert np.array_equal(final * 255, np.rint(final * 255))
        assert final.shape == aux.shape == (len(attrs["labels"]), 24, 24)
        assert not np.array_equal(final, aux) or final.size == 0


def test_cams_source_picks_the_seed_cam(case):
    """cams.source: aux stores the auxiliary CAM as seeds; auto follows the CAM training's online
    labels came from at its end (aux when train.cam2mask >= train.iterations)."""
    from seco_cli.params import seed_cam_source

    assert seed_cam_source(tiny_params("train.cam2mask=4")) == "final"  # 6 iterations
    assert seed_cam_source(tiny_params("train.cam2mask=6")) == "aux"
    assert seed_cam_source(tiny_params("train.cam2mask=6", "cams.source=final")) == "final"
    assert seed_cam_source(tiny_params("train.cam2mask=0", "cams.source=aux")) == "aux"
    # auto follows the train params the checkpoint recorded, not the current ones
    assert seed_cam_source(tiny_params("train.cam2mask=4"),
                           {"params": {"train": {"cam2mask": 6, "iterations": 6}}}) == "aux"
    assert seed_cam_source(tiny_params("train.cam2mask=6"),
                           {"params": {"train": {"cam2mask": 4, "iterations": 6}}}) == "final"
    assert seed_cam_source(tiny_params("train.cam2mask=6", "cams.source=aux"),
                           {"params": {"train": {"cam2mask": 4, "iterations": 6}}}) == "aux"
    root = case["root"]
    for source, expect_equal in (("aux", True), ("final", False)):
        out = root / f"src_{source}.zarr"
        _run_cams(case, out, Shard(), "cams.aux=true", f"cams.source={source}",
                  "cams.store_size=24")
        store = StoreReader(out, "cams")
        assert store.attrs["source"] == source
        compared = 0
        for image_id in store.ids()[:6]:
            seeds, aux = store.read(image_id), store.read(image_id, "aux")
            if seeds.size:
                assert np.array_equal(seeds, aux) == expect_equal
                compared += 1
        assert compared > 0
    # the auxiliary seeds (backbone run only up to aux_layer) equal the auxiliary CAMs of
    # the full pass that also made the final seeds
    early, full = StoreReader(root / "src_aux.zarr", "cams"), StoreReader(root / "src_final.zarr",
                                                                          "cams")
    assert early.ids() == full.ids("aux")
    for image_id in early.ids():
        assert np.array_equal(early.read(image_id), full.read(image_id, "aux"))
    # auto: the model was trained with cam2mask 4 of 6 iterations, so it ended on the final
    # CAM; the current params claiming cam2mask 6 do not change that
    auto = root / "src_auto.zarr"
    _run_cams(case, auto, Shard(), "train.cam2mask=6", "cams.store_size=24")
    auto_store = StoreReader(auto, "cams")
    final_store = StoreReader(root / "src_final.zarr", "cams")
    assert auto_store.attrs["source"] == "final"
    for image_id in auto_store.ids()[:6]:
        assert np.array_equal(auto_store.read(image_id), final_store.read(image_id))


def test_uint8_cams_give_the_pseudo_masks_of_float16(case):
    root = case["root"]
    data = PreparedDataset(case["prepared"])
    for dtype in ("float16", "uint8"):
        _run_cams(case, root / f"cams_{dtype}.zarr", Shard(), f"cams.dtype={dtype}")
    half, eight = (StoreReader(root / f"cams_{d}.zarr", "cams") for d in ("float16", "uint8"))
    assert half.ids() == eight.ids()
    differ = total = 0
    for image_id in half.ids():
        a, attrs = half.read_with_attrs(image_id)
        b, _ = eight.read_with_attrs(image_id)
        assert a.dtype == np.float16 and b.dtype == np.float32
        assert a.shape == b.shape
        assert np.abs(a.astype(np.float32) - b).max(initial=0) <= 1 / 510 + 1 / 2048
        size = data.image_size(image_id)
        ma = cam_to_mask(a, attrs["labels"], 0.45, size)
        mb = cam_to_mask(b, attrs["labels"], 0.45, size)
        differ, total = differ + int((ma != mb).sum()), total + ma.size
    assert differ / total < 0.005
    assert _store_bytes(root / "cams_uint8.zarr") < _store_bytes(root / "cams_float16.zarr")


def _store_bytes(path: Path) -> int:
    stored, images = StoreReader(path).stored_bytes()
    assert images > 0
    return stored


def test_two_shards_equal_one_process_cams_pseudo_segment(case):
    root = case["root"]
    one = {"cams": root / "c1.zarr", "pseudo": root / "p1.zarr", "segment": root / "s1.zarr"}
    two = {"cams": root / "c2.zarr", "pseudo": root / "p2.zarr", "segment": root / "s2.zarr"}
    sets = ("pseudo.workers=1", "segment.workers=1", "cams.scales=[1.0, 0.5]")
    params = tiny_params(*sets)
    _run_cams(case, one["cams"], Shard(), *sets)
    pseudo_stage.run(params, case["prepared"], one["cams"], one["pseudo"], root / "png1p")
    segment_stage.run(params, case["prepared"], case["model"], one["segment"], root / "png1s")
    for i in range(2):
        r = _run_cams(case, two["cams"], Shard(i, 2), *sets)
        assert r["complete"] == (i == 1)
    for i in range(2):
        r = pseudo_stage.run(params, case["prepared"], one["cams"], two["pseudo"], root / "png2p",
                             Shard(i, 2))
        assert r["complete"] == (i == 1) and r["images"] == 12
    for i in range(2):
        segment_stage.run(params, case["prepared"], case["model"], two["segment"],
                          root / "png2s", Shard(i, 2))
    _assert_same_store(one["cams"], two["cams"], [None])
    _assert_same_store(one["pseudo"], two["pseudo"], [None])
    _assert_same_store(one["segment"], two["segment"], ["raw", "ms_crf"])
    assert sorted(p.name for p in (root / "png2s").glob("*.png")) == \
        sorted(p.name for p in (root / "png1s").glob("*.png"))


def test_incomplete_shard_set_has_no_marker_and_is_refused(case):
    out = case["root"] / "half.zarr"
    for i in (0, 2):  # shard 1 of 3 never ran
        assert _run_cams(case, out, Shard(i, 3))["complete"] is False
    assert not (out / COMPLETE).exists()
    with pytest.raises(MissingInputError, match="shard\\(s\\) 1/3 not done.*seco cams"):
        pseudo_stage.run(tiny_params(), case["prepared"], out, case["root"] / "never.zarr",
                         case["root"] / "never_png")
    assert not (case["root"] / "never.zarr").exists()


def test_pool_of_two_workers_gives_the_masks_of_one(case):
    root = case["root"]
    cams = root / "pool_cams.zarr"
    _run_cams(case, cams)
    sets = ("pseudo.par_iterations=2", "pseudo.crf.iterations=3")
    pseudo_stage.run(tiny_params(*sets, "pseudo.workers=1"), case["prepared"], cams,
                     root / "w1.zarr", root / "w1png")
    r = pseudo_stage.run(tiny_params(*sets, "pseudo.workers=2"), case["prepared"], cams,
                         root / "w2.zarr", root / "w2png")
    assert r["workers"] == 2
    _assert_same_store(root / "w1.zarr", root / "w2.zarr", [None])


def test_pseudo_palette_pngs_round_trip(case):
    root = case["root"]
    cams = root / "png_cams.zarr"
    _run_cams(case, cams)
    params = tiny_params("pseudo.palette_png=true", "pseudo.workers=1")
    r = pseudo_stage.run(params, case["prepared"], cams, root / "pp.zarr", root / "pp_png")
    masks = _arrays(root / "pp.zarr")
    assert r["pngs"] == len(masks) == 24
    assert (root / "pp_png" / ".seco-output").is_file()
    for image_id, mask in masks.items():
        png = root / "pp_png" / f"{image_id}.png"
        assert Image.open(png).mode == "P"
        np.testing.assert_array_equal(load_mask(png), mask)


def test_segment_pngs_for_a_split_without_masks(case, tmp_path):
    data = PreparedDataset(case["prepared"])
    ids = data.ids("val")[:3]
    samples = [Sample(i, data.image(i), None, data.labels(i)) for i in ids]
    write_prepared(tmp_path / "prep", source="synthetic", classes=data.classes,
                   splits={"train": ids, "test": ids}, samples=samples, provenance={})
    params = tiny_params("segment.split=test", "segment.workers=1")
    r = segment_stage.run(params, tmp_path / "prep", case["model"], tmp_path / "s.zarr",
                          tmp_path / "png")
    assert r["images"] == 3 and r["pngs"] == 3
    store = StoreReader(tmp_path / "s.zarr", "segment")
    for i in ids:
        np.testing.assert_array_equal(load_mask(tmp_path / "png" / f"{i}.png"),
                                      store.read(i, "ms_crf"))
        assert store.read(i, "raw").shape == data.image_size(i)


# --------------------------------------------------------------------------- shards
def test_shard_parsing_and_torchrun_env():
    assert parse_shard("1/3") == Shard(1, 3)
    assert Shard(1, 3).take(list(range(8))) == [1, 4, 7]
    assert resolve_shard(None, {}) == Shard()
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    assert resolve_shard(None, env) == Shard(2, 4, 0)
    assert resolve_shard("0/2", {"RANK": "2", "WORLD_SIZE": "4"}) == Shard(0, 2)
    for bad in ("2/2", "a/b", "1", "0/0"):
        with pytest.raises(SecoError, match="--shard"):
            parse_shard(bad)


def test_shards_fill_one_store_and_only_the_last_completes(tmp_path: Path):
    path = tmp_path / "s.zarr"
    w0 = open_writer(path, "cams", {"x": 1}, shard=0, num_shards=2)
    w0.write("a", np.zeros((1, 2, 2)))
    assert w0.finish() is False and not (path / COMPLETE).exists()
    with pytest.raises(MissingInputError, match="incomplete: shard\\(s\\) 1/2 not done"):
        StoreReader(path, "cams")
    w1 = open_writer(path, "cams", {"x": 1}, shard=1, num_shards=2, wait_s=0)
    w1.write("b", np.ones((1, 2, 2)))
    assert w1.finish() is True
    assert StoreReader(path, "cams").ids() == ["a", "b"]
    # re-running shard 0 of the same run joins the store (shard 1's images stay) ...
    w0 = open_writer(path, "cams", {"x": 1}, shard=0, num_shards=2)
    assert not (path / COMPLETE).exists()
    w0.write("a", np.ones((1, 2, 2)))
    assert w0.finish() is True
    assert StoreReader(path).ids() == ["a", "b"]
    # ... a different run starts afresh, and its shard 1 does not join the old store
    open_writer(path, "cams", {"x": 2}, shard=0, num_shards=2).finish()
    assert not (path / COMPLETE).exists()
    with pytest.raises(MissingInputError, match="1/2 not done"):
        StoreReader(path)
    with pytest.raises(SecoError, match="found no store of its run"):
        open_writer(path, "cams", {"x": 3}, shard=1, num_shards=2, wait_s=0)


def test_groups_are_declared_and_kept_apart(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "segment", {}, groups=["raw", "ms_crf"])
    w.write("a", np.zeros((2, 2), np.uint8), group="raw")
    w.write("a", np.ones((2, 2), np.uint8), group="ms_crf")
    with pytest.raises(ValueError, match="no group 'other'"):
        w.write("a", np.ones((2, 2), np.uint8), group="other")
    w.finish()
    r = StoreReader(tmp_path / "s.zarr")
    assert r.ids() == [] and r.ids("raw") == r.ids("ms_crf") == ["a"]
    assert r.read("a", "ms_crf").sum() == 4 and r.has("a", "raw") and "raw" not in r
    with pytest.raises(MissingInputError, match="no group 'aux'"):
        r.ids("aux")


# --------------------------------------------------------------------------- evaluate
def test_sweep_finds_the_known_best_threshold():
    # one image, one class: ground truth is the right half (columns 10..19); the CAM rises
    # 0.05 per column from 0.025, crossing 0.5 exactly between columns 9 and 10: a threshold
    # below takes too much, above too little, 0.5 is exact.
    gt = np.zeros((4, 20), np.uint8)
    gt[:, 10:] = 1
    cam = np.tile(np.arange(20) * 0.05 + 0.025, (4, 1))[None].astype(np.float32)  # (1, 4, 20)
    sweep = BkgSweep(2, [0.2, 0.3, 0.5, 0.6, 0.7])
    sweep.update(gt, cam, [1])
    curve = sweep.curve(["background", "boat"])
    best = best_threshold(curve)
    assert best["bkg"] == 0.5 and best["miou"] == pytest.approx(1.0)
    # at 0.2: columns 4..19 are boat → background IoU 4/10, boat IoU 10/16
    assert curve[0]["miou"] == pytest.approx((4 / 10 + 10 / 16) / 2)


def test_grid_has_rows_of_five_panels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 5:25] = 2
    rows = [GridRow("a", image, mask, rng.random((1, 8, 10)), [2], mask, mask),
            GridRow("b", image, mask, None, (), None, mask),
            GridRow("c", image)]
    grid = sample_grid(rows, ["background", "boat", "horse"], 64)
    assert len(COLUMNS) == 5
    assert grid.size == grid_size(3, 64) == (5 * 64, CAPTION + 3 * (64 + CAPTION))
    # the ground-truth panel of row 0 shows class 2's palette colour (VOC: (0, 128, 0))
    px = np.asarray(grid)[CAPTION + 32, 64 + 32]
    assert tuple(px) == (0, 128, 0)


def test_evaluate_reports_variants_aux_and_writes_the_grid(case):
    root = case["root"]
    sets = ("cams.aux=true", "pseudo.workers=1", "segment.workers=1", "evaluate.grid_images=2",
            "evaluate.grid_panel=32")
    params = tiny_params(*sets)
    _run_cams(case, root / "e_cams.zarr", Shard(), *sets)
    pseudo_stage.run(params, case["prepared"], root / "e_cams.zarr", root / "e_p.zarr", root / "e1")
    segment_stage.run(params, case["prepared"], case["model"], root / "e_s.zarr", root / "e2")
    metrics = evaluate_stage.run(params, case["prepared"], root / "e_cams.zarr",
                                 root / "e_p.zarr", root / "e_s.zarr", root / "m.json",
                                 root / "plots")
    assert list(metrics) == ["cams", "cams_aux", "pseudo", "segment_raw", "segment_ms_crf",
                             "pairs"]
    assert metrics["cams_aux"]["best_bkg"] in params.evaluate.bkg_sweep
    assert json.loads((root / "m.json").read_text()) == metrics
    grid = Image.open(root / "plots" / "samples.png")
    assert grid.size == (5 * 32, CAPTION + 4 * (32 + CAPTION))  # 2 train + 2 val ids
    assert (root / "plots" / "cam_aux_bkg_sweep.csv").is_file()


def test_cams_source_select_takes_each_class_from_the_head_the_model_recorded(case, tmp_path):
    """A model trained with train.cam_select: area records a head per class; cams.source auto
    then stores per class that head's CAM (both from one pass), and says so in the store."""
    from seco_cli.params import seed_cam_source

    ckpt = torch.load(case["model"], weights_only=True)
    n = ckpt["meta"]["num_classes"]
    heads = ["aux" if c % 2 else "final" for c in range(n)]
    model = tmp_path / "select.pt"
    torch.save({**ckpt, "meta": {**ckpt["meta"], "cam_heads": heads}}, model)
    assert seed_cam_source(tiny_params(), {"cam_heads": heads}) == "select"
    assert seed_cam_source(tiny_params("cams.source=final"), {"cam_heads": heads}) == "final"

    def run(out: Path, *extra: str) -> StoreReader:
        cams_stage.run(tiny_params("cams.store_size=24", *extra), case["prepared"], model, out)
        return StoreReader(out, "cams")

    select = run(tmp_path / "select.zarr", "cams.aux=true")
    final = run(tmp_path / "final.zarr", "cams.source=final", "cams.aux=true")
    assert select.attrs["source"] == "select" and select.attrs["cam_heads"] == heads
    taken = {"aux": 0, "final": 0}
    for image_id in select.ids():
        seeds, attrs = select.read_with_attrs(image_id)
        for k, c in enumerate(attrs["labels"]):
            head = heads[c - 1]
            want = final.read(image_id, "aux" if head == "aux" else None)[k]
            assert np.array_equal(seeds[k], want), (image_id, c, head)
            taken[head] += 1
        assert np.array_equal(select.read(image_id, "aux"), final.read(image_id, "aux"))
    assert taken["aux"] > 0 and taken["final"] > 0
    # a head list that does not fit the dataset: one error, no store
    torch.save({**ckpt, "meta": {**ckpt["meta"], "cam_heads": heads[:-1]}}, model)
    with pytest.raises(SecoError, match="records .* CAM heads"):
        run(tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize("power", [None, 2.0])
def test_cams_source_select_takes_a_tiles_class_from_the_tile_logit_map(case, tmp_path,
                                                                        monkeypatch, power):
    """A model trained with train.cam_select: agreement may record `tiles` for a class no head
    agrees on: its seeds are the final head's tile-min map, cut with the tiling the model
    recorded and sharpened by the power it recorded (none recorded: 1, the map as it was);
    the other classes keep their heads' CAMs."""
    import stages.cams as stage_mod
    from seco_cli.tiles import TileLogits, classify_tiles

    ckpt = torch.load(case["model"], weights_only=True)
    n = ckpt["meta"]["num_classes"]
    heads = ["tiles" if c % 2 else "final" for c in range(n)]
    model = tmp_path / "tiles.pt"
    tiling = {"size": 16, "step": 8, **({} if power is None else {"power": power})}
    torch.save({**ckpt, "meta": {**ckpt["meta"], "cam_heads": heads, "cam_tiles": tiling}}, model)
    calls = []

    class Ramp:  # the real tile logits, then a known map in place of their spread
        fallback = TileLogits.fallback  # the real sharpening, of the ramp below

        def __init__(self, real):
            self.real = real

        def map(self, head, reduce):
            assert (head, reduce) == ("final", "min")
            found = self.real.map(head, reduce)
            assert found.shape == (self.real.logits[head].shape[0], n, *self.real.size)
            ramp = torch.linspace(0, 1, self.real.size[-1], device=found.device)
            return ramp.expand_as(found).clone()

    def ramp_tiles(net, images, size, step):
        calls.append((size, step))
        return Ramp(classify_tiles(net, images, size, step))

    monkeypatch.setattr(stage_mod, "classify_tiles", ramp_tiles)

    def run(out: Path, m: Path, *extra: str) -> StoreReader:
        cams_stage.run(tiny_params("cams.store_size=24", *extra), case["prepared"], m, out)
        return StoreReader(out, "cams")

    select = run(tmp_path / "select.zarr", model)
    final = run(tmp_path / "final.zarr", model, "cams.source=final")
    assert calls and set(calls) == {(16, 8)}
    assert select.attrs["cam_heads"] == heads
    assert select.attrs["cam_tiles"] == {"power": 1.0, **tiling}
    taken = {"final": 0, "tiles": 0}
    for image_id in select.ids():
        seeds, attrs = select.read_with_attrs(image_id)
        for k, c in enumerate(attrs["labels"]):
            if heads[c - 1] == "final":
                assert np.array_equal(seeds[k], final.read(image_id)[k])
            else:  # the ramp, normalised and resized: rising left to right, 0 to 1
                row = seeds[k].astype(np.float64).mean(0)
                assert np.all(np.diff(row) >= -1e-6) and row[0] < 0.1 and row[-1] > 0.9
                # its middle: 0.5 raised to the recorded power
                assert abs(row[len(row) // 2] - 0.5 ** (power or 1.0)) < 0.06
                assert np.allclose(seeds[k], seeds[k][:1], atol=1 / 255)  # every row alike
            taken[heads[c - 1]] += 1
    assert taken["final"] > 0 and taken["tiles"] > 0


def _prefetch_threads() -> int:
    return sum(t.name == "seco-prefetch" for t in threading.enumerate())


def test_prefetch_keeps_order_and_reads_ahead():
    made: list[int] = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    for _ in range(100):  # the thread fills both slots while the consumer holds item 0
        if len(made) >= 3:
            break
        time.sleep(0.01)
    assert made[:3] == [0, 1, 2]
    assert len(made) <= 4  # item 0 taken, at most `depth` waiting, one being put
    assert [0, *stream] == list(range(6))
    assert _prefetch_threads() == 0


def test_prefetch_raises_the_producer_error_at_its_place():
    def items():
        yield "a"
        yield "b"
        raise OSError("unreadable image x.png")

    got = []
    with pytest.raises(OSError, match="unreadable image x.png"):
        for item in prefetch(items()):
            got.append(item)
    assert got == ["a", "b"]
    assert _prefetch_threads() == 0


def test_prefetch_stopped_early_ends_its_thread():
    stream = prefetch(iter(range(1000)), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer stops (break, error): the producer must not hang on a full queue
    assert _prefetch_threads() == 0


def test_network_is_built_on_meta_and_takes_the_checkpoint_tensors(tmp_path: Path):
    mp = tiny_params().model
    torch.manual_seed(3)
    trained = SeCoNet(mp, 6).eval()
    state = trained.state_dict()
    net = build_loaded(mp, 6, state, tmp_path / "m.pt").eval()
    assert not any(t.is_meta for t in (*net.parameters(), *net.buffers()))
    for name, value in net.state_dict().items():  # the checkpoint's own tensors, not copies
        assert value.data_ptr() == state[name].data_ptr(), name
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(net.cams(x), trained.cams(x), rtol=0, atol=0)


def test_network_with_a_buffer_the_checkpoint_lacks_is_built_the_plain_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from seco_cli import inference

    class WithTable(SeCoNet):  # a non-persistent buffer: not in any state dict
        def __init__(self, *args):
            super().__init__(*args)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    mp = tiny_params().model
    state = WithTable(mp, 6).state_dict()
    monkeypatch.setattr(inference, "SeCoNet", WithTable)
    net = build_loaded(mp, 6, state, tmp_path / "m.pt")
    assert not net.table.is_meta and torch.equal(net.table, torch.arange(4.0))
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_segment_crf_over_present_labels(case):
    """`segment.crf_labels: present`: ms_crf keeps to the labels that win a pixel of the
    multi-scale logits before the CRF; raw is untouched; the store records the choice."""
    root = case["root"]
    out = {}
    for mode in ("all", "present"):
        params = tiny_params("segment.workers=1", f"segment.crf_labels={mode}")
        segment_stage.run(params, case["prepared"], case["model"], root / f"cl_{mode}.zarr",
                          root / f"cl_{mode}_png")
        out[mode] = StoreReader(root / f"cl_{mode}.zarr", "segment")
        assert out[mode].attrs["variants"]["ms_crf"]["crf_labels"] == mode
    ids = out["all"].ids("ms_crf")
    assert ids == out["present"].ids("ms_crf")
    data = PreparedDataset(case["prepared"])
    params = tiny_params()
    net, _ = load_model(case["model"], params, data.num_classes, torch.device("cpu"))
    same = total = 0
    for image_id in ids:
        assert np.array_equal(out["all"].read(image_id, "raw"), out["present"].read(image_id, "raw"))
        image = data.image(image_id)
        x = resize_square(to_tensor(image, params.data.mean, params.data.std),
                          params.model.crop_size)[None]
        with torch.no_grad():
            logits = seg_logits(net, x, params.segment.scales, params.segment.flip)[0].numpy()
        won = set(np.unique(resize_scores(logits, image.shape[:2]).argmax(0)).tolist())
        labels = out["present"].read(image_id, "ms_crf")
        assert set(np.unique(labels).tolist()) <= won
        a = out["all"].read(image_id, "ms_crf")
        same, total = same + int((a == labels).sum()), total + a.size
    assert same / total > 0.9  # the labels that won nowhere seldom win after the CRF
