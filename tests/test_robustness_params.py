"""Robustness of parameter loading through the CLI (issue 6): every bad value is refused
before any work, in one line naming the key, the file and the fix, with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from seco_cli.cli import app
from tests.conftest import ROOT

runner = CliRunner()


def _prepare(tmp_path: Path, params: Path, *sets: str):
    argv = ["prepare", "--params", str(params), "--out", str(tmp_path / "prepared"),
            "--metrics", str(tmp_path / "prepare.json")]
    for s in sets:
        argv += ["--set", s]
    return runner.invoke(app, argv)


def _one_line(result, tmp_path: Path, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()
    return lines[0]


BAD = {
    # unknown keys (a section, a key, a nested key)
    "unknown_section": ("nosuch.key=1", "unknown parameter 'nosuch'"),
    "unknown_key": ("train.iteration=3", "unknown parameter 'train.iteration'"),
    "unknown_nested": ("prepare.synthetic.size=3", "unknown parameter 'prepare.synthetic.size'"),
    # wrong types
    "type_int": ("train.iterations=abc", "invalid 'train.iterations' = 'abc'"),
    "type_float": ("train.lr=fast", "invalid 'train.lr' = 'fast'"),
    "type_list": ("model.crop_size=[1, 2]", "invalid 'model.crop_size'"),
    "type_section": ("train=3", "invalid 'train' = 3"),
    "type_tuple_len": ("train.betas=[0.9]", "invalid 'train.betas.1' = [0.9]: Field required"),
    "choice": ("data.on_bad_image=ignore", "Input should be 'stop' or 'skip'"),
    # negative or zero rates
    "lr_zero": ("train.lr=0", "invalid 'train.lr' = 0: Input should be greater than 0"),
    "lr_negative": ("train.lr=-0.001", "invalid 'train.lr' = -0.001"),
    "head_lr_zero": ("train.head_lr_mult=0", "'train.head_lr_mult'"),
    "weight_decay_negative": ("train.weight_decay=-0.01", "'train.weight_decay'"),
    "warmup_ratio_zero": ("train.warmup_ratio=0", "'train.warmup_ratio'"),
    "teacher_momentum_zero": ("train.teacher_momentum=0", "'train.teacher_momentum' = 0"),
    "teacher_momentum_one": ("train.teacher_momentum=1", "less than 1"),
    "proto_momentum_negative": ("train.proto_momentum=-0.1", "'train.proto_momentum'"),
    "betas_one": ("train.betas=[0.9, 1.0]", "invalid 'train.betas.1' = 1.0: Input should be less than 1"),
    "tau_zero": ("train.tau_g=0", "'train.tau_g'"),
    "tau_negative": ("train.tau_l=-0.08", "'train.tau_l'"),
    "std_zero": ("data.std=[0.2, 0, 0.2]", "data.std values must be > 0"),
    "batch_zero": ("train.batch_size=0", "'train.batch_size'"),
    "iterations_negative": ("train.iterations=-5", "'train.iterations'"),
    # thresholds outside [0, 1]
    "cam_high": ("train.cam_high=1.5", "'train.cam_high' = 1.5"),
    "cam_low": ("train.cam_low=-0.1", "'train.cam_low'"),
    "pseudo_bkg": ("pseudo.bkg=2", "'pseudo.bkg' = 2"),
    "cam_bkg": ("evaluate.cam_bkg=-1", "'evaluate.cam_bkg'"),
    "bkg_sweep": ("evaluate.bkg_sweep=[0.3, 1.5]", "'evaluate.bkg_sweep.1' = 1.5"),
    "tag_threshold": ("train.tag_threshold=1.01", "'train.tag_threshold'"),
    "rectify_proportion": ("train.rectify_proportion=-0.5", "'train.rectify_proportion'"),
    "ptc_high": ("train.ptc_high=7", "'train.ptc_high'"),
    "probability": ("train.key_p_blur=1.5", "'train.key_p_blur'"),
    "val_fraction": ("prepare.val_fraction=1", "'prepare.val_fraction'"),
    # low above high
    "cam_low_gt_high": ("train.cam_low=0.8", "train.cam_low (0.8) must be <= train.cam_high (0.7)"),
    "ptc_low_gt_high": ("train.ptc_low=0.9", "train.ptc_low (0.9) must be <= train.ptc_high (0.7)"),
    "scale_range": ("train.scale_range=[2.0, 0.5]", "train.scale_range must satisfy 0 < low <= high"),
    "global_scale": ("train.global_scale=[0.8, 0.4]", "train.global_scale must satisfy"),
    "object_size": ("prepare.synthetic.object_size=[0.5, 0.2]", "object_size must satisfy"),
    # structure
    "reservoir": ("train.reservoir_capacity=1000",
                  "train.reservoir_capacity (1000) must be a multiple of the keys per step, "
                  "batch_size × (num_patches + 2) = 96"),
    "patch_gt_crop": ("train.patch_size=128", "train.patch_size (128) is larger than the crop, "
                      "model.crop_size (96)"),
    "scales_empty": ("cams.scales=[]", "cams.scales must be a non-empty list of positive scales"),
    "scales_negative": ("segment.scales=[1.0, -0.5]", "segment.scales must be a non-empty list"),
    "cam_scales_zero": ("train.cam_scales=[0]", "train.cam_scales must be a non-empty list"),
    "splits_empty": ("prepare.voc_splits=[]", "'prepare.voc_splits' = []"),
    "dilation_zero": ("model.seg_dilations=[0, 2]", "'model.seg_dilations.0' = 0"),
    "pseudo_par_dilation_zero": ("pseudo.par_dilations=[1, 0]", "'pseudo.par_dilations.1' = 0"),
    "hue": ("train.key_jitter=[0.4, 0.4, 0.2, 0.9]", "train.key_jitter hue (0.9) must be <= 0.5"),
    "root_missing": ("data.source=folder", "data.root is required when data.source is 'folder'"),
    "class_unknown": ("prepare.synthetic.objects=[{a: horse, b: zebra}]", "bad pair 'horse'/'zebra'"),
    # the override itself
    "no_equals": ("train.iterations", "override 'train.iterations' is not of the form section.key=value"),
    "not_a_section": ("train.lr.x=1", "cannot set 'train.lr.x': 'train.lr' is not a section"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_override_is_one_line_naming_the_key(tmp_path: Path, case: str):
    override, needle = BAD[case]
    line = _one_line(_prepare(tmp_path, ROOT / "params.yaml", override), tmp_path, needle)
    assert "--set" in line  # where: the override, not the file alone


def test_bad_value_in_the_params_file_names_the_file(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lr: -1\n")
    _one_line(_prepare(tmp_path, f), tmp_path, "invalid 'train.lr' = -1", f"at {f};", "correct the value")


def test_unknown_key_in_the_params_file_lists_the_allowed_keys(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("data:\n  sorce: voc\n")
    _one_line(_prepare(tmp_path, f), tmp_path, "unknown parameter 'data.sorce'", "allowed keys here:",
              "source")


@pytest.mark.parametrize(("text", "needle"), [
    ("train:\n  iterations: [1,\n", "params file is not valid YAML"),
    ("- just\n- a list\n", "params file must be a mapping of sections"),
])
def test_malformed_params_file(tmp_path: Path, text: str, needle: str):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    _one_line(_prepare(tmp_path, f), tmp_path, needle, str(f))


def test_missing_params_file(tmp_path: Path):
    _one_line(_prepare(tmp_path, tmp_path / "nope.yaml"), tmp_path, "does not exist",
              "give an existing file")
