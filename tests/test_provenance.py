"""The git revision every artifact records: ``-dirty`` for code or params, not for dvc.lock."""

from __future__ import annotations

import subprocess
from pathlib import Path

from seco_cli.provenance import git_revision, revision


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    return tmp_path


def test_dvc_rewriting_dvc_lock_between_stages_does_not_mark_the_revision_dirty(tmp_path):
    repo = _repo(tmp_path)
    head = revision(repo)
    assert len(head) == 40 and not head.endswith("-dirty")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # what dvc repro does
    assert revision(repo) == head
    # asked from a subdirectory, dvc.lock at the top is still left out
    assert revision(repo / "stages") == head


def test_changed_code_or_params_mark_the_revision_dirty(tmp_path):
    repo = _repo(tmp_path)
    head = revision(repo)
    (repo / "params.yaml").write_text("seed: 1\n")
    assert revision(repo) == head + "-dirty"
    _git(repo, "checkout", "--", "params.yaml")
    (repo / "stages" / "train.py").write_text("x = 2\n")
    assert revision(repo) == head + "-dirty"
    assert revision(repo / "stages") == head + "-dirty"


def test_outside_git_the_revision_is_unknown(tmp_path):
    assert revision(tmp_path / "nowhere") == "unknown"


def test_this_checkout_has_a_revision():
    rev = git_revision()
    assert rev == "unknown" or len(rev.split("-")[0]) == 40
