"""Calibrate tag rectification (SPEC §5) against ground truth.

Loads a training checkpoint (``last.pt``: student, local teacher, reservoir, prototypes),
draws training batches *with their ground-truth masks*, tags the patches exactly as training
does (CAM → region map → patches → tags) and also from the ground truth. A patch tag is
*noisy* when it differs from its ground-truth tag. For each probe — the student query (the
paper) and the teacher key of the same patch (our default, `train.rectify_view: key`) — it
reports how well the abnormal-pair fraction finds the noisy tags: the ROC AUC, and for a grid
of β the firing rate, precision (fired tags that are noisy) and recall (noisy tags fired).

    python bench/rectify_calibration.py --checkpoint artifacts/checkpoints/last.pt \
        --prepared artifacts/prepared [--set train.preset=seco ...] [--batches 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import benchlib  # noqa: E402

from seco_cli.checkpoint import load_checkpoint  # noqa: E402
from seco_cli.data.loader import TrainSamples, train_loader  # noqa: E402
from seco_cli.data.prepared import PreparedDataset  # noqa: E402
from seco_cli.losses.contrast import rectify  # noqa: E402
from seco_cli.metrics import auc  # noqa: E402
from seco_cli.params import load_params  # noqa: E402
from seco_cli.tags import patch_tags, region_map  # noqa: E402
from seco_cli.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def collect(params, prepared: Path, checkpoint: Path, batches: int, start: int):
    data = PreparedDataset(prepared)
    trainer = Trainer(params, data, torch.device("cpu"), {"params": params.dump()})
    trainer.load_state(load_checkpoint(checkpoint))
    step = trainer.iteration
    method, tp = trainer.method, params.train
    method.eval()
    samples = TrainSamples(data, data.ids(params.data.train_split), tp.batch_size, tp.seed + 7,
                           params.model.crop_size, tp.scale_range, params.data.mean,
                           params.data.std, with_masks=True)
    bank_keys, bank_tags = method.reservoir.valid()
    rows = {"query": [], "key": [], "tag": [], "gt": []}
    for i, batch in enumerate(train_loader(samples, start, start + batches, 0)):
        images, labels, valid = batch["image"], batch["labels"], batch["valid"]
        raw = (images * trainer.std + trainer.mean).clamp(0, 1)
        cam = method.online_cam(images, labels, aux=False)
        region = region_map(cam, valid, tp.cam_high, tp.cam_low)
        v = method._views(images, raw, region, valid, labels, trainer._generator(start + i),
                          trainer._normalise, )
        gt_region = batch["mask"].masked_fill(~valid, 255)
        gt = patch_tags(gt_region, v["boxes"], labels, tp.tag_threshold, v["too_small"]).flatten()
        q = method._embed(v["query"])
        k = method._teacher_embed(v["key"])
        for name, probe in (("query", q), ("key", k)):
            _, stats = rectify(probe, v["tags"], bank_keys, bank_tags, tp.rectify_proportion)
            rows[name].append(stats["frac"].numpy())
        rows["tag"].append(v["tags"].numpy())
        rows["gt"].append(gt.numpy())
    return {name: np.concatenate(r) for name, r in rows.items()}, step


def report(rows: dict[str, np.ndarray]) -> dict:
    tag, gt = rows["tag"], rows["gt"]
    eligible = ~np.isnan(rows["key"]) & (tag >= 0)
    noisy = (tag != gt)[eligible]
    out = {"patches": int(len(tag)), "eligible": int(eligible.sum()),
           "noisy_rate": float(noisy.mean()) if eligible.any() else float("nan"),
           "noisy_by_gt": {}, "views": {}}
    for g in np.unique(gt[eligible]):
        sel = gt[eligible] == g
        out["noisy_by_gt"][int(g)] = {"n": int(sel.sum()), "noisy": float(noisy[sel].mean())}
    for view in ("query", "key"):
        frac = rows[view][eligible]
        per_beta = {}
        for beta in BETAS:
            fired = frac > beta
            per_beta[beta] = {
                "fire_rate": float(fired.mean()),
                "precision": float(noisy[fired].mean()) if fired.any() else float("nan"),
                "recall": float(fired[noisy].mean()) if noisy.any() else float("nan"),
            }
        out["views"][view] = {"auc": auc(frac, noisy), "mean_frac": float(frac.mean()),
                              "mean_frac_clean": float(frac[~noisy].mean()),
                              "mean_frac_noisy": float(frac[noisy].mean()) if noisy.any()
                              else float("nan"), "beta": per_beta}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    params = load_params(args.params, args.overrides)
    rows, step = collect(params, args.prepared, args.checkpoint, args.batches, 0)
    res = report(rows)
    print(f"checkpoint {args.checkpoint} at iteration {step}")
    print(f"patches {res['patches']}, eligible {res['eligible']}, "
          f"noisy tags {100 * res['noisy_rate']:.1f} %")
    for view, r in res["views"].items():
        print(f"\nprobe = {view}: AUC {r['auc']:.3f}; mean abnormal fraction clean "
              f"{r['mean_frac_clean']:.3f}, noisy {r['mean_frac_noisy']:.3f}")
        print(f"  {'β':>5} {'fires %':>8} {'precision':>10} {'recall':>8}")
        for beta, b in r["beta"].items():
            print(f"  {beta:>5} {100 * b['fire_rate']:>8.1f} {b['precision']:>10.3f} "
                  f"{b['recall']:>8.3f}")
    if args.json:
        res["provenance"] = {**benchlib.run_header(), "checkpoint": str(args.checkpoint),
                             "checkpoint_step": step, "overrides": args.overrides,
                             "batches": args.batches}
        benchlib.write_json(args.json, res)


if __name__ == "__main__":
    main()
