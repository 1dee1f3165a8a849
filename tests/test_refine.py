"""PAR, dense CRF and the CRF energy regulariser L_reg: math on constructed images."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from seco_cli.losses.crf import crf_energy, crf_energy_exact, crf_energy_window
from seco_cli.postprocess import crf_labels, dense_crf
from seco_cli.refine import neighbour_offsets, par_refine


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small ops: one intra-op thread is faster here and keeps the module under seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _two_regions(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image (1, 3, h, w): left half dark, right half bright, slight noise; and the
    true labels (h, w): 0 left, 1 right."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, w // 2:] = 1
    image = (truth.float() * 2 - 1).expand(1, 3, h, w) + 0.05 * torch.randn(1, 3, h, w, generator=g)
    return image, truth


def _salt(truth: torch.Tensor, rate: float, seed: int = 0) -> torch.Tensor:
    """Flip a ``rate`` fraction of a binary label map at random."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(truth.shape, generator=g) < rate
    return torch.where(flip, 1 - truth, truth)


# --- PAR -----------------------------------------------------------------------------------

def test_neighbour_offsets_cover_eight_per_dilation():
    offsets = neighbour_offsets((1, 3))
    assert len(offsets) == 16 and len(set(offsets)) == 16
    assert (0, 0) not in offsets and (-3, 3) in offsets


def test_par_keeps_constant_map():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 40, 36)
    dist = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    probs = dist.view(2, 3, 1, 1).expand(2, 3, 40, 36).clone()
    out = par_refine(image, probs)
    assert out.shape == probs.shape
    torch.testing.assert_close(out, probs, atol=1e-5, rtol=0)


def test_par_output_is_a_distribution():
    torch.manual_seed(1)
    image = torch.randn(2, 3, 30, 50)
    probs = torch.randn(2, 4, 30, 50).softmax(1)
    out = par_refine(image, probs)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 30, 50), atol=1e-5, rtol=0)
    assert out.min() >= 0


def test_par_moves_noisy_labels_to_the_region_majority():
    image, truth = _two_regions(64, 64)
    noisy = _salt(truth, 0.3)
    probs = torch.nn.functional.one_hot(noisy, 2).permute(2, 0, 1)[None].float() * 0.4 + 0.3
    before = (probs.argmax(1)[0] == truth).float().mean()
    after = (par_refine(image, probs).argmax(1)[0] == truth).float().mean()
    assert before < 0.75
    assert after > before and after >= 0.95


# --- dense CRF -----------------------------------------------------------------------------

def _crf_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two colour regions (uint8 RGB), the truth, a 20 % salt-noised label map, soft probs."""
    rng = np.random.default_rng(0)
    truth = np.zeros((48, 64), dtype=np.int64)
    truth[:, 32:] = 1
    colours = np.array([[200, 40, 40], [40, 60, 200]], dtype=np.int16)
    image = np.clip(colours[truth] + rng.integers(-3, 4, (48, 64, 3)), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)
    probs = np.stack([noisy == 0, noisy == 1]).astype(np.float32) * 0.4 + 0.3  # (2, H, W)
    return image, truth, noisy, probs


def test_dense_crf_cleans_salt_noise():
    image, truth, noisy, probs = _crf_case()
    out = dense_crf(image, probs)
    assert out.shape == probs.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)
    before, after = (noisy == truth).mean(), (out.argmax(0) == truth).mean()
    assert before < 0.85
    assert after > before and after >= 0.95


def test_crf_labels_maps_channels_and_pickles():
    image, truth, _, probs = _crf_case()
    fn = pickle.loads(pickle.dumps(crf_labels))                   # a process pool can ship it
    labels = fn(image, probs, [0, 15], iterations=5)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 15}
    assert ((labels == 15) == (truth == 1)).mean() >= 0.95
    with pytest.raises(ValueError):
        crf_labels(image, probs, [0])


# --- L_reg: the CRF energy -----------------------------------------------------------------

def _dense_reference(image, seg, gate, sigma_rgb, sigma_xy):
    """-Σ_b Σ_k S_kᵀ W S_k / B with W written out pixel pair by pixel pair (autograd)."""
    b, k, h, w = seg.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2).to(seg.dtype)
    total = seg.sum() * 0
    for i in range(b):
        rgb = image[i].reshape(3, -1).t().to(seg.dtype)
        d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
        d_rgb = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
        kernel = torch.exp(-d_pos / (2 * sigma_xy**2) - d_rgb / (2 * sigma_rgb**2))
        s = (seg[i] * gate[i]).reshape(k, -1)
        total = total - (s @ kernel * s).sum()
    return total / b


def _piecewise_image(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) 0–255: left half dark red, right half light blue."""
    image = torch.empty(1, 3, h, w)
    image[..., : w // 2] = torch.tensor([180.0, 30.0, 30.0]).view(1, 3, 1, 1)
    image[..., w // 2:] = torch.tensor([30.0, 90.0, 220.0]).view(1, 3, 1, 1)
    return image


def _random_case(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 10, 13, generator=g, dtype=dtype) * 255
    logits = torch.randn(2, 4, 10, 13, generator=g, dtype=dtype).requires_grad_()
    gate = torch.rand(2, 10, 13, generator=g) > 0.3
    return image, logits, gate


@pytest.mark.parametrize("form", ["exact", "window"])
def test_energy_matches_dense_reference_and_its_gradient(form):
    image, logits, gate = _random_case()
    kw = dict(sigma_rgb=60.0, sigma_xy=4.0)
    if form == "exact":
        energy = crf_energy_exact(image, logits.softmax(1), gate, scale=1.0, block=17, **kw)
    else:
        energy = crf_energy_window(image, logits.softmax(1), gate, radius=13, scale=1.0, **kw)
    (grad,) = torch.autograd.grad(energy, logits)
    ref = _dense_reference(image, logits.softmax(1), gate.double(), **kw)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(energy, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("form", ["exact", "window"])
def test_energy_is_float32_inside_bf16_autocast(form):
    """A CUDA training step calls L_reg inside a bf16 autocast region (on the CPU here): the
    energy and its gradient are still the float32 ones, from bf16 or float32 input."""
    image, logits, gate = _random_case(dtype=torch.float32, seed=1)
    kw = dict(sigma_rgb=60.0, sigma_xy=4.0, scale=1.0)

    def energy(seg):
        if form == "exact":
            return crf_energy_exact(image, seg, gate, block=17, **kw)
        return crf_energy_window(image, seg, gate, radius=13, **kw)

    ref = energy(logits.softmax(1))
    (ref_grad,) = torch.autograd.grad(ref, logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = energy(logits.softmax(1))
    (grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_exact_equals_window_covering_the_image():
    image, logits, gate = _random_case(dtype=torch.float32, seed=3)
    seg = logits.detach().softmax(1)
    for sigma_xy in (2.0, 50.0):
        exact = crf_energy_exact(image, seg, gate, sigma_xy=sigma_xy)
        window = crf_energy_window(image, seg, gate, radius=13, sigma_xy=sigma_xy)
        torch.testing.assert_close(window, exact, rtol=1e-5, atol=0)


def test_window_close_to_exact_when_sigma_xy_is_small():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 24, 24, generator=g, dtype=torch.float64) * 60
    seg = torch.randn(1, 5, 24, 24, generator=g, dtype=torch.float64).softmax(1)
    exact = crf_energy_exact(image, seg, None, sigma_xy=1.5)
    window = crf_energy_window(image, seg, None, radius=8, sigma_xy=1.5)
    assert math.isclose(window.item(), exact.item(), rel_tol=1e-6)
    assert not math.isclose(crf_energy_window(image, seg, None, radius=1, sigma_xy=1.5).item(),
                            exact.item(), rel_tol=1e-2)


def test_energy_lower_for_smooth_segmentation_than_noise():
    image = _piecewise_image(16, 16)
    truth = torch.zeros(1, 16, 16, dtype=torch.long)
    truth[..., 8:] = 2
    smooth = (4 * torch.nn.functional.one_hot(truth, 3).permute(0, 3, 1, 2).float()).softmax(1)
    noise = (4 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))).softmax(1)
    for energy in (lambda s: crf_energy_exact(image, s, None),
                   lambda s: crf_energy_window(image, s, None, radius=4)):
        assert energy(smooth) < energy(noise) < 0


@pytest.mark.parametrize("form", ["exact", "window"])
def test_gradient_flows_and_respects_the_gate(form):
    image, logits, gate = _random_case(dtype=torch.float32, seed=7)
    seg = logits.softmax(1)
    if form == "exact":
        energy = crf_energy_exact(image, seg, gate)
    else:
        energy = crf_energy_window(image, seg, gate, radius=3)
    energy.backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().amax(1)[gate].gt(0).all()                   # every gated pixel moves
    assert grad.abs().amax(1)[~gate].eq(0).all()                  # the others do not


def test_empty_gate_gives_zero_energy():
    image, logits, _ = _random_case(dtype=torch.float32)
    empty = torch.zeros(2, 10, 13, dtype=torch.bool)
    for form in (lambda s: crf_energy_exact(image, s, empty),
                 lambda s: crf_energy_window(image, s, empty, radius=3),
                 lambda s: crf_energy(image, s, empty),
                 lambda s: crf_energy_exact(image, s, empty, reduction="pixel")):
        energy = form(logits.softmax(1))
        assert energy.item() == 0.0
        energy.backward()                                          # still part of the graph
        assert torch.isfinite(logits.grad).all()


def test_pixel_reduction_divides_by_the_gated_count():
    image, logits, gate = _random_case(dtype=torch.float64, seed=9)
    seg = logits.detach().softmax(1)
    per_image = torch.stack([crf_energy_exact(image[i:i + 1], seg[i:i + 1], gate[i:i + 1])
                             for i in range(2)])
    expected = (per_image / gate.flatten(1).sum(1)).mean()
    got = crf_energy_exact(image, seg, gate, reduction="pixel")
    torch.testing.assert_close(got, expected)


def test_dispatch_picks_exact_or_window():
    image, logits, gate = _random_case(dtype=torch.float64, seed=11)
    seg = logits.detach().softmax(1)
    most = int(gate.flatten(1).sum(1).max())
    exact = crf_energy_exact(image, seg, gate, sigma_xy=30.0)
    window = crf_energy_window(image, seg, gate, radius=2, sigma_xy=30.0)
    assert crf_energy(image, seg, gate, sigma_xy=30.0, max_exact=most, radius=2) == exact
    assert crf_energy(image, seg, gate, sigma_xy=30.0, max_exact=most - 1, radius=2) == window


def test_exact_energy_of_a_batch_equals_each_image_alone_and_waits_once():
    """The batch's gated pixels come from one ``nonzero_static`` of the size read with the
    counts: one wait for the device per batch (a ``nonzero`` per image waited once each),
    and per image the very energy it has alone, an image with an empty gate included."""
    from torch.profiler import ProfilerActivity, profile

    image = torch.rand(4, 3, 9, 11, dtype=torch.float64) * 255
    seg = torch.rand(4, 3, 9, 11, dtype=torch.float64).softmax(1)
    gate = torch.rand(4, 9, 11) > 0.4
    gate[2] = False
    per_image = [crf_energy_exact(image[i:i + 1], seg[i:i + 1], gate[i:i + 1]) for i in range(4)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        batch = crf_energy(image, seg, gate, scale=1.0, reduction="image")
    names = [e.name for e in prof.events()]
    assert "aten::nonzero" not in names and names.count("aten::nonzero_static") == 1
    torch.testing.assert_close(batch, torch.stack(per_image).mean() / 1e-7, rtol=1e-12, atol=0)
