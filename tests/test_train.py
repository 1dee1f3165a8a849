"""Training: schedules, losses, resume equals an uninterrupted run, NaN stops cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from seco_cli.checkpoint import load_checkpoint
from seco_cli.data.prepared import PreparedDataset
from seco_cli.losses.segmentation import balanced_seg_loss
from seco_cli.params import Params
from seco_cli.pseudo_labels import cams_to_labels
from seco_cli.schedules import lr_multipliers, step_weights
from seco_cli.trainer import NonFiniteLoss, Trainer, train


def test_lr_schedule_warmup_then_poly():
    lr = lr_multipliers(100, warmup=10, warmup_ratio=1e-6, power=0.9)
    assert lr[0] == pytest.approx(1e-6)
    assert lr[5] == pytest.approx((1e-6 + (1 - 1e-6) * 0.5) * (1 - 5 / 100) ** 0.9)
    assert lr[10] == pytest.approx((1 - 10 / 100) ** 0.9)
    assert lr[99] == pytest.approx((1 / 100) ** 0.9)
    assert np.all(np.diff(lr[10:]) < 0)


def test_step_weights_switch_at_start():
    w = step_weights(10, 0.12, 4)
    assert w[:4].tolist() == [0.0] * 4 and w[4:].tolist() == [0.12] * 6


def test_balanced_seg_loss_weights_halves_equally():
    # 3 background pixels with CE a, 1 foreground pixel with CE b: loss = (a + b) / 2
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, :3] = 2.0  # confident background on the first three pixels
    target = torch.tensor([[[0, 0, 0, 2]]])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0, 0]
    expected = 0.5 * ce[:3].mean() + 0.5 * ce[3]
    assert balanced_seg_loss(logits, target).item() == pytest.approx(expected.item())


def test_balanced_seg_loss_ignores_255_and_empty_half():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[255, 255], [0, 0]]])
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    assert balanced_seg_loss(logits, target).item() == pytest.approx(0.5 * ce[0, 1].mean().item())


def test_cams_to_labels_thresholds():
    cam = torch.tensor([[[[0.9, 0.5, 0.1, 0.8]]], [[[0.2, 0.6, 0.0, 0.75]]]]).permute(1, 0, 2, 3)
    valid = torch.tensor([[[True, True, True, False]]])
    label = cams_to_labels(cam, valid, high=0.7, low=0.25)
    # px0: class 1 (0.9 > 0.7); px1: max 0.6 uncertain; px2: max 0.1 background; px3: invalid
    assert label.tolist() == [[[1, 255, 0, 255]]]


def _meta(p: Params, data: PreparedDataset) -> dict:
    return {"backbone": p.model.backbone, "num_classes": data.num_classes, "params": p.dump()}


def test_resume_equals_uninterrupted(tmp_path: Path, prepared: Path, tiny: Params,
                                     monkeypatch: pytest.MonkeyPatch):
    data = PreparedDataset(prepared)
    cpu = torch.device("cpu")
    full = train(tiny, data, cpu, _meta(tiny, data), tmp_path / "a", False, lambda *_: None)

    calls = {"n": 0}
    original = Trainer.step

    def dying_step(self, batch, it):
        if it == 4:  # after the checkpoint written at iteration 3: the process "dies"
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, batch, it)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny, data, cpu, _meta(tiny, data), tmp_path / "b", False, lambda *_: None)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3
    monkeypatch.setattr(Trainer, "step", original)
    resumed = train(tiny, data, cpu, _meta(tiny, data), tmp_path / "b", True, lambda *_: None)
    assert resumed.iteration == full.iteration == 6
    for (name, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items(), strict=False):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, prepared: Path,
                                                       tiny: Params, monkeypatch: pytest.MonkeyPatch):
    import seco_cli.trainer as trainer_mod

    data = PreparedDataset(prepared)
    real = trainer_mod.multilabel_loss
    state = {"calls": 0}

    def sometimes_nan(logits, labels):
        state["calls"] += 1
        value = real(logits, labels)
        return value * float("nan") if state["calls"] > 8 else value  # cls, aux per iteration

    monkeypatch.setattr(trainer_mod, "multilabel_loss", sometimes_nan)
    with pytest.raises(NonFiniteLoss, match="loss term 'cls' became nan at iteration 4"):
        train(tiny, data, torch.device("cpu"), _meta(tiny, data), tmp_path, False, lambda *_: None)
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 3
