"""Interruption by SIGKILL (issue 6): `seco train` killed at a random point after a checkpoint
resumes to the uninterrupted run's exact weights; a killed `cams` leaves a store that every
reader refuses, and the rerun completes it. Real processes, real `kill -9`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seco_cli.checkpoint import load_checkpoint
from seco_cli.errors import SecoError
from seco_cli.store import StoreReader
from tests.conftest import ROOT, TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _seco(*args: str, sets: tuple[str, ...] = ()) -> list[str]:
    argv = [sys.executable, "-m", "seco_cli.cli", *args, "--params", str(ROOT / "params.yaml")]
    for s in (*TINY, *sets):
        argv += ["--set", s]
    return argv


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


TRAIN_SETS = ("train.iterations=16", "train.ckpt_every=4", "train.log_every=4")


def _train(tmp: Path, prepared: Path, *extra: str) -> list[str]:
    return _seco("train", "--prepared", str(prepared), "--model", str(tmp / "model.pt"),
                 "--live", str(tmp / "live"), "--checkpoints", str(tmp / "ckpt"), *extra,
                 sets=TRAIN_SETS)


def test_kill9_of_train_then_resume_equals_the_uninterrupted_run(tmp_path: Path, prepared: Path):
    full = tmp_path / "full"
    subprocess.run(_train(full, prepared), env=ENV, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train(killed, prepared), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "ckpt" / "last.pt"
    _wait_for(last.exists, proc)  # at least one checkpoint (iteration 4) is on disk
    time.sleep(random.Random().uniform(0.0, 0.5))  # then die at a random later point
    if proc.poll() is not None:
        pytest.fail("training finished before the kill: lengthen train.iterations")
    _kill9(proc)
    at = load_checkpoint(last)["iteration"]  # the kill never leaves a torn checkpoint
    assert at % 4 == 0 and 4 <= at < 16
    assert not (killed / "model.pt").exists()

    subprocess.run(_train(killed, prepared, "--resume"), env=ENV, check=True,
                   capture_output=True)
    a = torch.load(full / "model.pt", weights_only=True)["model"]
    b = torch.load(killed / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_kill9_of_cams_leaves_a_refused_store_and_the_rerun_completes(tmp_path: Path,
                                                                     prepared: Path):
    model = tmp_path / "model.pt"
    subprocess.run(_seco("train", "--prepared", str(prepared), "--model", str(model), "--live",
                         str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ckpt"),
                         sets=("train.iterations=2",)), env=ENV, check=True, capture_output=True)
    out = tmp_path / "cams.zarr"
    # batch 1 and 8 scales make the stage slow enough to be caught in the middle
    slow = ("cams.batch_size=1", "cams.scales=[1.0,0.5,0.75,1.25,1.5,1.75,2.0,2.5]")
    proc = subprocess.Popen(_seco("cams", "--prepared", str(prepared), "--model", str(model),
                                  "--out", str(out), sets=slow), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the first bundle is opened with the first image's write: the stage is in its middle
    _wait_for(lambda: out.exists() and any(out.glob("bundle-*.zip")), proc)
    if proc.poll() is not None:
        pytest.fail("cams finished before the kill")
    _kill9(proc)
    assert not (out / "COMPLETE").exists()
    with pytest.raises(SecoError, match="incomplete"):
        StoreReader(out, "cams")

    subprocess.run(_seco("cams", "--prepared", str(prepared), "--model", str(model), "--out",
                         str(out), sets=slow), env=ENV, check=True, capture_output=True)
    reader = StoreReader(out, "cams")
    assert len(reader.ids()) == 24  # every train image of the TINY profile
