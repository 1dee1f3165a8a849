"""The CLI through Typer's CliRunner: help, one-line user errors, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from seco_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare", "train", "cams", "pseudo", "segment", "evaluate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_shared_options_and_defaults(command: str):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--params", "--set", "--debug"):
        assert option in result.output
    assert "params.yaml" in result.output  # defaults are shown
    assert "artifacts/" in result.output


def test_unknown_parameter_is_one_line_exit_2():
    result = runner.invoke(app, ["train", "--params", str(ROOT / "params.yaml"),
                                 "--set", "nosuch.key=1"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "unknown parameter 'nosuch'" in lines[0]
    assert "Traceback" not in result.output


def test_stage_before_its_input_names_the_stage(tmp_path: Path):
    result = runner.invoke(app, ["pseudo", "--params", str(ROOT / "params.yaml"),
                                 "--prepared", str(tmp_path / "none"), "--cams",
                                 str(tmp_path / "none.zarr")])
    assert result.exit_code == 2
    assert "run `seco prepare` first" in result.output


def test_debug_shows_the_traceback(tmp_path: Path):
    result = runner.invoke(app, ["pseudo", "--debug", "--params", str(ROOT / "params.yaml"),
                                 "--prepared", str(tmp_path / "none")])
    assert result.exit_code != 0 and result.exit_code != 2
    assert result.exception is not None


def test_missing_dataset_root(tmp_path: Path):
    result = runner.invoke(app, ["prepare", "--params", str(ROOT / "params.yaml"),
                                 "--set", "data.source=voc", "--set", f"data.root={tmp_path}/nope",
                                 "--out", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert "dataset root" in result.output and "does not exist" in result.output
    assert not (tmp_path / "p").exists()


def test_cuda_asked_but_absent(tmp_path: Path, prepared: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = runner.invoke(app, ["train", "--params", str(ROOT / "params.yaml"),
                                 "--prepared", str(prepared), "--set", "train.device=cuda",
                                 "--model", str(tmp_path / "m.pt")])
    assert result.exit_code == 2
    assert "CUDA was asked for" in result.output
    assert not (tmp_path / "m.pt").exists()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("seco ")
