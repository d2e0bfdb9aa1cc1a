"""The reproduction experiment (experiments/reproduce.py) end to end on a slice of the shared
data, so that the one-command experiment cannot rot: pre-training of an MAE and an M3AE,
probe, OOD scores, pictures, the report, and skipping/resuming on a second call."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_verdict_rules(reproduce):
    assert reproduce.compare([60, 61], [50, 52]) == "reproduced in direction"
    assert reproduce.compare([40, 41], [50, 52]).startswith("not reproduced")
    assert reproduce.compare([50, 53], [51, 52]).startswith("inconclusive")
    assert reproduce.compare([], [1]) == "not run"
    assert reproduce.compare_noise(2.0, 1.0) == "reproduced in direction"
    assert reproduce.compare_noise(-2.0, 1.0).startswith("not reproduced")
    assert reproduce.compare_noise(0.5, 1.0).startswith("inconclusive")


def test_run_specs_cover_every_claim(reproduce):
    specs = {s.name: s for s in reproduce.run_specs(reproduce.MODES["quick"])}
    mae, m3ae = specs["mae_s0"], specs["m3ae_s0"]
    # The baseline differs from M3AE only in dropping every caption.
    assert mae.overrides == ["data.paired_fraction=0.0"] and m3ae.overrides == [] and mae.seed == m3ae.seed
    assert {"mae_s1", "m3ae_s1", "m3ae_paired0.1_s0", "m3ae_paired0.3_s0", "m3ae_textmask0.15_s0",
            "m3ae_textmask0.5_s0", "m3ae_textmask0.9_s0"} <= set(specs)
    assert [s.name for s in reproduce.run_specs(reproduce.MODES["smoke"])] == ["mae_s0", "m3ae_s0"]


def test_a_run_is_taken_by_one_process(reproduce, tmp_path):
    import os
    import subprocess

    run = tmp_path / "run"
    assert reproduce.claim_run_dir(run)  # free
    assert reproduce.claim_run_dir(run)  # already ours
    (run / "running.pid").write_text(str(os.getppid()))  # a live process that is not us
    assert not reproduce.claim_run_dir(run)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "running.pid").write_text(str(gone.pid))  # a stale lock is taken over
    assert reproduce.claim_run_dir(run) and json.loads((run / "running.pid").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_smoke_pipeline_runs_reports_and_skips(reproduce, shared_data, tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    args = ["--mode", "smoke", "--data", str(shared_data), "--out", str(out), "--docs", str(docs),
            "--device", "cpu", "--threads", "1", "--no-progress"]
    assert reproduce.main(args) == 0

    mae = json.loads((out / "mae_s0" / "result.json").read_text())
    m3ae = json.loads((out / "m3ae_s0" / "result.json").read_text())
    assert mae["config"]["data"]["paired_fraction"] == 0.0 and m3ae["config"]["data"]["paired_fraction"] == 1.0
    assert mae["config"]["train"]["seed"] == m3ae["config"]["train"]["seed"]
    assert mae["final"]["text_loss"] == 0.0 and m3ae["final"]["text_loss"] > 0  # MAE never saw a caption
    # The cross-modal diagnostic: the same masked captions with and without the image.
    diag = m3ae["caption_diag"]
    assert "caption_diag" not in mae and diag["n"] > 0
    assert all(0 <= diag[k]["accuracy"] <= 1 and diag[k]["loss"] > 0 for k in ("with_image", "without_image"))
    for r in (mae, m3ae):
        assert 0 <= r["probe"]["top1"] <= 1 and r["probe"]["num_classes"] == 200
        for setting in ("ood_far", "ood_near"):
            for metric in ("mahalanobis", "msp"):
                assert 0 <= r[setting]["metrics"][metric]["auroc"] <= 1
        assert not list((out / r["name"]).glob("**/*.tmp"))
    assert {Path(p).name for p in m3ae["pictures"]} == {"recon_val.png", "recon_train_captions.png",
                                                        "attention.png"}

    md = (docs / "results" / "smoke.md").read_text()  # docs/results.md is the standard mode's page
    summary = json.loads((docs / "results" / "smoke.json").read_text())
    assert "## Verdicts" in md and "| MAE | 44.6 |" in md
    # Tables come from the measurements: the probe accuracy in the report is the run's.
    assert summary["claim1"]["m3ae_top1"] == [100 * m3ae["probe"]["top1"]]
    assert (docs / "results" / "smoke_claims.png").stat().st_size > 0

    # A second call skips finished runs; a run whose result was lost resumes after its last
    # checkpoint (no step is trained again) and is evaluated afresh.
    metrics = (out / "mae_s0" / "metrics.jsonl").read_text()
    stamp = (out / "m3ae_s0" / "result.json").stat().st_mtime_ns
    (out / "mae_s0" / "result.json").unlink()
    assert reproduce.main(args + ["--no-report"]) == 0
    assert (out / "m3ae_s0" / "result.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "mae_s0" / "result.json").read_text())
    assert (out / "mae_s0" / "metrics.jsonl").read_text() == metrics
    assert again["probe"] == mae["probe"]

    # The report alone works from the summary when the run folders are gone.
    import shutil

    shutil.rmtree(out)
    assert reproduce.main(args + ["--report"]) == 0
    assert (docs / "results" / "smoke.md").read_text() == md


def _fake_result(name, kind, seed, cls, mean, pf=1.0, tm=0.75, steps=(150, 300)):
    probe = lambda top1: {"top1": top1, "top5": top1 + 0.1, "knn_top1": top1 / 2, "knn_top5": 0.0,  # noqa: E731
                          "n_train": 10, "n_test": 10, "num_classes": 100, "chance": 0.01}
    ood = {"metrics": {m: {"auroc": 0.6, "fpr95": 0.9} for m in ("mahalanobis", "msp")}, "id_accuracy": 0.5,
           "n_id": 10, "n_ood": 10}
    return {"name": name, "kind": kind, "seed": seed, "paired_fraction": pf, "text_mask_ratio": tm,
            "steps": steps[-1], "samples_seen": 100, "final": {"loss": 1.0, "image_loss": 0.5, "text_loss": 1.0,
                                                              "text_accuracy": 0.1},
            "probe": probe(cls), "probes": {"cls": probe(cls), "mean": probe(mean)}, "pool": "cls",
            "curve": [{"step": s, "cls": {"top1": cls * s / steps[-1], "knn_top1": 0.0},
                       "mean": {"top1": mean, "knn_top1": 0.0}} for s in steps],
            "ood_far": ood, "ood_near": ood, "pretrain_seconds": 1.0, "eval_seconds": 1.0, "eval_images": 10,
            "device": "cpu", "started_at": 0.0, "finished_at": 1.0, "pictures": []}


def test_standard_report_states_the_measured_gap(reproduce, tmp_path):
    """The claim-1 verdict applies the issue's bar (every seed above, mean gap >= 3x the larger
    seed std) and the headline sentence carries the numbers of the results, for each pool."""
    out, docs = tmp_path / "runs", tmp_path / "docs"
    results = {"mae_s0": ("mae", 0, 0.100, 0.150), "mae_s1": ("mae", 1, 0.102, 0.151),
               "mae_s2": ("mae", 2, 0.098, 0.149), "m3ae_s0": ("m3ae", 0, 0.130, 0.152),
               "m3ae_s1": ("m3ae", 1, 0.132, 0.148), "m3ae_s2": ("m3ae", 2, 0.128, 0.153)}
    for name, (kind, seed, cls, mean) in results.items():
        (out / name).mkdir(parents=True)
        r = _fake_result(name, kind, seed, cls, mean, pf=0.0 if kind == "mae" else 1.0)
        (out / name / "result.json").write_text(json.dumps(r))
    reproduce.report(out, docs, "standard")
    s = json.loads((docs / "results" / "standard.json").read_text())
    cls, mean = s["claim1_pools"]["cls"], s["claim1_pools"]["mean"]
    assert cls["gap"] == pytest.approx(3.0) and cls["max_std"] == pytest.approx(0.2)
    assert cls["verdict"].startswith("reproduced") and s["claim1"]["verdict"] == cls["verdict"]
    assert mean["verdict"].startswith("inconclusive")  # seed ranges overlap
    assert s["claim1"]["seed_gaps"] == pytest.approx({"0": 3.0, "1": 3.0, "2": 3.0})
    assert s["curve"]["m3ae"]["cls"]["150"] == pytest.approx([6.5, 6.6, 6.4])
    md = (docs / "results.md").read_text()
    assert "M3AE 13.00 % vs MAE 10.00 %" in md and "gap +3.00 points, 15.0x the larger seed std (0.20)" in md
    assert (docs / "results" / "standard_curve.png").stat().st_size > 0
    # Gap in direction but below 3x the std: not called reproduced.
    assert reproduce.compare_strict([11.0, 12.0, 13.0], [10.0, 10.5, 10.9]).startswith("in direction, but")


def test_the_plan_fits_the_budget_and_drops_ablations_before_seeds(reproduce):
    mode = dataclasses.replace(reproduce.MODES["standard"], step_range=(600, 2400), batch_size=100)
    specs = reproduce.run_specs(mode)  # 3 MAE + 3 M3AE seeds, 2 ablations
    measured = {"samples_per_s": {"m3ae": 100.0, "mae": 200.0}, "probe_checkpoint_s": 10.0, "ood_s": 20.0,
                "caption_diag_s": 5.0, "timed_steps": 15}
    # Per step: 5 M3AE runs x 1 s + 3 MAE runs x 0.5 s = 6.5 s; evaluation: 8 x 40 + 6 x 20 + 5 x 5 = 465 s.
    p = reproduce.plan(mode, specs, measured, budget_s=3000, processes=2, spent_s=100)
    assert p["steps"] == int((2 * 2900 - 465) / 6.5) // 100 * 100 == 800 and p["fits"] and not p["dropped"]
    assert p["estimated_wall_s"] == pytest.approx(100 + (465 + 800 * 6.5) / 2) and p["estimated_wall_s"] <= 3000
    assert p["warmup"] == round(800 / 15)
    # Too little time: the ablations go first (each frees 1 s a step and 45 s of evaluation).
    # With all 8 runs: (4000 - 465) / 6.5 -> 500 steps < 600; without the last: (4000 - 420) / 5.5 -> 600.
    p = reproduce.plan(mode, specs, measured, budget_s=2100, processes=2, spent_s=100)
    assert p["dropped"] == ["m3ae_textmask0.15_s0"] and p["steps"] == 600 and p["fits"]
    assert "m3ae_paired0.1_s0" in p["runs"]
    assert sum(n.startswith(("mae_s", "m3ae_s")) for n in p["runs"]) == 6  # every seed stays
    # Even without them it does not fit: the smallest step count, said so.
    p = reproduce.plan(mode, specs, measured, budget_s=600, processes=1, spent_s=100)
    assert p["steps"] == 600 and not p["fits"] and len(p["dropped"]) == 2


@pytest.mark.slow
def test_gpu_mode_smoke_plans_caches_and_reports_every_readout(reproduce, shared_data, tmp_path):
    """`--mode gpu --smoke`: the GPU mode's code (caches, a measured plan, every readout along
    training, its own page) on a CPU in seconds."""
    out, docs = tmp_path / "runs", tmp_path / "docs"
    assert reproduce.main(["--mode", "gpu", "--smoke", "--data", str(shared_data), "--out", str(out),
                           "--docs", str(docs), "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"] == 3 and set(plan["measured"]["samples_per_s"]) == {"m3ae", "mae"}
    assert all(plan["measured"][k] > 0 for k in ("probe_checkpoint_s", "ood_s", "caption_diag_s"))
    m3ae = json.loads((out / "m3ae_s0" / "result.json").read_text())
    assert m3ae["config"]["data"]["source"] == "cache" and m3ae["steps"] == 3
    assert {"cls", "mean", "cls/fewshot", "mean/fewshot"} <= set(m3ae["probes"])
    assert m3ae["probes"]["cls/fewshot"]["num_train"] <= 2 * m3ae["probes"]["cls"]["num_classes"]
    for name in ("tin-train", "tin-val", "cifar-test", "cifar-train"):
        assert (out / "caches" / f"{name}-32px" / "manifest.json").is_file()
    s = json.loads((docs / "results" / "gpu-smoke.json").read_text())
    assert set(s["readouts"]) == set(reproduce.READOUTS) and s["plan"]["steps"] == 3
    assert s["readouts"]["few-shot probe, CLS"]["m3ae"] == [100 * m3ae["probes"]["cls/fewshot"]["top1"]]
    md = (docs / "results" / "gpu-smoke.md").read_text()
    assert "## How the step count was chosen" in md and "| few-shot probe, mean |" in md
    assert (docs / "results" / "gpu-smoke_readouts.png").stat().st_size > 0
    assert not (docs / "results.md").exists()  # the standard mode's page is not touched
