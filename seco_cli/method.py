"""SeCo: the network plus everything the method trains with (SPEC §2–6).

:class:`SeCo` holds the student network, the projection head, the local teacher (EMA of
backbone + projection), the reservoir with its tag pool and the class prototypes — all as
submodules or buffers, so one ``state_dict`` checkpoints them. :meth:`SeCo.losses` runs one
training step's phases and returns the named loss terms and statistics; the trainer weights
and sums the terms. A term whose weight is 0 at this iteration is not computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from seco_cli.cams import fuse_cams, normalise_cams
from seco_cli.data.views import global_view, strong_view
from seco_cli.distributed import gather_cat
from seco_cli.losses.classification import multilabel_loss
from seco_cli.losses.contrast import (
    global_contrast,
    local_contrast,
    patch_token_contrast,
    rectify,
)
from seco_cli.losses.crf import crf_energy
from seco_cli.losses.segmentation import balanced_seg_loss
from seco_cli.memory import CamHeads, Prototypes, Reservoir
from seco_cli.models.network import NetOutput, SeCoNet
from seco_cli.models.projection import ProjectionHead
from seco_cli.params import Params
from seco_cli.pseudo_labels import cams_to_labels
from seco_cli.refine import par_refine
from seco_cli.tags import (
    alone_tags,
    crop_patches,
    gather_boxes,
    global_tags,
    patch_tags,
    region_map,
    sample_patch_boxes,
)
from seco_cli.teacher import EMATeacher
from seco_cli.tiles import TileLogits, classify_tiles, tile_agreement

IGNORE = 255


@dataclass
class StepWeights:
    """Loss weights and switches at one iteration (from the schedule arrays)."""

    cls: float
    aux: float
    seg: float
    ptc: float
    lig: float
    lil: float
    reg: float
    rectify: bool
    proto: bool
    gt_seg: bool  # fully supervised: segmentation on ground-truth masks


class SeCo(nn.Module):
    def __init__(self, params: Params, num_classes: int):
        super().__init__()
        tp = params.train
        self.params = params
        self.net = SeCoNet(params.model, num_classes)
        dim = self.net.backbone.dim
        self.proj = ProjectionHead(dim, tp.proj_hidden)
        self.teacher = EMATeacher(self._student_encoder(), tp.teacher_momentum)
        self.reservoir = Reservoir(tp.reservoir_capacity, dim)
        self.prototypes = Prototypes(num_classes, dim, seed=tp.seed)
        # per-class CAM head statistics, only where selected (the SPEC's state dict otherwise)
        self.cam_heads = (None if tp.cam_select == "schedule" else
                          CamHeads(num_classes, tp.cam_select, tp.cam_select_min_agreement,
                                   tp.cam_select_fallback, tp.cam_select_hysteresis))

    def _student_encoder(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.net.backbone, "proj": self.proj})

    def head_parameters(self) -> list[nn.Parameter]:
        """Trained at ``head_lr_mult`` × lr: classifiers, decoder, projection head (SPEC §2)."""
        return [*self.net.head_parameters(), *self.proj.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.net.parameters(), *self.proj.parameters()]

    @torch.no_grad()
    def update_teacher(self) -> None:
        self.teacher.update(self._student_encoder(), self.params.train.teacher_momentum)

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def online_cam(self, images: torch.Tensor, labels: torch.Tensor, aux: bool,
                   valid: torch.Tensor | None = None, update: bool = True,
                   host_labels: Sequence[Sequence[float]] | None = None,
                   hold: bool = True) -> torch.Tensor:
        """Multi-scale CAM (SPEC §3.2), normalised, restricted to labels: (B, C, H, W), from
        the auxiliary head when ``aux`` (the schedule), else the final one. With
        ``train.cam_select`` ``area`` or ``agreement`` both heads come from one pass per
        scale; when ``update``, each image's statistic of each head (covered area inside
        ``valid`` (B, H, W), or agreement with the head's tile-logit map there) updates
        :class:`CamHeads` (from ``train.cam_select_start``, every ``train.cam_select_every``
        iterations; on every rank alike: ``update`` must be too; ``hold``: whether it may
        hold classes on the tiles, from ``train.cam_select_hold_start``); and each class takes
        the source it picks (``aux`` breaks ties): a head, or the final head's tile-logit map
        (minimum over the tiles covering a pixel). Without ``update`` the tiles are classified
        only for the images showing a class that takes that map (:meth:`CamHeads.tile_images`,
        from ``host_labels``, the batch's labels as the host holds them; all images when the
        host does not know). The tile map is sharpened by ``train.cam_select_fallback_power``
        (:func:`sharpen`) before its normalisation."""
        tp = self.params.train
        was = self.net.training
        self.net.eval()
        if self.cam_heads is None:
            fn = partial(self.net.cams, aux=aux)
        else:
            fn = self.net.both_cams
        cam = fuse_cams(fn, images, tp.cam_scales, True, images.shape[-2:],
                        multiple=self.net.backbone.stride)
        heads = self.cam_heads
        tiles, rows = None, None  # rows: the images tiled (None: all of them)
        if heads is not None and heads.rule == "agreement":
            rows = None if update else heads.tile_images(host_labels)
            if rows is None or rows:
                picked = images if rows is None else images[rows]
                tiles = classify_tiles(self.net, picked, tp.patch_size, tp.tile_step)
        self.net.train(was)
        if heads is None:
            return normalise_cams(cam, labels)
        final, aux_cam = (normalise_cams(c, labels) for c in cam)
        if update:
            self._update_heads(final, aux_cam, tiles, labels, valid, hold)
        use_aux = heads.use_aux(aux)[None, :, None, None]
        cam = torch.where(use_aux, aux_cam, final)
        if tiles is not None:
            tile_map = tiles.fallback(tp.cam_select_fallback_power)
            if rows is not None:  # the other images show no class on the tiles: their maps
                # of those classes are zeroed by their labels below, as a full map's would be
                tile_map = tile_map.new_zeros(cam.shape).index_copy_(
                    0, torch.tensor(rows, device=cam.device), tile_map)
            use_tiles = heads.use_tiles()[None, :, None, None]
            cam = torch.where(use_tiles, normalise_cams(tile_map, labels), cam)
        return cam

    def _update_heads(self, final: torch.Tensor, aux_cam: torch.Tensor,
                      tiles: TileLogits | None, labels: torch.Tensor,
                      valid: torch.Tensor | None, hold: bool = True) -> None:
        """One step of :class:`CamHeads`' statistic from both heads' normalised CAMs: the
        covered area (rule ``area``) or the agreement with the ``tiles`` (``agreement``; their
        map sharpened by ``train.cam_select_tile_power``, and with
        ``train.cam_select_tile_reference`` ``both`` the map itself too: :func:`tile_agreement`)."""
        tp = self.params.train
        if tiles is None:  # area: no tiles were classified
            inside = (torch.ones_like(final[:, 0]) if valid is None else valid.float())[:, None]
            pixels = inside.sum((2, 3)).clamp(min=1)  # (B, 1)
            values = torch.stack([((c > tp.cam_high) * inside).sum((2, 3)) / pixels
                                  for c in (aux_cam, final)], 1)  # (B, 2, C)
            counts = labels
        else:
            found = [tile_agreement(c, tiles.map(h, "mean"), tp.cam_select_tile_power,
                                    tp.cam_select_tile_reference, valid)
                     for c, h in ((aux_cam, "aux"), (final, "final"))]
            values = torch.stack([r for r, _ in found], 1)  # (B, 2, C)
            counts = labels * found[0][1] * found[1][1]  # labelled, both defined
        self.cam_heads.update(*gather_cat(values, counts), tp.cam_select_momentum, hold)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, cam: torch.Tensor, labels: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """Online segmentation labels (SPEC §6): background maps at ``high`` and ``low``, each
        softmaxed over background + the image's classes and refined by PAR; class where the
        high map says a class, background where both say background, 255 elsewhere."""
        tp = self.params.train
        if tp.par_iterations == 0:
            return cams_to_labels(cam, valid, tp.cam_high, tp.cam_low)
        present = torch.cat([torch.ones_like(labels[:, :1]), labels], 1)[..., None, None] > 0
        probs = []
        for thr in (tp.cam_high, tp.cam_low):
            scores = torch.cat([torch.full_like(cam[:, :1], thr), cam], 1)  # (B, 1 + C, H, W)
            probs.append(scores.masked_fill(~present, float("-inf")).softmax(1))
        # PAR propagates each channel independently: both maps in one call share the affinity
        k = probs[0].shape[1]
        refined = par_refine(images, torch.cat(probs, 1), tp.par_dilations, tp.par_iterations)
        high, low = (r.masked_fill(~present, -1.0).argmax(1) for r in refined.split(k, 1))
        # selects, not boolean indexing: the same labels, and no wait for the device
        label = torch.where(high > 0, high, torch.full_like(high, IGNORE))
        label = torch.where((high == 0) & (low == 0), torch.zeros_like(label), label)
        return torch.where(valid, label, torch.full_like(label, IGNORE))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Student embedding of images/patches: class token → projection (N, d)."""
        return self.proj(self.net.backbone(x)[2])

    @torch.no_grad()
    def _teacher_embed(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.teacher.module
        return enc["proj"](enc["backbone"](x)[2])

    def _views(self, images: torch.Tensor, raw: torch.Tensor, region: torch.Tensor,
               valid: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
               normalise) -> dict[str, torch.Tensor]:
        """Separate (SPEC §3.4–3.7): patches with tags, weak/strong views, second global view."""
        tp = self.params.train
        boxes, too_small = sample_patch_boxes(region, valid, tp.num_patches, tp.patch_size, gen)
        side = tp.patch_size  # the boxes' side: given, so no step reads it from the device
        tags = patch_tags(region, boxes, labels, tp.tag_threshold, too_small, side)  # (B, n)
        query = crop_patches(images, boxes, side, side)  # (B*n, 3, p, p) weak → student
        key = normalise(strong_view(crop_patches(raw, boxes, side, side), gen, tp.key_jitter,
                                    tp.key_p_jitter, tp.key_p_gray, tp.key_p_blur))
        second = normalise(global_view(
            raw, gen, images.shape[-1], tp.global_scale, p_jitter=tp.global_p_jitter,
            p_gray=tp.global_p_gray, p_blur=tp.global_p_blur, p_solarize=tp.global_p_solarize,
            valid=valid))
        return {"query": query, "key": key, "tags": tags.flatten(), "second": second,
                "global_tags": global_tags(region, labels), "boxes": boxes,
                "too_small": too_small}

    def contrast_terms(self, out: NetOutput, images: torch.Tensor, raw: torch.Tensor,
                       valid: torch.Tensor, labels: torch.Tensor, cam: torch.Tensor,
                       w: StepWeights, gen: torch.Generator, normalise,
                       stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Conquer (SPEC §4–5): L_iG against prototypes, rectification, L_iL against keys ∪
        reservoir; then the reservoir and prototypes are updated."""
        tp = self.params.train
        region = region_map(cam, valid, tp.cam_high, tp.cam_low)
        v = self._views(images, raw, region, valid, labels, gen, normalise)
        # student: all patches in one forward, the second global view in another; view 1
        # reuses the step's forward `out` (its class token)
        q_global = self.proj(out.embedding)  # (B, d)
        patch_tokens, _, patch_cls = self.net.backbone(v["query"])
        q = torch.cat([self.proj(patch_cls), q_global, self._embed(v["second"])])  # (B*n+2B, d)
        if tp.patch_tags == "alone":
            # Deviation (README): each patch tagged by its own classification (the final
            # classifier on the forward that embeds it), not by the CAM of the whole image
            with torch.no_grad():
                patch_logits, _ = self.net.classifier(patch_tokens.detach())
            # patches with a valid pixel that fit the image (the others are never tagged)
            v["fits"] = ((gather_boxes(valid[:, None].float(), v["boxes"], tp.patch_size)
                          .flatten(2).sum(-1) > 0)
                         & ~v["too_small"]).flatten()
            cam_tags = v["tags"]
            v["tags"] = alone_tags(patch_logits, labels.repeat_interleave(v["boxes"].shape[1], 0),
                                   tp.alone_threshold, v["fits"])
            stats["tag_cam_agree"] = (v["tags"] == cam_tags).float().mean()
        tags = torch.cat([v["tags"], v["global_tags"], v["global_tags"]])
        # teacher keys aligned with q: strong patches, then both global views in one forward
        keys = torch.cat([self._teacher_embed(v["key"]),
                          self._teacher_embed(torch.cat([images, v["second"]]))])
        terms: dict[str, torch.Tensor] = {}
        # copies: the reservoir and prototypes are updated in place before backward
        bank_keys, bank_tags = (t.clone() for t in self.reservoir.valid())
        if w.lil > 0 and bank_keys.shape[0] > 0:
            # a rectified query becomes uncertain and leaves both contrasts (SPEC §5); the
            # statistics are logged without rectifying too (no_rectify), to calibrate β
            # Deviation (README): by default the patch is judged by its teacher key, the same
            # embedding space as μ_t (teacher–teacher); `query` compares the student query as
            # the paper writes, which sits systematically below μ_t and over-rectifies.
            probe = keys.detach() if tp.rectify_view == "key" else q.detach()
            rectified, rect = rectify(probe, tags, bank_keys, bank_tags, tp.rectify_proportion,
                                      num_tags=self.prototypes.P.shape[0] + 1)
            if w.rectify:
                tags = rectified
            for name in ("rectified_fraction", "abnormal_fraction", "mu_mean"):
                stats[name] = rect[name].detach()
        if w.lig > 0:
            terms["lig"] = global_contrast(q, tags, self.prototypes.P.clone(), tp.tau_g)
        if w.lil > 0:
            terms["lil"] = local_contrast(q, tags, torch.cat([keys.float(), bank_keys]),
                                          torch.cat([tags, bank_tags]), tp.tau_l)
            # after the loss, with rectified tags; every rank's keys in rank order, so every
            # rank's reservoir stays identical (SPEC §5)
            self.reservoir.enqueue(*gather_cat(keys.detach().float(), tags))
            stats["reservoir_fill"] = self.reservoir.filled.double() / tp.reservoir_capacity
        n_tags = v["tags"].numel()
        stats["tag_background"] = (v["tags"] == 0).sum().double() / n_tags
        stats["tag_class"] = (v["tags"] > 0).sum().double() / n_tags
        stats["tag_uncertain"] = (v["tags"] < 0).sum().double() / n_tags
        if w.proto:  # global teacher: the shared encoder's class token of the whole image
            # from every rank's images, the same update on each rank (SPEC §4)
            z, z_labels = gather_cat(q_global.detach().float(), labels)  # (W·B, d), (W·B, C)
            self.prototypes.update(z, z_labels, tp.proto_momentum, tp.prototype_update, tp.tau_g)
        return terms

    def losses(self, batch: dict[str, torch.Tensor], it: int, w: StepWeights, raw: torch.Tensor,
               gen: torch.Generator, normalise, autocast: bool,
               host_labels: Sequence[Sequence[float]] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One step's named loss terms (unweighted) and statistics (0-dim tensors, left on the
        device: the trainer reads them with the terms in one transfer). ``host_labels``: the
        batch's labels as Python lists, when the host has them (the online CAM then tiles only
        the images that need it, without reading the device)."""
        tp = self.params.train
        images, labels, valid = batch["image"], batch["labels"], batch["valid"]
        stats: dict[str, torch.Tensor] = {}
        need_seg = w.seg > 0 or w.reg > 0
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = self.net(images, with_seg=need_seg)
            terms: dict[str, torch.Tensor] = {}
            if w.cls > 0:
                terms["cls"] = multilabel_loss(out.logits, labels)
            if w.aux > 0:
                terms["aux"] = multilabel_loss(out.aux_logits, labels)
            if w.ptc > 0:
                aux_cam = F.relu(out.aux_cam.detach().float())
                if aux_cam.shape[-2:] != out.tokens.shape[-2:]:  # CNN: aux stage is finer
                    aux_cam = F.interpolate(aux_cam, size=out.tokens.shape[-2:], mode="bilinear",
                                            align_corners=False)
                aux_cam = normalise_cams(aux_cam, labels)
                terms["ptc"] = patch_token_contrast(out.tokens, aux_cam, labels, tp.ptc_bkg,
                                                    tp.ptc_high, tp.ptc_low)
            cam = None
            if w.lig > 0 or w.lil > 0 or (need_seg and not w.gt_seg):
                cam = self.online_cam(images, labels, aux=it < tp.cam2mask, valid=valid,
                                      update=(it % tp.cam_select_every == 0
                                              and it >= tp.cam_select_start),
                                      host_labels=host_labels,
                                      hold=it >= tp.cam_select_hold_start)
            if w.lig > 0 or w.lil > 0:
                terms.update(self.contrast_terms(out, images, raw, valid, labels, cam, w, gen,
                                                 normalise, stats))
            if need_seg:
                terms.update(self.seg_terms(out, images, raw, valid, labels, cam, batch, w))
        return terms, stats

    def seg_terms(self, out: NetOutput, images: torch.Tensor, raw: torch.Tensor,
                  valid: torch.Tensor, labels: torch.Tensor, cam: torch.Tensor | None,
                  batch: dict[str, torch.Tensor], w: StepWeights) -> dict[str, torch.Tensor]:
        """L_seg on online pseudo labels (or GT when fully supervised) and L_reg (SPEC §6)."""
        tp = self.params.train
        seg = F.interpolate(out.seg.float(), size=images.shape[-2:], mode="bilinear",
                            align_corners=False)  # (B, C+1, H, W)
        if w.gt_seg:
            target = batch["mask"]
            terms = {"seg": F.cross_entropy(seg, target, ignore_index=IGNORE)}
        else:
            target = self.pseudo_labels(images, cam, labels, valid)
            terms = {"seg": balanced_seg_loss(seg, target)}
        if w.reg > 0:
            h, wd = images.shape[-2] // 2, images.shape[-1] // 2
            small = F.interpolate(seg, size=(h, wd), mode="bilinear", align_corners=False)
            rgb = F.interpolate(raw * 255.0, size=(h, wd), mode="bilinear", align_corners=False)
            keep = F.interpolate((valid & (target == IGNORE)).float()[:, None], size=(h, wd),
                                 mode="nearest")[:, 0] > 0  # valid, not confidently labelled
            terms["reg"] = crf_energy(rgb, small.softmax(1), keep, tp.reg_sigma_rgb,
                                      tp.reg_sigma_xy * 0.5, tp.reg_scale, tp.reg_max_exact,
                                      tp.reg_radius)
        return terms
