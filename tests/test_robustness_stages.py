"""Robustness of the stages after `prepare` (issue 6): stages run out of order, checkpoints
that are foreign, corrupt or malicious, devices that are absent, and a full disk while a
checkpoint is written. Each user error is one line and exit 2, and leaves no output behind.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seco_cli.checkpoint import check_compatible, load_checkpoint, load_weights, save_atomic
from seco_cli.cli import app
from seco_cli.data.prepared import PreparedDataset
from seco_cli.errors import SecoError, WriteError
from seco_cli.models.network import SeCoNet
from tests.conftest import ROOT, TINY, one_error_line, tiny_params

runner = CliRunner()


def _run(command: str, *args: str, sets: tuple[str, ...] = ()) -> object:
    argv = [command, "--params", str(ROOT / "params.yaml"), *args]
    for s in (*TINY, *sets):
        argv += ["--set", s]
    return runner.invoke(app, argv)


# The last frame of a rich progress bar or counter: "⠋ evaluate 0 images 0:00:00".
PROGRESS = re.compile(r"(\S )?[a-z]+( \([\w-]+\))? ([━╸╺ ]+ *\d+/\d+|\d+ images) \d+:\d\d:\d\d.*")


def _one_line(result, *needles: str) -> str:
    return one_error_line(result, PROGRESS, *needles)


# --------------------------------------------------------------------------- stage order
@pytest.mark.parametrize(("command", "missing", "first"), [
    ("train", "prepared", "prepare"),
    ("cams", "model", "train"),
    ("pseudo", "cams", "cams"),
    ("segment", "model", "train"),
    ("evaluate", "cams", "cams"),  # the stores are checked before the probe's model
])
def test_stage_before_its_inputs_names_the_stage_to_run(tmp_path: Path, prepared: Path,
                                                        command: str, missing: str, first: str):
    paths = {"prepared": prepared, "model": tmp_path / "model.pt", "cams": tmp_path / "cams.zarr",
             "pseudo": tmp_path / "pseudo.zarr", "segment": tmp_path / "segment.zarr"}
    paths[missing] = tmp_path / "never-made"
    outs = {"train": ["--model", str(tmp_path / "out.pt"), "--live", str(tmp_path / "live"),
                      "--checkpoints", str(tmp_path / "ckpt")],
            "cams": ["--out", str(tmp_path / "out.zarr")],
            "pseudo": ["--out", str(tmp_path / "out.zarr")],
            "segment": ["--out", str(tmp_path / "out.zarr"), "--png-dir", str(tmp_path / "png")],
            "evaluate": ["--metrics", str(tmp_path / "out.json"), "--plots", str(tmp_path / "plots")]}
    ins = {"train": ["prepared"], "cams": ["prepared", "model"], "pseudo": ["prepared", "cams"],
           "segment": ["prepared", "model"],
           "evaluate": ["prepared", "cams", "pseudo", "segment", "model"]}
    args = [a for name in ins[command] for a in (f"--{name}", str(paths[name]))]
    result = _run(command, *args, *outs[command])
    _one_line(result, "never-made", f"run `seco {first}` first")
    made = {p.name for p in tmp_path.iterdir()}
    assert not made & {"out.pt", "out.zarr", "png", "out.json", "plots", "ckpt"}, made


# --------------------------------------------------------------------------- checkpoints
def _fake_model(path: Path, **meta) -> Path:
    torch.save({"model": {"w": torch.zeros(3)}, "meta": {"backbone": "vit_small_patch16_224",
                                                         "num_classes": 6, **meta}}, path)
    return path


def _cams(prepared: Path, model: Path, tmp_path: Path, *sets: str):
    return _run("cams", "--prepared", str(prepared), "--model", str(model), "--out",
                str(tmp_path / "cams.zarr"), sets=sets)


@pytest.mark.parametrize(("meta", "needle"), [
    ({"backbone": "resnet50"}, "trained with backbone 'resnet50', params ask for 'vit_small_patch16_224'"),
    ({"num_classes": 20}, "checkpoint has 20 classes, the dataset 6"),
])
def test_checkpoint_from_another_backbone_or_class_count(tmp_path: Path, prepared: Path,
                                                         meta: dict, needle: str):
    model = _fake_model(tmp_path / "model.pt", **meta)
    _one_line(_cams(prepared, model, tmp_path), needle, "retrain")
    assert not (tmp_path / "cams.zarr").exists()


def test_checkpoint_with_other_model_shape_params(tmp_path: Path):
    p = tiny_params()
    trained = tiny_params("model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 64, "
                          "depth: 3, num_heads: 2}")
    ckpt = {"meta": {"backbone": p.model.backbone, "num_classes": 6, "params": trained.dump()}}
    with pytest.raises(SecoError, match="trained with model.backbone_kwargs") as exc:
        check_compatible(ckpt, p.model.backbone, 6, "m.pt", p.model.model_dump(mode="json"))
    assert "\n" not in exc.value.line()
    net = SeCoNet(p.model, 6)
    state = SeCoNet(trained.model, 6).state_dict()
    with pytest.raises(SecoError, match=r"checkpoint does not fit the network: weight '.*' is \(") as exc:
        load_weights(net, state, "m.pt")
    own = net.state_dict()
    first = next(iter(own))
    with pytest.raises(SecoError, match=f"1 weights missing, 0 unexpected \\(first: '{first}'\\)"):
        load_weights(net, {k: v for k, v in own.items() if k != first}, "m.pt")
    load_weights(net, net.state_dict(), "m.pt")  # a matching state loads


@pytest.mark.parametrize("recorded", [True, False])
def test_checkpoint_of_the_same_backbone_name_with_other_kwargs(tmp_path: Path, prepared: Path,
                                                                recorded: bool):
    p = tiny_params()
    trained = tiny_params("model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 64, "
                          "depth: 3, num_heads: 2}")
    meta = {"backbone": p.model.backbone, "num_classes": 6}
    if recorded:  # a checkpoint of `seco train` records its params; an older file may not
        meta["params"] = trained.dump()
    model = tmp_path / "model.pt"
    torch.save({"model": SeCoNet(trained.model, 6).state_dict(), "meta": meta}, model)
    needle = ("trained with model.backbone_kwargs" if recorded else
              "does not fit the network: weight 'backbone.net.cls_token' is (1, 1, 64) in the "
              "checkpoint, (1, 1, 32) in the network")
    _one_line(_cams(prepared, model, tmp_path), needle, "retrain")
    assert not (tmp_path / "cams.zarr").exists()


def _real_checkpoint(path: Path) -> bytes:
    torch.save({"model": {f"w{i}": torch.randn(64, 64) for i in range(4)}, "meta": {}}, path)
    return path.read_bytes()


@pytest.mark.parametrize(("damage", "needle"), [
    ("truncated", "is corrupt, truncated or not a checkpoint"),
    ("random_bytes", "is corrupt, truncated or not a checkpoint"),
    ("empty", "is empty (0 bytes)"),
    ("text", "is corrupt, truncated or not a checkpoint"),
    ("tensor_only", "is a torch file but not a SeCo checkpoint"),
])
def test_corrupt_checkpoint_is_one_line(tmp_path: Path, prepared: Path, damage: str, needle: str):
    model = tmp_path / "model.pt"
    data = _real_checkpoint(model)
    if damage == "truncated":
        model.write_bytes(data[: len(data) // 2])
    elif damage == "random_bytes":
        model.write_bytes(os.urandom(4096))
    elif damage == "empty":
        model.write_bytes(b"")
    elif damage == "text":
        model.write_text("model weights go here\n")
    else:
        torch.save(torch.zeros(3), model)
    line = _one_line(_cams(prepared, model, tmp_path), needle, str(model))
    assert "run `seco train`" in line or "written by `seco train`" in line
    assert not (tmp_path / "cams.zarr").exists()


class _Payload:
    """A pickle that runs code when loaded unsafely: it would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_checkpoint_is_refused_not_run(tmp_path: Path, prepared: Path, writer: str):
    marker, model = tmp_path / "PWNED", tmp_path / "model.pt"
    obj = {"meta": {"backbone": "vit_small_patch16_224", "num_classes": 6},
           "model": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, model)
    else:
        model.write_bytes(pickle.dumps(obj, protocol=2))
    _one_line(_cams(prepared, model, tmp_path), "refers to the Python object", "system",
              "refused (checkpoints are read weights-only)")
    assert not marker.exists()
    with pytest.raises(SecoError, match="refused"):
        load_checkpoint(model)
    assert not marker.exists()


def test_malicious_pretrained_weights_are_refused_in_one_line(tmp_path: Path, prepared: Path):
    marker, weights = tmp_path / "PWNED", tmp_path / "weights.pth"
    torch.save({"blocks.0.attn.qkv.weight": _Payload(marker)}, weights)
    result = _run("train", "--prepared", str(prepared), "--model", str(tmp_path / "m.pt"),
                  "--live", str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ckpt"),
                  sets=(f"model.pretrained={weights}",))
    line = _one_line(result, "refer to the Python object", "were refused", "model.pretrained")
    assert len(line) < 400  # not torch's multi-paragraph explanation
    assert not marker.exists() and not (tmp_path / "m.pt").exists()


def test_resume_from_a_checkpoint_of_other_params(tmp_path: Path, prepared: Path):
    from seco_cli.trainer import train

    p = tiny_params()
    data = PreparedDataset(prepared)
    other = tiny_params("train.lr=0.1").dump()
    torch.save({"meta": {"params": other}}, tmp_path / "last.pt")
    meta = {"backbone": p.model.backbone, "num_classes": data.num_classes, "params": p.dump()}
    with pytest.raises(SecoError, match="cannot resume: the checkpoint was made with other params"):
        train(p, data, torch.device("cpu"), meta, tmp_path, True, lambda *_: None)


@pytest.mark.parametrize("failure", ["ENOSPC", "torch-writer"])
def test_full_disk_while_writing_a_checkpoint_keeps_the_last_good_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str):
    import seco_cli.checkpoint as ckpt_mod

    path = tmp_path / "last.pt"
    save_atomic({"meta": {}, "iteration": 3}, path)
    real = torch.save

    def half_written(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 partial")  # the disk fills mid-file
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                           "frame #0: c10::Error::Error(...)")

    monkeypatch.setattr(ckpt_mod.torch, "save", half_written)
    with pytest.raises(WriteError) as exc:
        save_atomic({"meta": {}, "iteration": 6}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real)
    line = exc.value.line()
    assert "\n" not in line and "cannot write the checkpoint (" in line and f"at {path};" in line
    assert "the previous file is kept" in line and "`seco train`" in line
    if failure == "ENOSPC":
        assert "No space left on device" in line and "free disk space" in line
    assert load_checkpoint(path)["iteration"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --------------------------------------------------------------------------- devices, splits
def test_cuda_asked_for_but_absent(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # runs on GPU machines too
    model = _fake_model(tmp_path / "model.pt")
    _one_line(_cams(prepared, model, tmp_path, "cams.device=cuda"),
              "CUDA was asked for but no CUDA device is available", "cams.device", "cpu or auto")
    assert not (tmp_path / "cams.zarr").exists()


def test_unknown_device_name(tmp_path: Path, prepared: Path):
    model = _fake_model(tmp_path / "model.pt")
    _one_line(_cams(prepared, model, tmp_path, "cams.device=gpu"), "unknown device 'gpu'",
              "use auto, cpu, cuda or cuda:N")


def test_split_missing_from_the_prepared_dataset(tmp_path: Path, prepared: Path):
    p = tiny_params()
    model = tmp_path / "model.pt"
    torch.save({"model": SeCoNet(p.model, 6).state_dict(),
                "meta": {"backbone": p.model.backbone, "num_classes": 6}}, model)
    _one_line(_cams(prepared, model, tmp_path, "cams.split=nosuch"),
              "split 'nosuch' is not in the prepared dataset", "use one of: train, val")
    assert not (tmp_path / "cams.zarr").exists()


def test_full_disk_while_a_stage_writes_its_store_is_one_line(
        tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch):
    import seco_cli.store as store_mod
    from stages import train as train_stage

    p = tiny_params("train.iterations=2")
    model = tmp_path / "model.pt"
    train_stage.run(p, prepared, model, tmp_path / "live", tmp_path / "ckpt")

    def full(self, image_id, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cams.zarr"))

    monkeypatch.setattr(store_mod.StoreWriter, "write", full)
    line = _one_line(_cams(prepared, model, tmp_path), "No space left on device",
                     "free disk space", "`seco cams`")
    assert "no output of this stage is marked complete" in line
    assert not (tmp_path / "cams.zarr" / "COMPLETE").exists()
