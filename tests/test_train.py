"""Training: schedules, losses, resume equals an uninterrupted run, NaN stops cleanly."""

from __future__ import annotations

import contextlib
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
from seco_cli.trainer import PRESETS, NonFiniteLoss, Schedules, Trainer, train
from seco_cli.waits import select_everywhere
from tests.conftest import tiny_params


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


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "select"])
def test_balanced_seg_loss_weights_halves_equally(gather):
    # 3 background pixels with CE a, 1 foreground pixel with CE b: loss = (a + b) / 2
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, :3] = 2.0  # confident background on the first three pixels
    target = torch.tensor([[[0, 0, 0, 2]]])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0, 0]
    expected = 0.5 * ce[:3].mean() + 0.5 * ce[3]
    assert balanced_seg_loss(logits, target, gather).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "select"])
def test_balanced_seg_loss_ignores_255_and_empty_half(gather):
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[255, 255], [0, 0]]])
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    loss = balanced_seg_loss(logits, target, gather)
    assert loss.item() == pytest.approx(0.5 * ce[0, 1].mean().item())
    loss.backward()  # the empty half keeps the graph and gives no gradient
    assert logits.grad[..., 0, :].abs().sum() == 0 and logits.grad[..., 1, :].abs().sum() > 0
    nothing = balanced_seg_loss(logits, torch.full_like(target, 255), gather)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_balanced_seg_loss_select_equals_gather():
    logits = torch.randn(3, 5, 9, 7, generator=torch.Generator().manual_seed(4))
    target = torch.randint(0, 5, (3, 9, 7), generator=torch.Generator().manual_seed(5))
    target[0, :2] = 255
    torch.testing.assert_close(balanced_seg_loss(logits, target, False),
                               balanced_seg_loss(logits, target, True), rtol=1e-6, atol=0)


def test_cams_to_labels_thresholds():
    cam = torch.tensor([[[[0.9, 0.5, 0.1, 0.8]]], [[[0.2, 0.6, 0.0, 0.75]]]]).permute(1, 0, 2, 3)
    valid = torch.tensor([[[True, True, True, False]]])
    label = cams_to_labels(cam, valid, high=0.7, low=0.25)
    # px0: class 1 (0.9 > 0.7); px1: max 0.6 uncertain; px2: max 0.1 background; px3: invalid
    assert label.tolist() == [[[1, 255, 0, 255]]]


def _meta(p: Params, data: PreparedDataset) -> dict:
    return {"backbone": p.model.backbone, "num_classes": data.num_classes, "params": p.dump()}


@pytest.mark.parametrize("preset,select,every,hysteresis", [
    ("baseline", "schedule", 1, 0.0), ("seco", "schedule", 1, 0.0), ("seco", "area", 1, 0.0),
    ("baseline", "agreement", 1, 0.0),
    ("seco", "agreement", 2, 0.0),  # resumed between updates: the heads' host copy is gone
    ("seco", "agreement", 1, 0.5)])  # classes held on the tiles across the resume
def test_resume_equals_uninterrupted(tmp_path: Path, prepared: Path, preset: str, select: str,
                                     every: int, hysteresis: float,
                                     monkeypatch: pytest.MonkeyPatch):
    held = ("train.cam_select_min_agreement=0.9",) if hysteresis else ()
    tiny = tiny_params(f"train.preset={preset}", f"train.cam_select={select}",
                       f"train.cam_select_every={every}",
                       f"train.cam_select_hysteresis={hysteresis}", *held)
    data = PreparedDataset(prepared)
    cpu = torch.device("cpu")
    logs: list[dict[str, float]] = []
    full = train(tiny, data, cpu, _meta(tiny, data), tmp_path / "a", False,
                 lambda _, values: logs.append(values))

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
    # everything: student, projection, teacher, reservoir with tags and pointer, prototypes
    a_state, b_state = full.method.state_dict(), resumed.method.state_dict()
    assert a_state.keys() == b_state.keys()
    for name, a in a_state.items():
        assert torch.equal(a, b_state[name]), name
    # the per-class CAM head statistics are state too, and the trained model records the heads
    selects = select != "schedule"
    assert any(k.startswith("cam_heads.") for k in a_state) == selects
    meta = resumed.final()["meta"]
    if selects:
        assert int(resumed.method.cam_heads.seen.sum()) > 0
        assert not hysteresis or bool(resumed.method.cam_heads.held.any())
        assert len(meta["cam_heads"]) == data.num_classes
        assert set(meta["cam_heads"]) <= {"aux", "final", "tiles"}
        assert len(meta[f"cam_head_{select}"]) == 2
        # when each class's source began: kept across the resume, recorded in the model
        assert resumed.cam_sources == full.cam_sources == meta["cam_heads"]
        assert resumed.cam_since == full.cam_since == meta["cam_heads_since"]
        assert resumed.cam_switches == full.cam_switches == meta["cam_heads_switches"]
        assert all(n >= (since > 0) for n, since in zip(meta["cam_heads_switches"],
                                                        meta["cam_heads_since"], strict=True))
        assert all(0 <= it < 6 for it in meta["cam_heads_since"])
    else:
        assert "cam_heads" not in meta and "cam_heads_since" not in meta
    assert ("cam_tiles" in meta) == (select == "agreement")
    # the live log holds each head's EMA per class (area or agreement), with selection only
    stats = {k: v for k, v in logs[-1].items() if k.startswith("cam_")}
    names = data.classes[1:]
    want = {f"cam_{select}/{h}/{n}" for h in ("aux", "final") for n in names}
    assert set(stats) == (want if selects else set())
    low = 0.0 if select == "area" else -1.0
    assert all(low <= v <= 1.0 for v in stats.values())
    assert not selects or any(v != 0 for v in stats.values())


@pytest.mark.parametrize("every,floor,tile_steps", [
    (1, 0.3, [2, 3, 4, 5]),  # every step: the statistic and the tiles
    (2, -1.0, [2, 4]),  # no class can fall under a floor of -1: tiles on update steps only
    (2, 1.0, [2, 3, 4, 5])])  # every seen class takes the tiles: needed on every step
def test_cam_select_every_steps_the_statistic_on_its_iterations_only(
        tmp_path: Path, prepared: Path, every: int, floor: float, tile_steps: list[int],
        monkeypatch: pytest.MonkeyPatch):
    """train.cam_select_every: the agreement statistic and its seen counts change on the
    iterations it divides (from contrast_start on, when the online CAM is first needed, with
    train.cam_select_start 0), the tiles are classified on those and, in between, only while
    a class takes the tile map."""
    import seco_cli.method as method_module

    tiny = tiny_params("train.preset=seco", "train.cam_select=agreement",
                       "train.cam_select_start=0",
                       f"train.cam_select_every={every}",
                       f"train.cam_select_min_agreement={floor}")
    data = PreparedDataset(prepared)
    trainer = Trainer(tiny, data, torch.device("cpu"), _meta(tiny, data))
    tiled: list[int] = []
    real = method_module.classify_tiles
    it_now = {"it": -1}
    monkeypatch.setattr(method_module, "classify_tiles",
                        lambda *a, **k: tiled.append(it_now["it"]) or real(*a, **k))
    from seco_cli.data.loader import TrainSamples, train_loader

    tp = tiny.train
    samples = TrainSamples(data, data.ids(tiny.data.train_split), tp.batch_size, tp.seed,
                           tiny.model.crop_size, tp.scale_range, tiny.data.mean, tiny.data.std)
    heads = trainer.method.cam_heads
    changed = []
    first_seen: dict[int, int] = {}
    for it, batch in enumerate(train_loader(samples, 0, tp.iterations, 0)):
        it_now["it"] = it
        before = heads.seen.clone(), heads.agreement.clone()
        trainer.step(batch, it)
        if not (torch.equal(before[0], heads.seen) and torch.equal(before[1], heads.agreement)):
            changed.append(it)
        for c in heads.seen.nonzero().flatten().tolist():
            first_seen.setdefault(c, it)
    assert changed == [it for it in range(tp.contrast_start, tp.iterations) if it % every == 0]
    assert tiled == tile_steps
    # the trainer's record of each class's source and the iteration it began: under a floor
    # of 1.0 a class takes the tiles at its first update; an unseen one follows the schedule
    # (auxiliary head, the final one from cam2mask)
    if floor == 1.0:
        assert first_seen
        for c, (src, since) in enumerate(zip(trainer.cam_sources, trainer.cam_since,
                                             strict=True)):
            if c in first_seen:
                assert (src, since) == ("tiles", first_seen[c]), c
            else:
                assert (src, since) == ("final", tp.cam2mask), c
        # each class switched once: from the schedule's aux head to the tiles or, unseen,
        # to the final head at cam2mask (a floor of 1.0 is never cleared)
        assert trainer.cam_switches == [1] * data.num_classes
    assert trainer.cam_sources == heads.names(tp.iterations <= tp.cam2mask)
    # a checkpoint from before switches were counted: the whole record restarts, none is
    # made up; one with the count resumes it
    state = trainer.state()
    assert state["cam_switches"] == trainer.cam_switches
    fresh = Trainer(tiny, data, torch.device("cpu"), _meta(tiny, data))
    fresh.load_state(state)
    assert (fresh.cam_sources, fresh.cam_since, fresh.cam_switches) == (
        trainer.cam_sources, trainer.cam_since, trainer.cam_switches)
    state.pop("cam_switches")
    fresh.load_state(state)
    assert fresh.cam_sources is fresh.cam_since is fresh.cam_switches is None


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, prepared: Path,
                                                       tiny: Params, monkeypatch: pytest.MonkeyPatch):
    import seco_cli.method as trainer_mod

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


def _seco_run(tmp_path: Path, prepared: Path, iterations: int, select: bool = False,
              ) -> tuple[Trainer, set[str], list[dict[str, float]]]:
    """A short seco run with every term on from iteration 2; checks every term was logged and
    every logged value is finite; (trainer, the logged names, the logs). ``select``: with the
    select forms a GPU runs (seco_cli.waits) instead of the CPU's gather forms."""
    p = tiny_params("train.preset=seco", f"train.iterations={iterations}",
                    "train.contrast_start=1", "train.seg_start=1", "train.proto_start=0",
                    "train.rectify_start=2")
    data = PreparedDataset(prepared)
    logs: list[dict[str, float]] = []
    with select_everywhere() if select else contextlib.nullcontext():
        trainer = train(p, data, torch.device("cpu"), _meta(p, data), tmp_path, False,
                        lambda step, values: logs.append(values))
    seen = {k for values in logs for k in values}
    for term in ("cls", "aux", "seg", "reg", "ptc", "lig", "lil"):
        assert f"loss/{term}" in seen, term
    assert all(np.isfinite(v) for values in logs for v in values.values())
    return trainer, seen, logs


def test_seco_iterations_give_finite_losses_for_every_term(tmp_path: Path, prepared: Path):
    trainer, seen, _ = _seco_run(tmp_path, prepared, 5)
    for stat in ("tag_background", "tag_class", "tag_uncertain", "reservoir_fill",
                 "rectified_fraction"):
        assert f"seco/{stat}" in seen, stat
    # keys of 4 steps (4 images × (4 patches + 2 global views)) are in the reservoir
    assert int(trainer.method.reservoir.filled) == 48
    # prototypes were updated from their random init and stay unit norm
    norms = trainer.method.prototypes.P.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_select_forms_train_as_the_gather_forms(tmp_path: Path, prepared: Path):
    """A SeCo run with the select forms a GPU runs logs what the CPU's gather forms log, up
    to rounding, term by term and step by step, and ends with the same reservoir."""
    gathered, _, logs_g = _seco_run(tmp_path / "gather", prepared, 5)
    selected, _, logs_s = _seco_run(tmp_path / "select", prepared, 5, select=True)
    assert [sorted(v) for v in logs_s] == [sorted(v) for v in logs_g]
    for a, b in zip(logs_s, logs_g, strict=True):
        for k in b.keys() - {"sec_per_iter"}:  # the one wall-clock value
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
    res_g, res_s = gathered.method.reservoir, selected.method.reservoir
    assert torch.equal(res_s.tags, res_g.tags) and int(res_s.ptr) == int(res_g.ptr)
    torch.testing.assert_close(selected.method.prototypes.P, gathered.method.prototypes.P,
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_switch_terms(preset: str):
    p = tiny_params(f"train.preset={preset}", "train.iterations=10", "train.contrast_start=0",
                    "train.seg_start=0", "train.ptc_start=0", "train.rectify_start=5")
    w = Schedules.build(p.train).at(5)
    on = {k for k in ("cls", "aux", "seg", "reg", "ptc", "lig", "lil") if getattr(w, k) > 0}
    expected = {
        "baseline": {"cls", "aux", "seg", "reg"},
        "toco_like": {"cls", "aux", "seg", "reg", "ptc"},
        "no_lig": {"cls", "aux", "seg", "reg", "ptc", "lil"},
        "no_lil": {"cls", "aux", "seg", "reg", "ptc", "lig"},
        "no_rectify": {"cls", "aux", "seg", "reg", "ptc", "lig", "lil"},
        "seco": {"cls", "aux", "seg", "reg", "ptc", "lig", "lil"},
        "fully_supervised": {"seg"},
    }[preset]
    assert on == expected
    assert w.rectify == (preset in {"seco", "no_lig"}) and not Schedules.build(p.train).at(
        p.train.rectify_start - 1).rectify
    assert w.gt_seg == (preset == "fully_supervised")


def test_zero_weight_skips_the_term():
    p = tiny_params("train.preset=seco", "train.w_lig=0", "train.iterations=10",
                    "train.contrast_start=0")
    assert Schedules.build(p.train).at(5).lig == 0.0


def test_fully_supervised_trains_on_ground_truth(tmp_path: Path, prepared: Path):
    p = tiny_params("train.preset=fully_supervised", "train.iterations=3")
    data = PreparedDataset(prepared)
    logs: list[dict[str, float]] = []
    train(p, data, torch.device("cpu"), _meta(p, data), tmp_path, False,
          lambda step, values: logs.append(values))
    seen = {k for values in logs for k in values if k.startswith("loss/")}
    assert seen == {"loss/seg", "loss/total"}


def test_online_pseudo_labels_with_par_follow_the_two_thresholds():
    from seco_cli.method import SeCo

    p = tiny_params("train.cam_high=0.7", "train.cam_low=0.25")
    method = SeCo(p, num_classes=3)
    h = w = 24
    cam = torch.zeros(1, 3, h, w)
    cam[0, 1, :, :8] = 0.9  # class 2 confidently: above high
    cam[0, 1, :, 8:16] = 0.5  # between low and high: uncertain
    cam[0, 1, :, 16:] = 0.1  # below low: background
    labels = torch.tensor([[0.0, 1.0, 0.0]])
    image = torch.zeros(1, 3, h, w)
    image[..., :8], image[..., 8:16], image[..., 16:] = 1.0, 0.0, -1.0  # three flat regions
    valid = torch.ones(1, h, w, dtype=torch.bool)
    valid[0, :, -2:] = False
    label = method.pseudo_labels(image, cam, labels, valid)
    assert (label[0, :, 1:6] == 2).all()  # region interiors keep their label through PAR
    assert (label[0, :, 10:14] == 255).all()
    assert (label[0, :, 18:21] == 0).all()
    assert (label[0, :, -2:] == 255).all()  # outside the valid region


def test_bf16_autocast_steps_run_every_term(tmp_path: Path, prepared: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    """The CUDA path trains under bf16 autocast (SPEC §7); forced on here, on the CPU, so
    every term meets bf16 activations as it does on a GPU (the regulariser once failed there
    on a dtype mismatch that float32 CPU runs never reach)."""
    init = Trainer.__init__

    def bf16_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.autocast = True

    monkeypatch.setattr(Trainer, "__init__", bf16_init)
    trainer, _, _ = _seco_run(tmp_path, prepared, 4, select=True)  # as on a GPU
    assert trainer.autocast
    # weights, prototypes and the reservoir stay float32 (autocast changes activations only)
    assert all(t.dtype == torch.float32 for t in trainer.method.state_dict().values()
               if t.is_floating_point())
