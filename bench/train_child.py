"""Training steps in a process of their own, for ``bench/speed.py``: seconds per step with
every term of the objective on, peak RSS and peak GPU memory, isolated from the parent; or
(``"flops"`` in the spec) each preset's floating-point operations per step, or
(``"host_reads"``) its ATen ops and host reads per step, so a large configuration's memory is
returned to the system when the count is done.

    python bench/train_child.py '{"params": "params.yaml", "overrides": [], "prepared":
        "artifacts/prepared", "warmup": 1, "steps": 5}'    # prints RESULT {...}
    python bench/train_child.py '{"params": "recipes/voc.yaml", "overrides": [...],
        "prepared": "...", "flops": ["baseline", "seco"]}'
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import train_step  # noqa: E402

from seco_cli.data.prepared import PreparedDataset  # noqa: E402
from seco_cli.params import load_params  # noqa: E402
from seco_cli.provenance import provenance  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In its own process: ``warmup + steps`` training steps with every term on (the real
    loader and trainer); seconds per step after the warm-up, peak RSS, peak GPU memory."""
    from seco_cli.data.loader import TrainSamples, train_loader
    from seco_cli.device import resolve_device
    from seco_cli.trainer import Trainer

    params = load_params(Path(spec["params"]), spec["overrides"])
    data, tp = PreparedDataset(spec["prepared"]), params.train
    device = resolve_device(tp.device, "train.device")
    meta = {"backbone": params.model.backbone, "num_classes": data.num_classes,
            "classes": data.classes, **provenance(params.dump(), tp.seed)}
    trainer = Trainer(params, data, device, meta)
    samples = TrainSamples(data, data.ids(params.data.train_split), tp.batch_size, tp.seed,
                           params.model.crop_size, tp.scale_range, params.data.mean,
                           params.data.std, with_masks=trainer.sched.gt_seg)
    warmup, steps = spec["warmup"], spec["steps"]
    workers = tp.num_workers if device.type == "cuda" else 0
    its, times = train_step.step_iterations(tp, train_step.all_on_iteration(tp),
                                            warmup + steps), []
    start = time.perf_counter()
    for i, batch in enumerate(train_loader(samples, 0, warmup + steps, workers)):
        trainer.step(batch, its[i])
        _sync(device)
        now = time.perf_counter()
        if i >= warmup:
            times.append(now - start)
        start = now
    return {"device": str(device), "steps": len(times), "warmup": warmup,
            "sec_per_iter": sum(times) / len(times), "median_s": sorted(times)[len(times) // 2],
            "peak_rss": peak_rss(),
            "peak_gpu": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                         else None)}


def _status_bytes(pid: int | str, field: str) -> int | None:
    """A memory field of ``/proc/<pid>/status`` (kB there) in bytes; None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set, bytes: ``VmHWM``, the high-water mark of its own
    address space. Not ``ru_maxrss``: Linux carries that over ``exec`` from the forked copy
    of the parent, so a child of a large parent would report the parent's size."""
    hwm = _status_bytes("self", "VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _rss(pid: int) -> int:
    return _status_bytes(pid, "VmRSS") or 0


class MemoryLimit(RuntimeError):
    """The training process passed ``--mem-limit-gb`` and was stopped (a lower bound)."""

    def __init__(self, limit: float):
        super().__init__(f"stopped at the memory limit {limit / 2**30:.1f} GiB (--mem-limit-gb)")
        self.limit = limit


def mem_limit(gb: float) -> float:
    """Bytes a child may use: ``gb``, or (0) 85 % of the memory available now."""
    if gb > 0:
        return gb * 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return 0.85 * int(line.split()[1]) * 1024
    return 16 * 2**30


def run(spec: dict[str, Any], limit_gb: float = 0.0) -> dict[str, Any]:
    """:func:`train_child` in a subprocess, stopped (:class:`MemoryLimit`) when its RSS
    passes ``limit_gb`` (0: 85 % of the memory available at its start)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]
    limit = mem_limit(limit_gb)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            if _rss(proc.pid) > limit:
                proc.kill()
                proc.wait()
                raise MemoryLimit(limit)
            time.sleep(0.2)
        log.seek(0)
        text = log.read()
    result = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not result:
        last = (text.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"training process failed (exit {proc.returncode}): {last}")
    return json.loads(result[-1][len("RESULT "):])


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if "flops" in spec:
        return train_step.count_flops(Path(spec["params"]), spec["overrides"], spec["flops"],
                                      Path(spec["prepared"]))
    if "host_reads" in spec:
        return train_step.count_host_reads(Path(spec["params"]), spec["overrides"],
                                           spec["host_reads"], 2, Path(spec["prepared"]))
    return train_child(spec)


if __name__ == "__main__":
    print("RESULT " + json.dumps(child_main(json.loads(sys.argv[1]))), flush=True)
