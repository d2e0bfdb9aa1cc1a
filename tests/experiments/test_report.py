"""The reproduction report (experiments/reproduction/report.py): it takes what it knows of the
experiment (the paper's numbers, the full mode's size, the pages to link) from the Experiment it
is given, not from the modes and not from text typed into the renderer."""
from __future__ import annotations

import json

import pytest

from reproduction.report import Experiment, full_estimate_hours, report

FULL = {"steps": 1000, "batch_size": 10, "seeds": [0, 1], "probe_train": 100, "val": 50, "cifar_test": 20,
        "cifar_train": 30, "model": {"image_size": 48, "patch_size": 8}}
PAPER = {"claim1": {"mae": 11.1, "m3ae": 22.2}, "claim2": {0.1: 33.3, 1.0: 44.4}, "claim3": "a made-up claim",
         "claim4": {"mahalanobis": {"mae": 55.5, "m3ae": 66.6}, "msp": {"mae": 77.7, "m3ae": 88.8}}}
SETTINGS = {"preset": "tiny", "model": {"image_size": 32, "patch_size": 4}, "text_len": 16, "vocab": 256,
            "caption_limit": None, "train_shards": 1, "steps": 300, "batch_size": 8, "lr": 1e-3, "warmup": 1,
            "probe_train": 10, "val": 10, "cifar_test": 10, "cifar_train": 10, "probe_epochs": 1, "seeds": [0],
            "ablations": True, "pictures": False, "attention_rows": 1, "paired_fractions": [0.1],
            "text_mask_ratios": [0.15], "pool": "cls", "fewshot": None}


def _result(name, kind, pf=1.0, tm=0.75, top1=0.2):
    probe = {"top1": top1, "top5": top1, "knn_top1": top1, "knn_top5": 0.0, "n_train": 10, "n_test": 10,
             "num_classes": 10, "chance": 0.1}
    ood = {"metrics": {m: {"auroc": 0.6, "fpr95": 0.9} for m in ("mahalanobis", "msp")}, "id_accuracy": 0.5}
    return {"name": name, "kind": kind, "seed": 0, "paired_fraction": pf, "text_mask_ratio": tm, "steps": 300,
            "samples_seen": 2400, "final": {"loss": 1.0, "image_loss": 0.5, "text_loss": 1.0, "text_accuracy": 0.1},
            "probe": probe, "probes": {"cls": probe, "mean": probe}, "pool": "cls", "curve": [],
            "ood_far": ood, "ood_near": ood, "pretrain_seconds": 100.0, "eval_seconds": 10.0, "eval_images": 100,
            "device": "cpu", "started_at": 0.0, "finished_at": 110.0, "pictures": []}


def test_the_page_takes_the_experiment_it_is_given(tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    results = [_result("mae_s0", "mae", pf=0.0, top1=0.1), _result("m3ae_s0", "m3ae", top1=0.3),
               _result("m3ae_paired0.1_s0", "m3ae", pf=0.1), _result("m3ae_textmask0.15_s0", "m3ae", tm=0.15)]
    for r in results:
        (out / r["name"]).mkdir(parents=True)
        (out / r["name"] / "result.json").write_text(json.dumps(r))
    (docs / "results").mkdir(parents=True)
    (docs / "results" / "other.md").write_text("x")  # a mode page the experiment names
    (docs / "results" / "stray.md").write_text("x")  # and one it does not
    experiment = Experiment(paper=PAPER, modes=("mine", "other"), full=FULL, full_runs=7)
    md = report(out, docs, "mine", SETTINGS, experiment).read_text()
    assert "| 22.2 vs 11.1 |" in md and "33.3 vs 11.1" in md and "| MAE | 11.1 |" in md
    assert "Paper: a made-up claim." in md and "| 66.6 vs 55.5 (CIFAR-100 vs CIFAR-10) |" in md
    assert "(7 runs × 1000 steps × batch 10" in md
    assert "[other](other.md)" in md and "stray" not in md
    s = json.loads((docs / "results" / "mine.json").read_text())
    # 4 runs x 2,400 samples in 400 s; 400 images in 40 s.
    assert s["timing"]["pretrain_samples_per_s"] == pytest.approx(24.0)
    assert s["timing"]["eval_images_per_s"] == pytest.approx(10.0)
    # Full mode: 7 x 1000 x 10 samples at 24/s; 7 x 150 + 4 x 50 images at 10/s.
    assert s["full_estimate_hours"] == pytest.approx((70000 / 24 + 1250 / 10) / 3600)
    assert full_estimate_hours(s["timing"], experiment) == s["full_estimate_hours"]
