"""Shared fixtures: a tiny parameter profile and a prepared synthetic dataset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from seco_cli.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A profile small enough for a full pipeline run in seconds on a CPU.
TINY = [
    "prepare.synthetic.num_train=24",
    "prepare.synthetic.num_val=8",
    "prepare.synthetic.image_size=48",
    "model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}",
    "model.crop_size=48",
    "train.iterations=6",
    "train.batch_size=4",
    "train.warmup_iters=2",
    "train.seg_start=3",
    "train.cam_select_start=3",  # = seg_start, as in params.yaml
    "train.ptc_start=0",
    "train.cam2mask=4",
    "train.log_every=2",
    "train.ckpt_every=3",
    "train.num_patches=4",
    "train.patch_size=16",
    "train.proj_hidden=32",
    "train.reservoir_capacity=48",
    "train.contrast_start=2",
    "train.proto_start=1",
    "cams.batch_size=8",
    "segment.batch_size=8",
    "pseudo.workers=1",  # no process pool: tests/test_inference.py covers it
    "segment.workers=1",
]


def tiny_params(*extra: str) -> Params:
    return load_params(ROOT / "params.yaml", [*TINY, *extra])


@pytest.fixture
def tiny() -> Params:
    return tiny_params()


@pytest.fixture
def prepared(tmp_path: Path, tiny: Params) -> Path:
    from stages import prepare

    out = tmp_path / "prepared"
    prepare.run(tiny, out, tmp_path / "prepare.json")
    return out


def one_error_line(result, progress: re.Pattern[str], *needles: str) -> str:
    """The user sees exactly one line `error: ...`, exit code 2 and no traceback; the only
    other output allowed is a progress bar's last frame, as ``progress`` matches it. Each of
    ``needles`` is in the line; returns the line."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not progress.fullmatch(ln)]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
