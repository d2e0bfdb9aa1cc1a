"""The reproduction's report (experiments/reproduce.py ``--report``): the per-run result.json
files summarised into the numbers of every claim (:func:`summarize`), then plots
(:mod:`.plots`) and a Markdown page (:mod:`.page`), from
:func:`report`.

Nothing here knows the experiment's modes: what the page needs of them (the paper's numbers,
the full mode's size, the pages to link) comes in as an :class:`Experiment`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from m3ae.io import write_json_atomic
from m3ae.ops import POOLS
from m3ae.reports.stats import compare, compare_noise, compare_strict, gap_stats, mean

from .experiment import Experiment

# Every readout of a run's encoder: (key in result["probes"] and in its curve points, field).
READOUTS = {"linear probe, CLS": ("cls", "top1"), "linear probe, mean": ("mean", "top1"),
            "kNN, CLS": ("cls", "knn_top1"), "kNN, mean": ("mean", "knn_top1"),
            "few-shot probe, CLS": ("cls/fewshot", "top1"), "few-shot probe, mean": ("mean/fewshot", "top1")}


def readout_summary(m3ae: list[dict], mae: list[dict]) -> tuple[dict, dict]:
    """Claim 1 on every readout of the final models (top-1 %, gap statistics, the strict
    verdict) and along training: {readout: {step: {"m3ae": [...], "mae": [...]}}}."""
    final, curve = {}, {}
    for label, (key, field_) in READOUTS.items():
        vals = {kind: [100 * r["probes"][key][field_] for r in rs if key in r.get("probes", {})]
                for kind, rs in (("m3ae", m3ae), ("mae", mae))}
        if vals["m3ae"] or vals["mae"]:
            final[label] = {**vals, **gap_stats(vals["m3ae"], vals["mae"]),
                            "verdict": compare_strict(vals["m3ae"], vals["mae"])}
        for kind, rs in (("m3ae", m3ae), ("mae", mae)):
            for r in rs:
                for point in r.get("curve", []):
                    if key in point:
                        curve.setdefault(label, {}).setdefault(str(point["step"]), {"m3ae": [], "mae": []})[
                            kind].append(100 * point[key][field_])
    return final, curve


def summarize(results: dict[str, dict], mode_name: str, mode: dict, experiment: Experiment) -> dict:
    """The numbers the report shows, from the per-run results. ``mode``: the mode's settings as
    plain data (seeds, pool, paired_fractions, text_mask_ratios, steps, ...), kept in the
    summary as ``settings``."""
    mae = sorted(select(results, "mae"), key=lambda r: r["seed"])
    m3ae = sorted(select(results, "m3ae", pf=1.0, tm=0.75), key=lambda r: r["seed"])
    spread = max([max(x) - min(x) for x in (top1(mae), top1(m3ae)) if len(x) > 1] or [float("nan")])
    noise = 0.0 if spread != spread else spread
    s0 = mode["seeds"][0]
    s = {"mode": mode_name, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in mode.items()},
         "seed_spread_top1": spread, "claim1": claim1(m3ae, mae, mode.get("pool", "cls")),
         "caption_diag": {r["name"]: r["caption_diag"] for r in select(results, "m3ae") if "caption_diag" in r},
         "claim1_pools": claim1_pools(m3ae, mae), "curve": probe_curve(m3ae, mae)}
    s["readouts"], s["readout_curve"] = readout_summary(m3ae, mae)
    s["claim2"] = claim2(results, tuple(mode["paired_fractions"]), s0, noise)
    s["claim3"] = claim3(results, tuple(mode["text_mask_ratios"]), s0, noise)
    s["claim4"] = claim4(m3ae, mae)
    s["runs"] = {n: {k: r[k] for k in ("kind", "seed", "paired_fraction", "text_mask_ratio", "steps",
                                        "samples_seen", "final", "pretrain_seconds", "eval_seconds",
                                        "eval_images", "device")}
                 for n, r in sorted(results.items())}
    s["timing"] = timing(results)
    s["full_estimate_hours"] = full_estimate_hours(s["timing"], experiment)
    return s


def select(results: dict[str, dict], kind=None, pf=None, tm=None, seed=None) -> list[dict]:
    """The per-run results of one kind, paired fraction, text mask ratio and seed (None: any)."""
    return [r for r in results.values() if (kind is None or r["kind"] == kind)
            and (pf is None or abs(r["paired_fraction"] - pf) < 1e-9)
            and (tm is None or abs(r["text_mask_ratio"] - tm) < 1e-9)
            and (seed is None or r["seed"] == seed)]


def top1(rs: list[dict]) -> list[float]:
    return [100 * r["probe"]["top1"] for r in rs]


def claim1(m3ae: list[dict], mae: list[dict], pool: str) -> dict:
    """The main probe of the final models: top-1/top-5/kNN per seed, the gap, the verdict."""
    m3ae_acc, mae_acc = top1(m3ae), top1(mae)
    return {
        "mae_top1": mae_acc, "m3ae_top1": m3ae_acc, "mae_top5": [100 * r["probe"]["top5"] for r in mae],
        "m3ae_top5": [100 * r["probe"]["top5"] for r in m3ae],
        "mae_knn": [100 * r["probe"]["knn_top1"] for r in mae], "m3ae_knn": [100 * r["probe"]["knn_top1"] for r in m3ae],
        "chance": 100 * (mae or m3ae)[0]["probe"]["chance"] if (mae or m3ae) else None,
        "pool": pool, **gap_stats(m3ae_acc, mae_acc),
        "seed_gaps": {str(a["seed"]): 100 * (a["probe"]["top1"] - b["probe"]["top1"])
                      for a in m3ae for b in mae if a["seed"] == b["seed"]},
        "verdict": compare_strict(m3ae_acc, mae_acc)}


def claim1_pools(m3ae: list[dict], mae: list[dict]) -> dict:
    """Claim 1 on every pool the runs were probed with (CLS, mean of the image tokens)."""
    out = {}
    for pool in POOLS:
        a = [100 * r["probes"][pool]["top1"] for r in m3ae if pool in r.get("probes", {})]
        b = [100 * r["probes"][pool]["top1"] for r in mae if pool in r.get("probes", {})]
        if a or b:
            out[pool] = {
                "m3ae_top1": a, "mae_top1": b, **gap_stats(a, b), "verdict": compare_strict(a, b),
                "m3ae_knn": [100 * r["probes"][pool]["knn_top1"] for r in m3ae if pool in r.get("probes", {})],
                "mae_knn": [100 * r["probes"][pool]["knn_top1"] for r in mae if pool in r.get("probes", {})]}
    return out


def probe_curve(m3ae: list[dict], mae: list[dict]) -> dict:
    """{kind: {pool: {step: [top-1 % per seed]}}} along training (the kept checkpoints)."""
    curve = {}
    for kind, rs in (("mae", mae), ("m3ae", m3ae)):
        for r in rs:
            for point in r.get("curve", []):
                for pool in POOLS:
                    if pool in point:
                        curve.setdefault(kind, {}).setdefault(pool, {}).setdefault(
                            str(point["step"]), []).append(100 * point[pool]["top1"])
    return curve


def claim2(results: dict[str, dict], paired_fractions: tuple, seed: int, noise: float) -> dict:
    """Top-1 against the paired fraction (0 = MAE); the small fractions against MAE."""
    curve = {0.0: mean(top1(select(results, "mae", seed=seed)))}
    for p in paired_fractions + (1.0,):
        curve[p] = mean(top1(select(results, "m3ae", pf=p, tm=0.75, seed=seed)))
    small = [curve[p] - curve[0.0] for p in paired_fractions]
    if any(d != d for d in small):
        verdict = "not run"
    elif min(small) > 0 or max(small) < 0:  # both fractions on the same side of MAE
        verdict = compare_noise(min(small) if min(small) > 0 else max(small), noise)
    else:
        verdict = "inconclusive (the small fractions fall on different sides of MAE)"
    return {"top1": {str(k): v for k, v in curve.items()}, "verdict": verdict}


def claim3(results: dict[str, dict], text_mask_ratios: tuple, seed: int, noise: float) -> dict:
    """Top-1 against the text mask ratio; high ratios (>= 0.5) against BERT's 0.15."""
    curve = {r: mean(top1(select(results, "m3ae", pf=1.0, tm=r, seed=seed))) for r in sorted(text_mask_ratios + (0.75,))}
    high = [curve[r] for r in curve if r >= 0.5 and curve[r] == curve[r]]
    best = max(curve, key=lambda r: -1e9 if curve[r] != curve[r] else curve[r])
    return {"top1": {str(k): v for k, v in curve.items()}, "best_ratio": best,
            "verdict": compare_noise(mean(high) - curve[0.15], noise)}


def claim4(m3ae: list[dict], mae: list[dict]) -> dict:
    """OOD AUROCs (far and near, Mahalanobis and max-softmax) and the in-distribution accuracy."""
    c4 = {}
    for setting in ("ood_far", "ood_near"):
        for metric in ("mahalanobis", "msp"):
            a = [100 * r[setting]["metrics"][metric]["auroc"] for r in m3ae if setting in r]
            b = [100 * r[setting]["metrics"][metric]["auroc"] for r in mae if setting in r]
            c4[f"{setting}/{metric}"] = {"m3ae": a, "mae": b, "verdict": compare(a, b)}
        c4[f"{setting}/id_accuracy"] = {"m3ae": [100 * r[setting]["id_accuracy"] for r in m3ae if setting in r],
                                        "mae": [100 * r[setting]["id_accuracy"] for r in mae if setting in r]}
    return c4


def timing(results: dict[str, dict]) -> dict:
    """Compute spent: pre-training and evaluation seconds, rates, wall time, runs in parallel."""
    rs = list(results.values())
    pre = sum(r["pretrain_seconds"] for r in rs)
    ev = sum(r["eval_seconds"] for r in rs)
    seen = sum(r["samples_seen"] for r in rs)
    imgs = sum(r["eval_images"] for r in rs)
    wall = max(r["finished_at"] for r in rs) - min(r["started_at"] for r in rs)
    # How many runs overlapped at most (the command may have been started more than once).
    spans = [(r["started_at"], r["finished_at"]) for r in rs]
    parallel = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    return {"pretrain_seconds": pre, "eval_seconds": ev, "pretrain_samples_per_s": seen / max(pre, 1e-9),
            "eval_images_per_s": imgs / max(ev, 1e-9), "wall_seconds": wall,
            "max_parallel_runs": parallel, "devices": sorted({r["device"] for r in rs})}


def full_estimate_hours(timing: dict, experiment: Experiment) -> float:
    """The full mode's wall time for one process at the throughput measured here (the same 8x8
    token grid, so about the same cost per sample; decoding 64 px instead of resizing to 32 is
    a wash)."""
    full = experiment.full
    full_seen = experiment.full_runs * full["steps"] * full["batch_size"]
    n_main = 2 * len(full["seeds"])
    full_imgs = (experiment.full_runs * (full["probe_train"] + full["val"])
                 + n_main * (full["cifar_test"] + full["cifar_train"]))
    return (full_seen / timing["pretrain_samples_per_s"] + full_imgs / timing["eval_images_per_s"]) / 3600


def report(out: Path, docs: Path, mode_name: str, mode: dict, experiment: Experiment) -> Path:
    """Summary JSON, plots and docs/results.md (the standard mode; other modes
    docs/results/<mode>.md) from the runs' result.json files (or, when the run folders are
    gone, from the summary saved by an earlier report)."""
    from .page import write_markdown
    from .plots import make_plots

    plan_file = out / "plan.json"
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}
    summary_path = docs / "results" / f"{mode_name}.json"
    pictures = []
    if plan_file.is_file():
        p = json.loads(plan_file.read_text())
        mode = dict(mode, steps=p["steps"], warmup=p["warmup"])
    if results and mode["steps"] == "plan":  # no plan.json beside them: the runs say
        r0 = next(iter(results.values()))
        mode = dict(mode, steps=r0["steps"], warmup=r0.get("config", {}).get("train", {}).get("warmup_steps"))
    if results:
        s = summarize(results, mode_name, mode, experiment)
        if plan_file.is_file():
            s["plan"] = p
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(summary_path, s)
        for name, r in sorted(results.items()):
            for p in r.get("pictures", []):
                if Path(p).is_file():
                    dst = docs / "results" / f"{mode_name}_{name}_{Path(p).name}"
                    shutil.copyfile(p, dst)
    elif summary_path.is_file():
        s = json.loads(summary_path.read_text())
    else:
        raise FileNotFoundError(f"no results in {out} and no {summary_path}; run the experiment first")
    pictures = make_plots(s, docs) + sorted(str(p) for p in (docs / "results").glob(f"{mode_name}_*_*.png"))
    return write_markdown(s, docs, pictures, experiment)
