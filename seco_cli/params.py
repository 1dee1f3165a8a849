"""Every parameter of the pipeline, typed and validated (pydantic).

``params.yaml`` has one section per stage plus the shared ``data`` and ``model`` sections.
Loading rejects unknown keys, wrong types and out-of-range values with the full key path and
what is allowed. ``--set section.key=value`` overrides are applied before validation.
SPEC references (§n) point to ``SPEC.md``; the defaults here are the small embedded profile,
the paper's recipes live in ``recipes/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seco_cli.errors import ParamsError

Fraction = Field(ge=0.0, le=1.0)
# Element types for lists and tuples: each element is checked and named by its position.
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]
BelowOne = Annotated[float, Field(ge=0, lt=1)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data / prepare
class DataParams(_Section):
    """Shared by every stage: which dataset, and how images enter the network."""

    source: Literal["synthetic", "voc", "coco", "yolo-seg", "folder"] = "synthetic"
    root: str | None = None  # dataset root for every source but `synthetic`
    train_split: str = "train"  # split used for training, CAM seeds and pseudo masks
    eval_split: str = "val"  # split segmented and evaluated
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # A bad image (missing, corrupt, truncated, empty, or with a bad mask) met by `prepare`:
    # stop with one line naming it, or skip it and list it in the prepare metrics.
    on_bad_image: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _root_needed(self) -> DataParams:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required when data.source is '{self.source}'")
        if any(s <= 0 for s in self.std):
            raise ValueError("data.std values must be > 0")
        return self


class ContextCoupling(_Section):
    """An object class that sits on its own background context most of the time (boat/water)."""

    cls: str
    context: str  # a texture name; its pixels are background in the masks
    rate: float = Field(0.9, ge=0.0, le=1.0)  # P(context | object present)


class ObjectCoupling(_Section):
    """Two object classes that appear together, touching or overlapping (horse/person)."""

    a: str
    b: str
    rate: float = Field(0.8, ge=0.0, le=1.0)  # P(b present | a present)


class SyntheticParams(_Section):
    """The embedded procedural dataset that shows the co-occurrence problem (README)."""

    num_train: int = Field(600, ge=1)
    num_val: int = Field(200, ge=1)
    image_size: int = Field(96, ge=32, le=1024)
    classes: list[str] = ["boat", "train", "horse", "person", "car", "bird"]
    contexts: list[ContextCoupling] = [
        ContextCoupling(cls="boat", context="water", rate=0.9),
        ContextCoupling(cls="train", context="rails", rate=0.9),
    ]
    context_alone_rate: float = Field(0.15, ge=0.0, le=1.0)  # P(a context with no object)
    objects: list[ObjectCoupling] = [ObjectCoupling(a="horse", b="person", rate=0.85)]
    empty_rate: float = Field(0.05, ge=0.0, le=1.0)  # images with no object at all
    # Relative frequency of each class as an image's independent object (default 1); a low
    # weight for a coupled partner makes it rarely appear on its own.
    class_weights: dict[str, float] = {"person": 0.35}
    # Per-class size multiplier on object_size (default 1).
    class_scales: dict[str, float] = {"train": 0.7}
    max_objects: int = Field(2, ge=1, le=8)  # independent objects per image (couplings add)
    object_size: tuple[float, float] = (0.22, 0.4)  # side as a fraction of the image side
    noise: float = Field(0.06, ge=0.0, le=1.0)  # pixel noise std (images in [0, 1])

    @model_validator(mode="after")
    def _check(self) -> SyntheticParams:
        names = set(self.classes)
        if len(names) != len(self.classes):
            raise ValueError("prepare.synthetic.classes has duplicate names")
        for c in self.contexts:
            if c.cls not in names:
                raise ValueError(f"prepare.synthetic.contexts: unknown class '{c.cls}'")
        for name, weight in self.class_weights.items():
            if name not in names or weight < 0:
                raise ValueError(f"prepare.synthetic.class_weights: '{name}' must be a class "
                                 "with a weight >= 0")
        for name, scale in self.class_scales.items():
            if name not in names or scale <= 0:
                raise ValueError(f"prepare.synthetic.class_scales: '{name}' must be a class "
                                 "with a scale > 0")
        for o in self.objects:
            if o.a not in names or o.b not in names or o.a == o.b:
                raise ValueError(f"prepare.synthetic.objects: bad pair '{o.a}'/'{o.b}'")
        lo, hi = self.object_size
        if not 0 < lo <= hi <= 1:
            raise ValueError("prepare.synthetic.object_size must satisfy 0 < low <= high <= 1")
        return self


class PrepareParams(_Section):
    seed: int = 0
    synthetic: SyntheticParams = SyntheticParams()
    # voc: list files under ImageSets/Segmentation (train_aug comes from SegmentationClassAug)
    voc_splits: list[str] = Field(["train_aug", "train", "val"], min_length=1)
    voc_mask_dir: str = "SegmentationClassAug"
    # coco: annotation year and split names (instances_<split><year>.json)
    coco_year: Literal["2014", "2017"] = "2014"
    coco_splits: list[str] = Field(["train", "val"], min_length=1)
    # yolo-seg / folder: split names (yolo: sub-folders of images/; folder: <split>.txt lists)
    splits: list[str] = Field(["train", "val"], min_length=1)
    # Fraction of a yolo-seg/folder split held out as val when no val split exists (0: none)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)


# --------------------------------------------------------------------------- model
class ModelParams(_Section):
    """Backbone adapter and heads (SPEC §2)."""

    backbone: str = "vit_small_patch16_224"
    # Extra timm constructor arguments (a small ViT for the embedded profile)
    backbone_kwargs: dict[str, Any] = {
        "img_size": 96, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4,
    }
    pretrained: bool | str = False  # true: timm hub weights; a path: a local state dict
    aux_layer: int = -3  # ViT block whose tokens feed the auxiliary classifier
    # decoder dilation rates; paper/VOC: 6, 12, 18, 24 at stride 16
    seg_dilations: list[PositiveInt] = Field([1, 2, 3, 4], min_length=1)
    crop_size: int = Field(96, ge=16)  # training crop and inference input side (SPEC §3, §8)


# --------------------------------------------------------------------------- train
class TrainParams(_Section):
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # which terms train (SPEC §6 presets); applied on top of the weights below
    preset: Literal["baseline", "toco_like", "no_lig", "no_lil", "no_rectify", "seco",
                    "fully_supervised"] = "seco"
    iterations: int = Field(1500, ge=1)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(0, ge=0)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale (SPEC §3.1)
    # optimiser (SPEC §7)
    lr: float = Field(6e-4, gt=0)
    head_lr_mult: float = Field(10.0, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[BelowOne, BelowOne] = (0.9, 0.999)
    warmup_iters: int = Field(100, ge=0)
    warmup_ratio: float = Field(1e-6, gt=0, le=1)
    poly_power: float = Field(0.9, ge=0)
    # online CAM used for the pseudo labels (SPEC §3.2-3.3)
    cam_scales: list[float] = [1.0, 0.5, 1.5]
    cam_high: float = Field(0.7, ge=0, le=1)
    cam_low: float = Field(0.25, ge=0, le=1)
    cam2mask: int = Field(1500, ge=0)  # aux CAM before this iteration, final CAM after
    # which classifier's CAM each class's tags and online labels come from: `schedule` = the
    # SPEC (aux before cam2mask, final after); `area` = per class, the head whose CAM covers
    # less of the image (an EMA with this momentum), ties to the schedule; `agreement` = per
    # class, the head whose CAM correlates best with its own tiles' logits (tiles of
    # patch_size every cam_select_tile_step pixels, 0 = half a patch), and where neither
    # reaches cam_select_min_agreement, with fallback `tiles`, the final head's tile-logit
    # map (README deviations; the default, the recipes keep the SPEC's `schedule`). The
    # statistic is computed, and its EMA stepped, every cam_select_every iterations; between
    # them each class keeps its source, and the tiles are classified only while a class takes
    # the fallback. cam_select_tile_power: the tile-logit map is divided by its maximum over
    # the image and raised to this power before the correlation (1 = the map itself; larger
    # weighs the tiles that find the class most, the object's own over a context that
    # carries the class alone, as the strict embedded data's water carries the boat).
    # cam_select_tile_reference: `sharpened` = the statistic is the correlation with the
    # sharpened map; `both` = the lower of that and the correlation with the map itself (the
    # sharpened map weighs a CAM's peak on the tiles finding the class most, the map itself
    # also its level on the tiles finding it less); the two are one at power 1.
    # cam_select_fallback_power: the same for the fallback's tile-min map, before it is
    # normalised into the class's CAM (1 = the map itself; larger narrows it to the tiles
    # that find the class most, the water's weaker "boat" tiles falling under the thresholds).
    # cam_select_hysteresis: a class on the fallback leaves it only once a head's statistic
    # reaches cam_select_min_agreement + this (0 = as soon as one reaches the floor; larger
    # keeps a statistic wavering around the floor from flipping the class's labels).
    # cam_select_hold_start: the iteration from which the hysteresis holds a class: at an
    # update before it a class is on the fallback only while under the floor (0 = from the
    # first update; later lets a statistic still rising from its first, immature CAMs
    # release the classes it caught, and holds the ones that fall under it afterwards)
    # cam_select_start: the iteration from which the statistic is stepped (its first step
    # there sets the EMA to that batch's mean); before it every class follows the schedule's
    # head, as an unseen class does. 0 = from the first online CAM, which comes at
    # contrast_start with L_iG/L_iL and only at seg_start without them, so the statistics of
    # two presets start apart; seg_start (the default) starts them together, from CAMs of the
    # same age
    cam_select: Literal["schedule", "area", "agreement"] = "agreement"
    cam_select_momentum: float = Field(0.99, ge=0.0, lt=1.0)  # per statistic update
    cam_select_every: int = Field(1, ge=1)
    cam_select_min_agreement: float = Field(0.3, ge=-1.0, le=1.0)
    cam_select_fallback: Literal["none", "tiles"] = "tiles"
    cam_select_tile_step: int = Field(0, ge=0)
    cam_select_tile_power: float = Field(8.0, ge=1.0, le=64.0)
    cam_select_fallback_power: float = Field(8.0, ge=1.0, le=64.0)
    cam_select_tile_reference: Literal["sharpened", "both"] = "both"
    cam_select_hysteresis: float = Field(0.0, ge=0.0, le=2.0)
    cam_select_hold_start: int = Field(0, ge=0)
    cam_select_start: int = Field(500, ge=0)  # = seg_start
    # loss weights and start iterations (SPEC §6); a weight of 0 skips the term
    w_cls: float = Field(1.0, ge=0)
    w_aux: float = Field(1.0, ge=0)
    w_seg: float = Field(0.12, ge=0)
    seg_start: int = Field(500, ge=0)  # also the start of L_reg
    w_ptc: float = Field(0.3, ge=0)
    ptc_start: int = Field(500, ge=0)
    w_lig: float = Field(0.5, ge=0)
    w_lil: float = Field(0.5, ge=0)
    contrast_start: int = Field(300, ge=0)  # L_iG and L_iL (VOC: 1000)
    w_reg: float = Field(0.05, ge=0)
    # PTC token labels (SPEC §6)
    ptc_bkg: float = Field(0.5, ge=0, le=1)
    ptc_high: float = Field(0.7, ge=0, le=1)
    ptc_low: float = Field(0.25, ge=0, le=1)
    # PAR refinement of the online pseudo labels (SPEC §6); 0 iterations = off
    par_iterations: int = Field(10, ge=0)
    par_dilations: list[PositiveInt] = Field([1, 2, 4, 8, 12, 24], min_length=1)
    # L_reg dense-CRF energy (SPEC §6), on the segmentation at half resolution
    reg_scale: float = Field(1e-7, gt=0)
    reg_sigma_rgb: float = Field(15.0, gt=0)
    reg_sigma_xy: float = Field(100.0, gt=0)  # at full resolution; halved with the image
    reg_radius: int = Field(16, ge=1)  # window of the approximation beyond reg_max_exact
    reg_max_exact: int = Field(4096, ge=0)  # gated pixels per image up to which W is exact
    # Separate: patches and tags (SPEC §3)
    num_patches: int = Field(10, ge=1)
    patch_size: int = Field(32, ge=4)  # VOC: 64 at crop 448 (4×4 tokens)
    tag_threshold: float = Field(0.2, ge=0, le=1)
    # where patch tags come from: `cam` = the region map of the online CAM (SPEC §3.5);
    # `alone` = each patch's own classification, from the student forward that embeds it
    # (deviation, README): exactly one image class above `alone_threshold` (sigmoid) → it,
    # none → background, several → uncertain
    patch_tags: Literal["cam", "alone"] = "cam"
    alone_threshold: float = Field(0.5, gt=0, lt=1)
    key_jitter: tuple[NonNegative, NonNegative, NonNegative, NonNegative] = (0.4, 0.4, 0.2, 0.1)
    key_p_jitter: float = Field(0.8, ge=0, le=1)
    key_p_gray: float = Field(0.2, ge=0, le=1)
    key_p_blur: float = Field(0.5, ge=0, le=1)
    global_scale: tuple[float, float] = (0.4, 1.0)
    global_p_jitter: float = Field(0.8, ge=0, le=1)
    global_p_gray: float = Field(0.2, ge=0, le=1)
    global_p_blur: float = Field(0.1, ge=0, le=1)
    global_p_solarize: float = Field(0.2, ge=0, le=1)
    # Conquer: teacher, prototypes, reservoir, contrasts (SPEC §2, §4, §5)
    proj_hidden: int = Field(512, ge=1)  # VOC: 2048
    teacher_momentum: float = Field(0.99, gt=0, lt=1)  # VOC: 0.999 over 20k iterations
    proto_momentum: float = Field(0.9, gt=0, lt=1)
    proto_start: int = Field(100, ge=0)  # VOC: 600
    prototype_update: Literal["adaptive", "single"] = "adaptive"
    tau_g: float = Field(0.1, gt=0)
    tau_l: float = Field(0.08, gt=0)
    reservoir_capacity: int = Field(1920, ge=1)  # VOC: 4608; a multiple of the keys per step
    rectify_proportion: float = Field(0.9, ge=0, le=1)
    rectify_view: Literal["key", "query"] = "key"
    # Deviation (README): rectification waits until the contrasts have shaped the embedding.
    # A backbone trained from scratch starts with collapsed class tokens (mean similarity
    # ~0.999), where the rule marks every query abnormal. Recipes set it to contrast_start.
    rectify_start: int = Field(500, ge=0)
    # bookkeeping
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(500, ge=1)

    @property
    def tile_step(self) -> int:
        """Pixels between the tiles of ``cam_select: agreement`` (0 → half a patch)."""
        return self.cam_select_tile_step or max(1, self.patch_size // 2)

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        if self.cam_low > self.cam_high:
            raise ValueError(f"train.cam_low ({self.cam_low}) must be <= train.cam_high ({self.cam_high})")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError("train.scale_range must satisfy 0 < low <= high")
        if not self.cam_scales or any(s <= 0 for s in self.cam_scales):
            raise ValueError("train.cam_scales must be a non-empty list of positive scales")
        glo, ghi = self.global_scale
        if not 0 < glo <= ghi <= 1:
            raise ValueError("train.global_scale must satisfy 0 < low <= high <= 1")
        if self.key_jitter[3] > 0.5:
            raise ValueError(f"train.key_jitter hue ({self.key_jitter[3]}) must be <= 0.5")
        if self.ptc_low > self.ptc_high:
            raise ValueError(f"train.ptc_low ({self.ptc_low}) must be <= train.ptc_high ({self.ptc_high})")
        if self.cam_select_tile_step > self.patch_size:  # a gap between tiles: pixels no tile covers
            raise ValueError(
                f"train.cam_select_tile_step ({self.cam_select_tile_step}) must be <= "
                f"train.patch_size ({self.patch_size}), or 0 for half a patch")
        per_step = self.batch_size * (self.num_patches + 2)  # patches + 2 global views per image
        if self.reservoir_capacity % per_step:
            raise ValueError(
                f"train.reservoir_capacity ({self.reservoir_capacity}) must be a multiple of the "
                f"keys per step, batch_size × (num_patches + 2) = {per_step}")
        return self

    @property
    def keys_per_step(self) -> int:
        return self.batch_size * (self.num_patches + 2)


# --------------------------------------------------------------------------- inference
def _check_scales(scales: list[float], key: str) -> None:
    if not scales or any(x <= 0 for x in scales):
        raise ValueError(f"{key} must be a non-empty list of positive scales")


class CamsParams(_Section):
    """CAM seeds (SPEC §3.2, §8): scale 1.0 + flip is the paper's seed protocol; its pseudo
    masks use scales 1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0 + flip."""

    split: str | None = None  # default: data.train_split
    scales: list[float] = [1.0]
    flip: bool = True
    # the seed CAM (store root): auto = the CAM training's online labels came from at its end
    # (aux when train.cam2mask >= train.iterations, else final; SPEC §3.2, §8; with
    # train.cam_select area or agreement, per class the source the checkpoint recorded)
    source: Literal["auto", "final", "aux"] = "auto"
    aux: bool = False  # also store the auxiliary CAMs (group `aux` of the store)
    store_size: int = Field(0, ge=0)  # longest stored side in pixels; 0 = original size
    dtype: Literal["uint8", "float16"] = "uint8"  # stored CAMs: q/255 (error ≤ 1/510) or float16
    batch_size: int = Field(16, ge=1)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> CamsParams:
        _check_scales(self.scales, "cams.scales")
        return self


def seed_cam_source(params: Params, meta: dict[str, Any] | None = None) -> str:
    """``final``, ``aux`` or ``select``: the CAM the cams stage stores as seeds
    (``cams.source``; ``auto`` follows training, whose online CAM is the auxiliary one until
    ``train.cam2mask``, or per class the source recorded as ``meta["cam_heads"]`` when it
    trained with ``train.cam_select`` ``area`` or ``agreement`` — ``select``).

    ``meta`` is a checkpoint's ``meta`` record; for ``auto`` the ``train`` params it recorded
    decide, so the seeds follow how the model *was* trained whatever the current params say.
    Without them (a checkpoint from elsewhere) the current params decide.
    """
    if params.cams.source != "auto":
        return params.cams.source
    if (meta or {}).get("cam_heads"):
        return "select"
    tp = ((meta or {}).get("params") or {}).get("train") or {}
    cam2mask = tp.get("cam2mask", params.train.cam2mask)
    iterations = tp.get("iterations", params.train.iterations)
    return "aux" if cam2mask >= iterations else "final"


class CrfParams(_Section):
    """Dense CRF of inference (SPEC §8, upstream values); 0 iterations = off."""

    iterations: int = Field(10, ge=0)
    gauss_sxy: float = Field(1.0, gt=0)
    gauss_compat: float = Field(1.0, ge=0)
    bilateral_sxy: float = Field(121.0, gt=0)
    bilateral_srgb: float = Field(5.0, gt=0)
    bilateral_compat: float = Field(4.0, ge=0)


class PseudoParams(_Section):
    """Pseudo masks from the stored CAMs (SPEC §8)."""

    bkg: float = Field(0.1, ge=0, le=1)  # constant background score
    par_iterations: int = Field(0, ge=0)  # PAR before the CRF (SPEC §6); 0 = off
    par_dilations: list[PositiveInt] = Field([1, 2, 4, 8, 12, 24], min_length=1)
    crf: CrfParams = CrfParams()
    workers: int = Field(0, ge=0)  # processes for PAR + CRF; 0 = all cores
    palette_png: bool = False  # also write VOC-palette PNGs (for training another network)


class SegmentParams(_Section):
    """Segmentation (SPEC §8): variant `raw` is scale 1, no flip, no CRF; variant `ms_crf`
    these scales (logits summed over the flip pair, max over scales) then the CRF."""

    split: str | None = None  # default: data.eval_split
    scales: list[float] = [1.0, 1.25, 1.5]
    flip: bool = True
    crf: CrfParams = CrfParams()
    # all (SPEC): the CRF over every label; present (deviation, README): over the labels that
    # win at one pixel or more before it, the others dropped — its cost falls with the labels
    crf_labels: Literal["all", "present"] = "all"
    workers: int = Field(0, ge=0)  # processes for the CRF; 0 = all cores
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    palette_png: bool = True  # VOC-palette PNGs of the ms_crf variant

    @model_validator(mode="after")
    def _check(self) -> SegmentParams:
        _check_scales(self.scales, "segment.scales")
        return self


class PairSpec(_Section):
    victim: str
    partner: str  # a class name, or "background" for a context partner


class EvaluateParams(_Section):
    cam_bkg: float = Field(0.1, ge=0, le=1)  # background score for the reported CAM seeds
    bkg_sweep: list[UnitFloat] = Field(
        [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6], min_length=1)
    pairs: list[PairSpec] = [
        PairSpec(victim="boat", partner="background"),
        PairSpec(victim="train", partner="background"),
        PairSpec(victim="horse", partner="person"),
        PairSpec(victim="person", partner="horse"),
    ]
    top_pairs: int = Field(5, ge=0)  # pairs taken from co-occurrence counts when none given
    grid_images: int = Field(4, ge=0)  # picture grid: first n ids (sorted) of each split; 0 = none
    grid_panel: int = Field(128, ge=16)  # side of one grid panel in pixels
    # isolated-patch probe (seco_cli.probe): n ids of the cams split with a mask, evenly spread
    # over its sorted ids, cut into train.patch_size tiles classified alone; 0 = off
    probe_images: int = Field(200, ge=0)
    probe_step: float = Field(0.5, gt=0, le=1)  # tile grid step, as a fraction of the tile side
    probe_min_fraction: float = Field(0.25, gt=0, le=1)  # object/partner tile: this pixel share
    probe_batch_size: int = Field(256, ge=1)  # tiles per forward pass
    device: str = "auto"  # of the probe's forward passes


class Params(_Section):
    """All parameters; cross-section checks live here."""

    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    cams: CamsParams = CamsParams()
    pseudo: PseudoParams = PseudoParams()
    segment: SegmentParams = SegmentParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _cross(self) -> Params:
        if self.train.patch_size > self.model.crop_size:
            raise ValueError(f"train.patch_size ({self.train.patch_size}) is larger than the "
                             f"crop, model.crop_size ({self.model.crop_size})")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain JSON-able dict (what artifacts record)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ParamsError(
            f"override '{item}' is not of the form section.key=value", "--set",
            "write e.g. --set train.iterations=100",
        )
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ParamsError(f"override '{item}' has an empty key", "--set", "name a key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(path[: depth + 1])
            raise ParamsError(f"cannot set '{'.'.join(path)}': '{where}' is not a section", "--set")
        node = nxt
    node[path[-1]] = value


def _allowed(loc: tuple[Any, ...]) -> str:
    """Names of the keys allowed beside an unknown one."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return ""
    names = getattr(model, "model_fields", {})
    return ", ".join(sorted(names)) if names else ""


def _format_error(err: ValidationError, source: str) -> ParamsError:
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed(loc)
        return ParamsError(
            f"unknown parameter '{key}'", source,
            f"allowed keys here: {allowed}" if allowed else "remove it",
        )
    msg = first["msg"]
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        return ParamsError(f"invalid parameters: {msg}", source, "correct the value")
    given = first.get("input")
    given_s = repr(given) if not isinstance(given, dict) else "a mapping"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return ParamsError(f"invalid '{key}' = {given_s}: {msg}{more}", source, "correct the value")


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate a parameter file; a missing file means all defaults."""
    path = Path(path)
    tree: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f"{path}:{line + 1}" if line is not None else str(path)
            raise ParamsError("params file is not valid YAML", where, "fix the syntax") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ParamsError("params file must be a mapping of sections", str(path))
        tree = loaded or {}
    elif str(path) != "params.yaml":
        raise ParamsError(f"params file '{path}' does not exist", "--params", "give an existing file")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _apply_override(tree, keys, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        source = f"{path}" + (" with --set overrides" if overrides else "")
        raise _format_error(err, source) from err
