"""The benchmark scripts' own arithmetic (the scripts themselves are run by hand)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import rectify_calibration as rc  # noqa: E402


def test_report_precision_and_recall_of_firing():
    # 4 eligible patches, tags vs ground truth: two noisy; fractions 0.95, 0.2 noisy / 0.9, 0.1 clean
    rows = {"tag": np.array([1, 1, 2, 2]), "gt": np.array([0, 1, 0, 2]),
            "key": np.array([0.95, 0.9, 0.2, 0.1]), "query": np.array([0.95, 0.9, 0.2, 0.1])}
    r = rc.report(rows)
    assert r["noisy_rate"] == pytest.approx(0.5)
    b = r["views"]["key"]["beta"][0.8]  # fires on 0.95 (noisy) and 0.9 (clean)
    assert b["fire_rate"] == pytest.approx(0.5)
    assert b["precision"] == pytest.approx(0.5)
    assert b["recall"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- quality / speed
import benchlib  # noqa: E402
import quality  # noqa: E402
import quality_report as qr  # noqa: E402


def _run(preset: str, seed: int, seg: float, ctx_fp: float = 1.0, obj_fp: float = 0.5,
         cams: float = 0.5) -> dict:
    """A stored run as bench/quality.py records it (evaluate.json under ``metrics``)."""
    head = {"precision": 0.6, "recall": 0.5, "fp_tp": 0.4}
    pair = {"cams": {"iou": 0.2, "fp_tp": ctx_fp, "fp_share_on_partner": 0.9},
            "segment_ms_crf": {"iou": 0.3, "fp_tp": 2 * ctx_fp, "fp_share_on_partner": 0.8}}
    obj = {"cams": {"iou": 0.6, "fp_tp": obj_fp, "fp_share_on_partner": None},
           "segment_ms_crf": {"iou": 0.7, "fp_tp": None, "fp_share_on_partner": None}}
    metrics = {"cams": {"miou": cams, "best_miou": cams + 0.01, **head},
               "pseudo": {"miou": cams + 0.02, **head}, "segment_raw": {"miou": seg - 0.01, **head},
               "segment_ms_crf": {"miou": seg, **head},
               "pairs": {"boat/background": pair, "horse/person": obj}}
    return {"preset": preset, "seed": seed, "metrics": metrics}


def test_mean_spread_skips_missing_values_and_uses_sample_std():
    assert qr.mean_spread([0.5, None, float("nan"), 0.7]) == pytest.approx((0.6, 0.1414213, 2))
    assert qr.mean_spread([0.42]) == (0.42, None, 1)
    assert qr.mean_spread([None]) == (None, None, 0)
    assert qr.fmt((0.572, 0.013, 3)) == "57.2 ± 1.3"
    assert qr.fmt((0.572, None, 1)) == "57.2"
    assert qr.fmt((1.234, 0.5, 2), 1.0, 2) == "1.23 ± 0.50"
    assert qr.fmt((None, None, 0)) is None


def test_aggregate_groups_seeds_and_averages_pairs():
    runs = [_run("baseline", 0, 0.40, ctx_fp=2.0), _run("baseline", 1, 0.44, ctx_fp=4.0),
            _run("seco", 0, 0.50, ctx_fp=1.0)]
    agg = qr.aggregate(runs)
    assert set(agg) == {"baseline", "seco"}
    mean, spread, n = agg["baseline"]["segment_ms_crf.miou"]
    assert (mean, n) == (pytest.approx(0.42), 2) and spread == pytest.approx(0.0282843, rel=1e-4)
    assert agg["baseline"]["context_fp_tp.cams"][0] == pytest.approx(3.0)  # boat/background only
    # coupled = both pairs; the horse/person seg FP/TP is None and is skipped
    assert agg["seco"]["coupled_fp_tp.cams"][0] == pytest.approx(0.75)
    assert agg["seco"]["coupled_fp_tp.segment_ms_crf"][0] == pytest.approx(2.0)
    assert qr.context_pairs(qr.pair_names(runs)) == ["boat/background"]


def _goals(runs: list[dict]) -> dict[str, str]:
    agg = qr.aggregate(runs)
    return {g["goal"]: g["status"] for g in qr.goal_checks(agg, qr.pair_names(runs))}


def test_goal_checks_met():
    runs = [_run("baseline", 0, 0.40, ctx_fp=10.0), _run("seco", 0, 0.50, ctx_fp=5.0),
            _run("fully_supervised", 0, 0.54), _run("no_lig", 0, 0.45),
            _run("no_lil", 0, 0.46), _run("no_rectify", 0, 0.49)]
    status = _goals(runs)
    assert len(status) == 7 and set(status.values()) == {"met"}, status


def test_goal_checks_not_met_and_not_measured():
    runs = [_run("baseline", 0, 0.48, ctx_fp=10.0), _run("seco", 0, 0.50, ctx_fp=7.0),
            _run("no_lig", 0, 0.50)]
    status = list(_goals(runs).values())
    # FP/TP 7 > 0.6 × 10 (cams and seg); +2 points < +5; no fully supervised run;
    # no_lig equal to SeCo is not below it; no_lil and no_rectify were not run
    assert status == ["not met", "not met", "not met", "not measured", "not met",
                      "not measured", "not measured"]


def test_fp_tp_goal_is_per_pair_and_counts_the_seeds_where_it_holds():
    # two context pairs: train improves in both seeds, boat is lost by both presets (FP/TP ≈
    # 100); a mean over the pairs would call the train's gain "not met"
    runs = []
    for seed, (b_train, s_train, b_boat, s_boat) in enumerate([(0.4, 0.2, 100.0, 150.0),
                                                                (0.3, 0.25, 120.0, 90.0)]):
        for preset, train_fp, boat_fp in (("baseline", b_train, b_boat),
                                          ("seco", s_train, s_boat)):
            run = _run(preset, seed, 0.5 + 0.06 * (preset == "seco") * (seed == 0),
                       ctx_fp=boat_fp)
            run["metrics"]["pairs"]["train/background"] = {
                "cams": {"iou": 0.7, "fp_tp": train_fp},
                "segment_ms_crf": {"iou": 0.8, "fp_tp": train_fp}}
            runs.append(run)
    goals = {g["goal"]: g for g in qr.goal_checks(qr.aggregate(runs), qr.pair_names(runs),
                                                   runs)}
    train = goals["FP/TP of train (coupled with background), CAM seeds: "
                  "SeCo ≤ 0.6 × baseline"]
    # means 0.225 against 0.6 × 0.35 = 0.21: not met; seed 0 holds (0.2 ≤ 0.24), seed 1 not
    assert train["status"] == "not met"
    assert train["measured"] == "SeCo 0.23, 0.6 × baseline 0.21; holds in 1 of 2 seeds"
    boat = goals["FP/TP of boat (coupled with background), seg MS+CRF: "
                 "SeCo ≤ 0.6 × baseline"]
    assert boat["status"] == "not met" and boat["measured"].endswith("holds in 0 of 2 seeds")
    seg = goals["segmentation mIoU (MS+CRF): SeCo ≥ baseline + 5"]
    assert seg["measured"] == "SeCo 53.0, baseline 50.0; holds in 1 of 2 seeds"
    assert not any(g.startswith("mean FP/TP") for g in goals)  # no pooled row
    # without a context pair every pair counts, one row per victim class (its pairs named)
    coupled = [g["goal"] for g in qr.goal_checks(qr.aggregate(runs), ["horse/person",
                                                                      "horse/car", "car/horse"])]
    assert coupled[0] == "FP/TP of horse (coupled with person, car), CAM seeds: SeCo ≤ 0.6 × " \
        "baseline"
    assert coupled[2].startswith("FP/TP of car (coupled with horse), CAM seeds")
    # without the runs (or a preset's seed), no seed count is claimed
    plain = qr.goal_checks(qr.aggregate(runs), qr.pair_names(runs))
    assert not any("holds in" in g["measured"] for g in plain)
    assert qr.seeds_holding(qr.seed_flats(runs[:3], qr.pair_names(runs)), "seco", "baseline",
                            "segment_ms_crf.miou", lambda a, b: a >= b) == (1, 1)


def test_quality_markdown_has_every_table_and_preset_in_order():
    runs = [_run("seco", 0, 0.5), _run("baseline", 0, 0.4), _run("baseline", 1, 0.42)]
    text = qr.render(runs, "# header\n")
    assert text.startswith("# header\n")
    for title in ("## mIoU", "## Precision", "## Co-occurring pairs, CAM seeds",
                  "## Co-occurring pairs, seg MS+CRF", "## Goals"):
        assert title in text
    table = text.split("## mIoU")[1].split("##")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[1].startswith("| baseline | 2 | 50.0 ± 0.0 |")  # presets in paper order
    assert lines[2].startswith("| seco | 1 | 50.0 | 51.0 | 52.0 | 49.0 | 50.0 |")
    assert "| boat/background IoU / FP-TP |" in text and "20.0 / 1.00" in text
    assert qr.render([], "# h\n").endswith("No finished run yet.\n")


def _with_classes(run: dict, ious: dict) -> dict:
    run["classes"] = {qr.SEG: ious}
    return run


def test_headroom_splits_the_gap_to_fully_supervised_into_all_classes_and_co_occurrence():
    # pairs boat/background and horse/person: coupled boat, horse, person; uncoupled car
    names = ["background", "boat", "horse", "person", "car"]
    full = [_with_classes(_run("fully_supervised", s, 0.9), dict.fromkeys(names, 0.9))
            for s in (0, 1)]
    base = [_with_classes(_run("baseline", 0, 0.5), {"background": 0.88, "boat": 0.65,
                                                    "horse": 0.85, "person": 0.7, "car": 0.8}),
            _with_classes(_run("baseline", 1, 0.5), {"background": 0.88, "boat": 0.55,
                                                    "horse": 0.85, "person": 0.7, "car": 0.8})]
    no_classes = _run("seco", 0, 0.5)  # stored before per-class IoU: left out
    runs = [*full, *base, no_classes]
    room = qr.headroom(runs, qr.pair_names(runs))
    assert list(room) == ["baseline"]
    b = room["baseline"]
    # gaps: background .02, boat .30 (mean of .25, .35), horse .05, person .20, car .10
    assert b["floor"] == pytest.approx(0.10)
    assert b["excess"] == pytest.approx({"boat": 0.20, "horse": 0.0, "person": 0.10})
    assert b["bound"] == pytest.approx(0.30 / 5) and b["gap"] == pytest.approx(0.134)
    assert b["runs"] == 2
    text = qr.render(runs, "")
    table = text.split("## Headroom")[1].split("\n## ")[0]
    assert "| baseline | 2 | 13.4 | 10.0 | 20.0 | 0.0 | 10.0 | 6.0 |" in table
    # without fully supervised runs, or without an uncoupled class: no table
    assert qr.headroom(base, qr.pair_names(runs)) is None and "## Headroom" not in qr.render(base)
    only = [_with_classes(r, {k: v for k, v in r["classes"][qr.SEG].items() if k != "car"})
            for r in [*full, *base]]
    assert qr.headroom(only, qr.pair_names(only)) is None


def test_per_seed_table_shows_each_runs_miou_and_only_with_several_seeds():
    runs = [_run("seco", 0, 0.5, cams=0.3), _run("baseline", 0, 0.4), _run("baseline", 1, 0.42)]
    table = qr.render(runs, "").split("## Per seed")[1].split("\n## ")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| preset | seed 0 | seed 1 |"
    assert lines[1] == "| baseline | 50.0 / 52.0 / 40.0 | 50.0 / 52.0 / 42.0 |"
    assert lines[2] == "| seco | 30.0 / 32.0 / 50.0 | — |"  # no seed-1 run
    assert "## Per seed" not in qr.render([_run("seco", 0, 0.5), _run("baseline", 0, 0.4)], "")


def test_miou_table_adds_the_auxiliary_head_column_only_when_scored():
    plain = qr.render([_run("seco", 0, 0.5)], "")
    assert "aux-head CAM" not in plain
    run = _run("seco", 0, 0.5)
    run["metrics"]["cams_aux"] = {"miou": 0.3, "best_miou": 0.35}
    table = qr.render([run], "").split("## mIoU")[1].split("##")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert "aux-head CAM mIoU (best bkg)" in lines[0]
    assert lines[1].startswith("| seco | 1 | 50.0 | 51.0 | 35.0 | 52.0 | 49.0 | 50.0 |")


def test_training_table_shows_the_logged_statistics_and_dashes_for_absent_terms():
    seco = _run("seco", 0, 0.5)
    seco["train"] = {"sec_per_iter": 0.5, "loss": {"ptc": 0.09, "lil": 7.0},
                     "seco": {"tag_background": 0.25, "rectified_fraction": 0.05,
                              "mu_mean": 0.95},
                     "proto": {"horse~person": 0.8, "person~horse": 0.8,
                               "mean_off_diagonal": 0.1}}
    base = _run("baseline", 0, 0.4)
    base["train"] = {"sec_per_iter": 0.3, "loss": {}}
    text = qr.render([seco, base], "")
    table = text.split("## Training statistics")[1].split("##")[0]
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert rows["seco"] == ("| seco | 25.0 | — | — | 5.0 | — | 0.950 | 0.090 | — | 7.000 | 0.500 "
                            "| 0.800 | 0.100 |")
    assert rows["baseline"] == "| baseline | — | — | — | — | — | — | — | — | — | 0.300 | — | — |"
    assert "| prototype sim. horse/person | prototype sim. mean (off-diagonal) |" in table
    assert "CAM tags" not in table  # the patch_tags: alone column only where it was logged
    seco["train"]["seco"]["tag_cam_agree"] = 0.4
    table = qr.render([seco, base], "").split("## Training statistics")[1].split("##")[0]
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert "| s/iteration | tags = CAM tags % (patch_tags: alone) |" in table
    assert rows["seco"].endswith("| 0.500 | 40.0 | 0.800 | 0.100 |")
    assert rows["baseline"].endswith("| 0.300 | — | — | — |")


def test_source_table_counts_each_classes_cam_source_by_the_heads_rule():
    """The agreement rule on the last logged EMA: the higher head, the tile map under the
    floor, the schedule's head on a tie; area: the smaller head; no table under the schedule
    or for the fully supervised preset (no online CAM)."""
    def run(preset, seed, rule, aux, final, **train):
        r = _run(preset, seed, 0.5)
        r["params"] = {"train": {"preset": preset, "cam_select": rule, "iterations": 750,
                                 "cam2mask": 750, "cam_select_fallback": "tiles",
                                 "cam_select_min_agreement": 0.3, **train}}
        r["train"] = {f"cam_{rule}": {"aux": dict(zip("bp", aux, strict=True)),
                                      "final": dict(zip("bp", final, strict=True))}}
        return r

    runs = [run("seco", 0, "agreement", (0.5, 0.1), (0.4, 0.2)),  # b aux, p tiles
            run("seco", 1, "agreement", (0.4, 0.4), (0.5, 0.4)),  # b final, p tie → aux
            run("baseline", 0, "agreement", (0.4, 0.4), (0.5, 0.4), cam2mask=100),  # tie → final
            run("no_lig", 0, "area", (0.2, 0.1), (0.3, 0.05)),  # smaller wins: b aux, p final
            run("fully_supervised", 0, "agreement", (0.0, 0.0), (0.0, 0.0))]
    assert qr.cam_sources(runs[0]) == {"b": "aux", "p": "tiles"}
    assert qr.cam_sources(runs[1]) == {"b": "final", "p": "aux"}
    assert qr.cam_sources(runs[2]) == {"b": "final", "p": "final"}
    assert qr.cam_sources(runs[3]) == {"b": "aux", "p": "final"}
    assert qr.cam_sources(runs[4]) is None
    table = qr.render(runs, "").split("## Online CAM source")[1].split("\n## ")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| preset | b | p |"
    assert lines[1:] == ["| baseline | F1 | F1 |", "| no_lig | A1 | F1 |",
                         "| seco | A1 F1 | A1 T1 |"]
    assert "## Online CAM source" not in qr.render([_run("seco", 0, 0.5)], "")
    # the trainer's record of when a class took the tiles, shown for the tiles only
    runs[0]["train"]["cam_since"] = {"b": 0, "p": 410}
    runs[1]["train"]["cam_since"] = {"b": 120, "p": 0}
    runs.append(run("seco", 2, "agreement", (0.5, 0.2), (0.4, 0.1)))
    runs[-1]["train"]["cam_since"] = {"b": 0, "p": 265}
    table = qr.render(runs, "").split("## Online CAM source")[1].split("\n## ")[0]
    assert "| seco | A2 F1 | A1 T2 (from 265, 410) |" in table.splitlines()
    # how often it switched, where logged; whether it ended on the tiles is the trainer's
    # record where logged (a class held on them by the hysteresis reads above the floor)
    runs[-1]["train"]["cam_switches"] = {"b": 0, "p": 7}
    runs[0]["train"]["cam_switches"] = {"b": 0, "p": 1}
    table = qr.render(runs, "").split("## Online CAM source")[1].split("\n## ")[0]
    assert "| seco | A2 F1 | A1 T2 (from 265 × 7, 410 × 1) |" in table.splitlines()
    assert "× n: the times it switched" in qr.render(runs, "")
    held = run("seco", 3, "agreement", (0.5, 0.2), (0.4, 0.35))  # p: 0.35 above the floor
    assert qr.cam_sources(held) == {"b": "aux", "p": "final"}
    held["train"]["cam_tiles"] = {"b": 0, "p": 1}
    assert qr.cam_sources(held) == {"b": "aux", "p": "tiles"}
    runs[0]["train"]["cam_tiles"] = {"b": 0, "p": 0}  # the record overrides the rule
    assert qr.cam_sources(runs[0]) == {"b": "aux", "p": "final"}


def test_ablation_goal_says_when_the_difference_is_within_the_seed_spread():
    runs = [_run("seco", 0, 0.50), _run("seco", 1, 0.54), _run("no_lig", 0, 0.49),
            _run("no_lig", 1, 0.51), _run("no_lil", 0, 0.30), _run("no_lil", 1, 0.32)]
    measured = {g["goal"]: g["measured"] for g in qr.goal_checks(qr.aggregate(runs), [])}
    assert measured["segmentation mIoU (MS+CRF): no_lig < SeCo"] == (
        "no_lig 50.0 ± 1.4, SeCo 52.0 ± 2.8; difference +2.0 is within the seeds' spread")
    assert measured["segmentation mIoU (MS+CRF): no_lil < SeCo"].endswith("; difference +21.0")
    status = {g["goal"]: g["status"] for g in qr.goal_checks(qr.aggregate(runs), [])}
    # ordered by the means, but by less than the seeds scatter: not claimed either way
    assert status["segmentation mIoU (MS+CRF): no_lig < SeCo"] == qr.NOT_SHOWN
    assert status["segmentation mIoU (MS+CRF): no_lil < SeCo"] == "met"
    # above SeCo within the spread is still not met, not "not shown"
    runs[2] = _run("no_lig", 0, 0.53)
    status = {g["goal"]: g["status"] for g in qr.goal_checks(qr.aggregate(runs), [])}
    assert status["segmentation mIoU (MS+CRF): no_lig < SeCo"] == "not met"


def test_found_table_counts_the_runs_where_the_victim_is_segmented():
    a, b, c = _run("seco", 0, 0.5), _run("seco", 1, 0.5), _run("seco", 2, 0.5)
    for run, iou in ((a, 0.7), (b, 0.01), (c, 0.5)):  # fused with its partner in seed 1
        run["metrics"]["pairs"]["boat/background"]["cams"]["iou"] = iou
    text = qr.render([a, b, c], "")
    table = text.split("## Runs in which")[1].split("##")[0]
    assert "| preset | boat/background (CAM seeds) | boat/background (seg MS+CRF) |" in table
    # boat cams 2 of 3 (0.5 counts); boat seg IoU 0.3 → 0 of 3; horse/person 0.6, 0.7 → 3 of 3
    assert "| seco | 2/3 | 0/3 | 3/3 | 3/3 |" in table


def test_probe_table_only_when_a_run_has_the_probe():
    assert "Isolated-patch probe" not in qr.render([_run("seco", 0, 0.5)], "")
    runs = [_run("baseline", 0, 0.4), _run("seco", 0, 0.5), _run("seco", 1, 0.5)]
    for run, a in zip(runs, (0.3, 0.8, 0.9), strict=True):
        run["metrics"]["probe"] = {"pairs": {"boat/background": {
            "object_tiles": 5, "partner_tiles": 9,
            "final": {"auc": a, "partner_fire": 1 - a, "object_fire": 0.9, "logit_gap": 1.0},
            "aux": {"auc": None, "partner_fire": None, "object_fire": 0.1,
                    "logit_gap": None}}}}
    text = qr.render(runs, "")
    table = text.split("## Isolated-patch probe")[1].split("##")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    # the aux head has no AUC in any run: no column; horse/person has no probe entry
    assert lines[0] == "| preset | boat/background final: AUC / partner fires % |"
    assert lines[1] == "| baseline | 0.30 / 70.0 |"
    assert lines[2] == "| seco | 0.85 ± 0.07 / 15.0 ± 7.1 |"


def test_params_hash_leaves_out_a_param_added_later_at_its_neutral_value():
    """A param that did not exist when runs were stored hashes like its absence at the value
    that reproduces the code before it, so those runs still match; any other value counts."""
    from conftest import ROOT

    from seco_cli.params import load_params

    neutral = [f"{section}.{key}={value}"
               for (section, key), value in quality.NEUTRAL_PARAMS.items()]
    assert len(neutral) >= 2
    plain = load_params(ROOT / "params.yaml", neutral)
    before = plain.dump()
    for section, key in quality.NEUTRAL_PARAMS:
        before[section].pop(key)  # what the dump held before the params existed
    h = quality.params_hash(plain)
    assert h == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    for (section, key), value in quality.NEUTRAL_PARAMS.items():
        other = "both" if value == "sharpened" else value + 1  # any other valid value
        assert quality.params_hash(load_params(ROOT / "params.yaml",
                                               [*neutral, f"{section}.{key}={other}"])) != h
    assert quality.params_hash(load_params(ROOT / "params.yaml", ["train.seed=5"])) != h


def test_md_table_and_goal_status():
    assert benchlib.md_table(["a", "b"], [[1, None], ["x|y", "z"]]) == (
        "| a | b |\n|---|---|\n| 1 | — |\n| x\\|y | z |\n")
    assert benchlib.goal_status(1.4, "<=", 1.5) == "met"
    assert benchlib.goal_status(1.6, "<=", 1.5) == "not met"
    assert benchlib.goal_status(0.8, ">=", 0.8) == "met"
    assert benchlib.goal_status(0.5, "<", 0.5) == "not met"
    assert benchlib.goal_status(None, ">=", 0.8) == "not measured"
    assert benchlib.goal_status(float("nan"), ">=", 0.8) == "not measured"


def _spec(preset: str, seed: int, h: str = "abc123def456") -> quality.RunSpec:
    return quality.RunSpec("synthetic", "bench", preset, seed, (f"train.preset={preset}",), h)


def test_remaining_skips_stored_runs_by_dataset_preset_seed_and_params_hash():
    specs = [_spec("baseline", 0), _spec("seco", 0), _spec("baseline", 1)]
    stored = {"runs": {specs[0].key: {}, _spec("seco", 0, "000000000000").key: {}}}
    # seco s0 is stored under other params: it still has to run
    assert quality.remaining(specs, stored) == specs[1:]
    assert quality.remaining(specs, {}) == specs
    assert specs[0].key == "synthetic/bench/baseline/s0/abc123def456"
    assert specs[0].name == "q-synthetic-bench-baseline-s0-abc123de"


def test_plan_hashes_the_resolved_params():
    a = quality.plan(benchlib.ROOT, "synthetic", "default", ["baseline", "seco"], [0, 1], [],
                     ["train.seed"])
    assert [(s.preset, s.seed) for s in a] == [("baseline", 0), ("seco", 0), ("baseline", 1),
                                              ("seco", 1)]
    assert len({s.params_hash for s in a}) == 4
    again = quality.plan(benchlib.ROOT, "synthetic", "default", ["baseline"], [0], [],
                         ["train.seed"])
    assert again[0].key == a[0].key  # the same params → the same key (resume)
    other = quality.plan(benchlib.ROOT, "synthetic", "default", ["baseline"], [0],
                         ["train.iterations=10"], ["train.seed"])
    assert other[0].params_hash != a[0].params_hash


def test_report_only_header_names_the_run_command_machine_dates_and_render(tmp_path,
                                                                          monkeypatch, capsys):
    specs = quality.plan(benchlib.ROOT, "synthetic", "default", ["baseline", "seco"], [0], [],
                         ["train.seed"])
    results: dict = {"version": 1, "runs": {}}
    quality.record(results, specs[0], {"metrics": _run("baseline", 0, 0.4)["metrics"]}, 60.0,
                   benchlib.ROOT)
    stored = results["runs"][specs[0].key]
    assert "cores" in stored["machine"] and stored["recorded"]
    path = tmp_path / "q.json"
    benchlib.write_json(path, results)
    argv = ["--presets", "baseline,seco", "--seeds", "0", "--results", str(path),
            "--report-only"]
    monkeypatch.setattr(sys, "argv", ["bench/quality.py", *argv])
    assert quality.main(argv) == 0
    text = path.with_suffix(".md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    head = dict(line[2:].split(": ", 1) for line in text.split("\n\n")[1].splitlines())
    # the command that makes the runs, not the re-rendering one
    assert head["command"] == (f"`{Path(sys.executable).name} bench/quality.py --presets "
                               f"baseline,seco --seeds 0 --results {path}`")
    assert head["runs"].startswith("1 of 2 planned")
    assert head["machine(s) of the runs"] == stored["machine"]
    assert head["dates of the runs"] == f"{stored['recorded']} to {stored['recorded']}"
    assert head["tables rendered"].endswith("(`--report-only`)")


def test_bench_profile_scales_every_start_of_the_schedule():
    from seco_cli.params import load_params

    p = load_params(benchlib.ROOT / "params.yaml", ["train.iterations=1000",
                                                    "train.seg_start=500", "train.ckpt_every=1",
                                                    "train.cam_select_hold_start=600",
                                                    "train.cam_select_start=500"])
    over = dict(o.split("=") for o in quality.scaled_schedule(p, 0.5))
    assert over["train.iterations"] == "500" and over["train.seg_start"] == "250"
    assert over["train.cam_select_hold_start"] == "300"
    assert over["train.cam_select_start"] == "250"
    assert over["train.ckpt_every"] == "1"  # never 0
    assert set(over) == {"train.iterations", *(f"train.{k}" for k in quality.SCHEDULE_KEYS)}


def test_coco128_bench_uses_the_spec_schedule_for_the_pretrained_backbone(tmp_path):
    from seco_cli.params import load_params

    over = quality.base_overrides(benchlib.ROOT, "coco128", "bench", [], tmp_path / "coco",
                                  tmp_path / "w.pth")
    p = load_params(benchlib.ROOT / "params.yaml", over)  # validates every override
    default = load_params(benchlib.ROOT / "params.yaml")
    assert p.train.iterations == round(default.train.iterations * quality.BENCH["coco128"][0])
    assert p.train.cam2mask == p.train.iterations // 2  # final CAM for the second half
    assert p.train.ptc_start == 0 and p.pseudo.bkg == p.evaluate.cam_bkg == 0.45
    assert p.cams.aux and p.model.backbone == "tf_efficientnet_lite0"
    assert p.train.cam_select == "schedule"
    user = quality.base_overrides(benchlib.ROOT, "coco128", "bench", ["train.cam2mask=7"],
                                  tmp_path / "coco", tmp_path / "w.pth")
    assert load_params(benchlib.ROOT / "params.yaml", user).train.cam2mask == 7  # --set wins


def test_find_experiment_reads_dvc_exp_show_json():
    evaluate = {"cams": {"miou": 0.5}}
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "abc", "experiments": [
                {"revs": [{"rev": "e1", "name": "q-a", "error": None, "data": {
                    "timestamp": "t", "metrics": {quality.METRICS: {"data": evaluate},
                                                  quality.LIVE: {"data": {"step": 6}}}}}]},
                {"revs": [{"rev": "e2", "name": "q-failed", "error": {"msg": "x"},
                           "data": {"metrics": {}}}]}]}]
    found = quality.find_experiment(show, "q-a")
    assert found == {"exp_rev": "e1", "exp_time": "t", "metrics": evaluate,
                     "train": {"step": 6}, "params_ran": None}
    assert quality.find_experiment(show, "q-failed") is None
    assert quality.find_experiment(show, "q-missing") is None


def test_find_experiment_passes_over_a_killed_attempt_of_the_same_name():
    # a killed ``dvc exp run --temp`` stays listed as running, without metrics, before the
    # attempt that later finished under the same name (DVC 3's ``exp show --json``)
    evaluate = {"cams": {"miou": 0.5}}
    killed = {"executor": {"state": "running", "name": "tempdir", "local": None}, "name": "q-a",
              "revs": [{"rev": "stash", "name": "q-a", "error": None, "data": {
                  "rev": "workspace", "metrics": {quality.METRICS: {"error": {"msg": "none"}}}}}]}
    failed = {"executor": {"state": "failed"}, "name": "q-a",
              "revs": [{"rev": "f", "name": "q-a", "error": None, "data": {
                  "metrics": {quality.METRICS: {"data": {"cams": {"miou": 0.1}}}}}}]}
    done = {"executor": None, "name": "q-a",
            "revs": [{"rev": "e1", "name": "q-a", "error": None, "data": {
                "timestamp": "t", "metrics": {quality.METRICS: {"data": evaluate}}}}]}
    show = [{"rev": "abc", "experiments": [killed, failed, done]}]
    assert quality.find_experiment(show, "q-a")["exp_rev"] == "e1"
    assert quality.find_experiment([{"rev": "abc", "experiments": [killed, failed]}],
                                   "q-a") is None


def _sleepy_dvc_repo(tmp_path: Path):
    """A git + DVC repository whose one stage writes its pid to ``started`` (outside the
    repository), sleeps ``x`` seconds (params.yaml), then writes the bench's metrics file;
    returns (repo, started, sh)."""
    import subprocess

    import yaml

    repo = tmp_path / "repo"
    repo.mkdir()

    def sh(*cmd):
        return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    started = tmp_path / "started"
    code = (f"import json, os, time, yaml; open({str(started)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(yaml.safe_load(open('params.yaml'))['x']); "
            "os.makedirs('artifacts/metrics', exist_ok=True); "
            "json.dump({'cams': {'miou': 0.5}}, open(" + repr(quality.METRICS) + ", 'w'))")
    (repo / "params.yaml").write_text("x: 0\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": f"{sys.executable} -c \"{code}\"", "params": ["x"],
        "metrics": [{quality.METRICS: {"cache": False}}]}}}))
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    return repo, started, sh


def _stage_pid(started: Path, proc) -> int:
    import time

    for _ in range(600):
        if started.exists() and started.read_text():
            return int(started.read_text())
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the experiment's stage did not start")


def _wait_until(cond, seconds: float = 10.0) -> bool:
    import time

    for _ in range(int(seconds / 0.05)):
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _temp_copies(repo: Path) -> list[Path]:
    standalone = repo / ".dvc" / "tmp" / "exps" / "standalone"
    return [p for p in standalone.iterdir() if p.name.startswith("tmp")]


def test_a_killed_experiment_is_cleared_and_its_name_runs_again(tmp_path, capsys):
    """On a real DVC repository: kill ``dvc exp run --temp`` mid-stage, then resume: the
    leftover "running" entry and temporary copy are cleared only once no process works in
    the copy, and the rerun's metrics are found under the name."""
    import os
    import signal
    import subprocess

    repo, started, sh = _sleepy_dvc_repo(tmp_path)
    name = "q-synthetic-bench-seco-s1-abc"
    run = subprocess.Popen(["dvc", "exp", "run", "--temp", "-n", name, "-S", "x=120"], cwd=repo,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    stage_pid = _stage_pid(started, run)
    run.kill()  # dvc only: its stage command goes on in the temporary copy
    run.wait()
    copies = _temp_copies(repo)
    assert len(copies) == 1
    entries = [e for b in quality.exp_show(repo) for e in b.get("experiments") or []]
    assert [(e["name"], e["executor"]["state"]) for e in entries] == [(name, "running")]
    # still in use: left alone, with a note
    assert quality.clear_stale_attempts(repo, {name}) == []
    assert f"still has processes working in {copies[0]}" in capsys.readouterr().out
    assert copies[0].exists()
    os.kill(stage_pid, signal.SIGKILL)
    assert _wait_until(lambda: not quality.processes_in(copies[0]))
    assert quality.clear_stale_attempts(repo, {"another-name"}) == []  # not ours: kept
    assert quality.clear_stale_attempts(repo, {name}) == [name]
    assert not _temp_copies(repo) and not list(repo.glob(".dvc/tmp/exps/standalone/run/*"))
    assert not [e for b in quality.exp_show(repo) for e in b.get("experiments") or []]
    sh("dvc", "exp", "run", "--temp", "-n", name, "-S", "x=0")
    found = quality.find_experiment(quality.exp_show(repo), name)
    assert found is not None and found["metrics"] == {"cams": {"miou": 0.5}}
    assert found["params_ran"] == {"x": 0}


def test_a_bench_stopped_by_a_signal_stops_its_experiment(tmp_path):
    """``kill <bench>`` (SIGTERM) mid-experiment: the bench stops DVC and the stage command
    with it (their own process group), so nothing runs on behind it, and a resumed bench
    can clear the attempt."""
    import os
    import signal
    import subprocess

    repo, started, _ = _sleepy_dvc_repo(tmp_path)
    spec = quality.RunSpec("synthetic", "bench", "seco", 1, ("x=120",), "abc123")
    script = (f"import signal, sys; sys.path.insert(0, {str(benchlib.ROOT / 'bench')!r}); "
              "from pathlib import Path; import quality; "
              "signal.signal(signal.SIGTERM, quality._interrupt_on_sigterm); "
              f"quality.run_experiment(Path({str(repo)!r}), quality.{spec!r}, "
              f"Path({str(tmp_path / 'exp.log')!r}))")
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    stage_pid = _stage_pid(started, bench)
    bench.send_signal(signal.SIGTERM)
    _, err = bench.communicate(timeout=60)
    assert bench.returncode != 0 and "KeyboardInterrupt" in err

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert _wait_until(lambda: gone(stage_pid))
    (copy,) = _temp_copies(repo)
    assert _wait_until(lambda: quality.processes_in(copy) == [])
    assert quality.clear_stale_attempts(repo, {spec.name}) == [spec.name]
    assert not _temp_copies(repo)


def test_dvc_set_args_replace_mappings_like_seco_set():
    args = quality.dvc_set_args(["train.seed=1", "model.backbone_kwargs={}",
                                 "model.backbone_kwargs={img_size: 48}", "prepare.splits=[a, b]"])
    assert args == ["-S", "train.seed=1",
                    "-S", "~model.backbone_kwargs", "-S", "+model.backbone_kwargs={}",
                    "-S", "~model.backbone_kwargs", "-S", "+model.backbone_kwargs={img_size: 48}",
                    "-S", "prepare.splits=[a, b]"]


def test_stages_of_log_tells_run_from_cached():
    log = ("Stage 'prepare' is cached - skipping run, checking out outputs\n"
           "Running stage 'train':\n> seco train\nRunning stage 'cams':\n")
    assert quality.stages_of_log(log) == {"stages_run": ["train", "cams"],
                                          "stages_cached": ["prepare"]}


def test_speed_rows_format_ratio_and_goal():
    import speed

    r = speed.row("x", "y", "1 s", "2 s", 0.5, ">=", 0.8)
    assert (r.goal, r.status) == ("≥ 0.8", "not met")
    r = speed.row("x", "y", "0.4 s/it", value=0.4, op="<=", bound=0.5, goal="≤ 0.5 s/it")
    assert (r.goal, r.status, r.ratio) == ("≤ 0.5 s/it", "met", None)
    assert speed.row("x", "y", "3 GiB").status == "info"
    assert speed.ratio_text(0.0175) == "1/57 (0.0175)" and speed.ratio_text(1.456) == "1.46"
    assert speed.ratio_text(None) is None
    md = speed.render({"command": "c", "date": "d", "git_revision": "g", "machine": {
        "cpu": "cpu", "cores": 2, "usable_cores": 2, "torch_threads": 1, "omp_num_threads": "1",
        "memory_gib": 8, "gpu": None, "python": "3", "torch": "2", "platform": "p"}},
        [r, speed.Row("dvc", "repro", status="not measured: x")], {"dvc": 1.0})
    assert "| dvc | repro | — | — | — | — | not measured: x |" in md
    assert "- GPU: none" in md and "- part durations: dvc 1 s" in md


def test_speed_realistic_overrides_keep_the_profile_network():
    import speed

    from seco_cli.params import load_params

    base = load_params(benchlib.ROOT / "params.yaml")
    over = speed.synthetic_overrides(base, 320, 4, 2, speed.VOC_NAMES)
    p = load_params(benchlib.ROOT / "params.yaml", over)
    assert p.model.crop_size == 320 and p.prepare.synthetic.image_size == 320
    assert p.model.backbone_kwargs == {**base.model.backbone_kwargs, "img_size": 320}
    assert len(p.prepare.synthetic.classes) == 20 and p.model.pretrained is False


def test_check_params_refuses_an_experiment_that_ran_other_params():
    from seco_cli.params import load_params

    ran = load_params(benchlib.ROOT / "params.yaml", ["train.seed=3"])
    spec = _spec("seco", 3, quality.params_hash(ran))
    found = {"params_ran": ran.dump(), "metrics": {}}
    quality.check_params(found, spec)  # same params: accepted, kept validated as "params"
    assert "params_ran" not in found and found["params"] == ran.dump()
    with pytest.raises(RuntimeError, match="other params"):
        quality.check_params({"params_ran": ran.dump()}, _spec("seco", 3, "000000000000"))


def test_train_step_counts_each_presets_arithmetic(prepared, tmp_path):
    import torch
    import train_step
    from conftest import ROOT, TINY

    res = train_step.measure(ROOT / "params.yaml", TINY, ["baseline", "seco"], 0, 1, prepared)
    base, seco = res["baseline"]["flops"], res["seco"]["flops"]
    # SeCo adds the patch, second-view and teacher passes to the baseline's step
    assert 0 < base < seco
    # the count holds the backward pass: a step costs more than twice the network's forward
    trainers, batches, _, _ = train_step._setup(ROOT / "params.yaml", TINY, ["baseline"], 1,
                                                prepared, str(tmp_path))
    forward = train_step.FlopCounterMode(display=False)
    with forward, torch.no_grad():
        trainers["baseline"].method.net(batches[0]["image"])
    assert base > 2 * forward.get_total_flops()


def test_train_step_times_one_preset_under_two_settings_side_by_side(prepared):
    """`preset@key=value`: the same preset with overrides of its own, stepped alternately
    with the plain one; the agreement rule's tile forward shows in its arithmetic, and the
    speed bench's row divides the two."""
    import speed
    import train_step
    from conftest import ROOT, TINY

    assert train_step.variant("seco") == ("seco", [])
    assert train_step.variant("seco@train.cam_select=schedule@train.tau=0.2") == (
        "seco", ["train.cam_select=schedule", "train.tau=0.2"])
    names = ["seco", "seco@train.cam_select=schedule"]
    trainers, _, _, _ = train_step._setup(ROOT / "params.yaml", TINY, names, 1, prepared, "")
    assert [t.params.train.cam_select for t in trainers.values()] == ["agreement", "schedule"]
    assert all(t.params.train.preset == "seco" for t in trainers.values())
    res = train_step.measure(ROOT / "params.yaml", TINY, names, 0, 1, prepared)
    assert set(res) == set(names)
    assert res["seco"]["flops"] > res["seco@train.cam_select=schedule"]["flops"] > 0
    r = speed._select_row(res, names[1], "agreement", 1)
    assert r.ratio == res["seco"]["median_s"] / res[names[1]]["median_s"]
    assert "agreement ÷ schedule" in r.what and r.status == "info"
    # the cheaper agreement row divides means (one step in k is the dear one)
    every = speed.every_variant(4)
    assert train_step.variant(every) == ("seco", ["train.cam_select_every=4",
                                                  "train.cam_select_min_agreement=-1.0"])
    fake = {"seco": {"mean_s": 0.6, "median_s": 0.6, "flops": 64},
            every: {"mean_s": 0.5, "median_s": 0.45, "flops": 56}}
    r = speed._every_row(fake, every, 4, 20)
    assert r.ratio == 0.5 / 0.6 and "FLOP ratio 0.88" in r.what and "every 4" in r.what


def test_train_step_steps_consecutive_iterations_and_averages_flops_over_the_statistics_period(
        prepared):
    """Timed steps walk consecutive iterations from the all-terms-on one (a setting acting
    every few iterations is timed at its average), and a preset's FLOPs are its mean over
    train.cam_select_every steps: skipping the tiles between updates shows there."""
    import train_step
    from conftest import ROOT, TINY

    from seco_cli.params import load_params

    tp = load_params(ROOT / "params.yaml", TINY).train  # 6 iterations
    assert train_step.step_iterations(tp, 3, 5) == [3, 4, 5, 5, 5]
    every = "seco@train.cam_select_every=2@train.cam_select_min_agreement=-1.0"
    flops = train_step.count_flops(ROOT / "params.yaml", TINY, ["seco", every], prepared)
    assert 0 < flops[every] < flops["seco"]


def test_host_reads_count_the_packages_reads_by_site_and_restore_torch(prepared):
    import torch
    import train_step
    from conftest import ROOT, TINY

    originals = {name: getattr(torch.Tensor, name) for name in train_step.READS}
    res = train_step.count_host_reads(ROOT / "params.yaml", TINY, ["baseline", "seco"], 1,
                                      prepared)
    assert {name: getattr(torch.Tensor, name) for name in train_step.READS} == originals
    base, seco = res["baseline"], res["seco"]
    assert 0 < base["aten_ops"] < seco["aten_ops"]  # SeCo's extra passes launch more ops
    lines = (ROOT / "seco_cli" / "trainer.py").read_text().splitlines()
    step = next(i for i, t in enumerate(lines, 1) if "self.optimizer.step()" in t)
    for r in (base, seco):
        assert r["reads"] == sum(r["read_sites"].values()) > 0
        assert all(":" in site and not site.startswith("/") for site in r["read_sites"])
        # the trainer reads the device once per step: terms, total and statistics together
        trainer_sites = {k: n for k, n in r["read_sites"].items() if k.startswith("trainer.py")}
        assert list(trainer_sites.values()) == [1]
        read = int(next(iter(trainer_sites)).split(":")[1])
        assert "values = torch.stack(" in lines[read - 1] or ".tolist()" in lines[read - 1]
        # the optimiser's step counters are CPU tensors everywhere: its reads are not counted
        assert f"trainer.py:{step}" not in r["read_sites"]
    # the select forms a GPU runs (seco_cli.waits): no nonzero, and SeCo waits where the
    # baseline does, for the trainer's one read and the CRF regulariser's pixel counts
    assert seco["nonzero"] == base["nonzero"] == 0
    assert seco["read_sites"] == base["read_sites"] and len(base["read_sites"]) == 2


def test_child_peak_rss_is_its_own_not_the_large_parents():
    import subprocess

    import train_child

    hold = b"\x01" * (2560 * 2**20)  # the parent touches 2.5 GiB before starting the child
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import train_child; "
            "print(train_child.peak_rss())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(train_child.__file__).parent)],
                         capture_output=True, text=True, check=True)
    child = int(out.stdout.split()[-1])
    assert len(hold) > 0 and train_child.peak_rss() > len(hold)  # the parent's own is large
    assert 2**20 < child < 1536 * 2**20, child  # the child (torch imported, ≈ 0.7 GiB) is smaller


def test_flops_count_runs_in_a_child_process(prepared):
    import train_child
    from conftest import ROOT, TINY

    f = train_child.run({"params": str(ROOT / "params.yaml"), "overrides": TINY,
                         "prepared": str(prepared), "flops": ["baseline", "seco"],
                         "threads": 1})
    assert set(f) == {"baseline", "seco"} and 0 < f["baseline"] < f["seco"]


def test_params_diff_lists_changed_added_and_removed_leaves_but_not_skipped_ones():
    old = {"train": {"lr": 0.1, "beta": 0.9, "gone": 1}, "cams": {"scales": [1.0]}}
    new = {"train": {"lr": 0.2, "beta": 0.9, "new": "x"}, "cams": {"scales": [1.0, 2.0]}}
    assert quality.flatten(old) == {"train.lr": 0.1, "train.beta": 0.9, "train.gone": 1,
                                    "cams.scales": [1.0]}
    assert quality.params_diff(old, new) == ["cams.scales: [1.0] → [1.0, 2.0]",
                                             "train.gone: 1 → absent", "train.lr: 0.1 → 0.2",
                                             'train.new: absent → "x"']
    assert quality.params_diff(old, new, skip=("train.lr", "cams")) == [
        "train.gone: 1 → absent", 'train.new: absent → "x"']
    assert quality.params_diff(old, old) == []


INTEL = ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz, 2 usable of 2 cores, torch threads 2, "
         "23.5 GiB, GPU none, torch 2.14.1+cu130")
AMD = "AMD EPYC, 2 usable of 2 cores, torch threads 2, 23.5 GiB, GPU none, torch 2.14.1+cu130"


def test_machine_kind_keeps_what_decides_bitwise_repeats_and_drops_the_hosts_size():
    kind = quality.machine_kind(INTEL)
    assert kind == ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz · torch threads 2 · GPU none "
                    "· torch 2.14.1+cu130")
    # more cores or memory on the host: the same kind; another CPU, thread count or torch: not
    assert quality.machine_kind(INTEL.replace("2 usable of 2", "8 usable of 16")
                                .replace("23.5", "128.0")) == kind
    assert quality.machine_kind(AMD) != kind
    assert quality.machine_kind(INTEL.replace("threads 2", "threads 4")) != kind
    assert quality.machine_kind(INTEL.replace("2.14.1", "2.15.0")) != kind
    gpu = AMD.replace("GPU none", "GPU 1 × NVIDIA H200 (139 GiB)")
    assert quality.machine_kind(gpu).endswith("GPU 1 × NVIDIA H200 (139 GiB) · torch 2.14.1+cu130")
    assert quality.machine_kind(None) is None and quality.machine_kind("a laptop") is None
    # the line this machine records parses
    here = quality.machine_line(benchlib.machine())
    assert quality.machine_kind(here) is not None


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
model name\t: something else
"""


def test_cpu_names_its_family_model_and_vector_kernels_so_two_of_one_name_differ():
    zen4 = benchlib._cpu_model(ZEN4, "AVX512")
    assert zen4 == "AMD EPYC [cpu family 25; model 17; stepping 1; AVX512]"
    zen3 = benchlib._cpu_model(ZEN4.replace(": 17", ": 1"), "AVX2")
    line = AMD.replace("AMD EPYC", zen4)
    assert quality.machine_kind(line).startswith(zen4 + " · torch threads 2")
    assert quality.machine_kind(line) != quality.machine_kind(AMD.replace("AMD EPYC", zen3))
    assert quality.machine_kind(line) != quality.machine_kind(AMD)  # a run of the name alone
    assert benchlib._cpu_model("", "AVX2").endswith(" [AVX2]")  # no /proc/cpuinfo


def _stored_on(machines: dict[quality.RunSpec, str | None]) -> dict:
    results: dict = {"version": 1, "runs": {}}
    for spec, line in machines.items():
        results["runs"][spec.key] = {**_run(spec.preset, spec.seed, 0.5), "machine": line}
    return results


def test_other_machine_runs_and_set_aside_keep_the_stored_run():
    specs = [_spec("baseline", 0), _spec("seco", 0), _spec("seco", 1)]
    results = _stored_on({specs[0]: INTEL, specs[1]: AMD, specs[2]: None})
    here = quality.machine_kind(INTEL)
    assert quality.other_machine_runs(specs, results, here) == [
        (specs[1], quality.machine_kind(AMD)), (specs[2], None)]
    assert quality.other_machine_runs(specs[:1], results, here) == []
    # two kinds stored (an unknown machine is one), or another kind with runs still to make
    assert quality.mixes_machines(specs, results, here, to_run=False)
    assert not quality.mixes_machines(specs[1:2], results, here, to_run=False)
    assert quality.mixes_machines(specs[1:2], results, here, to_run=True)
    assert not quality.mixes_machines(specs[:1], results, here, to_run=True)
    amd_run = results["runs"][specs[1].key]
    quality.set_aside(results, [specs[1], specs[2]])
    assert quality.remaining(specs, results) == specs[1:]  # to run again here
    assert results["runs_elsewhere"] == {
        f"{specs[1].key}@{quality.machine_kind(AMD)}": amd_run,
        f"{specs[2].key}@unknown machine": _stored_on({specs[2]: None})["runs"][specs[2].key]}


def test_rename_set_aside_experiments_frees_the_name_and_keeps_the_experiment(tmp_path):
    import subprocess

    def sh(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("x: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: echo hi > out.txt\n    params: [x]\n    outs: [out.txt]\n")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    specs = [_spec("seco", 0), _spec("baseline", 0)]
    sh("dvc", "exp", "run", "-q", "-n", specs[0].name, "-S", "x=2")
    results = _stored_on({specs[0]: AMD, specs[1]: AMD})
    for spec in specs:
        results["runs"][spec.key]["exp_name"] = spec.name
    quality.set_aside(results, specs)
    assert quality.rename_set_aside_experiments(tmp_path, results, specs) == [
        f"{specs[0].name}-elsewhere-1"]
    assert sh("dvc", "exp", "list", "--name-only").split() == [f"{specs[0].name}-elsewhere-1"]
    names = sorted(r["exp_name"] for r in results["runs_elsewhere"].values())
    assert names == sorted([f"{specs[0].name}-elsewhere-1", specs[1].name])


def test_bench_stops_on_runs_from_another_machine_unless_told_and_marks_a_mixed_table(
        tmp_path, monkeypatch, capsys):
    specs = quality.plan(benchlib.ROOT, "synthetic", "default", ["baseline", "seco"], [0], [],
                         ["train.seed"])
    here = quality.machine_line(benchlib.machine())
    other = "Some Other CPU, 4 usable of 4 cores, torch threads 4, 8.0 GiB, GPU none, torch 0.1"
    path = tmp_path / "q.json"
    results = _stored_on({specs[0]: here, specs[1]: other})
    benchlib.write_json(path, results)
    argv = ["--presets", "baseline,seco", "--seeds", "0", "--results", str(path)]
    monkeypatch.setattr(sys, "argv", ["bench/quality.py", *argv])
    # every planned run is stored, so without the check the bench would just report
    assert quality.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: 1 stored run(s)")
    assert specs[1].name in err and "Some Other CPU" in err and "--mixed-machines" in err
    assert json.loads(path.read_text()) == results and not path.with_suffix(".md").exists()
    # a dry run says so and exits 0
    assert quality.main([*argv, "--dry-run"]) == 0
    assert "1 stored run(s) were made on another kind" in capsys.readouterr().out
    # reused on request: the table's header names which run came from which machine
    assert quality.main([*argv, "--mixed-machines"]) == 0
    text = path.with_suffix(".md").read_text()
    assert "- **mixed machines**: the runs come from 2 kinds of machine" in text
    assert f"{quality.machine_kind(here)}: baseline s0; {quality.machine_kind(other)}: seco s0" \
        in text
    # one kind: no such line
    benchlib.write_json(path, _stored_on({specs[0]: here, specs[1]: here}))
    assert quality.main(argv) == 0
    assert "mixed machines" not in path.with_suffix(".md").read_text()
    # a complete table from one other kind is consistent: rendered, not stopped
    benchlib.write_json(path, _stored_on({specs[0]: other, specs[1]: other}))
    assert quality.main(argv) == 0
    assert "mixed machines" not in path.with_suffix(".md").read_text()
    # but with a run still to make here it would mix: stopped (before running anything)
    benchlib.write_json(path, _stored_on({specs[1]: other}))
    assert quality.main(argv) == 2
    assert "1 stored run(s) of this table were made on another kind" in capsys.readouterr().err


def test_report_only_renders_runs_of_the_same_command_under_older_params_and_flags_them(
        tmp_path, monkeypatch):
    """params.yaml moved on since the runs (here: a different lr): the bench would re-run
    them, but --report-only renders the latest run of the same command, and its header lists
    what differs, from the params stored with the run."""
    from seco_cli.params import load_params

    specs = quality.plan(benchlib.ROOT, "synthetic", "default", ["baseline", "seco"], [0], [],
                         ["train.seed"])
    results: dict = {"version": 1, "runs": {}}
    for spec, lr, when, value in ((specs[0], 0.5, "2026-01-01", 0.3),
                                  (specs[0], 0.25, "2026-01-02", 0.4),
                                  (specs[1], None, "2026-01-01", 0.6)):
        over = list(spec.overrides) + ([f"train.lr={lr}"] if lr else [])
        ran = load_params(benchlib.ROOT / "params.yaml", over)
        h = quality.params_hash(ran)
        old = quality.RunSpec(spec.dataset, spec.profile, spec.preset, spec.seed,
                              spec.overrides, h)
        found = {"params_ran": ran.dump(), "metrics": _run(spec.preset, 0, value)["metrics"]}
        quality.check_params(found, old)
        quality.record(results, old, found, 60.0, benchlib.ROOT)
        results["runs"][old.key]["recorded"] = when
    # another command (other overrides) is never a stand-in
    other = quality.RunSpec("synthetic", "default", "seco", 0, ("train.iterations=3",), "x" * 12)
    results["runs"][other.key] = {**results["runs"][specs[1].key], "overrides": ["x=1"]}
    assert quality.stand_in(results, specs[0])["recorded"] == "2026-01-02"  # the latest
    assert quality.stand_in(results, specs[1]) is results["runs"][specs[1].key]
    assert quality.stand_in(results, _spec("seco", 0)) is None
    # the bench schedule's derived overrides moved (a start joined the scaled keys): the same
    # command still
    moved = dataclasses.replace(specs[1], overrides=(*specs[1].overrides,
                                                     "train.iterations=750",
                                                     "train.cam_select_start=250"))
    assert quality.stand_in(results, moved) is results["runs"][specs[1].key]
    assert quality.stand_in(results, dataclasses.replace(
        moved, overrides=(*moved.overrides, "train.lr=0.1"))) is None  # a --set of its own
    path = tmp_path / "q.json"
    benchlib.write_json(path, results)
    argv = ["--presets", "baseline,seco", "--seeds", "0", "--results", str(path)]
    monkeypatch.setattr(sys, "argv", ["bench/quality.py", *argv, "--report-only"])
    assert quality.main([*argv, "--report-only"]) == 0
    text = path.with_suffix(".md").read_text()
    assert "- runs: 2 of 2 planned" in text
    assert "- params drift: 1 of 2 runs were made with other params" in text
    default_lr = load_params(benchlib.ROOT / "params.yaml").train.lr
    assert f"  - baseline s0: stored params: `train.lr: 0.25 → {default_lr}`" in text
    # the runs' values reach the tables: baseline from the later of its two runs
    assert "| baseline | 1 | 50.0 | 51.0 | 52.0 | 39.0 | 40.0 |" in text
    assert "| seco | 1 | 50.0 | 51.0 | 52.0 | 59.0 | 60.0 |" in text
    # a bench run does not take stand-ins: it lists both baseline runs as still to do
    assert quality.remaining(specs, results) == [specs[0]]


def test_git_revision_is_dirty_for_code_but_not_for_the_benchmarks_own_results(tmp_path):
    import subprocess

    def git(*a: str) -> None:
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = benchlib.git_revision(tmp_path)
    assert len(head) == 40 and not head.endswith("-dirty")
    (tmp_path / "bench" / "results" / "r.md").write_text("new\n")
    assert benchlib.git_revision(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert benchlib.git_revision(tmp_path) == head + "-dirty"
    assert benchlib.git_revision(tmp_path / "nowhere") == "unknown"


def test_crf_seconds_times_the_segment_crf_per_image(prepared):
    """bench/inference_speed.crf_seconds (the speed bench's `crf_voc` part): one timing per
    image, of the CRF the params give, at the image's own size."""
    import inference_speed
    from conftest import tiny_params

    from seco_cli.data.prepared import PreparedDataset

    params = tiny_params("segment.crf.iterations=2")
    data = PreparedDataset(prepared)
    ids = data.ids("val")[:3]
    r = inference_speed.crf_seconds(data, ids, params.segment.crf, data.num_classes + 1,
                                    params.model.crop_size)
    assert r["images"] == 3 and len(r["seconds"]) == 3 and min(r["seconds"]) > 0
    assert r["labels"] == data.num_classes + 1 and r["iterations"] == 2
    assert r["size"] == list(data.image_size(ids[0]))
    assert r["seconds_per_image"] == pytest.approx(sum(r["seconds"]) / 3)


def test_report_per_class_table_shows_each_run_and_dashes_where_a_run_has_none():
    """The per-class IoU tables (CAM seeds, seg MS+CRF): a row per run in preset order, a
    column per class; a run without stored classes shows dashes; no table without any."""
    runs = [_run("seco", 1, 0.5), _run("baseline", 0, 0.4), _run("seco", 0, 0.5)]
    assert "## IoU per class" not in qr.render(runs, "")
    runs[0]["classes"] = {"cams": {"background": 0.9, "boat": 0.25, "car": None},
                          "segment_ms_crf": {"background": 0.97, "boat": 0.65, "car": 0.364}}
    runs[1]["classes"] = {"cams": {"background": 0.8, "boat": 0.3, "car": 0.87},
                          "segment_ms_crf": {"background": 0.98, "boat": 0.63, "car": 0.92}}
    text = qr.render(runs, "")
    seg = text.split("## IoU per class, seg MS+CRF (points, each run)")[1].split("\n## ")[0]
    seg = seg.strip().splitlines()
    assert seg == ["| preset · seed | background | boat | car |", "|---|---|---|---|",
                   "| baseline · 0 | 98.0 | 63.0 | 92.0 |", "| seco · 0 | — | — | — |",
                   "| seco · 1 | 97.0 | 65.0 | 36.4 |"]
    cams = text.split("## IoU per class, CAM seeds")[1].split("\n## ")[0]
    assert "| seco · 1 | 90.0 | 25.0 | — |" in cams.splitlines()


def test_exp_classes_reads_the_per_class_report_of_an_experiment_through_dvc(tmp_path):
    """exp_classes reads artifacts/plots/report.json as DVC tracks it at a commit (from the
    cache), None for a commit the repository lacks or a report no longer cached;
    fill_classes adds it to the stored runs without it, and keeps the ones that have it."""
    import shutil
    import subprocess

    def sh(*cmd):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    plots = tmp_path / "artifacts" / "plots"
    plots.mkdir(parents=True)
    rows = [{"class": "background", "iou": 0.9}, {"class": "car", "iou": 0.36},
            {"class": "bird", "iou": None}]
    (plots / "report.json").write_text(json.dumps(
        {"sources": {"cams": {"classes": rows}, "segment_ms_crf": {"classes": rows[:2]}}}))
    sh("dvc", "add", "-q", "artifacts/plots")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "exp")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    want = {"cams": {"background": 0.9, "car": 0.36, "bird": None},
            "segment_ms_crf": {"background": 0.9, "car": 0.36}}
    assert quality.exp_classes(tmp_path, rev) == want
    assert quality.exp_classes(tmp_path, "0" * 40) is None
    assert quality.exp_classes(tmp_path, None) is None
    results = {"runs": {"a": {"exp_rev": rev}, "b": {"exp_rev": rev, "classes": {"x": {}}},
                        "c": {"exp_rev": "f" * 40}}}
    assert quality.fill_classes(tmp_path, results) == 1
    assert results["runs"]["a"]["classes"] == want and results["runs"]["b"]["classes"] == {"x": {}}
    assert results["runs"]["c"]["classes"] is None
    shutil.rmtree(plots)
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    assert quality.exp_classes(tmp_path, rev) is None  # the commit is there, its report not


def test_folder_layout_copy_of_a_store_reads_the_same_arrays(tmp_path):
    import store_layout

    from seco_cli.store import StoreReader, StoreWriter

    rng = np.random.default_rng(3)
    w = StoreWriter(tmp_path / "b.zarr", "cams", {"seed": 7}, groups=["aux"], per_bundle=2)
    for i in range(3):
        w.write(f"im{i}", rng.random((2, 5, 4)).astype(np.float32), {"labels": [1, i]},
                dtype="uint8")
        w.write(f"im{i}", rng.random((1, 5, 4)).astype(np.float32), group="aux")
    w.finish()
    assert store_layout.write_folder_layout(tmp_path / "b.zarr", tmp_path / "f.zarr") == 6
    a, b = StoreReader(tmp_path / "b.zarr", "cams"), StoreReader(tmp_path / "f.zarr", "cams")
    assert a.bundled and not b.bundled and b.attrs["seed"] == 7
    for group in (None, "aux"):
        assert a.ids(group) == b.ids(group) == ["im0", "im1", "im2"]
        for image_id in a.ids(group):
            (x, xa), (y, ya) = a.read_stored(image_id, group), b.read_stored(image_id, group)
            assert x.dtype == y.dtype and np.array_equal(x, y) and xa == ya
    assert (tmp_path / "f.zarr" / "im1" / "c.0.0.0").is_file()  # a folder per image
    assert (tmp_path / "f.zarr" / "aux" / "im1" / "c.0.0.0").is_file()


def test_store_layout_times_dvc_status_on_both_layouts_of_a_real_dvc_repo(tmp_path):
    import subprocess

    import store_layout

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "make.py").write_text(
        "import numpy as np\n"
        "from seco_cli.store import StoreWriter\n"
        "for name in ('cams', 'pseudo', 'segment'):\n"
        "    w = StoreWriter(f'artifacts/{name}.zarr', name, {}, per_bundle=4)\n"
        "    for i in range(10):\n"
        "        w.write(f'im{i}', np.full((3, 3), i + 1, np.uint8))\n"
        "    w.finish()\n")
    outs = "".join(f"      - artifacts/{n}.zarr\n" for n in ("cams", "pseudo", "segment"))
    (repo / "dvc.yaml").write_text(f"stages:\n  make:\n    cmd: {sys.executable} make.py\n"
                                   f"    deps:\n      - make.py\n    outs:\n{outs}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    def listing() -> list[Path]:  # the repository's files, less DVC's own state
        return sorted(p for p in repo.rglob("*") if ".dvc" not in p.relative_to(repo).parts)

    lock, files = (repo / "dvc.lock").read_bytes(), listing()
    r = store_layout.measure(repo, runs=1)
    assert (repo / "dvc.lock").read_bytes() == lock and listing() == files
    assert r["arrays"] == 30 and r["ratio"] > 0
    assert set(r["median_s"]) == {"bundles", "folders"}
    assert r["stores"]["bundles"]["cams.zarr"] == {"files": 6, "folders": 0}  # 3 bundles
    assert r["stores"]["folders"]["cams.zarr"] == {"files": 23, "folders": 10}
    assert r["totals"] == {"bundles": {"files": 18, "folders": 0},
                           "folders": {"files": 69, "folders": 30}}
    w = store_layout.measure_writes(repo, images=3, upscale=2, rounds=1)
    assert w["images"] == 3 and w["shape"] == [6, 6] and min(w["median_ms"].values()) > 0
    (repo / "make.py").write_text((repo / "make.py").read_text() + "# changed\n")
    with pytest.raises(RuntimeError, match="not up to date"):
        store_layout.measure(repo, runs=1)
