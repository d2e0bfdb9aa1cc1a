"""The reproduction experiment (experiments/reproduce.py) end to end on a slice of the shared
data, so that the one-command experiment cannot rot: pre-training of an MAE and an M3AE,
probe, OOD scores, pictures, the report, and skipping/resuming on a second call."""
from __future__ import annotations

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
    assert reproduce._take(run)  # free
    assert reproduce._take(run)  # already ours
    (run / "running.pid").write_text(str(os.getppid()))  # a live process that is not us
    assert not reproduce._take(run)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "running.pid").write_text(str(gone.pid))  # a stale lock is taken over
    assert reproduce._take(run) and (run / "running.pid").read_text() == str(os.getpid())


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
    for r in (mae, m3ae):
        assert 0 <= r["probe"]["top1"] <= 1 and r["probe"]["num_classes"] == 200
        for setting in ("ood_far", "ood_near"):
            for metric in ("mahalanobis", "msp"):
                assert 0 <= r[setting]["metrics"][metric]["auroc"] <= 1
        assert not list((out / r["name"]).glob("**/*.tmp"))
    assert {Path(p).name for p in m3ae["pictures"]} == {"recon_val.png", "recon_train_captions.png",
                                                        "attention.png"}

    md = (docs / "results.md").read_text()
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
    assert (docs / "results.md").read_text() == md
