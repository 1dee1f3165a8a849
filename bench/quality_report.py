"""The quality table of ``bench/quality.py``: per-run metrics → mean ± spread per preset, the
paper's table shapes (Tables 2 and 5: mIoU of CAM seeds, pseudo masks and segmentation;
Table 3: IoU and FP/TP of co-occurring pairs), and the goal checks of issue 5.

Pure functions of the stored results (no I/O), so ``--report-only`` and the tests use them.
Metrics are fractions in the results (``evaluate.json``) and points (× 100) in the tables;
FP/TP is a ratio. The spread is the sample standard deviation over seeds (n − 1); with one
seed it is left out.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from benchlib import goal_status, md_table

PRESETS = ["baseline", "toco_like", "no_lig", "no_lil", "no_rectify", "seco",
           "fully_supervised"]
ABLATIONS = ["no_lig", "no_lil", "no_rectify"]  # SeCo with one component removed
SOURCES = {"cams": "CAM seeds", "pseudo": "pseudo masks", "segment_raw": "seg raw",
           "segment_ms_crf": "seg MS+CRF"}
HEADLINE = ("miou", "precision", "recall", "fp_tp")
PAIR_SOURCES = ("cams", "segment_ms_crf")  # Table 3 is shown for these
SEG = "segment_ms_crf"  # the paper's segmentation protocol: the goals use it
FOUND_IOU = 0.5  # a coupled victim counts as segmented in a run at this IoU or above
PROBE_HEADS = ("final", "aux")  # the isolated-patch probe's classifier heads
# training statistics of the last logged window (dvclive's metrics.json): (group, key, label,
# scale) — scale 100 shows a fraction in percent
TRAIN_STATS = (("seco", "tag_background", "tags bkg %", 100.0),
               ("seco", "tag_class", "tags class %", 100.0),
               ("seco", "tag_uncertain", "tags uncertain %", 100.0),
               ("seco", "rectified_fraction", "rectified %", 100.0),
               ("seco", "abnormal_fraction", "abnormal pairs %", 100.0),
               ("seco", "mu_mean", "μ (reservoir same-tag sim.)", 1.0),
               ("loss", "ptc", "L_ptc", 1.0), ("loss", "lig", "L_iG", 1.0),
               ("loss", "lil", "L_iL", 1.0), (None, "sec_per_iter", "s/iteration", 1.0))
# columns shown only where some run logged them (options that are off by default)
OPTIONAL_STATS = (("seco", "tag_cam_agree", "tags = CAM tags % (patch_tags: alone)", 100.0),)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def mean_spread(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None below two values, count) of the finite
    values; (None, None, 0) when there is none."""
    vals = [f for f in map(_finite, values) if f is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt(stat: tuple[float | None, float | None, int] | None, scale: float = 100.0,
        digits: int = 1) -> str | None:
    """``57.2 ± 1.3`` (scaled), ``57.2`` for one value, None when missing."""
    if stat is None or stat[0] is None:
        return None
    mean, spread, _ = stat
    text = f"{mean * scale:.{digits}f}"
    return text if spread is None else f"{text} ± {spread * scale:.{digits}f}"


def pair_names(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The ``victim/partner`` pairs of the runs' evaluate.json, in first-seen order."""
    seen: dict[str, None] = {}
    for run in runs:
        seen.update(dict.fromkeys(run.get("metrics", {}).get("pairs", {})))
    return list(seen)


def context_pairs(pairs: Sequence[str]) -> list[str]:
    """Pairs coupled with a context (partner ``background``, e.g. boat/water)."""
    return [p for p in pairs if p.split("/", 1)[-1] == "background"]


def flatten(run: dict[str, Any], pairs: Sequence[str]) -> dict[str, float | None]:
    """One run's numbers under flat keys: ``<source>.<metric>``, ``pair.<pair>.<source>.<iou|
    fp_tp>``, and ``context_fp_tp.<source>`` / ``coupled_fp_tp.<source>``: the mean FP/TP
    over the context pairs / over all pairs."""
    m = run.get("metrics", {})
    out: dict[str, float | None] = {}
    for src in SOURCES:
        for k in HEADLINE:
            out[f"{src}.{k}"] = _finite(m.get(src, {}).get(k))
    out["cams.best_miou"] = _finite(m.get("cams", {}).get("best_miou"))
    # the auxiliary head's CAMs, scored when the cams stage stored them (`cams.aux`)
    out["cams_aux.miou"] = _finite(m.get("cams_aux", {}).get("miou"))
    out["cams_aux.best_miou"] = _finite(m.get("cams_aux", {}).get("best_miou"))
    for pair in pairs:
        for src in PAIR_SOURCES + ("pseudo", "segment_raw"):
            entry = m.get("pairs", {}).get(pair, {}).get(src, {})
            for k in ("iou", "fp_tp"):
                out[f"pair.{pair}.{src}.{k}"] = _finite(entry.get(k))
            iou = out[f"pair.{pair}.{src}.iou"]  # 1 when the victim is segmented at all
            out[f"pair.{pair}.{src}.found"] = None if iou is None else float(iou >= FOUND_IOU)
    probe = (m.get("probe") or {}).get("pairs", {})  # the isolated-patch probe (evaluate)
    for pair in pairs:
        for head in PROBE_HEADS:
            entry = probe.get(pair, {}).get(head) or {}
            for k in ("auc", "partner_fire", "object_fire"):
                out[f"probe.{pair}.{head}.{k}"] = _finite(entry.get(k))
    train = run.get("train") or {}
    for group, key, _, _ in TRAIN_STATS + OPTIONAL_STATS:
        section = train if group is None else train.get(group) or {}
        out[f"train.{key}"] = _finite(section.get(key))
    for pair, value in (train.get("proto") or {}).items():  # prototype similarities
        out[f"train.proto.{pair}"] = _finite(value)
    for name, chosen in (("context", context_pairs(pairs)), ("coupled", list(pairs))):
        for src in SOURCES:
            out[f"{name}_fp_tp.{src}"] = mean_spread(
                out[f"pair.{p}.{src}.fp_tp"] for p in chosen)[0]
    return out


Stat = tuple[float | None, float | None, int]


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Stat]]:
    """preset → key → (mean, spread, n) over the preset's runs (seeds)."""
    pairs = pair_names(runs)
    by_preset: dict[str, list[dict[str, float | None]]] = {}
    for run in runs:
        by_preset.setdefault(run["preset"], []).append(flatten(run, pairs))
    return {preset: {k: mean_spread(f.get(k) for f in flats)
                     for k in dict.fromkeys(k for f in flats for k in f)}
            for preset, flats in by_preset.items()}


def _mean(agg: dict[str, dict[str, Stat]], preset: str, key: str) -> float | None:
    return agg.get(preset, {}).get(key, (None, None, 0))[0]


def _pts(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def seed_flats(runs: Sequence[dict[str, Any]], pairs: Sequence[str]
               ) -> dict[str, dict[Any, dict[str, float | None]]]:
    """preset → seed → the run's flat numbers (:func:`flatten`), for seed-by-seed comparisons
    (presets trained with the same seed share data, initial weights and batches)."""
    out: dict[str, dict[Any, dict[str, float | None]]] = {}
    for run in runs:
        out.setdefault(run["preset"], {})[run.get("seed")] = flatten(run, pairs)
    return out


def seeds_holding(flats: dict[str, dict[Any, dict[str, float | None]]], a: str, b: str,
                  key: str, holds) -> tuple[int, int]:
    """(k, n): over the n seeds where presets ``a`` and ``b`` both have ``key``, in how many
    ``holds(value_a, value_b)`` is true."""
    k = n = 0
    for seed, fa in flats.get(a, {}).items():
        va, vb = fa.get(key), flats.get(b, {}).get(seed, {}).get(key)
        if va is not None and vb is not None:
            n += 1
            k += bool(holds(va, vb))
    return k, n


def _in_seeds(kn: tuple[int, int]) -> str:
    k, n = kn
    return f"; holds in {k} of {n} seed{'s' if n != 1 else ''}" if n else ""


def goal_checks(agg: dict[str, dict[str, Stat]], pairs: Sequence[str],
                runs: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
    """Issue 5's goals on the means over seeds: met / not met / not measured, with numbers;
    given the ``runs``, each comparison also says in how many seeds it holds run by run. An
    ablation's ordering below SeCo whose difference is within the seeds' spread is
    :data:`NOT_SHOWN`, not met.

    The FP/TP goal is checked per coupled victim class (of the context pairs, or of every pair
    when none is a context pair; a pair's FP/TP is its victim's): a mean over pairs lets one
    lost class (FP/TP ≈ 100) hide another's gain."""
    goals = []
    flats = seed_flats(runs, pairs)
    victims: dict[str, list[str]] = {}  # victim → its pairs, in first-seen order
    for pair in context_pairs(pairs) or pairs:
        victims.setdefault(pair.split("/", 1)[0], []).append(pair)
    for victim, its in victims.items():
        partners = ", ".join(q.split("/", 1)[-1] for q in its)
        for src in PAIR_SOURCES:
            key = f"pair.{its[0]}.{src}.fp_tp"
            s, b = _mean(agg, "seco", key), _mean(agg, "baseline", key)
            bound = None if b is None else 0.6 * b
            kn = seeds_holding(flats, "seco", "baseline", key, lambda x, y: x <= 0.6 * y)
            goals.append({"goal": f"FP/TP of {victim} (coupled with {partners}), "
                          f"{SOURCES[src]}: SeCo ≤ 0.6 × baseline",
                          "measured": f"SeCo {_ratio(s)}, 0.6 × baseline {_ratio(bound)}"
                          + _in_seeds(kn),
                          "status": goal_status(s, "<=", bound)})
    key = f"{SEG}.miou"
    s, b, f = _mean(agg, "seco", key), _mean(agg, "baseline", key), _mean(agg, "fully_supervised",
                                                                           key)
    kn = seeds_holding(flats, "seco", "baseline", key, lambda x, y: x >= y + 0.05)
    goals.append({"goal": "segmentation mIoU (MS+CRF): SeCo ≥ baseline + 5",
                  "measured": f"SeCo {_pts(s)}, baseline {_pts(b)}" + _in_seeds(kn),
                  "status": goal_status(s, ">=", None if b is None else b + 0.05)})
    goals.append({"goal": "segmentation mIoU (MS+CRF): SeCo ≥ 90 % of fully supervised",
                  "measured": f"SeCo {_pts(s)}, fully supervised {_pts(f)}"
                  + (f" (ratio {s / f:.2f})" if s is not None and f else ""),
                  "status": goal_status(s, ">=", None if f is None else 0.9 * f)})
    seco_stat = agg.get("seco", {}).get(key)
    for ablation in ABLATIONS:
        a = _mean(agg, ablation, key)
        stat = agg.get(ablation, {}).get(key)
        kn = seeds_holding(flats, ablation, "seco", key, lambda x, y: x < y)
        status = goal_status(a, "<", s)
        if status == "met" and _spread_covers(stat, seco_stat):
            status = NOT_SHOWN  # ordered, but not by more than the seeds scatter
        goals.append({"goal": f"segmentation mIoU (MS+CRF): {ablation} < SeCo",
                      "measured": f"{ablation} {fmt(stat) or '—'}, SeCo {fmt(seco_stat) or '—'}"
                      + _within_spread(stat, seco_stat) + _in_seeds(kn),
                      "status": status})
    return goals


# an ordering goal whose means order the right way by no more than the larger sample std of
# the two presets: the seeds do not show it (neither met nor refuted)
NOT_SHOWN = "not shown (within the seeds' spread)"


def _spread_covers(a: Stat | None, b: Stat | None) -> bool | None:
    """Whether |mean a − mean b| is at most the larger sample std of the two (the ordering is
    not claimed then); None when a mean or a spread is missing (a single seed)."""
    if not a or not b or a[0] is None or b[0] is None or a[1] is None or b[1] is None:
        return None
    return abs(b[0] - a[0]) <= max(a[1], b[1])


def _within_spread(a: Stat | None, b: Stat | None) -> str:
    """``; difference … is within the seeds' spread`` when :func:`_spread_covers`, ``;
    difference …`` when not, ``""`` when it cannot say."""
    covers = _spread_covers(a, b)
    if covers is None:
        return ""
    diff = f"; difference {100 * (b[0] - a[0]):+.1f}"
    return diff + " is within the seeds' spread" if covers else diff


def _presets(agg: Collection[str]) -> list[str]:
    return [p for p in PRESETS if p in agg] + sorted(p for p in agg if p not in PRESETS)


def miou_table(agg: dict[str, dict[str, Stat]]) -> str:
    """Tables 2/5 shape: mIoU per stage, and weakly ÷ fully supervised."""
    full = _mean(agg, "fully_supervised", f"{SEG}.miou")
    # a column for the auxiliary head's CAMs only where some run stored them
    aux = any(a.get("cams_aux.best_miou", (None,))[0] is not None for a in agg.values())
    rows = []
    for p in _presets(agg):
        a = agg[p]
        seg = a[f"{SEG}.miou"][0]
        rows.append([p, a[f"{SEG}.miou"][2], fmt(a["cams.miou"]), fmt(a["cams.best_miou"]),
                     *([fmt(a["cams_aux.best_miou"])] if aux else []),
                     fmt(a["pseudo.miou"]), fmt(a["segment_raw.miou"]), fmt(a[f"{SEG}.miou"]),
                     None if seg is None or not full else f"{seg / full:.2f}"])
    return md_table(["preset", "seeds", "CAM mIoU", "CAM mIoU (best bkg)",
                     *(["aux-head CAM mIoU (best bkg)"] if aux else []), "pseudo mIoU",
                     "seg mIoU raw", "seg mIoU MS+CRF", "÷ fully supervised"], rows)


def seed_table(runs: Sequence[dict[str, Any]], pairs: Sequence[str]) -> str | None:
    """Each run's CAM / pseudo / seg MS+CRF mIoU, a column per seed: the means hide outcomes
    that a seed decides (a class found or lost). None with a single seed."""
    flats = seed_flats(runs, pairs)
    seeds = sorted({seed for per in flats.values() for seed in per}, key=str)
    if len(seeds) < 2:
        return None
    rows = [[p, *("—" if seed not in flats[p] else " / ".join(
        _pts(flats[p][seed].get(k)) for k in ("cams.miou", "pseudo.miou", f"{SEG}.miou"))
        for seed in seeds)] for p in _presets(flats)]
    return md_table(["preset", *(f"seed {seed}" for seed in seeds)], rows)


CLASS_SOURCES = ("cams", SEG)  # the per-class IoU table is shown for these


def class_table(runs: Sequence[dict[str, Any]], src: str) -> str | None:
    """Each run's IoU per class (points) of source ``src``, a row per preset and seed: the
    class a run loses (a whole-class collapse, which the means and the coupled pairs can
    hide) is read here. From the run's ``classes`` (the evaluate stage's per-class report,
    stored by ``bench/quality.py``); None when no run has them. A run without them shows
    "—" in every cell."""
    have = [r for r in runs if (r.get("classes") or {}).get(src)]
    if not have:
        return None
    names = list(dict.fromkeys(c for r in have for c in r["classes"][src]))
    order = _presets({r["preset"] for r in runs})  # the other tables' order, seeds within
    rows = []
    for r in sorted(runs, key=lambda r: (order.index(r["preset"]), str(r["seed"]))):
        ious = (r.get("classes") or {}).get(src) or {}
        rows.append([f"{r['preset']} · {r['seed']}", *(_pts(ious.get(c)) for c in names)])
    return md_table(["preset · seed", *names], rows)


FULL = "fully_supervised"  # the ceiling of the headroom table


def coupled_classes(pairs: Sequence[str]) -> list[str]:
    """The classes of the co-occurring pairs (victims and partners), background left out."""
    names = dict.fromkeys(c for q in pairs for c in q.split("/", 1))
    return [c for c in names if c != "background"]


def headroom(runs: Sequence[dict[str, Any]], pairs: Sequence[str], src: str = SEG
             ) -> dict[str, dict[str, Any]] | None:
    """Per weakly supervised preset, its gap to the fully supervised preset (per-class IoU
    of ``src``, means over each preset's runs) split into what every class loses and what
    co-occurrence adds: the uncoupled classes' mean gap (neither victim nor partner of a
    pair, background left out) is taken as what weak labels cost a class anyway; each
    coupled class's gap beyond it (none when below) is co-occurrence's share, and their sum
    over the classes of the mean is the most a perfect fix of co-occurrence could add to the
    preset's mIoU. None without fully supervised runs, uncoupled classes or per-class IoU.

    preset → ``gap`` (mIoU points × 1/100), ``floor``, ``excess`` (class → gap beyond the
    floor), ``bound`` (Σ excess ÷ classes), ``runs``."""
    per: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        ious = (r.get("classes") or {}).get(src)
        if ious:
            per.setdefault(r["preset"], []).append(ious)
    if FULL not in per:
        return None
    names = list(dict.fromkeys(c for ious in per[FULL] for c in ious))
    coupled = [c for c in coupled_classes(pairs) if c in names]
    free = [c for c in names if c not in coupled and c != "background"]
    if not coupled or not free:
        return None

    def means(preset: str) -> dict[str, float | None]:
        return {c: mean_spread(i.get(c) for i in per[preset])[0] for c in names}

    full = means(FULL)
    out = {}
    for preset in _presets(per):
        if preset == FULL:
            continue
        weak = means(preset)
        gap = {c: None if full[c] is None or weak[c] is None else full[c] - weak[c]
               for c in names}
        if any(v is None for v in gap.values()):
            continue
        floor = statistics.fmean(gap[c] for c in free)
        excess = {c: max(0.0, gap[c] - floor) for c in coupled}
        out[preset] = {"gap": statistics.fmean(gap.values()), "floor": floor,
                       "excess": excess, "bound": sum(excess.values()) / len(names),
                       "runs": len(per[preset])}
    return out or None


def headroom_table(runs: Sequence[dict[str, Any]], pairs: Sequence[str]) -> str | None:
    """:func:`headroom` as a table (points)."""
    room = headroom(runs, pairs)
    if not room:
        return None
    coupled = list(next(iter(room.values()))["excess"])
    rows = [[p, r["runs"], _pts(r["gap"]), _pts(r["floor"]),
             *(_pts(r["excess"][c]) for c in coupled), _pts(r["bound"])]
            for p, r in room.items()]
    return md_table(["preset", "runs", "mIoU gap to fully supervised",
                     "uncoupled classes' mean gap (what weak labels cost any class)",
                     *(f"{c}: gap beyond it" for c in coupled),
                     "co-occurrence's share of the mIoU gap (the most a perfect fix adds)"],
                    rows)


def precision_table(agg: dict[str, dict[str, Stat]]) -> str:
    """Precision, recall (points) and FP/TP (ratio) of CAM seeds, pseudo masks, segmentation."""
    srcs = ("cams", "pseudo", SEG)
    headers = ["preset"] + [f"{SOURCES[s]} {k}" for s in srcs for k in ("P", "R", "FP/TP")]
    rows = [[p] + [v for s in srcs for v in (fmt(agg[p][f"{s}.precision"]),
                                            fmt(agg[p][f"{s}.recall"]),
                                            fmt(agg[p][f"{s}.fp_tp"], 1.0, 2))]
            for p in _presets(agg)]
    return md_table(headers, rows)


def pair_table(agg: dict[str, dict[str, Stat]], pairs: Sequence[str], src: str) -> str:
    """Table 3 shape for one source: IoU (points) / FP/TP per coupled pair."""
    ctx = context_pairs(pairs)
    headers = ["preset"] + [f"{p} IoU / FP-TP" for p in pairs] + (
        ["context FP/TP (mean)"] if ctx else []) + ["coupled FP/TP (mean)"]
    rows = []
    for p in _presets(agg):
        a = agg[p]
        cells = [f"{fmt(a[f'pair.{q}.{src}.iou']) or '—'} / "
                 f"{fmt(a[f'pair.{q}.{src}.fp_tp'], 1.0, 2) or '—'}" for q in pairs]
        extra = [fmt(a[f"context_fp_tp.{src}"], 1.0, 2)] if ctx else []
        rows.append([p, *cells, *extra, fmt(a[f"coupled_fp_tp.{src}"], 1.0, 2)])
    return md_table(headers, rows)


def probe_table(agg: dict[str, dict[str, Stat]], pairs: Sequence[str]) -> str | None:
    """The isolated-patch probe per pair and head: AUC of the victim's logit, object tiles
    against partner tiles (1: read from the object, 0.5: no difference, < 0.5: the partner
    alone is the stronger cue), and the fraction of partner tiles that alone make the
    classifier say the victim. None when no run has it."""
    cols = [(q, h) for q in pairs for h in PROBE_HEADS
            if any(a.get(f"probe.{q}.{h}.auc", (None,))[0] is not None for a in agg.values())]
    if not cols:
        return None
    rows = [[p] + [f"{fmt(agg[p].get(f'probe.{q}.{h}.auc'), 1.0, 2) or '—'} / "
                   f"{fmt(agg[p].get(f'probe.{q}.{h}.partner_fire')) or '—'}"
                   for q, h in cols] for p in _presets(agg)]
    return md_table(["preset"] + [f"{q} {h}: AUC / partner fires %" for q, h in cols], rows)


def training_table(agg: dict[str, dict[str, Stat]]) -> str:
    """Each preset's training statistics at its last logged window (tags, rectification,
    μ, contrast losses, speed); a preset without the term shows —."""
    proto: list[str] = []  # cosine similarity is symmetric: b~a repeats a~b
    for k in dict.fromkeys(k for p in agg for k in agg[p] if k.startswith("train.proto.")):
        a, _, b = k.removeprefix("train.proto.").partition("~")
        if f"train.proto.{b}~{a}" not in proto:
            proto.append(k)
    stats = TRAIN_STATS + tuple(
        s for s in OPTIONAL_STATS if any(_mean(agg, p, f"train.{s[1]}") is not None for p in agg))
    rows = [[p] + [fmt(agg[p][f"train.{key}"], scale, 1 if scale == 100.0 else 3)
                   for _, key, _, scale in stats]
            + [fmt(agg[p].get(k), 1.0, 3) for k in proto] for p in _presets(agg)]
    return md_table(["preset"] + [label for *_, label, _ in stats]
                    + [f"prototype sim. {k.removeprefix('train.proto.').replace('~', '/')}"
                       .replace("mean_off_diagonal", "mean (off-diagonal)") for k in proto],
                    rows)


def cam_sources(run: dict[str, Any]) -> dict[str, str] | None:
    """Per class, the online CAM's source at the end of the run under ``train.cam_select``
    ``area`` or ``agreement`` (``aux``, ``final``, ``tiles``): the trainer's own rule
    (:meth:`seco_cli.memory.CamHeads.names`) on the last logged window of its EMA (a mean
    over ``train.log_every`` steps, so a class within a hair of a boundary may read
    otherwise than the model records); None for the schedule, or without an online CAM.
    Whether a class ended on the tiles is the trainer's own record where the run logged it
    (``cam_tiles``): under ``train.cam_select_hysteresis`` it depends on the statistic's
    past, not only on its last value."""
    tp = run.get("params", {}).get("train", {})
    rule = tp.get("cam_select")
    stat = run.get("train", {}).get(f"cam_{rule}")
    if rule not in ("area", "agreement") or tp.get("preset") == "fully_supervised" or not stat:
        return None
    import torch  # only for runs that select their heads: the report itself needs no torch

    from seco_cli.memory import CamHeads

    names = list(stat["aux"])
    on_tiles = run["train"].get("cam_tiles") or {}
    recorded = all(n in on_tiles for n in names)
    heads = CamHeads(len(names), rule, tp["cam_select_min_agreement"],
                     "none" if recorded else tp.get("cam_select_fallback", "none"))
    heads.stat.copy_(torch.tensor([[stat[h][n] for n in names] for h in CamHeads.HEADS]))
    heads.seen.fill_(1)  # every logged class was seen
    # the trainer's tie-break at the end of training: the schedule's head then
    found = heads.names(tp["iterations"] <= tp["cam2mask"])
    if recorded:
        found = [CamHeads.TILES if on_tiles[n] else src for n, src in zip(names, found, strict=True)]
    return dict(zip(names, found, strict=True))


def source_table(runs: Sequence[dict[str, Any]]) -> str | None:
    """Per preset and class, in how many runs the online CAM came from each source (A aux,
    F final, T tiles; :func:`cam_sources`), and for the tiles, where the runs logged it
    (``cam_since``, the trainer's own record), the iteration from which each run's class took
    them, and how many times it switched source in training (``cam_switches``, where logged:
    ``× 1`` for a single switch; a statistic wavering around the floor switches often); None
    when no run selects its CAM heads."""
    counts: dict[str, dict[str, Counter]] = {}
    since: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
    for run in runs:
        found = cam_sources(run)
        if found:
            per = counts.setdefault(run["preset"], {})
            logged = (run.get("train") or {}).get("cam_since") or {}
            switches = (run.get("train") or {}).get("cam_switches") or {}
            for name, src in found.items():
                per.setdefault(name, Counter())[src] += 1
                if src == "tiles" and logged.get(name) is not None:
                    n = switches.get(name)
                    since.setdefault((run["preset"], name), []).append(
                        (int(logged[name]), None if n is None else int(n)))
    if not counts:
        return None

    def cell(p: str, n: str) -> str:
        if n not in counts[p]:
            return "—"
        text = " ".join(f"{src[0].upper()}{counts[p][n][src]}"
                        for src in ("aux", "final", "tiles") if counts[p][n][src])
        at = since.get((p, n))
        if not at:
            return text
        return f"{text} (from {', '.join(str(i) if k is None else f'{i} × {k}' for i, k in sorted(at))})"

    names = list(dict.fromkeys(n for per in counts.values() for n in per))
    return md_table(["preset", *names], [[p] + [cell(p, n) for n in names]
                                         for p in _presets(counts)])


def found_table(agg: dict[str, dict[str, Stat]], pairs: Sequence[str]) -> str:
    """In how many runs (seeds) each coupled victim reaches IoU ≥ FOUND_IOU, per source: the
    outcome is often all-or-nothing (a class fused with its partner scores ≈ 0), which a mean
    over few seeds hides."""
    headers = ["preset"] + [f"{q} ({SOURCES[src]})" for q in pairs for src in PAIR_SOURCES]
    rows = []
    for p in _presets(agg):
        cells = []
        for q in pairs:
            for src in PAIR_SOURCES:
                mean, _, n = agg[p].get(f"pair.{q}.{src}.found", (None, None, 0))
                cells.append(None if mean is None else f"{round(mean * n)}/{n}")
        rows.append([p, *cells])
    return md_table(headers, rows)


def render(runs: Sequence[dict[str, Any]], header: str = "") -> str:
    """The whole markdown report of the stored runs."""
    if not runs:
        return header + "\nNo finished run yet.\n"
    agg, pairs = aggregate(runs), pair_names(runs)
    goals = goal_checks(agg, pairs, runs)
    parts = [header,
             "\n## mIoU (paper Tables 2 and 5; points, mean ± sample std over seeds)\n\n",
             miou_table(agg)]
    per_seed = seed_table(runs, pairs)
    if per_seed:
        parts += ["\n## Per seed: CAM / pseudo / seg MS+CRF mIoU (points)\n\n", per_seed]
    parts += ["\n## Precision, recall (points) and FP/TP (false ÷ true positive pixels)\n\n",
              precision_table(agg)]
    for src in PAIR_SOURCES:
        parts += [f"\n## Co-occurring pairs, {SOURCES[src]} (paper Table 3)\n\n",
                  pair_table(agg, pairs, src)]
    if pairs:
        parts += [f"\n## Runs in which each coupled class is segmented (IoU ≥ {FOUND_IOU:.1f})"
                  "\n\n", found_table(agg, pairs)]
    probe = probe_table(agg, pairs)
    if probe:
        parts += ["\n## Isolated-patch probe: the victim's logit on tiles classified alone "
                  "(object tiles against partner tiles)\n\n", probe]
    for src in CLASS_SOURCES:
        per_class = class_table(runs, src)
        if per_class:
            parts += [f"\n## IoU per class, {SOURCES[src]} (points, each run)\n\n", per_class]
    room = headroom_table(runs, pairs)
    if room:
        parts += ["\n## Headroom: the gap to fully supervised, and co-occurrence's share of "
                  f"it ({SOURCES[SEG]}, points, per-class means over seeds)\n\n", room]
    parts += ["\n## Training statistics, last logged window (the analysis' evidence)\n\n",
              training_table(agg)]
    sources = source_table(runs)
    if sources:
        parts += ["\n## Online CAM source per class at the end of training (runs: A aux head, "
                  "F final head, T tile map; from: the iteration each run's class took the "
                  "tiles, where logged; × n: the times it switched source in training)\n\n",
                  sources]
    parts += ["\n## Goals (means over seeds)\n\n",
              md_table(["goal", "measured", "status"],
                       [[g["goal"], g["measured"], g["status"]] for g in goals])]
    return "".join(parts)
