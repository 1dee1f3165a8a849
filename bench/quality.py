"""Quality benchmark: the training presets × seeds as DVC experiments, and the paper-shaped
table (mIoU of CAM seeds, pseudo masks and segmentation; precision, recall, FP/TP overall and
per co-occurring pair; weakly ÷ fully supervised) with the goal checks of issue 5.

Each (preset, seed) is one named experiment, ``dvc exp run --temp`` (run in a temporary copy
of the repository: the workspace's params.yaml, dvc.lock and artifacts are not touched, which
is checked around every run). Results are appended to a JSON file keyed by (dataset, profile,
preset, seed, params hash) after each run, so an interrupted bench resumes where it stopped;
an experiment that finished but was not yet recorded is read back from ``dvc exp show``, and
what a killed experiment left behind (its temporary copy, listed as running for good) is
cleared before its name runs again.
The copy holds the workspace as it is (commits and uncommitted changes of tracked files), and
its stage commands import that copy's code (``PYTHONPATH=.``), not whatever ``seco`` is
installed: commit first for a clean provenance, and do not edit the repository meanwhile.

Protocol: every preset and seed uses the same data (``prepare.seed`` fixed) and the same
iterations; the seed sets ``train.seed`` (initial weights, batches, views): the usual
ablation protocol, which measures training noise on one dataset. ``--seed-keys
train.seed,prepare.seed`` also redraws the synthetic data per seed.

    python bench/quality.py                         # 7 presets × seeds 0,1,2, params.yaml as is
    python bench/quality.py --profile bench         # half the schedule: ~2 h on 2 CPU cores
    python bench/quality.py --dataset coco128 --profile bench --seeds 0   # real photos
    python bench/quality.py --presets baseline,seco --seeds 0 --set train.iterations=300
    python bench/quality.py --report-only           # rebuild the tables (same options)
                                                    # (and fill in per-class IoU, see below)
    python bench/quality.py --dry-run               # list the runs still to do

Writes ``bench/results/quality-<dataset>-<profile>.json`` (the runs, each with the params it
ran and each class's IoU from the evaluate stage's report) and ``.md`` (the tables). Runs
stored before the per-class IoU was recorded gain it on the next invocation where the
repository still has their experiment (its commit under ``refs/exps`` and the DVC cache).
A run is reused only under the very same params; when params.yaml or the code's params have
moved on since, ``--report-only`` still renders the latest run of the same command (preset,
seed, overrides) and the header lists, per run, which params differ.
Do not run ``dvc`` commands in the same repository while it runs (DVC's lock).

Runs repeat bit for bit on one kind of machine (CPU model, torch threads, GPU, torch
version), not across kinds, so a table compares presets within one kind. A bench run stops,
before running anything, when its table would mix kinds: stored runs from two kinds, or from
another kind than this one while runs are still to be made here (a complete table from one
other kind is only rendered):
``--rerun-other-machines`` runs those again here (the stored ones are kept under
``runs_elsewhere`` in the JSON), ``--mixed-machines`` reuses them, and the table's header
then says which run came from which machine (``--report-only`` always renders, marked so).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import benchlib  # noqa: E402
import quality_report  # noqa: E402

from seco_cli.params import Params, load_params  # noqa: E402

ROOT = benchlib.ROOT
SHARED_DATA = ROOT.parent / "shared" / "data"
VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
             "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
             "sofa", "train", "tvmonitor"]
# The bench profile runs the schedule of params.yaml at a fraction of its iterations, every
# start (warm-up, prototypes, contrasts, CAM→mask, segmentation, rectification) keeping its
# relative place, so the 7 presets × 3 seeds fit in a working session on 2 CPU cores:
# synthetic: 750 of 1,500 iterations, ~5 min a run (≈ 1.8 h for 21 runs);
# coco128: 300 iterations at crop 160 (SeCo ~4 s/step at 320² is PAR and CNN-bound at 320):
# 7.2-11.8 min a run (1.05 h for the 7 presets of one seed, measured). BENCHMARKS.md has both.
BENCH = {"synthetic": (0.5, []), "coco128": (0.2, ["model.crop_size=160"])}
SCHEDULE_KEYS = ("warmup_iters", "proto_start", "contrast_start", "cam2mask", "seg_start",
                 "rectify_start", "ptc_start", "cam_select_hold_start", "cam_select_start",
                 "ckpt_every")
METRICS = "artifacts/metrics/evaluate.json"
LIVE = "artifacts/train/live/metrics.json"
REPORT = "artifacts/plots/report.json"  # the evaluate stage's full report (per-class rows)
# ``dvc exp show --json``: executor states of an experiment that has not finished, and DVC's
# TaskStatus.SUCCESS in an executor record (``.run`` file; earlier values: pending, preparing,
# running)
UNFINISHED_STATES = ("queued", "running", "failed")
DVC_TASK_SUCCESS = 3


# --------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class RunSpec:
    dataset: str
    profile: str
    preset: str
    seed: int
    overrides: tuple[str, ...]
    params_hash: str

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.profile}/{self.preset}/s{self.seed}/{self.params_hash}"

    @property
    def name(self) -> str:
        """The experiment's name (a valid git ref name)."""
        return f"q-{self.dataset}-{self.profile}-{self.preset}-s{self.seed}-{self.params_hash[:8]}"


# Params added after runs were stored, each with the value at which the code does exactly
# what it did before the param existed: left out of the hash at that value, so the stored
# runs keep their keys (a run with another value hashes it). Add one only with that proof
# (for each of these: a clean-clone `dvc repro` gave every evaluate.json value unchanged).
NEUTRAL_PARAMS = {("train", "cam_select_every"): 1, ("train", "cam_select_tile_power"): 1.0,
                  ("train", "cam_select_fallback_power"): 1.0,
                  ("train", "cam_select_tile_reference"): "sharpened",
                  ("train", "cam_select_hysteresis"): 0.0,
                  ("train", "cam_select_hold_start"): 0, ("train", "cam_select_start"): 0}


def params_hash(params: Params) -> str:
    dumped = params.dump()
    for (section, key), neutral in NEUTRAL_PARAMS.items():
        if dumped.get(section, {}).get(key, neutral) == neutral:
            dumped.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:12]


def scaled_schedule(params: Params, fraction: float) -> list[str]:
    """Overrides running ``train.iterations × fraction`` with every start scaled alike."""
    tp = params.train
    out = [f"train.iterations={max(1, round(tp.iterations * fraction))}"]
    for key in SCHEDULE_KEYS:
        value = getattr(tp, key)
        out.append(f"train.{key}={max(1 if key == 'ckpt_every' else 0, round(value * fraction))}")
    return out


def coco128_overrides(root: Path, weights: Path) -> list[str]:
    """coco128_voc20 (128 COCO photos, 20 VOC classes) through the ``folder`` source, with the
    offline ImageNet EfficientNet-Lite0 (its preprocessing: mean = std = 0.5)."""
    return ["data.source=folder", f"data.root={root}", "data.train_split=train",
            "data.eval_split=val", "prepare.splits=[train, val]", "prepare.val_fraction=0.0",
            "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]",
            "model.backbone=tf_efficientnet_lite0", "model.backbone_kwargs={}",
            f"model.pretrained={weights}", "model.aux_layer=-2", "model.seg_dilations=[1, 2, 4]",
            "model.crop_size=320", "train.patch_size=64", "train.lr=0.0001",
            "evaluate.pairs=[]",  # the most frequent co-occurring pairs of the train split
            # a pretrained backbone: the SPEC's schedule and thresholds, not the ones the
            # default profile tuned for a ViT trained from scratch (README "Deviations"): L_ptc
            # from the start, seeds from the final CAM after half the run (the schedule, not
            # the per-class head selection), background 0.45; the auxiliary CAMs are stored
            # and scored too (`cams_aux`)
            "train.ptc_start=0", "train.cam_select=schedule", "pseudo.bkg=0.45",
            "evaluate.cam_bkg=0.45", "cams.aux=true"]


def coco128_schedule(repo: Path, over: list[str]) -> list[str]:
    """The SPEC's CAM→mask switch at half the run (set before the profile scales it)."""
    iterations = load_params(repo / "params.yaml", over).train.iterations
    return [f"train.cam2mask={iterations // 2}"]


def base_overrides(repo: Path, dataset: str, profile: str, extra: list[str],
                   data_root: Path | None, weights: Path | None) -> list[str]:
    """Dataset overrides, then the profile's, then the user's ``--set`` (last wins)."""
    over = coco128_overrides(data_root, weights) if dataset == "coco128" else []
    if dataset == "coco128":
        over += coco128_schedule(repo, over)
    if profile == "bench":
        fraction, more = BENCH[dataset]
        over += more + scaled_schedule(load_params(repo / "params.yaml", over), fraction)
    return over + list(extra)


def plan(repo: Path, dataset: str, profile: str, presets: list[str], seeds: list[int],
         base: list[str], seed_keys: list[str]) -> list[RunSpec]:
    """Every (preset, seed) run with its overrides and params hash (params validated here)."""
    specs = []
    for seed in seeds:
        for preset in presets:
            over = [*base, f"train.preset={preset}", *(f"{k}={seed}" for k in seed_keys)]
            h = params_hash(load_params(repo / "params.yaml", over))
            specs.append(RunSpec(dataset, profile, preset, seed, tuple(over), h))
    return specs


def remaining(specs: list[RunSpec], results: dict[str, Any]) -> list[RunSpec]:
    """The runs without a stored result."""
    done = results.get("runs", {})
    return [s for s in specs if s.key not in done]


# --------------------------------------------------------------------------- coco128 layout
def coco128_layout(shared: Path, cache: Path) -> Path:
    """A ``folder``-source view of ``coco128_voc20`` (symlinks, class list, labels, a fixed
    train/val split: every 4th id by name → val, 96 / 32 images), made once."""
    src = shared / "coco128_voc20"
    if not (src / "JPEGImages").is_dir():
        raise SystemExit(f"error: {src} not found; --dataset coco128 needs ../shared/data "
                         "(see its README), or point --shared-data at it")
    root = cache / "coco128_voc20"
    root.mkdir(parents=True, exist_ok=True)
    for link, target in (("images", "JPEGImages"), ("masks", "SegmentationClass")):
        if not (root / link).exists():
            (root / link).symlink_to((src / target).resolve(), target_is_directory=True)
    (root / "classes.txt").write_text("\n".join(VOC_NAMES) + "\n")
    (root / "labels.json").write_text((src / "image_labels.json").read_text())
    ids = sorted(p.stem for p in (src / "JPEGImages").glob("*.jpg"))
    (root / "val.txt").write_text("\n".join(ids[::4]) + "\n")
    (root / "train.txt").write_text("\n".join(i for k, i in enumerate(ids) if k % 4) + "\n")
    return root


# --------------------------------------------------------------------------- DVC
def exp_show(repo: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"dvc exp show failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return json.loads(done.stdout or "[]")


def find_experiment(show: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The finished experiment called ``name`` in ``dvc exp show --json`` output: its rev,
    time, evaluate.json and training metrics; None when there is none with metrics.

    An attempt killed mid-run stays listed under the same name, as "running" with no metrics
    (DVC cannot tell that its process is gone, see :func:`clear_stale_attempts`), beside the
    run that later finished: such entries, failed ones and entries without metrics are passed
    over, not taken for the answer."""
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in UNFINISHED_STATES:
                continue
            for rev in exp.get("revs") or []:
                if rev.get("name") != name:
                    continue
                data = rev.get("data") or {}
                metrics = data.get("metrics") or {}
                evaluate = (metrics.get(METRICS) or {}).get("data")
                if rev.get("error") or not evaluate:
                    continue
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
                return {"exp_rev": rev.get("rev"), "exp_time": data.get("timestamp"),
                        "metrics": evaluate, "train": (metrics.get(LIVE) or {}).get("data"),
                        "params_ran": params}
    return None


def processes_in(path: Path) -> list[int] | None:
    """Ids of the live processes whose working directory is ``path`` or below it (a stage
    command of an experiment runs in its temporary copy); None where ``/proc`` cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    path = path.resolve()
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # gone meanwhile, or another user's
            continue
        if cwd == path or path in cwd.parents:
            pids.append(int(entry.name))
    return pids


def clear_stale_attempts(repo: Path, names: set[str]) -> list[str]:
    """Removes what a killed ``dvc exp run --temp`` of one of ``names`` left behind: its
    temporary copy of the workspace under ``.dvc/tmp/exps/standalone`` (the whole workspace,
    artifacts included) and its executor records, which keep it listed by ``dvc exp show``
    as running for good (DVC records no process id for a temporary-copy run, and ``dvc exp
    remove`` does not take it). Only attempts that never finished (status before success)
    and whose copy no live process works in; nothing where ``/proc`` is missing. Returns
    the names cleared (an attempt can be cleared only when DVC's records are in the layout
    of DVC 3: otherwise nothing is touched and :func:`find_experiment` still passes it by)."""
    standalone = repo / ".dvc" / "tmp" / "exps" / "standalone"
    cleared = []
    for info in sorted(standalone.glob("run/*/*.run")):
        try:
            rec = json.loads(info.read_text())
            status, name, root = int(rec["status"]), rec["name"], Path(rec["root_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if name not in names or status >= DVC_TASK_SUCCESS or root.parent != standalone:
            continue
        busy = processes_in(root) if root.exists() else []
        if busy is None:
            continue
        if busy:
            print(f"note: an earlier attempt of {name} still has processes working in {root} "
                  f"(pid {', '.join(map(str, busy))}); stop them and run the bench again to "
                  "clear it", flush=True)
            continue
        stash_rev = info.parent.name
        for path in (root, info.parent, repo / ".dvc" / "tmp" / "exps" / "run" / stash_rev):
            shutil.rmtree(path, ignore_errors=True)
        cleared.append(name)
    return cleared


def exp_classes(repo: Path, exp_rev: str | None) -> dict[str, dict[str, float | None]] | None:
    """Per source (``cams``, ``pseudo``, ``segment_raw``, ``segment_ms_crf``), each class's IoU
    in the experiment's evaluate report (``dvc.api`` reads it from the experiment's commit and
    the DVC cache): what ``evaluate.json`` leaves out to stay a short metrics file. None when
    this repository no longer has the commit or the cached report."""
    if not exp_rev or subprocess.run(["git", "cat-file", "-e", f"{exp_rev}^{{commit}}"],
                                     cwd=repo, capture_output=True).returncode:
        return None
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        report = json.loads(dvc.api.read(REPORT, repo=str(repo), rev=exp_rev))
        return {name: {row["class"]: row["iou"] for row in src["classes"]}
                for name, src in report["sources"].items()}
    except (DvcException, OSError, ValueError, KeyError, TypeError):
        return None


def fill_classes(repo: Path, results: dict[str, Any]) -> int:
    """Adds :func:`exp_classes` to stored runs recorded without it (before it was recorded, or
    while the report was unreadable) where the repository still has their experiment; returns
    how many runs gained it."""
    filled = 0
    for run in (results.get("runs") or {}).values():
        if run.get("classes") is None:
            run["classes"] = exp_classes(repo, run.get("exp_rev"))
            filled += run["classes"] is not None
    return filled


def check_params(found: dict[str, Any], spec: RunSpec) -> None:
    """The experiment's params.yaml (as DVC wrote it from the ``-S`` overrides) must be the
    params the spec was hashed from; otherwise its result would be stored under a wrong key.
    The validated params are kept with the run (``params``), so a later report can say what
    changed when params.yaml or the code moves on."""
    ran = found.pop("params_ran", None)
    params = Params.model_validate(ran) if ran is not None else None
    got = params_hash(params) if params is not None else None
    if got != spec.params_hash:
        raise RuntimeError(f"experiment {spec.name} ran with other params than planned (hash "
                           f"{got} ≠ {spec.params_hash}); not recorded")
    found["params"] = params.dump()


def fingerprint(repo: Path) -> dict[str, Any]:
    """What an experiment must leave alone: HEAD, params.yaml, dvc.yaml, dvc.lock and the
    artifacts (names and modification times two levels deep)."""
    def digest(p: Path) -> str | None:
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    art = repo / "artifacts"
    entries = sorted((str(p.relative_to(art)), p.lstat().st_mtime_ns)
                     for p in [*art.glob("*"), *art.glob("*/*")]) if art.is_dir() else []
    return {"head": head.stdout.strip(), "artifacts": entries,
            **{f: digest(repo / f) for f in ("params.yaml", "dvc.yaml", "dvc.lock")}}


def dvc_set_args(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """``-S`` arguments for ``dvc exp run`` meaning what ``seco --set`` means. DVC applies
    ``-S key={...}`` as Hydra does, *merging* a mapping into the existing one (``{}`` would
    change nothing), while ``--set`` replaces it: a mapping value is therefore sent as a
    deletion and an addition (``~key``, ``+key=value``)."""
    args: list[str] = []
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            is_map = isinstance(yaml.safe_load(value), dict)
        except yaml.YAMLError:
            is_map = False
        args += ["-S", f"~{key}", "-S", f"+{item}"] if is_map else ["-S", item]
    return args


def stages_of_log(text: str) -> dict[str, list[str]]:
    """Stages DVC ran and stages it restored from its run cache (same params and deps:
    identical outputs, no run time), from the ``dvc exp run`` output."""
    ran, cached = [], []
    for line in text.splitlines():
        if line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
        elif line.startswith("Stage '") and "is cached" in line:
            cached.append(line.split("'")[1])
    return {"stages_run": ran, "stages_cached": cached}


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stops the process group that ``proc`` leads: SIGTERM, then SIGKILL after ``grace``
    seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_experiment(repo: Path, spec: RunSpec, log: Path) -> float:
    """``dvc exp run --temp`` of one spec (stage commands import this repository's code:
    PYTHONPATH=. in the temporary copy); seconds taken. Raises when it fails or when the
    workspace changed."""
    cmd = ["dvc", "exp", "run", "--temp", "-n", spec.name, *dvc_set_args(spec.overrides)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        ["."] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    before = fingerprint(repo)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        out.write(shlex.join(cmd) + "\n")
        out.flush()
        # its own process group, stopped with the bench: a bench stopped by a signal leaves
        # no experiment running on behind it (DVC and its stage commands)
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait()
        except BaseException:
            stop_group(proc)
            raise
    seconds = time.perf_counter() - start
    if fingerprint(repo) != before:
        raise SystemExit(f"error: the workspace of {repo} changed during experiment {spec.name} "
                         "(params.yaml, dvc.lock, dvc.yaml, HEAD or artifacts/); stopping. Was "
                         "another dvc command running in it?")
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)} (log: {log}; an "
                           f"experiment of this name may need `dvc exp remove {spec.name}`)")
    return seconds


# --------------------------------------------------------------------------- results
def log_path(results_path: Path, spec: RunSpec) -> Path:
    return results_path.parent / "logs" / f"{spec.name}.log"


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"version": 1, "runs": {}}


def record(results: dict[str, Any], spec: RunSpec, found: dict[str, Any], seconds: float | None,
           repo: Path) -> None:
    results.setdefault("runs", {})[spec.key] = {
        "dataset": spec.dataset, "profile": spec.profile, "preset": spec.preset,
        "seed": spec.seed, "params_hash": spec.params_hash, "exp_name": spec.name,
        "overrides": list(spec.overrides), "wall_s": seconds,
        "git_revision": benchlib.git_revision(repo),
        "recorded": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(benchlib.machine()),
        "classes": exp_classes(repo, found.get("exp_rev")), **found}


def machine_line(m: dict[str, Any]) -> str:
    """The machine a run trained on, in one line (stored with the run)."""
    return (f"{m['cpu']}, {m['usable_cores']} usable of {m['cores']} cores, torch threads "
            f"{m['torch_threads']}, {m['memory_gib']} GiB, GPU {m['gpu'] or 'none'}, "
            f"torch {m['torch']}")


MACHINE_LINE = re.compile(r"^(?P<cpu>.+?), \d+ usable of \d+ cores, torch threads "
                          r"(?P<threads>\S+), .*, GPU (?P<gpu>.+), torch (?P<torch>\S+)$")


def machine_kind(line: str | None) -> str | None:
    """Of a stored :func:`machine_line`, what decides whether two runs of the same params
    repeat bit for bit: the CPU model, torch's thread count, the GPU and the torch version
    (not the memory or the cores the host has). Runs repeat per kind of machine, not across
    kinds (BENCHMARKS: the same code and params gave seg mIoU 84.3 on one CPU and 81.5 on
    another), so a table comparing presets is read within one kind. None: not recorded or
    not readable."""
    m = MACHINE_LINE.match(line or "")
    return (f"{m['cpu']} · torch threads {m['threads']} · GPU {m['gpu']} · torch {m['torch']}"
            if m else None)


def other_machine_runs(specs: list[RunSpec], results: dict[str, Any], here: str | None
                       ) -> list[tuple[RunSpec, str | None]]:
    """The planned runs stored from another kind of machine than ``here`` (or from an
    unknown one), with that kind."""
    stored = results.get("runs", {})
    kinds = [(s, machine_kind(stored[s.key].get("machine"))) for s in specs if s.key in stored]
    return [(s, kind) for s, kind in kinds if kind is None or kind != here]


def mixes_machines(specs: list[RunSpec], results: dict[str, Any], here: str | None,
                   to_run: bool) -> bool:
    """Whether the table of ``specs`` would hold runs of more than one kind of machine: its
    stored runs come from two kinds (an unknown machine counting as one), or from another
    kind than ``here`` while runs are still ``to_run`` here."""
    stored = results.get("runs", {})
    kinds = {machine_kind(stored[s.key].get("machine")) for s in specs if s.key in stored}
    return len(kinds | ({here} if to_run else set())) > 1


def set_aside(results: dict[str, Any], specs: list[RunSpec]) -> None:
    """Moves the stored runs of ``specs`` to ``runs_elsewhere`` (kept, keyed by run and
    machine kind), so that the bench runs them again on this machine."""
    aside = results.setdefault("runs_elsewhere", {})
    for s in specs:
        run = results["runs"].pop(s.key)
        aside[f"{s.key}@{machine_kind(run.get('machine')) or 'unknown machine'}"] = run


def rename_set_aside_experiments(repo: Path, results: dict[str, Any], specs: list[RunSpec]
                                 ) -> list[str]:
    """Before :func:`set_aside`'s runs are made again here: an experiment of the same name on
    this commit (``dvc exp run -n`` would refuse the name) is renamed ``<name>-elsewhere-<n>``
    (kept, with its commit and cached outputs), and its stored run gets the new name. Returns
    the new names."""
    done = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"dvc exp list failed: {(done.stderr or done.stdout).strip()[-400:]}")
    names = set(done.stdout.split())
    renamed = []
    for s in specs:
        if s.name not in names:
            continue
        n = 1
        while f"{s.name}-elsewhere-{n}" in names:
            n += 1
        new = f"{s.name}-elsewhere-{n}"
        done = subprocess.run(["dvc", "exp", "rename", s.name, new], cwd=repo,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"dvc exp rename {s.name} failed: "
                               f"{(done.stderr or done.stdout).strip()[-400:]}")
        names.add(new)
        for run in results.get("runs_elsewhere", {}).values():
            if run.get("exp_name") == s.name:
                run["exp_name"] = new
        renamed.append(new)
    return renamed


def mixed_machine_line(chosen: dict[RunSpec, dict[str, Any] | None]) -> str:
    """A header line when a table's runs come from more than one kind of machine: which run
    came from which (empty when they come from one)."""
    by_kind: dict[str, list[str]] = {}
    for s, run in chosen.items():
        if run:
            kind = machine_kind(run.get("machine")) or "machine not recorded"
            by_kind.setdefault(kind, []).append(f"{s.preset} s{s.seed}")
    if len(by_kind) < 2:
        return ""
    return (f"- **mixed machines**: the runs come from {len(by_kind)} kinds of machine, and runs "
            "repeat bit for bit within a kind only, so a difference between runs of two kinds "
            "mixes the method with the machine: "
            + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in by_kind.items()) + "\n")


def run_command(argv: list[str]) -> str:
    """The command that makes the runs: this one without ``--report-only``/``--dry-run``."""
    return shlex.join([Path(sys.executable).name,
                       *(a for a in argv if a not in ("--report-only", "--dry-run"))])


# --------------------------------------------------------------------------- params drift
def command_overrides(overrides: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A run's overrides without those the bench profile derives from params.yaml (its
    scaled schedule: ``train.iterations`` and each start): what the command itself fixed.
    Those derived values move whenever params.yaml's schedule moves, or a start joins the
    scaled keys, and the command stays the same."""
    derived = {"train.iterations", *(f"train.{k}" for k in SCHEDULE_KEYS)}
    return tuple(o for o in overrides if o.partition("=")[0] not in derived)


def stand_in(results: dict[str, Any], spec: RunSpec) -> dict[str, Any] | None:
    """The latest stored run of the same command — dataset, profile, preset, seed and the
    same overrides, the bench schedule's derived ones aside (:func:`command_overrides`) —
    made under other params than ``spec`` resolves to now (params.yaml or the params model
    changed since). ``--report-only`` renders it, flagged, with the params that differ; a
    bench run re-runs it."""
    want = (spec.dataset, spec.profile, spec.preset, spec.seed,
            command_overrides(spec.overrides))
    same = [r for r in results.get("runs", {}).values()
            if (r.get("dataset"), r.get("profile"), r.get("preset"), r.get("seed"),
                command_overrides(r.get("overrides") or ())) == want]
    return max(same, key=lambda r: r.get("recorded") or "", default=None)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def params_diff(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...] = ()) -> \
        list[str]:
    """``key: old → new`` for every leaf that differs (``absent`` where one side lacks it),
    sorted; keys under a ``skip`` prefix (what both sides set alike) are left out."""
    a, b = flatten(old), flatten(new)

    def show(side: dict[str, Any], key: str) -> str:
        return json.dumps(side[key]) if key in side else "absent"

    return [f"{key}: {show(a, key)} → {show(b, key)}" for key in sorted(set(a) | set(b))
            if a.get(key, ...) != b.get(key, ...)
            and not any(key == s or key.startswith(s + ".") for s in skip)]


def yaml_at(repo: Path, revision: str) -> dict[str, Any] | None:
    """params.yaml as committed at ``revision`` (``-dirty`` stripped), or None."""
    rev = revision.removesuffix("-dirty")
    try:
        done = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=repo,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return yaml.safe_load(done.stdout) if done.returncode == 0 else None


def drift(run: dict[str, Any], spec: RunSpec, repo: Path) -> str:
    """What differs between the params ``run`` was made with and those ``spec`` resolves to
    now: from the params stored with the run; for runs recorded before they were stored, from
    params.yaml at the run's revision against params.yaml now (the overridden keys left out;
    defaults the code added since cannot be seen that way)."""
    if run.get("params") is not None:
        now = load_params(repo / "params.yaml", list(spec.overrides)).dump()
        rows, source = params_diff(run["params"], now), "stored params"
    else:
        then = yaml_at(repo, run.get("git_revision") or "")
        if then is None:
            return "params not stored with the run, and its revision's params.yaml is not here"
        now = yaml.safe_load((repo / "params.yaml").read_text())
        skip = tuple(o.split("=", 1)[0] for o in spec.overrides)
        rows = params_diff(then, now, skip)
        source = (f"params.yaml at `{run['git_revision'].removesuffix('-dirty')[:7]}` "
                  f"→ now (params not stored with the run; defaults added in code not seen)")
    shown = rows[:12] + ([f"… {len(rows) - 12} more"] if len(rows) > 12 else [])
    return f"{source}: " + ("; ".join(f"`{r}`" for r in shown) if rows else "no key differs")


def drift_lines(stand_ins: list[tuple[RunSpec, dict[str, Any]]], specs: list[RunSpec],
                repo: Path) -> str:
    """The header's params-drift line(s): one per distinct difference, naming its runs."""
    if not stand_ins:
        return "- params drift: none (every run has the params this command resolves to now)\n"
    groups: dict[str, list[str]] = {}
    for spec, run in stand_ins:
        groups.setdefault(drift(run, spec, repo), []).append(f"{spec.preset} s{spec.seed}")
    text = (f"- params drift: {len(stand_ins)} of {len(specs)} runs were made with other params "
            f"than this command resolves to now; `--report-only` shows them (the bench itself "
            f"would re-run them):\n")
    return text + "".join(f"  - {', '.join(names)}: {diff}\n" for diff, names in groups.items())


def report(results: dict[str, Any], specs: list[RunSpec], args: argparse.Namespace,
           base: list[str], out: Path) -> str:
    # the stored run of each planned spec (the table shows exactly the requested runs); with
    # --report-only, else the latest run of the same command under older params, flagged
    stored = results.get("runs", {})
    chosen = {s: stored.get(s.key) or (stand_in(results, s) if args.report_only else None)
              for s in specs}
    stand_ins = [(s, r) for s, r in chosen.items() if s.key not in stored and r]
    runs = [r for r in chosen.values() if r]
    times = [r["wall_s"] for r in runs if r.get("wall_s") and "train" in r.get("stages_run", [])]
    revs = sorted({r.get("git_revision", "?") for r in runs})
    dates = sorted(r["recorded"] for r in runs if r.get("recorded"))
    machines = sorted({r.get("machine") or "not recorded (runs before it was stored)"
                       for r in runs})
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    head = (f"# Quality benchmark: {args.dataset}, profile {args.profile}\n\n"
            f"- command: `{run_command(sys.argv)}`\n"
            f"- runs: {len(runs)} of {len(specs)} planned (presets {args.presets}; seeds "
            f"{args.seeds}, setting {', '.join(args.seed_keys)}; same data and iterations)\n"
            f"- overrides of params.yaml: `{' '.join(base) or '(none)'}`\n"
            f"- run time per experiment (runs that trained, not restored from DVC's run "
            f"cache): " + (f"mean {sum(times) / len(times) / 60:.1f} min over {len(times)}, "
                           f"total {sum(times) / 3600:.2f} h" if times else "—") + "\n"
            f"- git revision(s) of the runs: {', '.join(f'`{r}`' for r in revs) or '—'}\n"
            f"- dates of the runs: {dates[0] + ' to ' + dates[-1] if dates else '—'}\n"
            f"- machine(s) of the runs: {'; '.join(machines) if runs else '—'}\n"
            + mixed_machine_line(chosen) + drift_lines(stand_ins, specs, args.repo.resolve()) +
            f"- tables rendered: {now} by the report code at `{benchlib.git_revision()}`"
            + (" (`--report-only`)" if args.report_only else "") + "\n")
    text = quality_report.render(runs, head)
    benchlib.write_text(out, text)
    return text


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["synthetic", "coco128"], default="synthetic")
    ap.add_argument("--profile", choices=["default", "bench"], default="default")
    ap.add_argument("--presets", default=",".join(quality_report.PRESETS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seed-keys", default="train.seed",
                    help="params the seed sets (comma-separated)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="params override for every run (repeatable; part of the params hash)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the DVC repository to run in")
    ap.add_argument("--results", type=Path, help="results JSON (default bench/results/"
                    "quality-<dataset>-<profile>.json in --repo)")
    ap.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    ap.add_argument("--data-cache", type=Path, default=Path.home() / ".cache" / "seco-bench",
                    help="where the coco128 folder layout (symlinks) is made")
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables only")
    ap.add_argument("--dry-run", action="store_true", help="list the runs still to do")
    mixed = ap.add_mutually_exclusive_group()
    mixed.add_argument("--mixed-machines", action="store_true",
                       help="reuse stored runs made on another kind of machine (the table "
                            "says which runs came from which)")
    mixed.add_argument("--rerun-other-machines", action="store_true",
                       help="run the stored runs made on another kind of machine again here "
                            "(the stored ones are kept under runs_elsewhere)")
    args = ap.parse_args(argv)
    args.presets_list = [p for p in args.presets.split(",") if p]
    args.seeds_list = [int(s) for s in args.seeds.split(",") if s]
    args.seed_keys = [k for k in args.seed_keys.split(",") if k]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = args.repo.resolve()
    stem = f"quality-{args.dataset}-{args.profile}"
    results_path = args.results or repo / "bench" / "results" / f"{stem}.json"
    out_md = results_path.with_suffix(".md")
    data_root = weights = None
    if args.dataset == "coco128":
        data_root = coco128_layout(args.shared_data, args.data_cache)
        weights = (args.shared_data / "weights" / "tf_efficientnet_lite0_timm.pth").resolve()
    base = base_overrides(repo, args.dataset, args.profile, args.overrides, data_root, weights)
    specs = plan(repo, args.dataset, args.profile, args.presets_list, args.seeds_list, base,
                 args.seed_keys)
    results = load_results(results_path)
    here = machine_kind(machine_line(benchlib.machine()))
    elsewhere = other_machine_runs(specs, results, here)
    if elsewhere and args.rerun_other_machines and not (args.report_only or args.dry_run):
        set_aside(results, [s for s, _ in elsewhere])
        renamed = rename_set_aside_experiments(repo, results, [s for s, _ in elsewhere])
        benchlib.write_json(results_path, results)
        print(f"set aside {len(elsewhere)} run(s) made on another kind of machine, to run "
              f"here: {', '.join(s.name for s, _ in elsewhere)}"
              + (f" (their experiments here renamed {', '.join(renamed)})" if renamed else ""))
    todo = remaining(specs, results)
    # a complete table from one other kind is consistent: a bench run only renders it (and
    # after a set-aside every stored run is from here: nothing mixes)
    if not mixes_machines(specs, results, here, bool(todo)):
        elsewhere = []
    if not args.dry_run and fill_classes(repo, results):
        benchlib.write_json(results_path, results)
    if args.report_only or args.dry_run:
        for s in todo if args.dry_run else []:
            print(f"to run: {s.name}  ({' '.join(s.overrides)})")
        print(report(results, specs, args, base, out_md) if args.report_only else
              f"{len(specs) - len(todo)} of {len(specs)} runs stored; {len(todo)} to run")
        if args.dry_run and elsewhere and not args.mixed_machines:
            print(f"{len(elsewhere)} stored run(s) were made on another kind of machine than "
                  f"this one ({here}); a bench run stops on them: pass --mixed-machines or "
                  "--rerun-other-machines")
        return 0
    if elsewhere and not args.mixed_machines:
        names = ", ".join(f"{s.name} ({kind or 'machine not recorded'})" for s, kind in elsewhere)
        print(f"error: {results_path}: {len(elsewhere)} stored run(s) of this table were made on "
              f"another kind of machine than this one ({here}), and runs repeat bit for bit "
              f"per kind only: {names}. Pass --rerun-other-machines to run them here (the "
              "stored ones are kept), or --mixed-machines to reuse them in a table marked "
              "mixed.", file=sys.stderr)
        return 2
    if todo:  # a killed run leaves its temporary copy and a "running" entry behind
        for name in clear_stale_attempts(repo, {s.name for s in todo}):
            print(f"cleared what a killed attempt of {name} left behind (its temporary copy "
                  "of the workspace and DVC's record of it running)")
    if todo:  # finished earlier but not recorded (interrupted between run and record)
        show = exp_show(repo)
        for s in list(todo):
            found = find_experiment(show, s.name)
            if not found:
                continue
            try:
                check_params(found, s)
            except RuntimeError as exc:
                print(f"not recovered: {exc}")
                continue
            record(results, s, found, None, repo)
            todo.remove(s)
            print(f"recovered {s.name} from dvc exp show")
        benchlib.write_json(results_path, results)
    print(f"{len(specs) - len(todo)} of {len(specs)} runs stored; {len(todo)} to run")
    failed = []
    for i, s in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] dvc exp run --temp -n {s.name}", flush=True)
        try:
            seconds = run_experiment(repo, s, log_path(results_path, s))
            found = find_experiment(exp_show(repo), s.name)
            if not found:
                raise RuntimeError("finished, but dvc exp show has no metrics for it")
            check_params(found, s)
            found.update(stages_of_log(log_path(results_path, s).read_text()))
        except RuntimeError as exc:
            print(f"    failed: {exc}", flush=True)
            failed.append(s.name)
            continue
        record(results, s, found, seconds, repo)
        benchlib.write_json(results_path, results)
        report(results, specs, args, base, out_md)
        print(f"    done in {seconds / 60:.1f} min", flush=True)
    print(report(results, specs, args, base, out_md))
    print(f"wrote {results_path} and {out_md}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; run again to retry them")
    return 1 if failed else 0


if __name__ == "__main__":
    # `kill` stops the bench as Ctrl-C does: with the experiment it runs (run_experiment)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the runs recorded so far are kept; the same command resumes",
              file=sys.stderr)
        sys.exit(130)
