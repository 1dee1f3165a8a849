"""Stage `evaluate`: CAM seeds, pseudo masks and segmentation against the ground truth
(SPEC §8) → a compact metrics JSON for `dvc metrics`, plot data and a full report.

Scored sources (images without a ground-truth mask are skipped and counted):

- ``cams``: CAM seeds of the cams split (``cams.split`` or ``data.train_split``) at
  ``evaluate.cam_bkg``, plus the ``evaluate.bkg_sweep`` curve (one pass over the images);
- ``pseudo``: pseudo masks, made from those CAMs, on the same split;
- ``cams_aux``: the auxiliary CAMs, scored alike, when the CAM store holds them (``cams.aux``);
- ``segment_raw`` and ``segment_ms_crf``: the segmentation of the eval split (``segment.split``
  or ``data.eval_split``), variants ``raw`` (scale 1, no CRF) and ``ms_crf`` (scales + flip +
  CRF) of the segment store.

The picture grid (``samples.png`` in the plots folder) shows the first ``evaluate.grid_images``
ids (sorted) with a mask of the cams split and of the segment split: image | ground truth |
CAM | pseudo mask | prediction (the ``ms_crf`` variant).

Pairs (paper Table 3) come from ``evaluate.pairs`` or, when that is empty, from the
``evaluate.top_pairs`` most frequent class pairs of the train split's co-occurrence counts.

With ``evaluate.probe_images`` > 0 the trained model also runs the isolated-patch probe
(:mod:`seco_cli.probe`) on that many images of the cams split: per pair, does the partner
(context or co-occurring object) alone make the classifier say the victim? Its summary goes
to the metrics under ``probe``; it is what tells pure co-occurrence (the context alone
carries the class) from attention leakage (it carries it only inside the whole image).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seco_cli.data.prepared import PreparedDataset
from seco_cli.errors import MissingInputError, SecoError
from seco_cli.jsonio import write_json, write_text
from seco_cli.metrics import (
    BkgSweep,
    ConfusionMatrix,
    best_threshold,
    confusion_rows,
    cooccurring_pairs,
    pair_table,
    resolve_pairs,
    summarize,
)
from seco_cli.params import Params
from seco_cli.pictures import GridRow, sample_grid
from seco_cli.postprocess import resize_scores
from seco_cli.provenance import provenance
from seco_cli.store import StoreReader, fresh_output_dir

# segmentation store group (variant) → source name in the report
SEGMENT_VARIANTS = {"raw": "segment_raw", "ms_crf": "segment_ms_crf"}
AUX = "aux"  # group of the auxiliary CAMs in the CAM store
HEADLINE = ("miou", "precision", "recall", "fp_tp")
PAIR_SOURCES = ("cams", "pseudo", *SEGMENT_VARIANTS.values())
GRID = "samples.png"
if TYPE_CHECKING:  # torch only where the probe runs
    import torch

    from seco_cli.models.network import SeCoNet

    ProbeModel = tuple[SeCoNet, torch.device, list[str]]
Advance = Callable[[int], None]


# --------------------------------------------------------------------------- workers (no I/O)
def score_masks(items: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int,
                advance: Advance | None = None) -> ConfusionMatrix:
    """Accumulate (ground truth, prediction) pairs of ``(H, W)`` masks."""
    cm = ConfusionMatrix(num_classes)
    for gt, pred in items:
        cm.update(gt, pred)
        if advance:
            advance(1)
    return cm


def score_cams(items: Iterable[tuple[np.ndarray, np.ndarray, list[int]]], num_classes: int,
               thresholds: list[float], advance: Advance | None = None) -> BkgSweep:
    """Accumulate (ground truth, CAM ``(K, h, w)``, labels) at every background threshold."""
    sweep = BkgSweep(num_classes, thresholds)
    for gt, cam, labels in items:
        scores = resize_scores(cam, gt.shape) if len(labels) else cam  # (K, H, W) float32
        sweep.update(gt, scores, labels)
        if advance:
            advance(1)
    return sweep


def source_report(cm: ConfusionMatrix, classes: list[str], pairs: list[tuple[str, str]],
                  split: str, images: int, skipped: int) -> dict[str, Any]:
    return {"split": split, "images": images, "skipped_no_mask": skipped,
            **summarize(cm, classes), "pairs": pair_table(cm, classes, pairs),
            "confusion": cm.mat.tolist()}


def compact(report: dict[str, Any]) -> dict[str, Any]:
    """The `dvc metrics` summary: headline numbers per source and the pair table."""
    out: dict[str, Any] = {}
    for name, src in report["sources"].items():
        out[name] = {k: src[k] for k in HEADLINE}
        out[name].update(images=src["images"], skipped_no_mask=src["skipped_no_mask"])
    for name in ("cams", "cams_aux"):
        if name in report["sources"]:
            cams = report["sources"][name]
            out[name].update(bkg=cams["bkg"], best_bkg=cams["best"]["bkg"],
                             best_miou=cams["best"]["miou"])
    out["pairs"] = {
        pair: {name: report["sources"][name]["pairs"][pair] for name in PAIR_SOURCES
               if name in report["sources"]}
        for pair in report["sources"]["cams"]["pairs"]
    }
    if "probe" in report:
        out["probe"] = report["probe"]
    return out


def _csv(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def plot_files(report: dict[str, Any]) -> dict[str, str]:
    """File name → text of every file under the plots folder (``None`` cells are empty)."""
    classes = report["classes"]
    files = {}
    for name, src in report["sources"].items():
        files[f"{name}_per_class.csv"] = _csv(
            ["class", "iou", "precision", "recall", "fp_tp"],
            ([r["class"], r["iou"], r["precision"], r["recall"], r["fp_tp"]] for r in src["classes"]))
        cm = ConfusionMatrix(len(classes))
        cm.mat[...] = np.asarray(src["confusion"], dtype=np.int64)
        # dvc's confusion_normalized counts rows, so each GT row i is written as
        # round(1000 * cm[i, j] / rowsum_i) copies of (class_i, class_j): see confusion_rows
        files[f"{name}_confusion.csv"] = _csv(["actual", "predicted"], confusion_rows(cm, classes))
    for name in ("cams", "cams_aux"):
        if name in report["sources"]:
            files[f"{name.replace('cams', 'cam')}_bkg_sweep.csv"] = _csv(
                ["bkg", "miou"], ([p["bkg"], p["miou"]] for p in report["sources"][name]["sweep"]))
    files["report.json"] = json.dumps(report, indent=2) + "\n"
    return files


# --------------------------------------------------------------------------- I/O
def _with_masks(data: PreparedDataset, split: str, store: StoreReader, stage: str,
                group: str | None = None) -> tuple[list[str], int]:
    """Ids of the split that have a mask (the rest are skipped); each must be in the store."""
    ids = data.ids(split)
    scored = [i for i in ids if data.has_mask(i)]
    missing = [i for i in scored if not store.has(i, group)]
    if missing:
        raise SecoError(f"{len(missing)} image(s) of split '{split}' are not in the store "
                        f"(first: '{missing[0]}')", str(store.path), f"re-run `seco {stage}`")
    return scored, len(ids) - len(scored)


def _checked(image_id: str, gt: np.ndarray, pred: np.ndarray, store: Path, stage: str) -> np.ndarray:
    if pred.shape != gt.shape:
        raise SecoError(f"prediction of '{image_id}' is {pred.shape}, its mask {gt.shape}",
                        str(store), f"re-run `seco {stage}`")
    return pred


def _cam_items(data: PreparedDataset, ids: list[str], store: StoreReader,
               group: str | None = None) -> Iterator[tuple]:
    for i in ids:
        cam, attrs = store.read_with_attrs(i, group)
        labels = list(attrs["labels"])
        if cam.ndim != 3 or cam.shape[0] != len(labels):
            raise SecoError(f"CAM of '{i}' is {cam.shape} for {len(labels)} labels",
                            str(store.path), "re-run `seco cams`")
        yield data.mask(i), cam, labels


def _mask_items(data: PreparedDataset, ids: list[str], store: StoreReader, stage: str,
                group: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in ids:
        gt = data.mask(i)
        yield gt, _checked(i, gt, store.read(i, group), store.path, stage)


def _pairs(params: Params, data: PreparedDataset) -> list[tuple[str, str]]:
    ep = params.evaluate
    pairs = ([(p.victim, p.partner) for p in ep.pairs] if ep.pairs else cooccurring_pairs(
        data.cooccurrence[params.data.train_split]["pair_counts"], data.classes, ep.top_pairs))
    resolve_pairs(pairs, data.classes)  # unknown class names fail before any work
    return pairs


def _eval_cams(data: PreparedDataset, store: StoreReader, split: str, params: Params,
               pairs: list[tuple[str, str]], progress: Advance | None,
               group: str | None = None) -> dict[str, Any]:
    ep = params.evaluate
    ids, skipped = _with_masks(data, split, store, "cams", group)
    sweep = score_cams(_cam_items(data, ids, store, group), len(data.classes),
                       [*ep.bkg_sweep, ep.cam_bkg], progress)
    wanted = {float(t) for t in ep.bkg_sweep}
    curve = [p for p in sweep.curve(data.classes) if p["bkg"] in wanted]
    return {**source_report(sweep.cms[float(ep.cam_bkg)], data.classes, pairs, split, len(ids),
                            skipped),
            "bkg": ep.cam_bkg, "sweep": curve, "best": best_threshold(curve)}


def _eval_masks(data: PreparedDataset, store: StoreReader, stage: str, split: str,
                pairs: list[tuple[str, str]], progress: Advance | None,
                group: str | None = None) -> dict[str, Any]:
    ids, skipped = _with_masks(data, split, store, stage, group)
    cm = score_masks(_mask_items(data, ids, store, stage, group), len(data.classes), progress)
    return source_report(cm, data.classes, pairs, split, len(ids), skipped)


def _grid_rows(data: PreparedDataset, splits: list[str], stores: dict[str, StoreReader],
               count: int) -> list[GridRow]:
    """The first ``count`` ids (sorted) with a mask of each split, each id once."""
    ids: list[str] = []
    for split in dict.fromkeys(splits):
        ids += [i for i in sorted(data.ids(split)) if data.has_mask(i) and i not in ids][:count]
    cams, pseudo, seg = stores["cams"], stores["pseudo"], stores["segment"]
    rows = []
    for i in ids:
        cam, attrs = cams.read_with_attrs(i) if i in cams else (None, {})
        rows.append(GridRow(i, data.image(i), data.mask(i), cam, list(attrs.get("labels", [])),
                            pseudo.read(i) if i in pseudo else None,
                            seg.read(i, "ms_crf") if seg.has(i, "ms_crf") else None))
    return rows


def _recorded(stores: dict[str, StoreReader]) -> dict[str, dict[str, Any]]:
    """What each scored store says made it: code version, git revision and seed (``None``
    where a store does not record one)."""
    out = {}
    for name, store in stores.items():
        prov = store.attrs.get("provenance") or {}
        out[name] = {key: prov.get(key) for key in ("seco_version", "git_revision", "seed")}
    return out


def _segment_store(path: Path) -> StoreReader:
    store = StoreReader(path, "segment", stage_hint="segment")
    if not set(SEGMENT_VARIANTS) <= set(store.groups):
        raise MissingInputError(f"segment store '{path}' lacks the variants "
                                f"{', '.join(SEGMENT_VARIANTS)} (an older format)", str(path),
                                "re-run `seco segment`")
    return store


def probe_ids(data: PreparedDataset, split: str, count: int) -> list[str]:
    """``count`` ids of ``split`` with a mask, evenly spread over its sorted ids (all of them
    when there are fewer)."""
    ids = sorted(i for i in data.ids(split) if data.has_mask(i))
    if count >= len(ids):
        return ids
    return [ids[k] for k in np.linspace(0, len(ids) - 1, count).round().astype(int)]


def _probe_model(params: Params, model: Path, data: PreparedDataset, split: str
                 ) -> ProbeModel:
    """The trained network for the isolated-patch probe, its device and the probe's ids: read
    before any image is scored, so a missing or unfit model, or a split without masks, fails
    first."""
    from seco_cli.device import resolve_device  # torch: only this part of the stage needs it
    from seco_cli.inference import load_model

    ep = params.evaluate
    if not Path(model).is_file():
        raise MissingInputError(f"model '{model}' does not exist (the isolated-patch probe "
                                "needs it)", str(model), "run `seco train` first, pass --model, "
                                "or set evaluate.probe_images=0 to skip the probe")
    ids = probe_ids(data, split, ep.probe_images)
    if not ids:
        raise SecoError(f"split '{split}' has no image with a mask for the patch probe",
                        str(data.path), "set evaluate.probe_images=0 to skip the probe")
    device = resolve_device(ep.device, "evaluate.device")
    net, _ = load_model(model, params, data.num_classes, device)
    return net, device, ids


def _probe(params: Params, data: PreparedDataset, loaded: ProbeModel,
           pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The isolated-patch probe (seco_cli.probe) of the model :func:`_probe_model` read."""
    from seco_cli.probe import patch_probe

    net, device, ids = loaded
    ep = params.evaluate
    return patch_probe(net, data, ids, resolve_pairs(pairs, data.classes),
                       [f"{v}/{q}" for v, q in pairs], params.model.crop_size,
                       params.train.patch_size, ep.probe_step, params.data.mean,
                       params.data.std, ep.probe_min_fraction, ep.probe_batch_size, device)


def run(params: Params, prepared: Path, cams: Path, pseudo: Path, segment: Path,
        metrics_out: Path, plots_dir: Path, progress: Advance | None = None,
        model: Path | None = None) -> dict[str, Any]:
    """Score every source, write ``metrics_out`` and the plot folder (CSVs, full report, picture
    grid), return the metrics. With ``model`` and ``evaluate.probe_images`` > 0 the
    isolated-patch probe runs too.

    ``progress``, when given, is called with the number of images just scored (an "advance").
    """
    data = PreparedDataset(prepared)
    stores = {"cams": StoreReader(cams, "cams", stage_hint="cams"),
              "pseudo": StoreReader(pseudo, "pseudo", stage_hint="pseudo"),
              "segment": _segment_store(segment)}
    # pseudo masks are made from the CAMs, so they cover the cams split
    cam_split = params.cams.split or params.data.train_split
    loaded = None  # after the stores, before any scoring
    if model is not None and params.evaluate.probe_images > 0:
        loaded = _probe_model(params, model, data, cam_split)
    seg_split = params.segment.split or params.data.eval_split
    pairs = _pairs(params, data)
    sources = {"cams": _eval_cams(data, stores["cams"], cam_split, params, pairs, progress)}
    if AUX in stores["cams"].groups:
        sources["cams_aux"] = _eval_cams(data, stores["cams"], cam_split, params, pairs,
                                         progress, AUX)
    sources["pseudo"] = _eval_masks(data, stores["pseudo"], "pseudo", cam_split, pairs, progress)
    for variant, name in SEGMENT_VARIANTS.items():
        sources[name] = _eval_masks(data, stores["segment"], "segment", seg_split, pairs,
                                    progress, variant)
    report = {"classes": data.classes, "pairs": [list(p) for p in pairs],
              "pairs_from": "params" if params.evaluate.pairs else "cooccurrence",
              "sources": sources,
              "provenance": provenance(params.dump(), params.train.seed),
              "inputs": _recorded(stores)}
    if loaded is not None:
        report["probe"] = _probe(params, data, loaded, pairs)
    metrics = compact(report)
    files = plot_files(report)
    rows = _grid_rows(data, [cam_split, seg_split], stores, params.evaluate.grid_images)
    grid = sample_grid(rows, data.classes, params.evaluate.grid_panel) if rows else None
    out_dir = fresh_output_dir(plots_dir)  # cleared only now that every score is in
    for name, text in files.items():
        write_text(out_dir / name, text)
    if grid is not None:
        grid.save(out_dir / GRID)
    write_json(metrics_out, metrics)
    return metrics
