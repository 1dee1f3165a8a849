"""Conquer in feature space (SPEC §4–§6): L_iG against prototypes, tag rectification,
L_iL against keys ∪ reservoir, and ToCo's patch-token contrast L_ptc.

Tags: 0 = background, c ≥ 1 = class c (prototype row c − 1), −1 = uncertain.
Embeddings q and keys are expected L2-normalised (projection head output); similarities
are computed in float32 whatever the autocast dtype.

``gather``: each loss has a gather and a select form (:mod:`seco_cli.waits`): equal up to
rounding, and the select form, the default off the CPU, never makes the host wait.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seco_cli.waits import gathers


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero loss still attached to ``x``'s graph (so backward() works when no anchor)."""
    return x.sum() * 0.0


def global_contrast(
    q: torch.Tensor, tags: torch.Tensor, prototypes: torch.Tensor, tau: float,
    gather: bool | None = None,
) -> torch.Tensor:
    """L_iG (paper eq. 4, SPEC §4).

    q (N, d) student embeddings, tags (N,) long, prototypes (C, d) (detached here).
    Anchors: tag ≥ 1. loss_i = −log softmax over c ∈ A of q_i·p_c/τ at c = t_i, where A =
    the classes among this batch's tags ≥ 1 (co-categories are the negatives); mean over
    anchors, 0 (attached to the graph) when there is none.
    """
    anchor = tags >= 1  # (N,)
    if not gathers(q, gather):
        rows = (tags - 1).clamp_min(0)  # (N,)
        in_batch = prototypes.new_zeros(prototypes.shape[0]).index_add_(
            0, rows, anchor.to(prototypes.dtype)) > 0  # (C,) the set A
        # a row that is no anchor sees every class (finite) and weighs 0
        allowed = in_batch[None] | ~anchor[:, None]  # (N, C)
        logits = q.float() @ prototypes.detach().float().T / tau
        log_prob = logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=1)
        per_row = -log_prob.gather(1, rows[:, None]).squeeze(1)  # (N,)
        return (per_row * anchor).sum() / anchor.sum().clamp_min(1)
    if not bool(anchor.any()):
        return _zero(q)
    rows = tags[anchor] - 1  # (n,) prototype rows
    in_batch = torch.zeros(prototypes.shape[0], dtype=torch.bool, device=q.device)
    in_batch[rows] = True  # (C,) the set A
    logits = q[anchor].float() @ prototypes.detach().float().T / tau  # (n, C)
    logits = logits.masked_fill(~in_batch[None], float("-inf"))
    log_prob = logits.log_softmax(dim=1)  # (n, C), −inf outside A
    return -log_prob.gather(1, rows[:, None]).mean()


def _tag_mean_similarity(keys: torch.Tensor, tags: torch.Tensor, num_tags: int,
                         gather: bool = True) -> torch.Tensor:
    """μ_t (T,): mean similarity over off-diagonal pairs of entries tagged t; NaN if < 2.

    Exact without the (M, M) matrix: Σ_{i≠j} k_i·k_j = ‖Σ_i k_i‖² − Σ_i ‖k_i‖².
    """
    keep = tags >= 0
    if gather:
        keys, tags = keys[keep].float(), tags[keep]
        weight = None
    else:  # every entry, an uncertain one (−1) counted in row 0 with weight 0
        keys, tags, weight = keys.float(), tags.clamp_min(0), keep.float()
        keys = keys * weight[:, None]
    sums = keys.new_zeros(num_tags, keys.shape[1]).index_add_(0, tags, keys)  # (T, d)
    sq = keys.new_zeros(num_tags).index_add_(0, tags, (keys * keys).sum(1))  # (T,)
    n = torch.bincount(tags, weights=weight, minlength=num_tags).float()  # (T,)
    mu = ((sums * sums).sum(1) - sq) / (n * (n - 1)).clamp_min(1.0)
    return mu.masked_fill(n < 2, float("nan"))


@torch.no_grad()
def rectify(
    q: torch.Tensor,
    tags: torch.Tensor,
    bank_keys: torch.Tensor,
    bank_tags: torch.Tensor,
    proportion: float,
    num_tags: int | None = None,
    gather: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tag rectification (paper eqs. 6–7, SPEC §5); returns (new_tags (N,), stats).

    μ_t = mean pairwise similarity among bank entries tagged t (off-diagonal pairs; tags
    with fewer than 2 entries are not rectified). A query tagged t ≥ 0 — background
    included, as SPEC §5 says "for tag t" — forms pairs with the bank entries tagged t; a
    pair is abnormal when q·k_j < μ_t; if the abnormal fraction exceeds ``proportion`` (β)
    the query's tag becomes −1 (uncertain) and it leaves both contrasts.

    Decision (SPEC §5): follows the paper; upstream compares to q's zero-padded mean with
    ratio 10 and almost never fires.

    stats (0-dim tensors unless noted; the caller calls .item() when it logs):
    ``rectified_fraction`` (rectified / eligible queries, 0 when none eligible),
    ``eligible``, ``rectified``,
    ``abnormal_fraction`` (mean abnormal-pair fraction over eligible queries, for
    calibrating β), ``mu`` (T,) μ per tag (NaN where undefined), ``mu_mean`` (mean of the
    defined μ), ``frac`` (N,) each query's abnormal-pair fraction (NaN where not eligible).
    ``num_tags``: more than the largest tag (the classes + 1), else read from the tags.
    """
    gather = gathers(q, gather)
    if num_tags is None:
        num_tags = 1 + int(torch.cat([tags, bank_tags, tags.new_zeros(1)]).max())  # T ≥ 1
    mu = _tag_mean_similarity(bank_keys, bank_tags, num_tags, gather)  # (T,)
    sim = q.float() @ bank_keys.float().T  # (N, M)
    same = (bank_tags[None] == tags[:, None]) & (tags[:, None] >= 0)  # (N, M)
    mu_q = mu[tags.clamp_min(0)]  # (N,)
    eligible = (tags >= 0) & ~torch.isnan(mu_q)  # (N,)
    abnormal = (same & (sim < mu_q[:, None])).sum(1).float()  # (N,)
    frac = abnormal / same.sum(1).clamp_min(1).float()  # (N,)
    rectified = eligible & (frac > proportion)
    new_tags = tags.masked_fill(rectified, -1)
    n_elig, n_rect = eligible.sum(), rectified.sum()
    stats = {
        "rectified_fraction": n_rect.float() / n_elig.clamp_min(1).float(),
        "eligible": n_elig,
        "rectified": n_rect,
        "abnormal_fraction": (frac * eligible).sum() / n_elig.clamp_min(1).float(),
        "mu": mu,
        "mu_mean": (mu.nanmean() if bool((~torch.isnan(mu)).any()) else mu.new_zeros(()))
        if gather else torch.where(torch.isnan(mu).all(), 0.0, mu.nanmean()),
        "frac": frac.masked_fill(~eligible, float("nan")),
    }
    return new_tags, stats


def local_contrast(
    q: torch.Tensor,
    q_tags: torch.Tensor,
    keys: torch.Tensor,
    key_tags: torch.Tensor,
    tau: float,
    gather: bool | None = None,
) -> torch.Tensor:
    """L_iL (paper eq. 8, SPEC §5): supervised contrast of queries against keys ∪ reservoir.

    q (N, d), q_tags (N,), keys (M, d) (detached here), key_tags (M,). For an anchor i with
    tag ≠ −1: P_i = keys with the same tag (background matches background), A_i = all keys
    with tag ≠ −1; loss_i = −(1/|P_i|) Σ_{p∈P_i} log(exp(q_i·k_p/τ) / Σ_{a∈A_i} exp(q_i·k_a/τ)).
    Mean over anchors with non-empty P_i; 0 (attached to the graph) when there is none.

    Decision (SPEC §5): per-anchor normalisation (upstream divides by a batch-wide count and
    sums over all columns).
    """
    key_ok = key_tags != -1  # (M,)
    pos = (q_tags[:, None] == key_tags[None]) & key_ok[None]  # (N, M)
    anchor = (q_tags != -1) & pos.any(1)  # (N,)
    if not gathers(q, gather):
        logits = q.float() @ keys.detach().float().T / tau  # (N, M)
        # no usable key at all: a finite denominator (no row is an anchor then)
        in_den = key_ok[None] | ~key_ok.any()
        log_den = logits.masked_fill(~in_den, float("-inf")).logsumexp(dim=1)  # (N,)
        log_prob = torch.where(pos, logits - log_den[:, None], torch.zeros_like(logits))
        per_row = -(log_prob.sum(1) / pos.sum(1).clamp_min(1))  # (N,)
        return (per_row * anchor).sum() / anchor.sum().clamp_min(1)
    if not bool(anchor.any()):
        return _zero(q)
    pos = pos[anchor]  # (n, M)
    logits = q[anchor].float() @ keys.detach().float().T / tau  # (n, M)
    log_den = logits.masked_fill(~key_ok[None], float("-inf")).logsumexp(dim=1)  # (n,)
    log_prob = torch.where(pos, logits - log_den[:, None], torch.zeros_like(logits))
    return (-(log_prob.sum(1) / pos.sum(1))).mean()


def ptc_token_labels(
    aux_cam: torch.Tensor, labels: torch.Tensor, bkg: float, high: float, low: float
) -> torch.Tensor:
    """Token labels for L_ptc (B, h, w) long: class c + 1, background 0, ignored −1.

    ToCo's rule: the aux CAM (B, C, h, w), normalised, is restricted to the image's labels;
    with v = max over classes: v > max(high, bkg) → argmax class; v ≤ low → background;
    low < v ≤ high → ignored (middle band); high < v ≤ bkg → background. ``bkg`` is the
    constant background score of an argmax over [bkg, cam]; with the defaults
    (bkg 0.5 ≤ high 0.7) it never decides a label.
    """
    cam = aux_cam.detach() * labels[:, :, None, None].to(aux_cam.dtype)  # (B, C, h, w)
    value, cls = cam.max(dim=1)  # (B, h, w)
    # selects, not boolean indexing: the same labels, and no wait for the device
    out = torch.where(value <= bkg, 0, cls + 1)
    out = torch.where(value <= high, -1, out)
    return torch.where(value <= low, 0, out)


def patch_token_contrast(
    tokens: torch.Tensor,
    aux_cam: torch.Tensor,
    labels: torch.Tensor,
    bkg: float,
    high: float,
    low: float,
) -> torch.Tensor:
    """L_ptc (SPEC §6, inherited from ToCo) on the final token map.

    tokens (B, D, h, w); aux_cam (B, C, h, w) normalised at token resolution (detached);
    labels (B, C) multi-hot. Tokens are labelled by :func:`ptc_token_labels`; pairs are
    taken within each image over non-ignored tokens, self-pairs excluded, and pooled over
    the batch: 0.5·(1 − mean |cos| over same-label pairs) + 0.5·(mean |cos| over
    different-label pairs). A half with no pair in the whole batch contributes 0.
    (ToCo differs in small ways: it keeps self-pairs and divides by count + 1.)
    """
    lab = ptc_token_labels(aux_cam, labels, bkg, high, low).flatten(1)  # (B, n)
    x = F.normalize(tokens.float().flatten(2), dim=1)  # (B, D, n)
    cos = (x.transpose(1, 2) @ x).abs()  # (B, n, n)
    n = lab.shape[1]
    ok = (lab[:, :, None] >= 0) & (lab[:, None, :] >= 0)  # (B, n, n)
    ok &= ~torch.eye(n, dtype=torch.bool, device=lab.device)[None]
    same = ok & (lab[:, :, None] == lab[:, None, :])
    diff = ok & ~same
    n_same, n_diff = same.sum(), diff.sum()
    pos_mean = (cos * same).sum() / n_same.clamp_min(1)
    neg_mean = (cos * diff).sum() / n_diff.clamp_min(1)
    pos_half = torch.where(n_same > 0, 0.5 * (1.0 - pos_mean), 0.0 * pos_mean)
    neg_half = torch.where(n_diff > 0, 0.5 * neg_mean, 0.0 * neg_mean)
    return pos_half + neg_half
