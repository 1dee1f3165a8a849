"""dvc.yaml: each stage's deps cover the code it imports; `dvc repro` twice runs nothing the
second time (in a temporary git copy of the project, on the tiny profile)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY

STAGES = ["prepare", "train", "cams", "pseudo", "segment", "evaluate"]
# The thin CLI and the package marker are shared by every stage and change no result.
EXEMPT = {"seco_cli/cli.py", "seco_cli/__init__.py", "stages/__init__.py"}


def _imported_files(stage: str) -> set[str]:
    code = (
        f"import sys, stages.{stage}, pathlib\n"
        f"root = pathlib.Path({str(ROOT)!r})\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f and pathlib.Path(f).resolve().is_relative_to(root):\n"
        "        print(pathlib.Path(f).resolve().relative_to(root).as_posix())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return {line for line in out.stdout.split() if line.startswith(("seco_cli/", "stages/"))}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_its_imports(stage: str):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = [d.rstrip("/") for d in spec["deps"]]
    uncovered = sorted(
        f for f in _imported_files(stage) - EXEMPT
        if not any(f == d or f.startswith(d + "/") for d in deps)
    )
    assert not uncovered, f"stage {stage} imports files missing from its dvc.yaml deps: {uncovered}"


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def test_dvc_repro_twice_then_experiment_and_metrics_diff(tmp_path: Path):
    if shutil.which("dvc") is None or shutil.which("git") is None:
        pytest.skip("dvc or git is not on PATH")
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    (repo / "dvc.lock").unlink(missing_ok=True)
    # the tiny profile written into params.yaml, as a user editing it would
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for item in TINY:
        key, value = item.split("=", 1)
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run([*git, "init", "-q"], repo)
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", "copy"], repo)
    first = _run(["dvc", "repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    assert (repo / "artifacts/metrics/evaluate.json").is_file()
    second = _run(["dvc", "repro"], repo)
    assert "Running stage" not in second
    status = _run(["dvc", "status"], repo)
    assert "up to date" in status
    # an experiment with a train parameter changed reruns train and what follows, not prepare
    _run([*git, "add", "dvc.lock"], repo)
    _run([*git, "commit", "-qm", "lock"], repo)
    exp = _run(["dvc", "exp", "run", "-S", "train.iterations=8"], repo)
    assert "Running stage 'train'" in exp and "Running stage 'prepare'" not in exp
    diff = _run(["dvc", "metrics", "diff"], repo)
    assert "artifacts/metrics/evaluate.json" in diff and "segment_ms_crf.miou" in diff
