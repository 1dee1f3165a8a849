"""Parameter loading: defaults, overrides and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from seco_cli.errors import ParamsError
from seco_cli.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_default_profile():
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_validate(recipe: Path):
    p = load_params(recipe)
    assert p.model.backbone == "vit_base_patch16_224.orig_in21k_ft_in1k"
    assert p.model.crop_size == 448
    # the paper's recipes keep the SPEC's CAM schedule; the from-scratch default profile
    # selects per class by agreement with the tiles (README, "Deviations from SPEC")
    assert p.train.cam_select == "schedule"
    assert load_params(ROOT / "params.yaml").train.cam_select == "agreement"


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *sorted((ROOT / "recipes").glob("*.yaml"))],
                         ids=lambda p: p.stem)
def test_cam_select_start_is_seg_start_in_every_shipped_profile(path: Path):
    """train.cam_select_start = seg_start: both presets' statistics start from CAMs of the same
    age (README, "Start"); a profile moving seg_start must move it too."""
    p = load_params(path).train
    assert p.cam_select_start == p.seg_start > 0


def test_override_types_are_parsed():
    p = load_params(ROOT / "params.yaml", ["train.iterations=7", "train.cam_scales=[1.0, 0.5]",
                                           "model.pretrained=/tmp/w.pth", "cams.flip=false"])
    assert p.train.iterations == 7
    assert p.train.cam_scales == [1.0, 0.5]
    assert p.model.pretrained == "/tmp/w.pth"
    assert p.cams.flip is False
    assert p.cams.dtype == "uint8"  # the default; recipes inherit it
    assert load_params(ROOT / "recipes" / "voc.yaml").cams.dtype == "uint8"
    assert load_params(ROOT / "params.yaml", ["cams.dtype=float16"]).cams.dtype == "float16"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("nosuch.key=1", "unknown parameter 'nosuch'"),
        ("train.nosuch=1", "unknown parameter 'train.nosuch'"),
        ("train.iterations=abc", "'train.iterations'"),
        ("train.iterations=0", "greater than or equal to 1"),
        ("train.lr=-1", "'train.lr'"),
        ("train.cam_high=1.5", "'train.cam_high'"),
        ("train.cam_low=0.9", "train.cam_low (0.9) must be <= train.cam_high"),
        ("data.source=imagenet", "'data.source'"),
        ("data.source=voc", "data.root is required"),
        ("prepare.synthetic.contexts=[{cls: zebra, context: water}]", "unknown class 'zebra'"),
        ("train.iterations", "not of the form section.key=value"),
        ("train.reservoir_capacity=100", "must be a multiple of the keys per step"),
        ("train.patch_size=128", "larger than the crop"),
        ("train.preset=nosuch", "'train.preset'"),
        ("cams.dtype=float32", "'cams.dtype'"),
        ("train.ptc_low=0.9", "train.ptc_low (0.9) must be <= train.ptc_high"),
        ("train.cam_select=size", "'train.cam_select'"),
        ("train.cam_select_fallback=some", "'train.cam_select_fallback'"),
        ("train.cam_select_min_agreement=1.5", "'train.cam_select_min_agreement'"),
        ("train.cam_select_tile_power=0.5", "'train.cam_select_tile_power'"),
        ("train.cam_select_fallback_power=65", "'train.cam_select_fallback_power'"),
        ("train.cam_select_tile_reference=plain", "'train.cam_select_tile_reference'"),
        ("train.cam_select_hysteresis=-0.1", "'train.cam_select_hysteresis'"),
        ("train.cam_select_hold_start=-1", "'train.cam_select_hold_start'"),
        ("train.cam_select_tile_step=48", "train.cam_select_tile_step (48) must be <= train.patch_size"),
    ],
)
def test_bad_params_name_the_key(override: str, needle: str):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    line = err.value.line()
    assert needle in line
    assert "\n" not in line


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ParamsError, match="allowed keys here: .*iterations"):
        load_params(ROOT / "params.yaml", ["train.iteration=3"])


def test_bad_yaml_reports_line(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  iterations: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(f)


def test_missing_params_file_is_an_error(tmp_path: Path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
