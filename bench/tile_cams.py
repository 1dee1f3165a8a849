"""Can tiles classified alone replace an inverted CAM? A diagnostic on trained models.

The isolated-patch probe (`evaluate`, `probe` in evaluate.json) showed that a class whose
whole-image CAM is inverted (the person beside the horse, the boat on its water) is still read
from its own tiles: each ``train.patch_size`` tile classified alone scores the victim above
its partner's tiles. This script asks whether that can be turned into a CAM. For each
checkpoint and each classifier head it builds, from the same images (``--images`` of the
train split, resized to the inference input as the probe does):

- ``image``: the CAM of the SPEC (multi-scale + flip fusion, ``train.cam_scales``);
- ``tile-cam``: every tile (side ``train.patch_size``, every half tile, the far edges
  covered) and its flip through the network alone, each tile's own CAM put back where the
  tile came from, a pixel taking the mean over the tiles that cover it — no attention
  reaches a tile from outside;
- ``tile-logit-mean`` / ``tile-logit-min``: each tile's image logit (global max pooling of
  its CAM; flip fused by max), every quarter tile, spread over the tile's pixels; a pixel
  takes the mean, or the minimum, over the tiles that cover it (ReLU'd).

Each map is normalised as training normalises CAMs (per class, min-max, the image's labels
only) and turned into a mask against a constant background score, for each ``--bkg``; the
table gives per-class IoU and mIoU against the ground truth.

    python bench/tile_cams.py --model artifacts/train/model.pt
    python bench/tile_cams.py --exp q-synthetic-default-seco-s1-c78c13d3   # a quality run's model

``--exp`` takes a DVC experiment (name or commit) of this repository: the model is read from
the DVC cache by the md5 its ``dvc.lock`` records, so a ``bench/quality.py`` run needs no
``dvc exp apply``. Writes ``bench/results/tile-cams.{json,md}`` (``--results``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import benchlib  # noqa: E402

from seco_cli.cams import fuse_cams, normalise_cams  # noqa: E402
from seco_cli.data.prepared import PreparedDataset  # noqa: E402
from seco_cli.data.transforms import resize_square, to_tensor  # noqa: E402
from seco_cli.inference import load_model  # noqa: E402
from seco_cli.metrics import ConfusionMatrix  # noqa: E402
from seco_cli.params import load_params  # noqa: E402
from seco_cli.tiles import place, spread_logits, tile_agreement, tiles_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_OUT = "artifacts/train/model.pt"
VARIANTS = ("image", "tile-cam", "tile-logit-mean", "tile-logit-min")


@torch.no_grad()
def maps(net, images: torch.Tensor, scales: list[float], patch: int
         ) -> dict[str, dict[str, torch.Tensor]]:
    """The four maps of the module docstring, per head (``final``, ``aux``): each
    (B, C, H, W), ≥ 0. Both heads come from the same passes (``net.both_cams`` and one
    forward of the tiles for their logits)."""
    b = images.shape[0]
    size = tuple(images.shape[-2:])
    stride = net.backbone.stride
    out: dict[str, dict[str, torch.Tensor]] = {"final": {}, "aux": {}}
    image_cams = fuse_cams(net.both_cams, images, scales, True, size, multiple=stride)
    tiles, where, side = tiles_of(images, patch, max(1, patch // 2))
    tile_cams = fuse_cams(net.both_cams, tiles, [1.0], True, side, multiple=stride)  # ReLU'd
    tiles, where4, side4 = tiles_of(images, patch, max(1, patch // 4))
    res = net(torch.cat([tiles, tiles.flip(-1)]), with_seg=False)
    n = tiles.shape[0]
    for head, image_cam, tile_cam, logits in zip(
            ("final", "aux"), image_cams, tile_cams, (res.logits, res.aux_logits), strict=True):
        out[head]["image"] = image_cam
        out[head]["tile-cam"] = place(tile_cam.unflatten(0, (b, len(where))), where, side,
                                      size, "mean")
        logits = logits.float()
        logits = torch.maximum(logits[:n], logits[n:]).unflatten(0, (b, len(where4)))  # (B,T,C)
        for reduce in ("mean", "min"):
            out[head][f"tile-logit-{reduce}"] = spread_logits(logits, where4, side4, size, reduce)
    return out


def model_of_exp(exp: str, repo: Path) -> Path:
    """The DVC-cache path of the model a DVC experiment (name or commit) recorded."""
    try:
        lock = subprocess.run(["git", "show", f"{exp}:dvc.lock"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
    except subprocess.CalledProcessError:
        ref = subprocess.run(["git", "for-each-ref", "--format=%(refname)",
                              f"refs/exps/*/*/{exp}"], cwd=repo, capture_output=True,
                             text=True).stdout.split()
        if not ref:
            raise SystemExit(f"error: no DVC experiment or commit {exp!r} in {repo}; "
                             "list them with `dvc exp list --all-commits`") from None
        lock = subprocess.run(["git", "show", f"{ref[0]}:dvc.lock"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
    for out in yaml.safe_load(lock)["stages"]["train"]["outs"]:
        if out["path"] == MODEL_OUT:
            md5 = out["md5"]
            path = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
            if not path.is_file():
                raise SystemExit(f"error: {exp}'s model ({md5}) is not in {path.parent.parent}; "
                                 "run the experiment again or `dvc pull` it")
            return path
    raise SystemExit(f"error: {exp}'s dvc.lock records no {MODEL_OUT}")


@torch.no_grad()
def measure(model: Path, params, data: PreparedDataset, ids: list[str], bkgs: list[float],
            batch: int) -> dict[str, dict]:
    """Per head, variant and background score: the confusion summary (per-class IoU, mIoU)."""
    net, _ = load_model(model, params, data.num_classes, torch.device("cpu"))
    crop = params.model.crop_size
    k = data.num_classes + 1
    cms = {(h, v, b): ConfusionMatrix(k) for h in ("final", "aux") for v in VARIANTS for b in bkgs}
    agree: dict[tuple[str, int], list[float]] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        images = torch.stack([resize_square(to_tensor(data.image(i), params.data.mean,
                                                      params.data.std), crop) for i in chunk])
        labels = torch.tensor(np.stack([data.label_vector(i) for i in chunk])).float()
        gts = [F.interpolate(torch.from_numpy(np.ascontiguousarray(data.mask(i)))[None, None]
                             .float(), size=(crop, crop), mode="nearest")[0, 0].numpy()
               for i in chunk]
        per_head = maps(net, images, params.train.cam_scales, params.train.patch_size)
        for head, found in per_head.items():
            for (_, c), r in agreement(found["image"], found["tile-logit-mean"], labels,
                                       params.train.cam_select_tile_power,
                                       params.train.cam_select_tile_reference).items():
                agree.setdefault((head, c), []).append(r)
            for variant, cam in found.items():
                cam = normalise_cams(cam, labels)
                for b in bkgs:
                    pred = torch.cat([torch.full_like(cam[:, :1], b), cam], 1).argmax(1).numpy()
                    for g, p in zip(gts, pred, strict=True):
                        cms[head, variant, b].update(g.astype(np.int64), p)
    result: dict[str, dict] = {"heads": {}, "agreement": {},
                               "tile_power": params.train.cam_select_tile_power,
                               "tile_reference": params.train.cam_select_tile_reference}
    for (head, variant, b), cm in cms.items():
        iou = cm.compute()["iou"]
        present = cm.mat.sum(1) > 0
        result["heads"].setdefault(head, {}).setdefault(variant, {})[str(b)] = {
            "miou": float(np.nanmean(np.where(present, iou, np.nan))),
            "iou": {data.classes[c]: (None if np.isnan(iou[c]) else float(iou[c]))
                    for c in range(k)}}
    for (head, c), rs in sorted(agree.items()):
        result["agreement"].setdefault(head, {})[data.classes[c + 1]] = {
            "mean_r": float(np.mean(rs)), "images": len(rs)}
    return result


def agreement(cam: torch.Tensor, tiles: torch.Tensor, labels: torch.Tensor,
              power: float = 1.0, reference: str = "sharpened") -> dict[tuple[int, int], float]:
    """Per (image, class) of ``labels``: the Pearson correlation over pixels between the
    image's CAM and its tile-logit map — does the whole-image CAM rise where the tiles, each
    classified alone, find the class? (A label-free sign of an inverted head.) The map is
    sharpened by ``power`` and compared as the trainer's statistic does
    (:func:`seco_cli.tiles.tile_agreement`, ``reference``). Pairs where either map is
    constant are left out."""
    r, defined = tile_agreement(cam, tiles, power, reference)
    return {(b, c): float(r[b, c]) for b, c in labels.nonzero().tolist() if defined[b, c]}


def render(runs: dict[str, dict], classes: list[str], head: dict) -> str:
    lines = ["# Tile CAMs: tiles classified alone as a CAM (`bench/tile_cams.py`)\n",
             benchlib.header_markdown(head)]
    for name, run in runs.items():
        lines.append(f"\n## {name}\n\n- model: `{run['model']}`; {run['images']} train images\n\n")
        rows = []
        for h, variants in run["result"]["heads"].items():
            for v, per_bkg in variants.items():
                for b, r in per_bkg.items():
                    rows.append([h, v, b, f"{100 * r['miou']:.1f}",
                                 *(("—" if r["iou"][c] is None else f"{100 * r['iou'][c]:.0f}")
                                   for c in classes)])
        lines.append(benchlib.md_table(["head", "map", "bkg", "mIoU", *classes], rows))
        agree = run["result"]["agreement"]
        power = run["result"].get("tile_power", 1.0)  # runs stored before it: 1
        sharpened = (f", divided by its maximum and raised to the power {power:g} "
                     "(`train.cam_select_tile_power`)" if power != 1.0 else "")
        if power != 1.0 and run["result"].get("tile_reference") == "both":
            sharpened += (", the lower of that and the plain map's "
                          "(`train.cam_select_tile_reference: both`)")
        lines.append(f"\nCorrelation of the image CAM with the tile-logit map{sharpened} (mean "
                     "over the class's images; negative: the CAM falls where the tiles find "
                     "the class)\n\n")
        lines.append(benchlib.md_table(
            ["head", *classes[1:]],
            [[h, *((f"{agree[h][c]['mean_r']:+.2f}" if c in agree.get(h, {}) else "—")
                   for c in classes[1:])] for h in ("final", "aux")]))
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="a model.pt (repeatable)")
    ap.add_argument("--exp", action="append", default=[],
                    help="a DVC experiment of this repository (repeatable)")
    ap.add_argument("--exp-repo", default=str(ROOT),
                    help="the clone holding the experiments (default: this one)")
    ap.add_argument("--prepared", default="artifacts/prepared")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override (repeatable)")
    ap.add_argument("--images", type=int, default=200, help="first n train images")
    ap.add_argument("--bkg", type=float, action="append", default=None,
                    help="background score(s); default evaluate.cam_bkg")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--results", default="bench/results/tile-cams.json")
    args = ap.parse_args(argv)
    models = {m: Path(m) for m in args.model} | {e: model_of_exp(e, Path(args.exp_repo)) for e in args.exp}
    if not models:
        ap.error("give at least one --model or --exp")
    params = load_params(args.params, args.set)
    data = PreparedDataset(args.prepared)
    ids = [i for i in data.ids(params.data.train_split) if data.has_mask(i)][:args.images]
    bkgs = args.bkg or [params.evaluate.cam_bkg]
    runs = {name: {"model": str(path), "images": len(ids),
                   "result": measure(path, params, data, ids, bkgs, args.batch)}
            for name, path in models.items()}
    head = benchlib.run_header()
    text = render(runs, data.classes, head)
    print(text)
    out = Path(args.results)
    benchlib.write_json(out, {**head, "bkg": bkgs, "runs": runs})
    benchlib.write_text(out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
