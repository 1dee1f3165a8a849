"""Train step time, SeCo ÷ baseline, same backbone, batch and data (issue 5 goal ≤ 1.5).

Both trainers step at an iteration where every term of their preset is on (after
``seg_start``, ``contrast_start``, ``rectify_start``, ``proto_start``, ``cam2mask``); the
reservoir is filled by warm-up steps first. Steps alternate between the two presets so
machine noise hits both alike; the median of the timed steps is reported. One more step per
preset, untimed, counts its floating-point operations (forward and backward, matrix products
and convolutions: ``torch.utils.flop_counter``): the arithmetic the preset asks for, so the
FLOP ratio is the step ratio an implementation bound by arithmetic would reach.

With ``--host-reads`` it counts instead, for one step of each preset, the top-level ATen ops
(kernel launches on a GPU), the ``nonzero`` calls and the package's reads of tensor values by
call site (each a wait for the device on a GPU): :func:`host_reads`.

    python bench/train_step.py                       # embedded default profile
    python bench/train_step.py --params recipes/voc.yaml --set data.source=synthetic ...
    python bench/train_step.py --host-reads --warmup 2
    python bench/train_step.py --presets seco,seco@train.cam_select=schedule  # one setting's cost

A preset may carry overrides of its own after ``@`` (``preset@key=value@key=value``): the
same preset under two settings, timed side by side like two presets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import benchlib  # noqa: E402

from seco_cli.data.loader import TrainSamples, train_loader  # noqa: E402
from seco_cli.data.prepared import PreparedDataset  # noqa: E402
from seco_cli.device import resolve_device  # noqa: E402
from seco_cli.params import load_params  # noqa: E402
from seco_cli.trainer import Trainer  # noqa: E402
from seco_cli.waits import select_everywhere  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "seco_cli"


def all_on_iteration(tp) -> int:
    starts = [tp.seg_start, tp.contrast_start, tp.rectify_start, tp.proto_start, tp.cam2mask,
              tp.ptc_start, tp.warmup_iters]
    return min(max(starts) + 1, tp.iterations - 1)


def step_iterations(tp, it: int, n: int) -> list[int]:
    """The iterations of ``n`` timed steps from the all-terms-on ``it``: consecutive (so a
    setting acting every few iterations, such as ``train.cam_select_every``, is timed at its
    average), the last one repeated at the end of training."""
    return [min(it + i, tp.iterations - 1) for i in range(n)]


def variant(name: str) -> tuple[str, list[str]]:
    """``"seco@train.cam_select=schedule"`` → (``"seco"``, ``["train.cam_select=schedule"]``):
    a preset and the overrides of its own that follow it after ``@``."""
    preset, *extra = name.split("@")
    return preset, extra


def _setup(params_file: Path, overrides: list[str], presets: list[str], n_batches: int,
           prepared: Path | None, tmp: str):
    """(trainers by preset, ``n_batches`` batches, the all-terms-on iteration, device)."""
    base = load_params(params_file, overrides)
    if prepared is None:
        from stages import prepare

        prepared = Path(tmp) / "prepared"
        prepare.run(base, prepared, Path(tmp) / "prepare.json")
    data = PreparedDataset(prepared)
    device = resolve_device(base.train.device, "train.device")
    trainers = {}
    for name in presets:
        preset, extra = variant(name)
        p = load_params(params_file, [*overrides, f"train.preset={preset}", *extra])
        trainers[name] = Trainer(p, data, device, {"params": p.dump()})
    tp = base.train
    samples = TrainSamples(data, data.ids(base.data.train_split), tp.batch_size, tp.seed,
                           base.model.crop_size, tp.scale_range, base.data.mean,
                           base.data.std,  # fully_supervised trains on the masks
                           with_masks=any(t.sched.gt_seg for t in trainers.values()))
    batches = list(train_loader(samples, 0, n_batches, 0))
    return trainers, batches, all_on_iteration(tp), device


def measure(params_file: Path, overrides: list[str], presets: list[str], warmup: int,
            steps: int, prepared: Path | None = None) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        trainers, batches, it, device = _setup(params_file, overrides, presets, warmup + steps,
                                               prepared, tmp)
        times: dict[str, list[float]] = {k: [] for k in presets}
        its = step_iterations(next(iter(trainers.values())).params.train, it, len(batches))
        for i, batch in enumerate(batches):
            for preset, trainer in trainers.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.step(batch, its[i])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[preset].append(time.perf_counter() - t0)
        flops = {preset: step_flops(trainer, batches[-1], it)
                 for preset, trainer in trainers.items()}
    return {k: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v), "min_s": min(v),
                "steps": len(v), "flops": flops[k]} for k, v in times.items()}


def count_flops(params_file: Path, overrides: list[str], presets: list[str],
                prepared: Path | None = None) -> dict[str, int]:
    """Each preset's floating-point operations in one all-terms-on step (no timing: for
    configurations too slow to time here, such as the VOC recipe on a CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers, batches, it, _ = _setup(params_file, overrides, presets, 1, prepared, tmp)
        return {k: step_flops(t, batches[0], it) for k, t in trainers.items()}


def step_flops(trainer: Trainer, batch: dict[str, torch.Tensor], it: int) -> int:
    """Floating-point operations of one training step (forward, backward, no-grad passes):
    the mean over ``train.cam_select_every`` consecutive steps from ``it``, so a statistic
    computed every few steps counts at its average (one step when it is 1)."""
    tp = trainer.params.train
    its = step_iterations(tp, it, tp.cam_select_every)
    if len(its) > 1:  # one step first, uncounted: the heads then know whether tiles are needed
        trainer.step(batch, it)
    counter = FlopCounterMode(display=False)
    with counter:
        for i in its:
            trainer.step(batch, i)
    return round(counter.get_total_flops() / len(its))


# Tensor methods through which Python reads a tensor's value on the host: on a GPU each one
# waits until every kernel queued before it has run (the CPU stops queueing ahead).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def host_reads(trainer: Trainer, batch: dict[str, torch.Tensor], it: int,
               ) -> dict[str, Any]:
    """One training step's launch and wait counts, a proxy of how it runs on a GPU measured on
    any device: top-level ATen ops (each a kernel launch or more on a GPU; ``torch.profiler``),
    ``nonzero`` calls (boolean indexing included; each waits for the device), and reads of
    tensor values from the package's own code (:data:`READS`, by call site ``file:line``).
    Reads inside ``torch.optim`` are left out: the optimiser's step counters are CPU tensors
    on every device, so reading them waits for nothing (the trainer's read of the loader's
    labels, host memory on every device too, goes through numpy and is not counted either).
    The step runs the select forms of :mod:`seco_cli.waits`, which a GPU runs, whatever the
    device."""
    from torch.profiler import ProfilerActivity, profile

    sites: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            if not any("torch/optim/" in f.filename for f in stack):
                own = [f for f in stack if f"{PACKAGE}/" in f.filename]
                if own:
                    sites[f"{own[-1].filename.split(PACKAGE + '/')[1]}:{own[-1].lineno}"] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        with select_everywhere(), profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.step(batch, it)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"aten_ops": len(top), "nonzero": sum(e.name == "aten::nonzero" for e in events),
            "reads": sum(sites.values()), "read_sites": dict(sites.most_common())}


def count_host_reads(params_file: Path, overrides: list[str], presets: list[str], warmup: int,
                     prepared: Path | None = None) -> dict[str, dict[str, Any]]:
    """:func:`host_reads` of each preset's step after ``warmup`` steps (the reservoir and
    the optimiser state exist then), on the same batch."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers, batches, it, _ = _setup(params_file, overrides, presets, warmup + 1, prepared,
                                          tmp)
        out = {}
        for name, trainer in trainers.items():
            for batch in batches[:-1]:
                trainer.step(batch, it)
            out[name] = host_reads(trainer, batches[-1], it)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--presets", default="baseline,seco",
                    help="comma-separated presets, each optionally preset@key=value@...")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--prepared", type=Path, help="a prepared dataset (default: prepare one)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--host-reads", action="store_true",
                    help="count one step's ATen ops, nonzero calls and host reads instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host_reads:
        got = count_host_reads(args.params, args.overrides, args.presets.split(","),
                               args.warmup, args.prepared)
        for name, r in got.items():
            print(f"{name}: {r['aten_ops']} ATen ops, {r['nonzero']} nonzero, "
                  f"{r['reads']} host reads: {r['read_sites']}")
        if args.json:
            args.json.write_text(json.dumps(got, indent=2) + "\n")
        return
    presets = args.presets.split(",")
    res = measure(args.params, args.overrides, presets, args.warmup, args.steps, args.prepared)
    ref, ref_mean = res[presets[0]]["median_s"], res[presets[0]]["mean_s"]
    ref_flops = res[presets[0]]["flops"]
    width = max(18, *(len(p) + 2 for p in presets))
    print(f"{'preset':<{width}}{'s/step (median)':>16}{'÷ ' + presets[0]:>14}"
          f"{'s/step (mean)':>14}{'÷ ' + presets[0]:>14}{'GFLOP/step':>12}{'÷ ' + presets[0]:>14}")
    for name, r in res.items():
        print(f"{name:<{width}}{r['median_s']:>16.4f}{r['median_s'] / ref:>14.2f}"
              f"{r['mean_s']:>14.4f}{r['mean_s'] / ref_mean:>14.2f}"
              f"{r['flops'] / 1e9:>12.2f}{r['flops'] / ref_flops:>14.2f}")
    if args.json:  # with the command, date, revision and machine that made it
        benchlib.write_json(args.json, {**benchlib.run_header(), "result": res})


if __name__ == "__main__":
    main()
