"""What the benchmark reports share: the machine and revision they ran on, markdown tables,
goal checks, and result files written atomically."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seco_cli.provenance import NOT_CODE, revision

ROOT = Path(__file__).resolve().parents[1]

# goal operators: measured value vs the goal's bound
OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
       "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def goal_status(value: float | None, op: str, bound: float | None) -> str:
    """``met`` / ``not met`` for ``value op bound``; ``not measured`` when either is missing
    or not finite."""
    if value is None or bound is None or not (math.isfinite(value) and math.isfinite(bound)):
        return "not measured"
    return "met" if OPS[op](value, bound) else "not met"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; ``None`` cells print as an em dash, ``|`` is escaped."""
    def cell(v: Any) -> str:
        return "—" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, headers)) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def git_revision(repo: Path = ROOT) -> str:
    """HEAD of ``repo`` with ``-dirty`` when tracked files differ, or ``unknown``. The
    benchmarks' own result files (``bench/results``, which every bench run rewrites) and
    dvc.lock (which DVC rewrites) do not count: ``-dirty`` means the code or params that made a
    number were not committed."""
    return revision(repo, exclude=(*NOT_CODE, "bench/results"))


def _cpu_model(cpuinfo: str | None = None, capability: str | None = None) -> str:
    """The CPU's name, and what tells two CPUs of one name apart: its family, model and
    stepping, and the vector instructions torch's kernels use (``AVX512``, ``AVX2``, ...).
    A virtual machine may report only ``AMD EPYC``: two of those (2026-12-02) trained the same
    code and params to different weights, so a name alone does not identify a kind."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    ident = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    if capability is None:
        try:
            import torch

            capability = torch.backends.cpu.get_cpu_capability()
        except (ImportError, AttributeError):
            capability = None
    ident += [capability] if capability else []
    return f"{name} [{'; '.join(ident)}]" if ident else name


def machine() -> dict[str, Any]:
    """CPU model and cores, memory, GPU (via torch.cuda) and library versions."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = None
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{torch.cuda.device_count()} × {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "memory_gib": round(mem, 1) if mem else None, "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def run_header(repo: Path = ROOT) -> dict[str, Any]:
    """Command, date, git revision and machine of this run."""
    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_revision": git_revision(repo), "machine": machine()}


def header_markdown(head: dict[str, Any]) -> str:
    m = head["machine"]
    lines = [f"- command: `{head['command']}`", f"- date: {head['date']}",
             f"- git revision: `{head['git_revision']}`",
             f"- CPU: {m['cpu']}, {m['usable_cores']} usable of {m['cores']} cores, "
             f"torch threads {m['torch_threads']} (OMP_NUM_THREADS={m['omp_num_threads']}), "
             f"memory {m['memory_gib']} GiB",
             f"- GPU: {m['gpu'] or 'none'}",
             f"- python {m['python']}, torch {m['torch']}, {m['platform']}"]
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
