"""Speed, storage and memory of the pipeline against the goals of issue 5, in one run.

Every part is its own function returning table rows (measured, reference, ratio, goal,
met / not met); a part that fails reports its error in its row and the others still run:

- ``train_step``: train step time, SeCo ÷ baseline, same backbone, batch and data
  (``bench/train_step.measure``) — goal ≤ 1.5; SeCo under the profile's ``train.cam_select``
  rule ÷ under the SPEC's schedule, timed in the same alternation; the FLOPs of both steps, and their ATen ops
  and host waits (``bench/train_step.host_reads``: what a GPU step pays in launches and
  stalls) at the default profile and at the VOC recipe's shape;
- ``inference``: cams and segment stage throughput ÷ bare forward throughput at the same
  scales and flips (``bench/inference_speed``), on 320 px synthetic images with the profile's
  network at crop 320, untrained (speed does not depend on the weights) — goal ≥ 0.8;
- ``crf``: the pseudo stage (dense CRF) with 2 worker processes ÷ 1 — goal ≥ 1.7;
- ``crf_voc``: the segment stage's dense CRF alone at the VOC recipe's shape (448 px), one
  process: seconds per image over 21 labels and over 3 (``segment.crf_labels: present`` on an
  image with two classes), and the stage's ceiling on this machine's cores;
- ``cam_bytes``: CAM bytes per image as stored ÷ float32 full-resolution maps of every
  class, for the 6 embedded classes and for 20 VOC-like classes (a synthetic dataset with the
  VOC class names) — goal ≤ 1/50;
- ``dvc``: ``dvc status`` and ``dvc repro`` in this repository when nothing changed — goal
  ≤ 2 s (not measured when the pipeline is not up to date: nothing is rebuilt here); and
  ``dvc status`` on two copies of the workspace, its stores in bundles ÷ the same arrays in a
  folder per image (``bench/store_layout``);
- ``memory``: peak memory (RSS; GPU max allocated under CUDA) of training steps with every
  term on, at the default profile and at the VOC recipe (ViT-B/16, 448, batch 4, random init,
  synthetic 448 px data), each in its own process;
- ``gpu`` (CUDA only): VOC recipe seconds per iteration over 50 iterations and peak GPU memory
  — goal ≤ 0.5 s/it on an H100-class GPU — and its train step time SeCo ÷ baseline (goal
  ≤ 1.5);
- ``gpu_inference`` (CUDA only): cams and segment stage throughput ÷ bare forward with the VOC
  recipe's network on 256 (cams) and 64 (segment) synthetic 448 px images — goal ≥ 0.8.

    python bench/speed.py               # the real measurement (≲ 20 min on 2 CPU cores)
    python bench/speed.py --quick       # every part shrunk: a ~2 min smoke run
    python bench/speed.py --parts dvc,memory --out /tmp/speed

Writes ``<out>.md`` and ``<out>.json`` (default ``bench/results/speed``, with ``--quick``
``bench/results/speed-quick``) with the command, machine, date and git revision.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

import benchlib  # noqa: E402

# The stages' CRF pools start workers with ``spawn``, and a spawned worker re-runs this
# script's top-level imports (as ``__mp_main__``). torch and the measuring code load
# everywhere but there — when this file runs as the program or is imported — so the pool
# start-up measured here is the stages' own (their workers are torch-free), not this
# script's, and other scripts can import the helpers below.
if __name__ != "__mp_main__":
    import inference_speed as inf  # noqa: E402
    import store_layout  # noqa: E402
    import torch  # noqa: E402
    import train_child  # noqa: E402
    import train_step  # noqa: E402

    from seco_cli.checkpoint import save_atomic  # noqa: E402
    from seco_cli.data.prepared import PreparedDataset  # noqa: E402
    from seco_cli.params import Params, load_params  # noqa: E402
    from seco_cli.pool import resolve_workers  # noqa: E402
    from seco_cli.provenance import provenance  # noqa: E402
    from seco_cli.shards import Shard  # noqa: E402

ROOT = benchlib.ROOT
VOC_RECIPE = ROOT / "recipes" / "voc.yaml"
VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
             "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
             "sofa", "train", "tvmonitor"]
REALISTIC = 320  # image side of the inference measurement (≥ 320 px, VOC-like)


@dataclass
class Row:
    part: str
    what: str
    measured: str | None = None
    reference: str | None = None
    ratio: float | None = None
    goal: str | None = None
    status: str = "info"
    raw: dict[str, Any] = field(default_factory=dict)


def row(part: str, what: str, measured: str | None, reference: str | None = None,
        ratio: float | None = None, op: str | None = None, bound: float | None = None,
        value: float | None = None, goal: str | None = None,
        raw: dict[str, Any] | None = None) -> Row:
    """A table row; with a goal (``op``, ``bound``) its status compares ``value`` (default:
    the ratio) with the bound."""
    status = "info"
    if op is not None:
        status = benchlib.goal_status(ratio if value is None else value, op, bound)
        goal = goal or f"{op.replace('<=', '≤').replace('>=', '≥')} {bound:g}"
    return Row(part, what, measured, reference, ratio, goal, status, raw or {})


def ratio_text(r: float | None) -> str | None:
    if r is None:
        return None
    return f"1/{1 / r:.0f} ({r:.4f})" if 0 < r < 0.1 else f"{r:.2f}"


# --------------------------------------------------------------------------- shared set-up
class Context:
    """Options, a scratch folder, and the datasets/models/stores the parts share (made on
    first use, so every part also runs alone)."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.quick, self.tmp, self.args = args.quick, tmp, args
        self.params_file, self.overrides = args.params, args.overrides
        self.cache: dict[str, Any] = {}

    def n(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def synthetic(self, name: str, overrides: list[str], params_file: Path | None = None,
                  ) -> tuple[Params, Path, Path]:
        """(params, prepared dataset, untrained checkpoint) of a synthetic configuration."""
        if name not in self.cache:
            params = load_params(params_file or self.params_file, overrides)
            folder = self.tmp / name
            prepared = prepare(params, folder)
            self.cache[name] = (params, prepared, untrained_checkpoint(params, prepared,
                                                                       folder / "model.pt"))
        return self.cache[name]

    def realistic(self) -> tuple[Params, Path, Path]:
        base = load_params(self.params_file, self.overrides)
        over = [*self.overrides, *synthetic_overrides(base, REALISTIC, self.n(6, 96),
                                                      self.n(4, 24))]
        return self.synthetic("realistic", over)

    def realistic_cams(self) -> Path:
        """The CAM store of the realistic dataset (made by the inference part, or here)."""
        params, prepared, model = self.realistic()
        store = self.tmp / "realistic" / "cams.zarr"
        if not (store / "COMPLETE").is_file():
            from stages import cams as cams_stage

            cams_stage.run(params, prepared, model, store, Shard())
        return store


def synthetic_overrides(base: Params, size: int, n_train: int, n_val: int,
                        classes: list[str] | None = None) -> list[str]:
    """Overrides for synthetic ``size`` px images and a network at crop ``size``."""
    kw = dict(base.model.backbone_kwargs)
    if "img_size" in kw:
        kw["img_size"] = size
    out = ["data.source=synthetic", "data.train_split=train", "data.eval_split=val",
           f"prepare.synthetic.image_size={size}", f"prepare.synthetic.num_train={n_train}",
           f"prepare.synthetic.num_val={n_val}", f"model.crop_size={size}",
           f"model.backbone_kwargs={json.dumps(kw)}", "model.pretrained=false"]
    if classes:
        out.append(f"prepare.synthetic.classes={json.dumps(classes)}")
    return out


def prepare(params: Params, folder: Path) -> Path:
    from stages import prepare as prepare_stage

    prepare_stage.run(params, folder / "prepared", folder / "prepare.json")
    return folder / "prepared"


def untrained_checkpoint(params: Params, prepared: Path, path: Path) -> Path:
    """A freshly initialised network saved as ``stages/train.py`` saves a trained one."""
    from seco_cli.trainer import Trainer

    data = PreparedDataset(prepared)
    meta = {"backbone": params.model.backbone, "num_classes": data.num_classes,
            "classes": data.classes, **provenance(params.dump(), params.train.seed)}
    save_atomic(Trainer(params, data, torch.device("cpu"), meta).final(), path)
    return path


# --------------------------------------------------------------------------- parts
def _flop_row(what: str, fs: float, fb: float, extra: str = "") -> Row:
    return row("train step", f"SeCo ÷ baseline, floating-point operations per step, {what} "
               f"(forward + backward, matrix products and convolutions: the ratio an "
               f"arithmetic-bound device would reach{extra})", f"{fs / 1e9:.1f} GFLOP",
               f"{fb / 1e9:.1f} GFLOP (baseline)", fs / fb)


def _step_rows(res: dict[str, dict[str, float]], steps: int, where: str = "") -> list[Row]:
    """The s/step and FLOP rows, SeCo ÷ baseline, of a :func:`train_step.measure` result."""
    b, s = res["baseline"]["median_s"], res["seco"]["median_s"]
    fb, fs = res["baseline"]["flops"], res["seco"]["flops"]
    return [row("train step", f"SeCo ÷ baseline, s/step (median of {steps}), same backbone, "
                f"batch and data, every term on{where}", f"{s:.3f} s", f"{b:.3f} s (baseline)",
                s / b, "<=", 1.5, raw=res),
            _flop_row(f"the same steps{where}", fs, fb, f"; time ratio ÷ FLOP ratio "
                      f"{(s / b) / (fs / fb):.2f}")]


def _reads_rows(what: str, res: dict[str, dict[str, Any]]) -> list[Row]:
    """Launch and wait counts of one step, SeCo against the baseline
    (:func:`train_step.host_reads`)."""
    b, s = res["baseline"], res["seco"]
    waits_b, waits_s = b["reads"] + b["nonzero"], s["reads"] + s["nonzero"]
    return [row("train step", f"SeCo ÷ baseline, top-level ATen ops in one step (kernel "
                f"launches on a GPU), {what}", f"{s['aten_ops']:,}",
                f"{b['aten_ops']:,} (baseline)", s["aten_ops"] / b["aten_ops"], raw=res),
            row("train step", f"SeCo ÷ baseline, host waits in one step (reads of tensor "
                f"values by the package + nonzero calls, in the select forms a GPU runs; on "
                f"a GPU each drains the launch queue), {what}", f"{s['reads']} + {s['nonzero']}",
                f"{b['reads']} + {b['nonzero']} (baseline)", waits_s / waits_b)]


# The VOC recipe's shape (448 px, batch 4, 20 classes) with a ViT small enough to step on
# a CPU: op and wait counts follow the method, not the width (12 blocks add ops per block)
VOC_SHAPE_SMALL = ["model.backbone=vit_small_patch16_224", "train.proj_hidden=128",
                   'model.backbone_kwargs={"img_size": 448, "embed_dim": 64, "depth": 4, '
                   '"num_heads": 2}', "train.num_workers=0"]


def _select_row(res: dict[str, dict[str, float]], name: str, rule: str, steps: int) -> Row:
    """SeCo's step under the profile's ``train.cam_select`` rule ÷ under the SPEC's schedule,
    timed alternately with the other presets: the rule's own cost (``agreement``: the online
    CAM at full depth, where the schedule's auxiliary CAM stops at its block, and the tile
    forward)."""
    a, s = res["seco"]["median_s"], res[name]["median_s"]
    fa, fs = res["seco"]["flops"], res[name]["flops"]
    return row("train step", f"SeCo, train.cam_select {rule} ÷ schedule, s/step (median of "
               f"{steps}, timed alternately with the rows above; FLOP ratio {fa / fs:.2f})",
               f"{a:.3f} s", f"{s:.3f} s (schedule)", a / s)


EVERY = 4  # train.cam_select_every of the cheaper agreement row


def every_variant(k: int = EVERY) -> str:
    """SeCo with the agreement statistic every ``k`` iterations and no class on the tile map
    (a floor of −1 no correlation falls under): the case of most trained runs, where the
    tile forward runs on update steps only."""
    return f"seco@train.cam_select_every={k}@train.cam_select_min_agreement=-1.0"


def _every_row(res: dict[str, dict[str, float]], name: str, k: int, steps: int) -> Row:
    """SeCo's step with ``train.cam_select_every: k`` (no class on the tiles) ÷ every step:
    what skipping the tile forward between updates saves, timed alternately. Means, not
    medians: one step in k is the dear one, which a median would leave out."""
    a, s = res[name]["mean_s"], res["seco"]["mean_s"]
    fa, fs = res[name]["flops"], res["seco"]["flops"]
    return row("train step", f"SeCo, agreement statistic every {k} iterations (no class on the "
               f"tile map) ÷ every iteration, s/step (mean of {steps}, timed alternately "
               f"with the rows above; FLOP ratio {fa / fs:.2f})",
               f"{a:.3f} s", f"{s:.3f} s (every iteration)", a / s)


def part_train_step(ctx: Context) -> list[Row]:
    # a multiple of EVERY timed steps, so that setting is timed over whole periods
    warmup, steps = ctx.n(1, 4), ctx.n(EVERY, 20)
    tp = load_params(ctx.params_file, ctx.overrides).train
    rule = tp.cam_select
    schedule = "seco@train.cam_select=schedule"  # the same preset under the SPEC's rule
    every = rule == "agreement" and tp.cam_select_every == 1
    variants = ["baseline", "seco", *([schedule] if rule != "schedule" else []),
                *([every_variant()] if every else [])]
    res = train_step.measure(ctx.params_file, ctx.overrides, variants, warmup, steps)
    rows = _step_rows(res, steps)
    if rule != "schedule":
        rows.append(_select_row(res, schedule, rule, steps))
    if every:
        rows.append(_every_row(res, every_variant(), EVERY, steps))
    rows += _reads_rows("default profile", train_step.count_host_reads(
        ctx.params_file, ctx.overrides, ["baseline", "seco"], 2))

    def voc_shape() -> list[Row]:
        params, prepared, over = voc_recipe(ctx, 448, 4, 2, VOC_SHAPE_SMALL)
        f = run_child(ctx, {"params": str(VOC_RECIPE), "overrides": over,
                            "prepared": str(prepared), "host_reads": ["baseline", "seco"]})
        return _reads_rows("VOC recipe shape (448 px, batch 4, 20 classes) with a 4-block "
                           "ViT of width 64", f)

    def voc() -> list[Row]:
        size, extra, what = voc_scale(ctx)
        params, prepared, over = voc_recipe(ctx, size, 4, 2, extra)
        # in a process of its own: the parent keeps no ViT-B/16 memory for the later parts
        f = run_child(ctx, {"params": str(VOC_RECIPE), "overrides": over,
                            "prepared": str(prepared), "flops": ["baseline", "seco"]})
        return [_flop_row(what, f["seco"], f["baseline"])]

    return (rows + _attempt("train step", "SeCo ÷ baseline FLOPs, VOC recipe", voc)
            + _attempt("train step", "SeCo ÷ baseline launches and waits, VOC recipe shape",
                       voc_shape))


def _throughput_rows(tag: str, params: Params, prepared: Path, model: Path, out: Path,
                     ) -> list[Row]:
    c = inf.measure_cams(params, prepared, model, out / "cams.zarr")
    workers = resolve_workers(params.segment.workers)
    s = inf.measure_segment(params, prepared, model, out, workers)
    crop = params.model.crop_size
    return [
        row("cams", f"{tag}: stage ÷ bare forward, {c['images']} images at {crop} px, scales "
            f"{c['scales']} + flip={c['flip']}, {c['device']}", f"{c['stage_ips']:.2f} img/s",
            f"{c['bare_ips']:.2f} img/s (bare)", c["ratio"], ">=", 0.8, raw=c),
        row("segment", f"{tag}: stage ÷ bare forward, {s['images']} images, scales "
            f"{s['scales']} + flip, raw + ms_crf, CRF {s['crf_iterations']} it over "
            f"{workers} worker(s), PNGs, {s['device']}", f"{s['stage_ips']:.2f} img/s",
            f"{s['bare_ips']:.2f} img/s (bare)", s["ratio"], ">=", 0.8, raw=s),
    ]


def part_inference(ctx: Context) -> list[Row]:
    params, prepared, model = ctx.realistic()
    tag = f"profile network ({params.model.backbone}, untrained)"
    return _throughput_rows(tag, params, prepared, model, ctx.tmp / "realistic")


def part_crf(ctx: Context) -> list[Row]:
    params, prepared, _ = ctx.realistic()
    store = ctx.realistic_cams()
    out = ctx.tmp / "crf"
    one = inf.measure_pseudo(params, prepared, store, out / "w1", 1)
    two = inf.measure_pseudo(params, prepared, store, out / "w2", 2)
    start = inf.pool_startup(2)
    n, t1, t2 = one["images"], one["seconds"], two["seconds"]
    what = (f"pseudo stage 2 workers ÷ 1, {n} images at {params.model.crop_size} px, CRF "
            f"{one['crf_iterations']} it, PAR {one['par_iterations']} it")
    raw = {"one": one, "two": two, "pool_startup_s": start}
    rows = [row("CRF", f"{what}, stage wall time (pool start-up included)",
                f"{n / t2:.2f} img/s", f"{n / t1:.2f} img/s (1 worker)", t1 / t2, ">=", 1.7,
                raw=raw)]
    if t2 > start:
        rows.append(row("CRF", f"{what}, pool start-up ({start:.1f} s, measured apart) "
                        "subtracted: the per-image scaling of a long run",
                        f"{n / (t2 - start):.2f} img/s", f"{n / t1:.2f} img/s (1 worker)",
                        t1 / (t2 - start), ">=", 1.7, raw=raw))
    return rows


def part_crf_voc(ctx: Context) -> list[Row]:
    """The segment stage's dense CRF alone at the VOC recipe's shape, one process: the
    ceiling of that stage's throughput on this machine's cores, whatever the device."""
    params, prepared, _ = voc_recipe(ctx, 448, 2, ctx.n(2, 4))
    data = PreparedDataset(prepared)
    ids = data.ids(params.segment.split or params.data.eval_split)
    r = inf.crf_seconds(data, ids, params.segment.crf, data.num_classes + 1,
                        params.model.crop_size)
    # `segment.crf_labels: present` on an image with two classes: background + 2 labels
    few = inf.crf_seconds(data, ids, params.segment.crf, 3, params.model.crop_size)
    cores = resolve_workers(0)
    s, s3 = r["seconds_per_image"], few["seconds_per_image"]
    what = (f"segment's dense CRF alone, VOC recipe ({r['size'][0]}×{r['size'][1]} px, "
            f"{r['iterations']} it), one process, {r['images']} images")
    return [row("CRF", f"{what}, {r['labels']} labels (`segment.crf_labels: all`)",
                f"{s:.2f} s/image", raw=r),
            row("CRF", f"{what}, 3 labels (`present` on an image with two classes) ÷ "
                f"{r['labels']}: the speed-up", f"{s3:.2f} s/image", f"{s:.2f} s/image",
                s / s3, raw=few),
            row("CRF", f"segment stage ceiling at that CRF on {cores} cores, {r['labels']} / "
                "3 labels (no device makes it faster)", f"{cores / s:.2f} / {cores / s3:.2f} "
                "img/s", raw=r)]


def _bytes_row(what: str, b: dict[str, Any]) -> Row:
    return row("CAM bytes", f"{what}: {b['own_classes_per_image']:.2f} own classes/image, "
               f"{b['stored_per_class_map']:,.0f} B per stored class map; reference float32 × "
               f"{b['classes']} maps × H × W (with a background map: "
               f"{b['full_with_background_per_image']:,.0f} B)",
               f"{b['stored_per_image']:,.0f} B/image",
               f"{b['full_per_image']:,.0f} B/image", b["ratio"], "<=", 0.02,
               goal="≤ 1/50", raw=b)


def part_cam_bytes(ctx: Context) -> list[Row]:
    from stages import cams as cams_stage

    params, prepared, _ = ctx.realistic()
    size = params.cams.store_size
    rows = [_bytes_row(f"embedded 6 classes, {REALISTIC} px, store_size {size}, untrained",
                       inf.cam_bytes(prepared, ctx.realistic_cams()))]
    base = load_params(ctx.params_file, ctx.overrides)
    over = [*ctx.overrides, *synthetic_overrides(base, REALISTIC, ctx.n(4, 32), 2, VOC_NAMES)]
    voc_params, voc_prepared, voc_model = ctx.synthetic("voc20", over)
    recipe_size = load_params(VOC_RECIPE).cams.store_size
    for store_size in dict.fromkeys([size, recipe_size]):
        p = voc_params.model_copy(deep=True)
        p.cams.store_size = store_size
        store = ctx.tmp / "voc20" / f"cams-{store_size}.zarr"
        cams_stage.run(p, voc_prepared, voc_model, store, Shard())
        src = "VOC recipe's" if store_size == recipe_size else "profile's"
        rows.append(_bytes_row(f"VOC-like 20 classes (+ background = 21), {REALISTIC} px, "
                               f"{src} store_size {store_size}, untrained",
                               inf.cam_bytes(voc_prepared, store)))
    trained, ws_prepared = ROOT / "artifacts" / "cams.zarr", ROOT / "artifacts" / "prepared"
    if (trained / "COMPLETE").is_file():
        try:
            rows.append(_bytes_row("workspace artifacts/cams.zarr (trained model, as last "
                                   "built)", inf.cam_bytes(ws_prepared, trained)))
        except Exception as exc:  # noqa: BLE001 - an optional extra row
            rows.append(Row("CAM bytes", "workspace artifacts/cams.zarr",
                            status=status_error(exc)))
    return rows


def _timed_cmd(cmd: list[str], repo: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, done


def part_dvc(ctx: Context) -> list[Row]:
    secs, st = _timed_cmd(["dvc", "status", "--json"], ctx.args.repo)
    if st.returncode:
        raise RuntimeError(f"dvc status failed: {(st.stderr or st.stdout).strip()[-300:]}")
    changed = json.loads(st.stdout or "{}")
    rows = [row("dvc", "`dvc status` (nothing changed)" if not changed else "`dvc status`",
                f"{secs:.2f} s")]
    if changed:
        rows.append(Row("dvc", "`dvc repro` with nothing changed", goal="≤ 2 s",
                        status="not measured: pipeline not up to date (run dvc repro first); "
                        f"changed: {', '.join(changed)}"))
        return rows
    secs, rp = _timed_cmd(["dvc", "repro"], ctx.args.repo)
    if rp.returncode:
        raise RuntimeError(f"dvc repro failed: {(rp.stderr or rp.stdout).strip()[-300:]}")
    ran = [ln for ln in rp.stdout.splitlines() if ln.startswith("Running stage")]
    rows.append(row("dvc", f"`dvc repro` with nothing changed (stages run: {len(ran)})",
                    f"{secs:.2f} s", value=secs, op="<=", bound=2.0, goal="≤ 2 s"))
    try:
        rows.append(_layout_row(store_layout.measure(ctx.args.repo, runs=3 if ctx.args.quick
                                                     else 5)))
    except Exception as exc:  # noqa: BLE001 - an extra row; the goal row stands
        rows.append(Row("dvc", "`dvc status`, stores in bundles ÷ a folder per image",
                        status=status_error(exc)))
    return rows


def _layout_row(r: dict[str, Any]) -> Row:
    count = {name: (t["files"], t["folders"]) for name, t in r["totals"].items()}
    return row("dvc", "`dvc status` (nothing changed), the stores in bundles ÷ the same "
               f"{r['arrays']} arrays in a folder per image (the layout before), copies of this "
               f"workspace, median of {r['runs']} alternated runs; store files / folders "
               f"{count['bundles'][0]:,} / {count['bundles'][1]:,} against "
               f"{count['folders'][0]:,} / {count['folders'][1]:,} (`bench/store_layout.py`)",
               f"{r['median_s']['bundles']:.2f} s", f"{r['median_s']['folders']:.2f} s",
               ratio=r["ratio"], raw=r)


def run_child(ctx: Context, spec: dict[str, Any]) -> dict[str, Any]:
    return train_child.run({**spec, "threads": ctx.args.threads}, ctx.args.mem_limit_gb)


def voc_recipe(ctx: Context, size: int, n_train: int, n_val: int,
               extra: list[str] = ()) -> tuple[Params, Path, list[str]]:
    """The VOC recipe (ViT-B/16 at 448, batch 4) on synthetic ``size`` px data with the VOC
    class names, random init; (params, prepared dataset, overrides of recipes/voc.yaml)."""
    base = load_params(VOC_RECIPE)
    over = [*synthetic_overrides(base, size, n_train, n_val, VOC_NAMES), *extra]
    params = load_params(VOC_RECIPE, over)
    key = f"voc-{size}-{n_train}-{n_val}"
    if key not in ctx.cache:
        ctx.cache[key] = prepare(params, ctx.tmp / key)
    return params, ctx.cache[key], over


def voc_scale(ctx: Context) -> tuple[int, list[str], str]:
    """(image side, overrides, label) of the VOC recipe's CPU measurements: the recipe, or
    with ``--quick`` a reduced one (its ViT-B/16 at 448 takes a minute or more per step)."""
    if ctx.quick:  # 256: every cam_scale (0.5, 0.75, 1.5) gives a multiple of the patch 16
        return (256, ["train.batch_size=1", "train.num_workers=0"],
                "VOC recipe REDUCED for --quick (ViT-B/16 at 256, batch 1)")
    return 448, [], "VOC recipe (ViT-B/16 at 448, batch 4, random init)"


def _gib(n: float | None) -> str | None:
    return None if n is None else f"{n / 2**30:.2f} GiB"


def _memory_row(what: str, r: dict[str, Any]) -> Row:
    gpu = f", GPU max allocated {_gib(r['peak_gpu'])}" if r["peak_gpu"] is not None else ""
    return row("memory", f"{what} ({r['device']}, {r['steps']} timed + {r['warmup']} warm-up "
               f"steps, every term on){gpu}", f"{_gib(r['peak_rss'])} RSS", raw=r)


def _attempt(part: str, what: str, fn) -> list[Row]:
    """``fn()``'s rows, or one row with its error: one failure keeps the part's other rows."""
    try:
        return fn()
    except train_child.MemoryLimit as exc:
        return [Row(part, what, f"> {_gib(exc.limit)} RSS", status=f"info: {exc}")]
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return [Row(part, what, status=status_error(exc))]


def part_memory(ctx: Context) -> list[Row]:
    base = load_params(ctx.params_file, ctx.overrides)
    what = (f"train, default profile (batch {base.train.batch_size}, crop "
            f"{base.model.crop_size})")

    def default() -> list[Row]:
        prepared = prepare(base, ctx.tmp / "memory-default")
        spec = {"params": str(ctx.params_file), "overrides": ctx.overrides,
                "prepared": str(prepared), "warmup": 1, "steps": ctx.n(2, 10)}
        return [_memory_row(what, run_child(ctx, spec))]

    size, extra, voc_what = voc_scale(ctx)
    n, voc_what = ctx.n(4, 8), f"train, {voc_what}"

    def voc() -> list[Row]:
        params, prepared, over = voc_recipe(ctx, size, n, 2, extra)
        # 2 steps: the optimiser state exists from the end of the first
        spec = {"params": str(VOC_RECIPE), "overrides": over, "prepared": str(prepared),
                "warmup": 0, "steps": ctx.n(1, 2)}
        return [_memory_row(voc_what, run_child(ctx, spec))]

    return _attempt("memory", what, default) + _attempt("memory", voc_what, voc)


def part_gpu(ctx: Context) -> list[Row]:
    if not torch.cuda.is_available():
        return [Row("GPU", "VOC recipe s/it, peak GPU memory, SeCo ÷ baseline step",
                    goal="≤ 0.5 s/it (H100)", status="not measured: no CUDA device")]
    params, prepared, over = voc_recipe(ctx, 448, ctx.n(8, 64), ctx.n(4, 32))
    tp = params.train
    fill = tp.reservoir_capacity // tp.keys_per_step  # warm up until the reservoir is full
    steps = ctx.n(5, 50)
    r = run_child(ctx, {"params": str(VOC_RECIPE), "overrides": over,
                              "prepared": str(prepared), "warmup": ctx.n(3, fill),
                              "steps": steps})
    rows = [row("GPU", f"VOC recipe train, s/it over {steps} iterations after {r['warmup']} "
                f"warm-up (reservoir full), ViT-B/16 at 448, batch 4, bf16, {r['device']}",
                f"{r['sec_per_iter']:.3f} s/it", value=r["sec_per_iter"], op="<=", bound=0.5,
                goal="≤ 0.5 s/it (H100-class)", raw=r),
            row("GPU", "VOC recipe train, peak GPU memory (max allocated)", _gib(r["peak_gpu"]))]
    # SeCo ÷ baseline at the recipe itself (the CPU times it at the default profile only);
    # the SeCo reservoir filled first, as for the s/it above
    steps = ctx.n(3, 20)
    res = train_step.measure(VOC_RECIPE, over, ["baseline", "seco"], ctx.n(2, fill), steps,
                             prepared)
    torch.cuda.empty_cache()
    return rows + _step_rows(res, steps, f", VOC recipe (ViT-B/16 at 448, batch 4), {r['device']}")


def part_gpu_inference(ctx: Context) -> list[Row]:
    if not torch.cuda.is_available():
        return [Row("GPU", "cams/segment throughput with the VOC recipe network",
                    goal="≥ 0.8", status="not measured: no CUDA device")]
    # enough images that the stages' start-up (model load, store, CRF pool) weighs as it
    # does on a real split: the GPU runs the bare forward at 100+ images/s
    params, prepared, _ = voc_recipe(ctx, 448, ctx.n(16, 256), ctx.n(8, 64))
    model = untrained_checkpoint(params, prepared, ctx.tmp / "voc-gpu-model.pt")
    return _throughput_rows("VOC recipe network (ViT-B/16, untrained)", params, prepared, model,
                            ctx.tmp / "voc-gpu")


PARTS = {"train_step": part_train_step, "inference": part_inference, "crf": part_crf,
         "crf_voc": part_crf_voc,
         "cam_bytes": part_cam_bytes, "dvc": part_dvc, "memory": part_memory, "gpu": part_gpu,
         "gpu_inference": part_gpu_inference}


# --------------------------------------------------------------------------- report
def status_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return f"error: {exc.__class__.__name__}: {text[:300]}"


HEADERS = ["part", "what", "measured", "reference", "ratio", "goal", "status"]


def table_rows(rows: list[Row]) -> list[list[Any]]:
    return [[r.part, r.what, r.measured, r.reference, ratio_text(r.ratio), r.goal, r.status]
            for r in rows]


def render(head: dict[str, Any], rows: list[Row], seconds: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    return ("# Speed benchmark\n\n" + benchlib.header_markdown(head) +
            f"- part durations: {parts}\n\n" + benchlib.md_table(HEADERS, table_rows(rows)))


def run_parts(ctx: Context, names: list[str]) -> tuple[list[Row], dict[str, float]]:
    rows, seconds = [], {}
    for name in names:
        start = time.perf_counter()
        try:
            got = PARTS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a failing part reports in its row
            if ctx.args.debug:
                traceback.print_exc()
            got = [Row(name, "(part failed)", status=status_error(exc))]
        seconds[name] = time.perf_counter() - start
        for r in got:
            print(f"[{name}] {r.what}: {r.measured} vs {r.reference} → "
                  f"{ratio_text(r.ratio)} goal {r.goal}: {r.status}", flush=True)
        rows += got
    return rows, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shrink every part (~2 min smoke run)")
    ap.add_argument("--out", type=Path, help="output stem: <out>.md and <out>.json "
                    "(default bench/results/speed, --quick: bench/results/speed-quick)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="params override for the default-profile parts (repeatable)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    ap.add_argument("--repo", type=Path, default=ROOT,
                    help="the DVC repository whose no-op `dvc repro` is timed")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--mem-limit-gb", type=float, default=0.0,
                    help="stop a training process whose RSS passes this (0: 85 %% of the "
                    "memory available at its start)")
    ap.add_argument("--keep", type=Path, help="keep the scratch data in this folder")
    ap.add_argument("--debug", action="store_true", help="print the traceback of a failed part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    out = args.out or ROOT / "bench" / "results" / ("speed-quick" if args.quick else "speed")
    head = benchlib.run_header()
    with tempfile.TemporaryDirectory(prefix="seco-speed-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows, seconds = run_parts(Context(args, folder), names)
    md = render(head, rows, seconds)
    print("\n" + md)
    benchlib.write_text(out.with_suffix(".md"), md)
    benchlib.write_json(out.with_suffix(".json"), {**head, "quick": args.quick,
                                                   "part_seconds": seconds,
                                                   "rows": [asdict(r) for r in rows]})
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
