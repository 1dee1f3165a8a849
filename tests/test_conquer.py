"""Conquer part of SeCo (SPEC §2, §4–§6): heads, teacher, memory and contrastive losses,
checked against direct per-anchor formulas on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seco_cli.losses.contrast import (
    global_contrast,
    local_contrast,
    patch_token_contrast,
    ptc_token_labels,
    rectify,
)
from seco_cli.memory import Prototypes, Reservoir
from seco_cli.models.projection import ProjectionHead
from seco_cli.teacher import EMATeacher


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---------------------------------------------------------------- L_iG (paper eq. 4)
def _lig_reference(q, tags, protos, tau) -> float:
    classes = sorted({int(t) for t in tags if t >= 1})
    losses = []
    for i in range(len(tags)):
        t = int(tags[i])
        if t < 1:
            continue
        num = math.exp(float(q[i] @ protos[t - 1]) / tau)
        den = sum(math.exp(float(q[i] @ protos[c - 1]) / tau) for c in classes)
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


def test_global_contrast_matches_per_anchor_formula():
    q, protos = _unit(8, 4, 0), _unit(5, 4, 1)  # 5 classes, only 1, 3, 4 in the batch
    tags = torch.tensor([1, 3, 0, -1, 3, 4, 1, 0])
    got = global_contrast(q, tags, protos, tau=0.1)
    assert got.item() == pytest.approx(_lig_reference(q, tags, protos, 0.1), rel=1e-5)


def test_global_contrast_no_anchor_is_zero_with_graph_and_protos_get_no_grad():
    q = _unit(4, 4, 2).requires_grad_(True)
    protos = _unit(3, 4, 3).requires_grad_(True)
    zero = global_contrast(q, torch.tensor([0, -1, 0, -1]), protos, tau=0.1)
    assert zero.item() == 0.0
    zero.backward()
    loss = global_contrast(q, torch.tensor([1, 2, 0, 2]), protos, tau=0.1)
    loss.backward()
    assert protos.grad is None and q.grad is not None


# ---------------------------------------------------------------- L_iL (paper eq. 8)
def _lil_reference(q, q_tags, keys, key_tags, tau) -> float:
    losses = []
    for i in range(len(q_tags)):
        t = int(q_tags[i])
        if t == -1:
            continue
        allowed = [j for j in range(len(key_tags)) if int(key_tags[j]) != -1]
        positives = [j for j in allowed if int(key_tags[j]) == t]
        if not positives:
            continue
        den = sum(math.exp(float(q[i] @ keys[a]) / tau) for a in allowed)
        terms = [math.log(math.exp(float(q[i] @ keys[p]) / tau) / den) for p in positives]
        losses.append(-sum(terms) / len(positives))
    return sum(losses) / len(losses)


def test_local_contrast_matches_per_anchor_formula():
    q, keys = _unit(7, 4, 4), _unit(9, 4, 5)
    # anchor tagged 5 has no positive; −1 keys are excluded from A; background meets background
    q_tags = torch.tensor([0, 1, 2, -1, 5, 0, 1])
    key_tags = torch.tensor([0, 1, -1, 2, 0, -1, 1, 3, 2])
    got = local_contrast(q, q_tags, keys, key_tags, tau=0.08)
    assert got.item() == pytest.approx(_lil_reference(q, q_tags, keys, key_tags, 0.08), rel=1e-5)


def test_local_contrast_uncertain_keys_do_not_enter_denominator():
    q, keys = _unit(2, 4, 6), _unit(3, 4, 7)
    q_tags = torch.tensor([1, 1])
    base = local_contrast(q, q_tags, keys[:2], torch.tensor([1, 2]), tau=0.1)
    with_unc = local_contrast(q, q_tags, keys, torch.tensor([1, 2, -1]), tau=0.1)
    assert with_unc.item() == pytest.approx(base.item(), rel=1e-6)


def test_local_contrast_no_anchor_zero_and_keys_get_no_grad():
    q = _unit(3, 4, 8).requires_grad_(True)
    keys = _unit(3, 4, 9).requires_grad_(True)
    zero = local_contrast(q, torch.tensor([1, 2, -1]), keys, torch.tensor([0, 3, -1]), 0.1)
    assert zero.item() == 0.0
    zero.backward()
    loss = local_contrast(q, torch.tensor([1, 2, 0]), keys, torch.tensor([0, 2, 1]), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and keys.grad is None and q.grad is not None


# ---------------------------------------------------------------- rectification (eqs. 6–7)
def _bank() -> tuple[torch.Tensor, torch.Tensor]:
    """Tag 1 around +e1, tag 0 (background) around +e2, one lone tag-2 entry."""
    g = torch.Generator().manual_seed(10)
    e1, e2, e3 = torch.eye(4)[:3]
    k1 = F.normalize(e1 + 0.2 * torch.randn(6, 4, generator=g), dim=1)
    k0 = F.normalize(e2 + 0.2 * torch.randn(5, 4, generator=g), dim=1)
    keys = torch.cat([k1, k0, e3[None]])
    tags = torch.tensor([1] * 6 + [0] * 5 + [2])
    return keys, tags


def test_rectify_fires_on_noisy_and_not_on_clean_queries():
    keys, tags = _bank()
    e1, e2, e3 = torch.eye(4)[:3]
    q = torch.stack([e1, -e1, e2, -e2, -e3])
    q_tags = torch.tensor([1, 1, 0, 0, 2])
    new, stats = rectify(q, q_tags, keys, tags, proportion=0.8)
    # clean stays, anti-aligned becomes −1 (background too); tag 2 has < 2 entries: untouched
    assert new.tolist() == [1, -1, 0, -1, 2]
    assert int(stats["eligible"]) == 4 and int(stats["rectified"]) == 2
    assert float(stats["rectified_fraction"]) == pytest.approx(0.5)
    assert torch.isnan(stats["mu"][2])


def test_rectify_mu_is_mean_of_off_diagonal_pairs():
    keys, tags = _bank()
    _, stats = rectify(keys[:1], tags[:1], keys, tags, proportion=0.8)
    for t in (0, 1):
        k = keys[tags == t]
        sim = k @ k.T
        n = len(k)
        expected = (sim.sum() - sim.diag().sum()) / (n * (n - 1))
        assert float(stats["mu"][t]) == pytest.approx(float(expected), rel=1e-5)


def test_rectify_empty_bank_changes_nothing():
    keys, tags = Reservoir(4, 4).valid()
    new, stats = rectify(_unit(2, 4, 14), torch.tensor([0, 1]), keys, tags, proportion=0.8)
    assert new.tolist() == [0, 1] and int(stats["eligible"]) == 0
    assert float(stats["rectified_fraction"]) == 0.0


def test_rectify_uncertain_queries_untouched():
    keys, tags = _bank()
    new, stats = rectify(-keys[:2], torch.tensor([-1, -1]), keys, tags, proportion=0.0)
    assert new.tolist() == [-1, -1] and int(stats["eligible"]) == 0


# ---------------------------------------------------------------- reservoir
def test_reservoir_wraps_around_with_tags():
    res = Reservoir(capacity=5, dim=2)
    assert res.tags.tolist() == [-1] * 5
    a = torch.arange(6.0).view(3, 2)  # rows a0..a2
    res.enqueue(a, torch.tensor([1, 2, 3]))
    assert int(res.ptr) == 3 and int(res.filled) == 3
    keys, tags = res.valid()
    assert torch.equal(keys, a) and tags.tolist() == [1, 2, 3]
    b = 10 + torch.arange(8.0).view(4, 2)  # rows b0..b3
    res.enqueue(b, torch.tensor([4, 5, 6, 7]))
    # slots 3, 4 get b0, b1; b2, b3 wrap to slots 0, 1; a2 survives in slot 2
    assert torch.equal(res.keys, torch.stack([b[2], b[3], a[2], b[0], b[1]]))
    assert res.tags.tolist() == [6, 7, 3, 4, 5]
    assert int(res.ptr) == 2 and int(res.filled) == 5
    assert len(res.valid()[0]) == 5


def test_reservoir_enqueue_larger_than_capacity_keeps_last_k():
    res = Reservoir(capacity=3, dim=1)
    res.enqueue(torch.tensor([[0.0]]), torch.tensor([0]))  # ptr 1
    res.enqueue(torch.arange(1.0, 8.0)[:, None], torch.arange(1, 8))  # 7 rows, ptr → 8 % 3 = 2
    # sequential writes: slots 1,2,0,1,2,0,1 ← 1..7; survivors 5 (slot 2), 6 (slot 0), 7 (slot 1)
    assert res.keys.flatten().tolist() == [6.0, 7.0, 5.0]
    assert res.tags.tolist() == [6, 7, 5]
    assert int(res.ptr) == 2 and int(res.filled) == 3


def test_reservoir_state_is_buffers():
    res = Reservoir(4, 3)
    res.enqueue(torch.ones(2, 3), torch.tensor([0, 1]))
    state = res.state_dict()
    assert set(state) == {"keys", "tags", "ptr", "filled"}
    clone = Reservoir(4, 3)
    clone.enqueue(torch.zeros(3, 3), torch.tensor([2, 2, 2]))  # its own count (3) is replaced
    clone.load_state_dict(state)
    assert int(clone.ptr) == 2 and clone.tags.tolist() == [0, 1, -1, -1]
    assert clone.valid()[1].tolist() == [0, 1]
    clone.enqueue(torch.ones(3, 3), torch.tensor([3, 4, 5]))  # 2 + 3 fills the 4 slots
    assert int(clone.filled) == 4 and int(clone.ptr) == 1 and clone.valid()[1].tolist() == [5, 1, 3, 4]


def test_reservoir_writes_and_reads_without_waiting_for_the_device(monkeypatch):
    """No value of a tensor is read on the host (each read waits for a GPU): the pointer
    moves on the device, the fill count is mirrored on the host."""
    res = Reservoir(5, 2)

    def no_read(self, *args):
        raise AssertionError("a tensor value was read on the host")

    for name in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    for n in (3, 4, 2):
        res.enqueue(torch.randn(n, 2), torch.arange(n))
        res.valid()
    monkeypatch.undo()
    assert int(res.filled) == 5 and int(res.ptr) == (3 + 4 + 2) % 5
    assert len(res.valid()[0]) == 5


# ---------------------------------------------------------------- prototypes (paper eq. 3)
def test_prototypes_init_normalised_and_seeded():
    a, b = Prototypes(4, 8, seed=3), Prototypes(4, 8, seed=3)
    assert torch.equal(a.P, b.P)
    assert torch.allclose(a.P.norm(dim=1), torch.ones(4))
    assert "P" in a.state_dict()


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "select"])
def test_prototype_update_single_label_image(gather):
    protos = Prototypes(3, 4, seed=0)
    p0 = protos.P.clone()
    z = _unit(1, 4, 11)
    labels = torch.tensor([[0, 1, 0]])
    for mode in ("single", "adaptive"):
        protos.P.copy_(p0)
        protos.update(z, labels, momentum=0.9, mode=mode, tau=0.1, gather=gather)
        expected = F.normalize(0.9 * p0[1] + 0.1 * z[0], dim=0)
        assert torch.allclose(protos.P[1], expected, atol=1e-6)
        assert torch.equal(protos.P[[0, 2]], p0[[0, 2]])


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "select"])
def test_prototype_update_two_label_image_adaptive_and_single(gather):
    protos = Prototypes(3, 4, seed=1)
    p0 = protos.P.clone()
    z = _unit(1, 4, 12)
    labels = torch.tensor([[1, 0, 1]])
    protos.update(z, labels, momentum=0.9, mode="adaptive", tau=0.1, gather=gather)
    c0, c2 = float(p0[0] @ z[0]), float(p0[2] @ z[0])
    w0 = math.exp(c0 / 0.1) / (math.exp(c0 / 0.1) + math.exp(c2 / 0.1))
    w2 = 1.0 - w0
    assert torch.allclose(protos.P[0], F.normalize(0.9 * p0[0] + 0.1 * w0 * z[0], dim=0), atol=1e-6)
    assert torch.allclose(protos.P[2], F.normalize(0.9 * p0[2] + 0.1 * w2 * z[0], dim=0), atol=1e-6)
    assert torch.equal(protos.P[1], p0[1])
    protos.P.copy_(p0)
    protos.update(z, labels, momentum=0.9, mode="single", tau=0.1, gather=gather)  # multi-label: skipped
    assert torch.equal(protos.P, p0)


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "select"])
def test_prototype_update_is_sequential_in_batch_order(gather):
    protos = Prototypes(2, 4, seed=2)
    p0 = protos.P.clone()
    z = _unit(2, 4, 13)
    protos.update(z, torch.tensor([[1, 0], [1, 0]]), momentum=0.9, gather=gather)
    first = F.normalize(0.9 * p0[0] + 0.1 * z[0], dim=0)
    assert torch.allclose(protos.P[0], F.normalize(0.9 * first + 0.1 * z[1], dim=0), atol=1e-6)


@pytest.mark.parametrize("mode", ["adaptive", "single"])
def test_prototype_update_select_equals_gather(mode):
    """The wait-free select path (the default off the CPU) updates as the gather path does:
    images with no label, one label and several, classes shared between images."""
    labels = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0],
                           [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]])
    z = _unit(7, 8, 21)
    gathered, selected = Prototypes(4, 8, seed=5), Prototypes(4, 8, seed=5)
    gathered.update(z, labels, momentum=0.8, mode=mode, tau=0.1, gather=True)
    selected.update(z, labels, momentum=0.8, mode=mode, tau=0.1, gather=False)
    assert not torch.equal(gathered.P, Prototypes(4, 8, seed=5).P)
    torch.testing.assert_close(selected.P, gathered.P, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- teacher and projection
def test_ema_teacher_update_exact_and_buffers_copied():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student, momentum=0.9)
    old = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    student.train()
    student(torch.randn(5, 3))  # moves the BN running stats
    teacher.update(student, 0.9)
    assert torch.allclose(teacher.module[0].weight, 0.9 * old + 0.1 * (old + 1.0), atol=1e-6)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_stays_in_eval():
    teacher = EMATeacher(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), momentum=0.999)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not teacher(torch.randn(2, 2, requires_grad=True)).requires_grad


def test_projection_output_unit_norm():
    head = ProjectionHead(8, hidden=16)
    out = head(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 5), atol=1e-5)


# ---------------------------------------------------------------- L_ptc (ToCo)
def _ptc_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 tokens (2×3): class 1 ×2 identical (scaled), class 2 ×2 orthogonal, one background
    token anti-aligned with class 1 (|cos| = 1), one middle-band token (ignored)."""
    e = torch.eye(4)
    vecs = torch.stack([e[0], 3 * e[0], e[1], e[2], -e[0], e[0]])  # (6, D)
    tokens = vecs.T.reshape(1, 4, 2, 3)
    cam = torch.zeros(1, 3, 6)
    cam[0, 0, :2] = 0.9  # class 1
    cam[0, 1, 2:4] = 0.8  # class 2
    cam[0, 0, 4] = 0.1  # background …
    cam[0, 2, 4] = 0.95  # … because class 3 is not a label of the image
    cam[0, 0, 5] = 0.5  # middle band → ignored
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    return tokens, cam.reshape(1, 3, 2, 3), labels


def test_ptc_token_labels():
    _, cam, labels = _ptc_case()
    lab = ptc_token_labels(cam, labels, bkg=0.5, high=0.7, low=0.25)
    assert lab.flatten().tolist() == [1, 1, 2, 2, 0, -1]


def test_patch_token_contrast_known_value():
    tokens, cam, labels = _ptc_case()
    # same-label ordered pairs: (0,1),(1,0) |cos| 1; (2,3),(3,2) 0 → mean 0.5
    # different-label pairs: 20 − 4 = 16; |cos| 1 only for (0,4),(4,0),(1,4),(4,1) → 0.25
    loss = patch_token_contrast(tokens, cam, labels, bkg=0.5, high=0.7, low=0.25)
    assert loss.item() == pytest.approx(0.5 * (1 - 0.5) + 0.5 * 0.25, abs=1e-6)
    # an image with only ignored tokens adds no pair
    tokens2 = torch.cat([tokens, torch.randn_like(tokens)])
    cam2 = torch.cat([cam, torch.full_like(cam, 0.5)])
    loss2 = patch_token_contrast(tokens2, cam2, labels.repeat(2, 1), 0.5, 0.7, 0.25)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


def test_patch_token_contrast_empty_halves_contribute_zero():
    tokens = torch.randn(1, 4, 2, 2, requires_grad=True)
    cam = torch.full((1, 2, 2, 2), 0.9)  # every token class 1: no different-label pair
    loss = patch_token_contrast(tokens, cam, torch.tensor([[1.0, 0.0]]), 0.5, 0.7, 0.25)
    x = F.normalize(tokens.detach().flatten(2), dim=1)[0]
    cos = (x.T @ x).abs()
    expected = 0.5 * (1 - (cos.sum() - cos.diag().sum()) / 12)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert torch.isfinite(tokens.grad).all()
    ignored = patch_token_contrast(
        tokens, torch.full((1, 2, 2, 2), 0.5), torch.ones(1, 2), 0.5, 0.7, 0.25
    )
    assert ignored.item() == 0.0


def test_online_cam_rounds_scaled_sides_to_the_patch_size():
    """Crop 56 with patch 16: scale 0.75 gives 42 px, not a whole number of tokens; the
    online CAM rounds it to 48 (as inference does) instead of failing in the ViT."""
    import torch

    from seco_cli.method import SeCo
    from tests.conftest import tiny_params

    p = tiny_params("model.backbone_kwargs={img_size: 56, patch_size: 16, embed_dim: 32, "
                    "depth: 3, num_heads: 2}", "model.crop_size=56",
                    "train.cam_scales=[1.0, 0.75]", "train.patch_size=16")
    method = SeCo(p, 6)
    cam = method.online_cam(torch.randn(2, 3, 56, 56), torch.ones(2, 6), aux=False)
    assert cam.shape == (2, 6, 56, 56) and torch.isfinite(cam).all()


def test_cam_heads_pick_per_class_the_head_that_covers_less():
    from seco_cli.memory import CamHeads

    heads = CamHeads(3)
    assert heads.use_aux(True).tolist() == [True] * 3  # nothing seen: the schedule's head
    assert heads.names(False) == ["final"] * 3
    # class 0: the aux CAM is inverted (covers 60 %); class 1: the final one is; class 2 unseen
    areas = torch.tensor([[[0.6, 0.05, 0.0], [0.05, 0.5, 0.0]],
                          [[0.5, 0.05, 0.0], [0.07, 0.7, 0.0]]])  # (B, 2 heads, C)
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    heads.update(areas, labels, momentum=0.9)
    # first sighting sets the EMA to the batch mean over the images showing the class
    assert torch.allclose(heads.area[:, 0], torch.tensor([0.55, 0.06]))
    assert torch.allclose(heads.area[:, 1], torch.tensor([0.05, 0.5]))
    assert heads.seen.tolist() == [2, 1, 0]
    assert heads.use_aux(True).tolist() == [False, True, True]
    assert heads.names(False) == ["final", "aux", "final"]
    # later batches are EMA steps; a class absent from the batch keeps its statistics
    heads.update(torch.tensor([[[0.0, 0.9, 0.3], [1.0, 0.9, 0.1]]]),
                 torch.tensor([[1.0, 0.0, 1.0]]), momentum=0.9)
    assert torch.allclose(heads.area[:, 0], torch.tensor([0.9 * 0.55, 0.9 * 0.06 + 0.1]))
    assert torch.allclose(heads.area[:, 1], torch.tensor([0.05, 0.5]))
    assert torch.allclose(heads.area[:, 2], torch.tensor([0.3, 0.1]))
    assert heads.use_aux(True).tolist() == [False, True, False]


def test_cam_heads_agreement_picks_the_agreeing_head_and_falls_back_to_tiles():
    """train.cam_select: agreement: the head whose CAM correlates more with its tiles wins
    (ties and unseen classes: the schedule); with fallback tiles, a seen class where neither
    head reaches min_agreement takes the tile map; with fallback none it keeps the best head."""
    from seco_cli.memory import CamHeads

    heads = CamHeads(4, "agreement", min_agreement=0.3, fallback="tiles")
    assert "agreement" in dict(heads.named_buffers()) and "area" not in dict(heads.named_buffers())
    assert heads.names(True) == ["aux"] * 4 and not heads.use_tiles().any()
    # class 0: aux agrees, final inverted; class 1: final agrees; class 2: neither; 3 unseen
    r = torch.tensor([[[0.5, -0.3, 0.1, 0.0], [-0.4, 0.5, 0.05, 0.0]]])  # (B, 2 heads, C)
    heads.update(r, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), momentum=0.9)
    assert heads.use_aux(False).tolist() == [True, False, True, False]
    assert heads.use_tiles().tolist() == [False, False, True, False]
    assert heads.names(False) == ["aux", "final", "tiles", "final"]
    assert heads.names(True) == ["aux", "final", "tiles", "aux"]
    keep = CamHeads(4, "agreement", min_agreement=0.3, fallback="none")
    keep.update(r, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), momentum=0.9)
    assert keep.names(False) == ["aux", "final", "aux", "final"]
    # the area rule never falls back, whatever its numbers
    area = CamHeads(4, "area", min_agreement=0.3, fallback="tiles")
    area.update(r.abs(), torch.ones(1, 4), momentum=0.9)
    assert not area.use_tiles().any()
    with pytest.raises(ValueError, match="unknown CAM head rule"):
        CamHeads(4, "size")


def test_cam_heads_hysteresis_keeps_a_class_on_the_tiles_until_a_head_clears_the_margin():
    """train.cam_select_hysteresis: a class enters the tiles under min_agreement, and leaves
    them only once a head reaches min_agreement + hysteresis; 0 is the plain floor. The held
    set is state: a class absent from a batch keeps it, a checkpoint carries it, and a state
    saved before it existed loads with no class held."""
    from seco_cli.memory import CamHeads

    best = [0.5, 0.2, 0.35, 0.38, 0.45, 0.35]  # class 0's better head, update by update
    for hysteresis, want in ((0.0, [False, True, False, False, False, False]),
                             (0.1, [False, True, True, True, False, False])):
        heads = CamHeads(2, "agreement", min_agreement=0.3, fallback="tiles",
                         hysteresis=hysteresis)
        got = []
        for b in best:  # momentum 0: the statistic is the batch's; the aux head is worse
            heads.update(torch.tensor([[[b - 0.3, 0.9], [b, 0.9]]]),
                         torch.tensor([[1.0, 1.0]]), momentum=0.0)
            got.append(bool(heads.use_tiles()[0]))
            assert heads.held.tolist() == heads.use_tiles().tolist()
            assert heads.names(True)[0] == ("tiles" if got[-1] else "final")
            heads.observe(heads.readout().tolist())  # the host copy decides alike
            assert heads.observed_names(True) == heads.names(True)
            assert heads.may_use_tiles() == got[-1]
        assert got == want, hysteresis
    heads = CamHeads(2, "agreement", min_agreement=0.3, fallback="tiles", hysteresis=0.1)
    heads.update(torch.tensor([[[0.0, 0.9], [0.2, 0.9]]]), torch.ones(1, 2), momentum=0.0)
    heads.update(torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), torch.tensor([[0.0, 1.0]]),
                 momentum=0.0)  # class 0 absent: its statistic and its hold stay
    assert heads.use_tiles().tolist() == [True, True]
    heads.update(torch.tensor([[[0.0, 0.35], [0.0, 0.0]]]), torch.tensor([[0.0, 1.0]]),
                 momentum=0.0)  # class 1 was held: 0.35 < 0.4 keeps it on the tiles
    assert heads.use_tiles().tolist() == [True, True]
    state = heads.state_dict()
    fresh = CamHeads(2, "agreement", min_agreement=0.3, fallback="tiles", hysteresis=0.1)
    fresh.load_state_dict(state)
    assert fresh.held.tolist() == [True, True] and fresh.use_tiles().tolist() == [True, True]
    old = {k: v for k, v in state.items() if k != "held"}  # a checkpoint from before `held`
    fresh.load_state_dict(old)  # strict: the missing key is filled, nothing held
    assert fresh.held.tolist() == [False, False]
    assert fresh.use_tiles().tolist() == [True, False]  # the plain floor: 0.35 >= 0.3
    with pytest.raises(ValueError, match="hysteresis must be >= 0"):
        CamHeads(2, "agreement", hysteresis=-0.1)


def test_cam_heads_hold_starts_late_releases_the_classes_caught_before_it():
    """update(..., hold=False), before train.cam_select_hold_start: no class is held, so a
    class caught under the floor leaves the tiles as soon as a head reaches the floor; from
    the first update with hold=True a class on the tiles stays until min_agreement + h
    (here 2.0: for good). The same sequence held from the start keeps the early class."""
    from seco_cli.memory import CamHeads

    # class 0: under the floor at the first updates, then recovers (an immature early CAM);
    # class 1: fine at first, under the floor later, then recovers (a head lost to a context)
    best = [(0.1, 0.5), (0.35, 0.5), (0.5, 0.5), (0.5, 0.2), (0.5, 0.6), (0.5, 0.9)]
    hold = [False, False, True, True, True, True]  # hold_start at the third update
    for late, want in ((True, [[True, False], [False, False], [False, False], [False, True],
                               [False, True], [False, True]]),
                       (False, [[True, False], [True, False], [True, False], [True, True],
                                [True, True], [True, True]])):
        heads = CamHeads(2, "agreement", min_agreement=0.3, fallback="tiles", hysteresis=2.0)
        got = []
        for (b0, b1), h in zip(best, hold, strict=True):
            heads.update(torch.tensor([[[b0 - 0.3, b1 - 0.3], [b0, b1]]]), torch.ones(1, 2),
                         momentum=0.0, hold=h or not late)
            got.append(heads.use_tiles().tolist())
            if late and not h:
                assert not heads.held.any()  # before the start: the plain floor, none held
            heads.observe(heads.readout().tolist())  # the host copy decides alike
            assert heads.observed_names(True) == heads.names(True)
        assert got == want, late


def test_online_cam_holds_from_the_hold_start_iteration():
    """SeCo.losses passes hold = (it >= train.cam_select_hold_start) to the statistic's
    update: with a floor no head reaches, every class is on the tiles either way, and held
    only from that iteration."""
    from seco_cli.method import SeCo, StepWeights
    from tests.conftest import tiny_params

    p = tiny_params("train.cam_select=agreement", "train.cam_select_min_agreement=1.0",
                    "train.cam_select_hysteresis=0.5", "train.cam_select_hold_start=3",
                    "train.cam_select_start=0", "train.patch_size=16")
    method = SeCo(p, 6)
    images, labels = torch.randn(2, 3, 48, 48), torch.ones(2, 6)
    batch = {"image": images, "labels": labels, "valid": torch.ones(2, 48, 48, dtype=torch.bool)}
    w = StepWeights(cls=1.0, aux=1.0, seg=1.0, ptc=0.0, lig=0.0, lil=0.0, reg=0.0,
                    rectify=False, proto=False, gt_seg=False)
    held = []
    for it in range(5):
        method.losses(batch, it, w, images, torch.Generator().manual_seed(0), lambda x: x,
                      autocast=False)
        held.append(bool(method.cam_heads.held.all()))
        assert method.cam_heads.use_tiles().all()
    assert held == [False, False, False, True, True]


def test_online_cam_steps_the_statistic_only_from_the_start_iteration():
    """train.cam_select_start: before it the statistic is not stepped (no class seen: every
    class follows the schedule's head, none the tiles, though no head reaches the floor);
    its first step sets the EMA to that batch's mean."""
    from seco_cli.method import SeCo, StepWeights
    from tests.conftest import tiny_params

    p = tiny_params("train.cam_select=agreement", "train.cam_select_min_agreement=1.0",
                    "train.cam_select_start=2", "train.patch_size=16")
    method = SeCo(p, 6)
    images, labels = torch.randn(2, 3, 48, 48), torch.ones(2, 6)
    batch = {"image": images, "labels": labels, "valid": torch.ones(2, 48, 48, dtype=torch.bool)}
    w = StepWeights(cls=1.0, aux=1.0, seg=1.0, ptc=0.0, lig=0.0, lil=0.0, reg=0.0,
                    rectify=False, proto=False, gt_seg=False)
    heads = method.cam_heads
    seen, tiles = [], []
    for it in range(4):
        method.losses(batch, it, w, images, torch.Generator().manual_seed(0), lambda x: x,
                      autocast=False)
        seen.append(heads.seen.tolist())
        tiles.append(bool(heads.use_tiles().any()))
        if it == 2:  # the first step: the EMA is that batch's mean, not a blend with zeros
            assert heads.stat.abs().sum() > 0
    assert seen == [[0] * 6, [0] * 6, [2] * 6, [4] * 6]
    assert tiles == [False, False, True, True]
    assert heads.names(True) == ["tiles"] * 6


@pytest.mark.parametrize("floor,fallback,power,fpower,reference", [
    (-1.0, "tiles", 1.0, 1.0, "sharpened"), (1.0, "tiles", 1.0, 1.0, "sharpened"),
    (1.0, "none", 1.0, 1.0, "sharpened"), (-1.0, "tiles", 8.0, 1.0, "sharpened"),
    (-1.0, "tiles", 8.0, 1.0, "both"), (1.0, "tiles", 1.0, 4.0, "sharpened"),
    (1.0, "none", 1.0, 4.0, "sharpened")])
def test_online_cam_with_agreement_selection(floor, fallback, power, fpower, reference):
    """Both heads' CAMs and the tile-logit maps from the same images: the statistic is each
    head's pixel agreement with its own tile map (sharpened by cam_select_tile_power; with
    cam_select_tile_reference both, the lower of that and the plain map's), each class takes
    the head it picks, and a class under the floor (1.0: every seen class) takes the final
    head's tile-min map, sharpened by cam_select_fallback_power."""
    from seco_cli.cams import fuse_cams, normalise_cams
    from seco_cli.method import SeCo
    from seco_cli.tiles import classify_tiles, pixel_agreement, sharpen
    from tests.conftest import tiny_params

    torch.manual_seed(0)
    p = tiny_params("train.cam_select=agreement", f"train.cam_select_min_agreement={floor}",
                    f"train.cam_select_fallback={fallback}", "train.patch_size=16",
                    f"train.cam_select_tile_power={power}",
                    f"train.cam_select_fallback_power={fpower}",
                    f"train.cam_select_tile_reference={reference}")
    method = SeCo(p, 6)
    method.eval()
    images = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]])
    valid = torch.ones(2, 48, 48, dtype=torch.bool)
    valid[1, :, 40:] = False
    cam = method.online_cam(images, labels, aux=True, valid=valid)
    final, aux = (normalise_cams(c, labels) for c in fuse_cams(
        method.net.both_cams, images, p.train.cam_scales, True, (48, 48), 8))
    tiles = classify_tiles(method.net, images, 16, 8)
    r_aux, d_aux = pixel_agreement(aux, sharpen(tiles.map("aux", "mean"), power), valid)
    r_final, d_final = pixel_agreement(final, sharpen(tiles.map("final", "mean"), power), valid)
    plain_aux, _ = pixel_agreement(aux, tiles.map("aux", "mean"), valid)
    plain, _ = pixel_agreement(final, tiles.map("final", "mean"), valid)
    if power != 1.0:  # the power changes the statistic
        assert not torch.allclose(plain[d_final], r_final[d_final], atol=1e-3)
    if reference == "both":  # the lower of the sharpened and the plain map's agreement
        assert (plain[d_final] < r_final[d_final]).any()  # the plain bound binds here
        r_aux, r_final = torch.minimum(r_aux, plain_aux), torch.minimum(r_final, plain)
    counted = labels.bool() & d_aux & d_final
    assert method.cam_heads.seen.tolist() == counted.sum(0).tolist()
    for c in range(6):  # the first sighting: the mean over the images where it counts
        if counted[:, c].any():
            want = torch.stack([r_aux[counted[:, c], c].mean(), r_final[counted[:, c], c].mean()])
            assert torch.allclose(method.cam_heads.agreement[:, c], want, atol=1e-5)
    use_aux, use_tiles = method.cam_heads.use_aux(True), method.cam_heads.use_tiles()
    assert use_tiles.any() == (floor == 1.0 and fallback == "tiles")
    tile_cam = normalise_cams(sharpen(tiles.map("final", "min"), fpower), labels)
    if fpower != 1.0 and use_tiles.any():  # the power changes the fallback's CAM
        plain = normalise_cams(tiles.map("final", "min"), labels)
        shown = labels.bool() & use_tiles[None]
        assert not torch.allclose(cam[shown], plain[shown], atol=1e-3)
        # the tiles finding the class most keep their rank at the top; the rest sink
        assert (cam[shown] <= plain[shown] + 1e-4).all()  # 1e-4: normalise_cams' eps
    for c in range(6):
        want = tile_cam if use_tiles[c] else aux if use_aux[c] else final
        assert torch.allclose(cam[:, c], want[:, c], atol=1e-6), c
    assert method.training is False  # the mode the caller set is kept


def test_cam_heads_host_copy_of_the_fallback_follows_readout_and_observe():
    """The trainer reads readout() with the step's values and hands them to observe(): the
    host then knows, without another read, whether any class takes the tile map; an update
    or a loaded state makes that unknown again (may_use_tiles True: tiles are computed)."""
    from seco_cli.memory import CamHeads

    heads = CamHeads(3, "agreement", min_agreement=0.3, fallback="tiles")
    assert heads.may_use_tiles()  # nothing observed yet
    heads.update(torch.tensor([[[0.5, -0.3, 0.0], [0.1, 0.6, 0.0]]]),
                 torch.tensor([[1.0, 1.0, 0.0]]), momentum=0.9)
    assert heads.may_use_tiles()  # changed since the last observe
    values = heads.readout().tolist()
    assert values == [*heads.agreement.double().flatten().tolist(), 1.0, 1.0, 0.0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="before observe"):
        heads.observed_names(True)
    rows = heads.observe(values)
    assert rows == [heads.agreement[0].double().tolist(), heads.agreement[1].double().tolist()]
    for schedule_aux in (True, False):  # the host copy's sources are the device's
        assert heads.observed_names(schedule_aux) == heads.names(schedule_aux)
    assert not heads.use_tiles().any() and not heads.may_use_tiles()
    heads.update(torch.tensor([[[0.0, 0.0, 0.1], [0.0, 0.0, 0.2]]]),
                 torch.tensor([[0.0, 0.0, 1.0]]), momentum=0.9)  # class 2: under the floor
    assert heads.may_use_tiles()
    heads.observe(heads.readout().tolist())
    assert heads.use_tiles().tolist() == [False, False, True] and heads.may_use_tiles()
    state = heads.state_dict()
    fresh = CamHeads(3, "agreement", min_agreement=0.3, fallback="tiles")
    fresh.observe([0.5] * 6 + [1.0] * 3 + [0.0] * 3)  # host copy: "no class on the tiles"
    assert not fresh.may_use_tiles()
    fresh.load_state_dict(state)  # the loaded statistic has a class on the tiles
    assert fresh.may_use_tiles()
    keep = CamHeads(3, "agreement", min_agreement=0.3, fallback="none")
    keep.observe([0.0] * 6 + [1.0] * 3 + [0.0] * 3)  # below the floor, but no fallback
    assert not keep.may_use_tiles()
    with pytest.raises(ValueError, match="expected 12 values"):
        keep.observe([0.0] * 6)


@pytest.mark.parametrize("floor", [-1.0, 1.0])
def test_online_cam_without_update_keeps_the_statistic_and_skips_tiles_unless_needed(
        floor, monkeypatch):
    """train.cam_select_every > 1: between updates the statistic and the seen counts stay,
    the CAM is the one an update step's choice gives, and the tiles are classified only
    when a class takes the tile map (floor 1.0: every seen class does)."""
    import seco_cli.method as method_module
    from seco_cli.method import SeCo
    from tests.conftest import tiny_params

    torch.manual_seed(0)
    p = tiny_params("train.cam_select=agreement", f"train.cam_select_min_agreement={floor}",
                    "train.cam_select_fallback=tiles", "train.patch_size=16")
    method = SeCo(p, 6)
    method.eval()
    calls = []
    real = method_module.classify_tiles
    monkeypatch.setattr(method_module, "classify_tiles",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    images = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]])
    method.online_cam(images, labels, aux=True)  # an update step
    assert len(calls) == 1
    stat, seen = method.cam_heads.agreement.clone(), method.cam_heads.seen.clone()
    # the host copy is not known yet: the tiles are classified, and the CAM is unchanged
    other = torch.randn(2, 3, 48, 48)
    unknown = method.online_cam(other, labels, aux=True, update=False)
    assert len(calls) == 2
    method.cam_heads.observe(method.cam_heads.readout().tolist())
    known = method.online_cam(other, labels, aux=True, update=False)
    assert len(calls) == (3 if floor == 1.0 else 2)  # tiles only for a class on the fallback
    assert torch.equal(known, unknown)
    assert torch.equal(method.cam_heads.agreement, stat)
    assert torch.equal(method.cam_heads.seen, seen)
    assert method.cam_heads.use_tiles().any() == (floor == 1.0)
    # with the host's labels, only the images showing a class on the tiles are tiled: image 1
    # shows class 3 alone, never seen, so never on the tiles; its CAM is the same either way
    mixed = torch.tensor([[1.0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0]])
    sizes = []
    monkeypatch.setattr(method_module, "classify_tiles",
                        lambda net, x, *a: sizes.append(x.shape[0]) or real(net, x, *a))
    method.cam_heads.forget_host_copy()
    every_image = method.online_cam(other, mixed, aux=True, update=False)
    method.cam_heads.observe(method.cam_heads.readout().tolist())
    picked = method.online_cam(other, mixed, aux=True, update=False,
                               host_labels=mixed.tolist())
    assert sizes == ([2, 1] if floor == 1.0 else [2])
    assert torch.allclose(picked, every_image, atol=1e-6)
    assert (picked[1] == every_image[1]).all()  # not tiled: the heads' CAM, exactly


def test_cam_heads_tile_images_are_the_ones_showing_a_class_on_the_tiles():
    from seco_cli.memory import CamHeads

    heads = CamHeads(3, "agreement", min_agreement=0.3, fallback="tiles")
    labels = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert heads.tile_images(labels) is None  # nothing observed: every image
    heads.observe([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0, 0, 0])
    assert heads.tile_images(labels) == [] and heads.tile_images(None) == []  # none on tiles
    heads.observe([0.5, 0.5, 0.1, 0.5, 0.5, 0.2, 1.0, 1.0, 1.0, 0, 0, 0])  # class 2 on tiles
    assert heads.tile_images(labels) == [1, 2]
    held = CamHeads(3, "agreement", min_agreement=0.3, fallback="tiles", hysteresis=0.1)
    held.observe([0.5, 0.35, 0.35, 0.5, 0.35, 0.2, 1.0, 1.0, 1.0, 0, 1, 0])  # class 1 held
    assert held.tile_images(labels) == [1]  # 0.35 < 0.3 + 0.1: class 1 stays on the tiles
    assert heads.tile_images(None) is None  # labels not on the host: every image


def test_online_cam_with_area_selection_takes_each_class_from_the_chosen_head():
    from seco_cli.cams import fuse_cams, normalise_cams
    from seco_cli.method import SeCo
    from tests.conftest import tiny_params

    torch.manual_seed(0)
    p = tiny_params("train.cam_select=area")
    method = SeCo(p, 6)
    images, labels = torch.randn(2, 3, 48, 48), torch.ones(2, 6)
    cam = method.online_cam(images, labels, aux=True)
    final, aux = (normalise_cams(c, labels) for c in fuse_cams(
        method.net.both_cams, images, p.train.cam_scales, True, (48, 48), 8))
    use_aux = method.cam_heads.use_aux(True)
    assert int(method.cam_heads.seen.sum()) == 12
    for c in range(6):
        assert torch.equal(cam[:, c], (aux if use_aux[c] else final)[:, c])
    assert method.cam_heads.area.max() > 0


@pytest.mark.parametrize("source", ["cam", "alone"])
def test_patch_tags_come_from_the_cam_or_from_each_patch_classified_alone(source, monkeypatch):
    """train.patch_tags: alone tags each patch by the final classifier on the same student
    forward that embeds it (exactly one of its image's classes above alone_threshold → it,
    none → background, several → uncertain); cam keeps the CAM region-map tags (SPEC §3.5)."""
    from torch import nn

    from seco_cli.method import SeCo, StepWeights
    from tests.conftest import tiny_params

    torch.manual_seed(0)
    p = tiny_params(f"train.patch_tags={source}", "train.alone_threshold=0.7")
    method = SeCo(p, 6)
    images = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 1]])  # classes {1,3}, {2,6}
    valid = torch.ones(2, 48, 48, dtype=torch.bool)
    valid[1, :, 40:] = False  # some patches of image 1 may not fit
    out = method.net(images, with_seg=False)
    cam = method.online_cam(images, labels, aux=True, valid=valid)
    n = p.train.num_patches
    firsts, seconds = (0, 1), (2, 5)  # 0-based classes of images 0 and 1

    class Designed(nn.Module):
        """Patch i of image b: kind i % 4 → fires its image's first class / nothing / both
        classes / its second class and class 5 (not in either image)."""

        def forward(self, tokens):
            logits = torch.full((tokens.shape[0], 6), -4.0)
            for i in range(tokens.shape[0]):
                b, kind = i // n, i % 4
                if kind in (0, 2):
                    logits[i, firsts[b]] = 4.0
                if kind in (2, 3):
                    logits[i, seconds[b]] = 4.0
                if kind == 3:
                    logits[i, 4] = 4.0
            return logits, None

    monkeypatch.setattr(method.net, "classifier", Designed())  # after `out` and `cam`
    seen = {}
    views = method._views

    def spy(*args, **kwargs):
        seen["v"] = views(*args, **kwargs)
        seen["cam_tags"] = seen["v"]["tags"].clone()
        return seen["v"]

    monkeypatch.setattr(method, "_views", spy)
    w = StepWeights(1, 1, 0, 0, 0.5, 0.5, 0, True, True, False)
    stats: dict = {}
    terms = method.contrast_terms(out, images, images, valid, labels, cam, w,
                                  torch.Generator().manual_seed(0), lambda x: x, stats)
    assert set(terms) == {"lig", "lil"} and all(torch.isfinite(t) for t in terms.values())
    v = seen["v"]
    if source == "cam":
        assert torch.equal(v["tags"], seen["cam_tags"]) and "tag_cam_agree" not in stats
        return
    want = [(firsts[i // n] + 1, 0, -1, seconds[i // n] + 1)[i % 4] if fits else -1
            for i, fits in enumerate(v["fits"].tolist())]
    assert v["tags"].tolist() == want
    assert stats["tag_cam_agree"] == pytest.approx(
        sum(a == b for a, b in zip(want, seen["cam_tags"].tolist(), strict=True)) / len(want))
    assert stats["tag_class"] == pytest.approx(sum(t > 0 for t in want) / len(want))


# ---------------------------------------------------------------- select forms (no device waits)
def _contrast_case(seed: int, n: int = 30, m: int = 40, c: int = 5, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    keys = F.normalize(torch.randn(m, d, generator=g), dim=1)
    protos = F.normalize(torch.randn(c, d, generator=g), dim=1)
    tags = torch.randint(-1, c + 1, (n,), generator=g)
    key_tags = torch.randint(-1, c + 1, (m,), generator=g)
    return q, tags, keys, key_tags, protos


@pytest.mark.parametrize("case", ["random", "no anchor", "no usable key"])
def test_contrasts_select_equal_gather_values_and_gradients(case):
    """Each contrast's select form (the default off the CPU) gives the gather form's loss and
    gradient, also when no query is an anchor or no key can be used."""
    q, tags, keys, key_tags, protos = _contrast_case(3)
    if case == "no anchor":
        tags = torch.full_like(tags, -1)
    if case == "no usable key":
        key_tags = torch.full_like(key_tags, -1)
    losses = {"lig": lambda g: global_contrast(q, tags, protos, 0.1, gather=g),
              "lil": lambda g: local_contrast(q, tags, keys, key_tags, 0.2, gather=g)}
    for name, loss_fn in losses.items():
        out = {}
        for g in (True, False):
            q.grad = None
            loss = loss_fn(g)
            loss.backward()
            out[g] = loss.detach(), q.grad.clone()
        torch.testing.assert_close(out[False][0], out[True][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out[False][1], out[True][1], rtol=1e-5, atol=1e-7)
        assert torch.isfinite(out[False][1]).all()
        empty = case == "no anchor" or (case == "no usable key" and name == "lil")
        assert (out[False][0].item() == 0.0) == empty


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rectify_select_equals_gather(seed):
    q, tags, keys, key_tags, _ = _contrast_case(seed)
    q = q.detach()
    keys[:10] = F.normalize(q[:10] + 0.1 * keys[:10], dim=1)  # some queries near their bank
    key_tags[:10] = tags[:10]
    for proportion in (0.3, 0.6):
        a, sa = rectify(q, tags, keys, key_tags, proportion, gather=True)
        b, sb = rectify(q, tags, keys, key_tags, proportion, num_tags=6, gather=False)
        assert torch.equal(a, b)
        for name in ("rectified_fraction", "abnormal_fraction", "mu_mean"):
            torch.testing.assert_close(sb[name], sa[name], rtol=1e-5, atol=1e-7)
        assert int(sb["rectified"]) == int(sa["rectified"]) and int(sa["eligible"]) > 0
    empty = rectify(q, torch.full_like(tags, -1), keys, torch.full_like(key_tags, -1), 0.5,
                    num_tags=6, gather=False)[1]
    assert float(empty["mu_mean"]) == 0.0 and int(empty["eligible"]) == 0
