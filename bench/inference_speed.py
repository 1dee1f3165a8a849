"""Inference speed and storage of the cams, pseudo and segment stages.

Prints, for a prepared dataset and a trained model:

- cams and segment throughput (images/s) of the whole stage (model load, image reading,
  fusion, resizing, CRF, store writing, PNG export) against the bare network's forward
  throughput at the same scales and flips on preloaded batches, and their ratio;
- the pseudo stage (PAR/CRF as in the params) with 1 worker and with ``--workers`` workers:
  times and speed-up;
- CAM bytes per image as stored (float16, own classes, compressed, on disk) against float32
  full-resolution maps of every class.

    OMP_NUM_THREADS=1 python bench/inference_speed.py --prepared artifacts/prepared \\
        --model artifacts/train/model.pt --out /tmp/bench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from seco_cli.cams import rescale
from seco_cli.data.prepared import PreparedDataset
from seco_cli.inference import batches, cam_fn, load_model
from seco_cli.params import load_params
from seco_cli.shards import Shard
from stages import cams as cams_stage
from stages import pseudo as pseudo_stage
from stages import segment as segment_stage


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def bare_forward(net, loaded: list[torch.Tensor], scales: list[float], flip: bool,
                 head) -> float:
    """Seconds for the network's forward passes alone (backbone + ``head``) over the batches."""
    def run():
        for images in loaded:
            for s in scales:
                x = rescale(images, s, net.backbone.stride)
                head(torch.cat([x, x.flip(-1)]) if flip else x)
    return _timed(run)


def store_bytes(path: Path, group: str | None = None) -> tuple[int, int]:
    """(bytes on disk of the per-image arrays, number of images) of a store (or a group)."""
    root = path if group is None else path / group
    dirs = [p for p in root.iterdir() if (p / "zarr.json").is_file() and p.name != "aux"]
    total = sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())
    return total, len(dirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"))
    ap.add_argument("--model", type=Path, default=Path("artifacts/train/model.pt"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--set", action="append", default=[], help="params override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/seco-bench"))
    ap.add_argument("--workers", type=int, default=2, help="pool size compared with 1 worker")
    args = ap.parse_args()
    params = load_params(args.params, args.set)
    data = PreparedDataset(args.prepared)
    net, _ = load_model(args.model, params, data.num_classes, torch.device("cpu"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    mean, std, crop = params.data.mean, params.data.std, params.model.crop_size
    print(f"torch threads {torch.get_num_threads()}")

    # --- cams: stage vs bare forward at cams.scales + flip
    cp = params.cams
    ids = data.ids(cp.split or params.data.train_split)
    loaded = [b for _, b, _ in batches(data, ids, cp.batch_size, crop, mean, std)]
    bare = bare_forward(net, loaded, cp.scales, cp.flip, cam_fn(net, cp.aux))
    stage = _timed(lambda: cams_stage.run(params, args.prepared, args.model, out / "cams.zarr",
                                          Shard()))
    print(f"cams     {len(ids)} images  scales {cp.scales} flip {cp.flip}: stage "
          f"{len(ids) / stage:7.1f} img/s, bare forward {len(ids) / bare:7.1f} img/s, "
          f"stage/bare {bare / stage:.2f}")

    # --- segment: stage (both variants, CRF, PNGs) vs bare forward at segment.scales + flip
    sp = params.segment
    seg_ids = data.ids(sp.split or params.data.eval_split)
    loaded = [b for _, b, _ in batches(data, seg_ids, sp.batch_size, crop, mean, std)]
    bare = bare_forward(net, loaded, sp.scales, sp.flip,
                        lambda x: net.decoder(net.backbone(x)[0]))
    for workers in sorted({1, args.workers}):
        p = params.model_copy(deep=True)
        p.segment.workers = workers
        stage = _timed(lambda p=p: segment_stage.run(p, args.prepared, args.model,
                                                     out / "seg.zarr", out / "seg_png"))
        print(f"segment  {len(seg_ids)} images  scales {sp.scales} flip {sp.flip} "
              f"CRF {sp.crf.iterations} it, {workers} worker(s): stage "
              f"{len(seg_ids) / stage:7.1f} img/s, bare forward {len(seg_ids) / bare:7.1f} img/s,"
              f" stage/bare {bare / stage:.2f}")

    # --- pseudo: pool of 1 vs args.workers
    times = {}
    for workers in sorted({1, args.workers}):
        p = params.model_copy(deep=True)
        p.pseudo.workers = workers
        times[workers] = _timed(lambda p=p: pseudo_stage.run(
            p, args.prepared, out / "cams.zarr", out / "pseudo.zarr", out / "pseudo_png"))
        print(f"pseudo   {len(ids)} images  PAR {p.pseudo.par_iterations} it, CRF "
              f"{p.pseudo.crf.iterations} it, {workers} worker(s): {times[workers]:6.1f} s "
              f"({len(ids) / times[workers]:.1f} img/s)")
    if args.workers != 1:
        speedup = times[1] / times[args.workers]
        print(f"pseudo   speed-up {args.workers} workers vs 1: {speedup:.2f}×")

    # --- CAM storage
    stored, n = store_bytes(out / "cams.zarr")
    full = sum(4 * data.num_classes * h * w for h, w in map(data.image_size, ids))
    print(f"CAM bytes/image: stored {stored / n:,.0f} (float16, own classes, compressed, "
          f"store_size {cp.store_size}) vs float32 all {data.num_classes} classes at full "
          f"resolution {full / len(ids):,.0f}: {full / stored:.1f}× smaller")


if __name__ == "__main__":
    main()
