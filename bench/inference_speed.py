"""Inference speed and storage of the cams, pseudo and segment stages.

Prints, for a prepared dataset and a trained model:

- cams and segment throughput (images/s) of the whole stage (model load, image reading,
  fusion, resizing, CRF, store writing, PNG export) against the bare network's forward
  throughput at the same scales and flips on preloaded batches, and their ratio;
- the pseudo stage (PAR/CRF as in the params) with 1 worker and with ``--workers`` workers:
  times and speed-up;
- CAM bytes per image as stored (``cams.dtype``, own classes, compressed, on disk) against float32
  full-resolution maps of every class.

    OMP_NUM_THREADS=1 python bench/inference_speed.py --prepared artifacts/prepared \\
        --model artifacts/train/model.pt --out /tmp/bench

The measuring functions are imported by ``bench/speed.py``, whose numbers are the ones to
quote: a CRF pool's spawned workers re-run the top-level imports of the program that
started them, and this file imports torch at the top (``speed.py`` does not), so run
directly its pool start-up includes a torch import the stages' workers never do.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

from seco_cli.cams import rescale  # noqa: E402
from seco_cli.data.prepared import PreparedDataset  # noqa: E402
from seco_cli.device import resolve_device  # noqa: E402
from seco_cli.inference import batches, cam_fn, load_model  # noqa: E402
from seco_cli.params import Params, load_params, seed_cam_source  # noqa: E402
from seco_cli.shards import Shard  # noqa: E402
from seco_cli.store import StoreReader  # noqa: E402
from stages import cams as cams_stage  # noqa: E402
from stages import pseudo as pseudo_stage  # noqa: E402
from stages import segment as segment_stage  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device = torch.device("cpu")) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def bare_forward(net, loaded: list[torch.Tensor], scales: list[float], flip: bool,
                 head, device: torch.device = torch.device("cpu")) -> float:
    """Seconds for the network's forward passes alone (backbone + ``head``) over the batches
    (already on ``device``), after one untimed warm-up pass."""
    def run(batches_):
        for images in batches_:
            for s in scales:
                x = rescale(images, s, net.backbone.stride)
                head(torch.cat([x, x.flip(-1)]) if flip else x)
    run(loaded[:1])  # warm-up: allocator, kernels, thread pool
    return _timed(lambda: run(loaded), device)


def store_bytes(path: Path, group: str | None = None) -> tuple[int, int]:
    """(bytes on disk of the per-image arrays, number of images) of a store (or a group)."""
    return StoreReader(path).stored_bytes(group)


def _preload(data: PreparedDataset, ids: list[str], size: int, params: Params,
             device: torch.device) -> list[torch.Tensor]:
    mean, std, crop = params.data.mean, params.data.std, params.model.crop_size
    return [b.to(device) for _, b, _ in batches(data, ids, size, crop, mean, std)]


def _ratio(n: int, stage_s: float, bare_s: float) -> dict[str, Any]:
    return {"images": n, "stage_s": stage_s, "bare_s": bare_s, "stage_ips": n / stage_s,
            "bare_ips": n / bare_s, "ratio": bare_s / stage_s}


def measure_cams(params: Params, prepared: Path, model: Path, out: Path) -> dict[str, Any]:
    """cams stage vs bare forward at ``cams.scales`` + flip: images/s of both and their ratio.
    Writes the CAM store to ``out`` (kept: the pseudo and byte measurements read it)."""
    cp, data = params.cams, PreparedDataset(prepared)
    device = resolve_device(cp.device, "cams.device")
    net, meta = load_model(model, params, data.num_classes, device)
    ids = data.ids(cp.split or params.data.train_split)
    loaded = _preload(data, ids, cp.batch_size, params, device)
    # the forward the stage needs: up to the auxiliary block for auxiliary seeds
    source = seed_cam_source(params, meta)
    bare = bare_forward(net, loaded, cp.scales, cp.flip, cam_fn(net, source, cp.aux), device)
    stage = _timed(lambda: cams_stage.run(params, prepared, model, out, Shard()), device)
    return {**_ratio(len(ids), stage, bare), "scales": cp.scales, "flip": cp.flip,
            "source": source, "device": str(device)}


def measure_segment(params: Params, prepared: Path, model: Path, out: Path,
                    workers: int) -> dict[str, Any]:
    """segment stage (raw + ms_crf, CRF over ``workers`` processes, PNGs) vs bare forward
    (backbone + decoder) at ``segment.scales`` + flip."""
    sp, data = params.segment, PreparedDataset(prepared)
    device = resolve_device(sp.device, "segment.device")
    net, _ = load_model(model, params, data.num_classes, device)
    ids = data.ids(sp.split or params.data.eval_split)
    loaded = _preload(data, ids, sp.batch_size, params, device)
    bare = bare_forward(net, loaded, sp.scales, sp.flip,
                        lambda x: net.decoder(net.backbone(x)[0]), device)
    p = params.model_copy(deep=True)
    p.segment.workers = workers
    stage = _timed(lambda: segment_stage.run(p, prepared, model, out / "seg.zarr",
                                             out / "seg_png"), device)
    return {**_ratio(len(ids), stage, bare), "scales": sp.scales, "flip": sp.flip,
            "crf_iterations": sp.crf.iterations, "workers": workers, "device": str(device)}


def measure_pseudo(params: Params, prepared: Path, cams: Path, out: Path,
                   workers: int) -> dict[str, Any]:
    """Seconds of the pseudo stage (PAR/CRF as in the params) with ``workers`` processes."""
    p = params.model_copy(deep=True)
    p.pseudo.workers = workers
    res: dict[str, Any] = {}
    seconds = _timed(lambda: res.update(pseudo_stage.run(p, prepared, cams, out / "pseudo.zarr",
                                                         out / "pseudo_png")))
    return {"images": res["images"], "workers": workers, "seconds": seconds,
            "par_iterations": p.pseudo.par_iterations, "crf_iterations": p.pseudo.crf.iterations}


def pool_startup(workers: int) -> float:
    """Seconds to start a pool of ``workers`` processes (spawn, the CRF code imported) and get
    one trivial result from each: the fixed cost in a pool's stage time. The job is a function
    of the torch-free module the CRF jobs live in, so a worker loads what a CRF job loads."""
    from seco_cli.pool import imap
    from seco_cli.postprocess import softmax

    return _timed(lambda: list(imap(softmax, [np.zeros((2, 1, 1), np.float32)] * workers,
                                    workers)))


def crf_seconds(data: PreparedDataset, ids: list[str], crf: Any, num_labels: int, crop: int,
                seed: int = 0) -> dict[str, Any]:
    """Seconds of the segment stage's dense CRF alone (:func:`segment_labels` with
    ``crf``: resize to the image, softmax, CRF, argmax), one process, per image of ``ids``.
    The logits are random at a ViT-B/16's token grid (``crop`` / 16), upsampled to ``crop``
    as the decoder's are: the CRF's cost depends on the image and the label count, not on
    the weights that made the logits."""
    from seco_cli.postprocess import crf_kwargs, resize_scores, segment_labels

    rng = np.random.default_rng(seed)
    kwargs = crf_kwargs(crf)
    seconds = []
    for image_id in ids:
        image = data.image(image_id)
        grid = max(1, crop // 16)
        logits = resize_scores(3 * rng.standard_normal((num_labels, grid, grid))
                               .astype(np.float32), (crop, crop))
        start = time.perf_counter()
        segment_labels(image, logits, kwargs)
        seconds.append(time.perf_counter() - start)
    h, w = data.image_size(ids[0])
    return {"images": len(ids), "seconds_per_image": float(np.mean(seconds)),
            "seconds": seconds, "labels": num_labels, "size": [h, w],
            "iterations": crf.iterations}


def cam_bytes(prepared: Path, cams: Path) -> dict[str, Any]:
    """CAM bytes per image as stored (the store's per-image arrays on disk, metadata
    included) against float32 full-resolution maps of every foreground class (``ratio``;
    the reference with a background map too is ``full_with_background_per_image``)."""
    data = PreparedDataset(prepared)
    stored, n = store_bytes(cams)
    ids = StoreReader(cams).ids()
    own = sum(len(data.labels(i)) for i in ids)
    pixels = sum(h * w for h, w in map(data.image_size, ids))
    full = 4 * data.num_classes * pixels  # one float32 map per foreground class (a CAM)
    return {"images": n, "classes": data.num_classes, "stored_per_image": stored / n,
            "full_per_image": full / n, "ratio": stored / full,
            "full_with_background_per_image": 4 * (data.num_classes + 1) * pixels / n,
            "own_classes_per_image": own / n,
            "stored_per_class_map": stored / own if own else None}


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
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}")

    c = measure_cams(params, args.prepared, args.model, out / "cams.zarr")
    print(f"cams     {c['images']} images  scales {c['scales']} flip {c['flip']}: stage "
          f"{c['stage_ips']:7.1f} img/s, bare forward {c['bare_ips']:7.1f} img/s, "
          f"stage/bare {c['ratio']:.2f}")
    for workers in sorted({1, args.workers}):
        s = measure_segment(params, args.prepared, args.model, out, workers)
        print(f"segment  {s['images']} images  scales {s['scales']} flip {s['flip']} "
              f"CRF {s['crf_iterations']} it, {workers} worker(s): stage "
              f"{s['stage_ips']:7.1f} img/s, bare forward {s['bare_ips']:7.1f} img/s,"
              f" stage/bare {s['ratio']:.2f}")
    times = {}
    for workers in sorted({1, args.workers}):
        r = measure_pseudo(params, args.prepared, out / "cams.zarr", out, workers)
        times[workers] = r["seconds"]
        print(f"pseudo   {r['images']} images  PAR {r['par_iterations']} it, CRF "
              f"{r['crf_iterations']} it, {workers} worker(s): {r['seconds']:6.1f} s "
              f"({r['images'] / r['seconds']:.1f} img/s)")
    if args.workers != 1:
        print(f"pseudo   speed-up {args.workers} workers vs 1: "
              f"{times[1] / times[args.workers]:.2f}×")
    b = cam_bytes(args.prepared, out / "cams.zarr")
    print(f"CAM bytes/image: stored {b['stored_per_image']:,.0f} ({params.cams.dtype}, own "
          f"classes, compressed, store_size {params.cams.store_size}) vs float32 all "
          f"{b['classes']} classes at full resolution {b['full_per_image']:,.0f}: "
          f"{1 / b['ratio']:.1f}× smaller")


if __name__ == "__main__":
    main()
