"""Batched random views for SeCo's teachers (SPEC §3.6–§3.7).

* ``strong_view``: the local teacher's *key* view of each patch — colour jitter, grayscale,
  Gaussian blur. Photometric only: it never moves or flips a pixel, so key and query share
  location and flip (SPEC §3.6 decision: upstream flips the key independently).
* ``global_view``: the second global view — random-resized crop (inside the valid region),
  horizontal flip, the strong photometric ops and solarisation.

Images are **un-normalised** RGB in [0, 1], (B, 3, H, W); the caller normalises (ImageNet
mean/std or the backbone's own) afterwards. Every random parameter is drawn per sample, as a
tensor, from the given ``torch.Generator`` (drawn on the generator's device, then moved), in
a fixed order whatever the probabilities are — so a view is a function of (generator state,
input) only (SPEC §3.8). No loop over samples: per-sample factors broadcast, per-sample blur
kernels run as one grouped convolution.

Semantics follow torchvision (``ColorJitter`` factors and random op order, ``RandomGrayscale``,
``RandomResizedCrop`` sampling, ``solarize``); blur uses a Gaussian kernel of radius
ceil(3·σ_max) with reflect padding (upstream: PIL ``GaussianBlur(radius=σ)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seco_cli.tags import valid_bbox
from seco_cli.waits import gathers

Jitter = tuple[float, float, float, float]  # brightness, contrast, saturation, hue magnitudes
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision


def _rand(generator: torch.Generator, shape: tuple[int, ...], device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)  # (B,) → (B, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of ``x`` (B, 3, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness ``factor`` (B,)."""
    return (x * _per_sample(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample contrast ``factor`` (B,): blend with the image's mean luma."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    f = _per_sample(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample saturation ``factor`` (B,): blend with the pixel's luma."""
    f = _per_sample(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue ``shift`` (B,) in turns ([−0.5, 0.5]), through HSV."""
    v, _ = x.max(dim=1)  # (B, H, W)
    mn, _ = x.min(dim=1)
    chroma = v - mn
    s = chroma / torch.where(v > 0, v, torch.ones_like(v))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(dim=1)
    # hue in sextants [0, 6): which channel is the max decides the formula
    h = torch.where(v == r, (g - b) / safe,
                    torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + 6 * shift.view(-1, 1, 1), 6)  # (B, H, W)
    # HSV → RGB in closed form: channel n ∈ (5, 3, 1) for (R, G, B)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return (v.unsqueeze(1) * (1 - s.unsqueeze(1) * ramp)).clamp(0, 1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def random_color_jitter(x: torch.Tensor, generator: torch.Generator, jitter: Jitter,
                        p: float, gather: bool | None = None) -> torch.Tensor:
    """torchvision ``RandomApply([ColorJitter(*jitter)], p)`` per sample.

    Factors: brightness / contrast / saturation uniform in [max(0, 1 − m), 1 + m], hue shift
    uniform in [−m, m]; the four ops run in a per-sample random order. An op of magnitude 0
    is skipped, as torchvision does. Two forms (:mod:`seco_cli.waits`), equal to the bit:
    gather runs each op on just the samples whose order names it at that step (a jittered
    sample costs its four ops, an unjittered one nothing); select runs each op on every
    sample and keeps it where the order names it (4 × the arithmetic, no wait).
    """
    b = x.shape[0]
    apply = _rand(generator, (b,), x.device) < p  # (B,)
    u = _rand(generator, (b, 4), x.device)  # (B, 4)
    order = _rand(generator, (b, 4), x.device).argsort(dim=1)  # (B, 4) random permutations
    if p <= 0 or not any(m > 0 for m in jitter):
        return x
    lo = torch.tensor([max(0.0, 1 - m) for m in jitter[:3]] + [-jitter[3]], device=x.device)
    hi = torch.tensor([1 + m for m in jitter[:3]] + [jitter[3]], device=x.device)
    factors = lo + (hi - lo) * u  # (B, 4)
    gather = gathers(x, gather)
    y = x.clone()
    for step in range(4):
        for j, op in enumerate(_JITTER_OPS):
            if jitter[j] > 0:
                chosen = apply & (order[:, step] == j)  # (B,)
                if gather:
                    idx = chosen.nonzero().flatten()  # (k,)
                    if idx.numel():
                        y[idx] = op(y[idx], factors[idx, j])
                else:
                    y = torch.where(_per_sample(chosen), op(y, factors[:, j]), y)
    return y


def random_grayscale(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Per sample with probability ``p``: luma replicated on the three channels."""
    apply = _rand(generator, (x.shape[0],), x.device) < p  # (B,)
    if p <= 0:
        return x
    return torch.where(_per_sample(apply), grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur, per-sample ``sigma`` (B,), kernel 2·radius+1, reflect padding.

    One grouped convolution over all B·3 channels (each with its own kernel).
    """
    b, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)  # reflect padding needs radius < side
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (K,)
    kernel = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(b, 1)) ** 2)  # (B, K)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*3, K)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)  # horizontal pass
    y = F.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)  # vertical pass
    return y.view(b, c, h, w)


def random_blur(x: torch.Tensor, generator: torch.Generator, p: float,
                sigma: tuple[float, float]) -> torch.Tensor:
    """Per sample with probability ``p``: Gaussian blur, σ uniform in ``sigma``."""
    b = x.shape[0]
    apply = _rand(generator, (b,), x.device) < p  # (B,)
    s = sigma[0] + (sigma[1] - sigma[0]) * _rand(generator, (b,), x.device)  # (B,)
    if p <= 0:
        return x
    blurred = gaussian_blur(x, s, radius=math.ceil(3 * sigma[1]))
    return torch.where(_per_sample(apply), blurred, x)


def random_solarize(x: torch.Tensor, generator: torch.Generator, p: float,
                    threshold: float = 0.5) -> torch.Tensor:
    """Per sample with probability ``p``: values ≥ ``threshold`` become 1 − value."""
    apply = _rand(generator, (x.shape[0],), x.device) < p  # (B,)
    if p <= 0:
        return x
    solarized = torch.where(x >= threshold, 1 - x, x)
    return torch.where(_per_sample(apply), solarized, x)


def strong_view(x: torch.Tensor, generator: torch.Generator,
                jitter: Jitter = (0.4, 0.4, 0.2, 0.1), p_jitter: float = 0.8,
                p_gray: float = 0.2, p_blur: float = 0.5,
                sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """Strong key view (B, 3, H, W) of ``x`` in [0, 1] (SPEC §3.6): jitter → gray → blur.

    Photometric only — never moves or flips a pixel; all probabilities 0 is the identity.
    """
    x = random_color_jitter(x, generator, jitter, p_jitter)
    x = random_grayscale(x, generator, p_gray)
    return random_blur(x, generator, p_blur, sigma)


def random_resized_boxes(bbox: torch.Tensor, generator: torch.Generator,
                         scale: tuple[float, float], ratio: tuple[float, float],
                         attempts: int = 10) -> torch.Tensor:
    """torchvision ``RandomResizedCrop`` boxes (B, 4) long ``(y0, x0, y1, x1)`` inside ``bbox``.

    Area fraction uniform in ``scale``, log aspect ratio (w/h) uniform in log ``ratio``; the
    first of ``attempts`` draws that fits wins, else the central crop with the ratio clamped.
    """
    b, dev = bbox.shape[0], bbox.device
    hb = (bbox[:, 2] - bbox[:, 0]).double().view(b, 1)  # (B, 1)
    wb = (bbox[:, 3] - bbox[:, 1]).double().view(b, 1)
    area = hb * wb * (scale[0] + (scale[1] - scale[0]) * _rand(generator, (b, attempts), dev,
                                                               torch.float64))  # (B, A)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(
        generator, (b, attempts), dev, torch.float64)  # (B, A)
    w, h = torch.sqrt(area * log_r.exp()).round(), torch.sqrt(area / log_r.exp()).round()
    fits = (w > 0) & (w <= wb) & (h > 0) & (h <= hb)  # (B, A)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1)
    h, w = h.gather(1, first), w.gather(1, first)  # (B, 1)
    # fallback: central crop of the whole box, aspect ratio clamped into ``ratio``
    fw = torch.where(wb / hb > ratio[1], (hb * ratio[1]).round(), wb)
    fh = torch.where(wb / hb < ratio[0], (wb / ratio[0]).round(), hb)
    ok = fits.any(dim=1, keepdim=True)  # (B, 1)
    h, w = torch.where(ok, h, fh), torch.where(ok, w, fw)
    u = _rand(generator, (b, 2), dev, torch.float64)  # (B, 2)
    top = torch.where(ok, (u[:, :1] * (hb - h + 1)).floor(), ((hb - h) / 2).floor())
    left = torch.where(ok, (u[:, 1:] * (wb - w + 1)).floor(), ((wb - w) / 2).floor())
    y0, x0 = bbox[:, :1] + top.long(), bbox[:, 1:2] + left.long()  # (B, 1)
    return torch.cat([y0, x0, y0 + h.long(), x0 + w.long()], dim=1)


def _source_coords(start: torch.Tensor, end: torch.Tensor, out: int, full: int) -> torch.Tensor:
    """grid_sample coordinates (B, out) reading [start, end) (B,) resized to ``out`` samples,
    as ``F.interpolate(bilinear, align_corners=False)`` of the crop: half-pixel centres,
    clamped to the crop's first / last pixel."""
    length = (end - start).double().view(-1, 1)  # (B, 1)
    i = torch.arange(out, device=start.device, dtype=torch.float64).view(1, out)
    src = start.double().view(-1, 1) + (i + 0.5) * length / out - 0.5  # (B, out)
    src = torch.minimum(src, (end - 1).double().view(-1, 1))
    src = torch.maximum(src, start.double().view(-1, 1))
    return (2 * src + 1) / full - 1  # pixel index → normalised, align_corners=False


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (B, 3, size, size) of ``x`` (B, 3, H, W) at per-sample ``boxes`` (B, 4), bilinear.

    Equals per-sample ``F.interpolate(crop, size, bilinear, align_corners=False)``, in one
    ``grid_sample`` call. Decision: bilinear (upstream: bicubic in PIL).
    """
    b, _, h, w = x.shape
    gy = _source_coords(boxes[:, 0], boxes[:, 2], size, h)  # (B, size)
    gx = _source_coords(boxes[:, 1], boxes[:, 3], size, w)  # (B, size)
    grid = torch.stack([gx.view(b, 1, size).expand(b, size, size),
                        gy.view(b, size, 1).expand(b, size, size)], dim=-1)  # (B, s, s, 2) (x, y)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def global_view(x: torch.Tensor, generator: torch.Generator, size: int,
                scale: tuple[float, float] = (0.4, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3),
                jitter: Jitter = (0.4, 0.4, 0.2, 0.1), p_jitter: float = 0.8,
                p_gray: float = 0.2, p_blur: float = 0.1, p_solarize: float = 0.2,
                p_flip: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0),
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Second global view (B, 3, size, size) of ``x`` (B, 3, H, W) in [0, 1] (SPEC §3.7).

    Random-resized crop inside the bounding box of ``valid`` (B, H, W) (the whole image when
    None), horizontal flip with ``p_flip`` (upstream's global views flip), then jitter →
    gray → blur → solarize.
    """
    b, _, h, w = x.shape
    if valid is None:
        bbox = torch.tensor([[0, 0, h, w]], device=x.device).expand(b, 4)
    else:
        bbox = valid_bbox(valid).to(x.device)
    boxes = random_resized_boxes(bbox, generator, scale, ratio)  # (B, 4)
    out = resized_crop(x, boxes, size)
    flip = _rand(generator, (b,), x.device) < p_flip  # (B,)
    out = torch.where(_per_sample(flip), out.flip(-1), out)
    out = strong_view(out, generator, jitter, p_jitter, p_gray, p_blur, sigma)
    return random_solarize(out, generator, p_solarize)
