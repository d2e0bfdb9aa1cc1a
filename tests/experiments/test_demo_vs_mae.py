"""experiments/demo_vs_mae.py: M3AE vs MAE on the demo's data, end to end with a few steps,
and the table's numbers from given run summaries."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "demo_vs_mae.py"


@pytest.fixture(scope="module")
def dvm():
    spec = importlib.util.spec_from_file_location("demo_vs_mae", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(folder: Path, shape: float, colour: float, init: float = 0.5, pixels: float = 0.7):
    folder.mkdir(parents=True)
    probe = {t: {"trained": v, "random_init": init, "pixels": pixels, "chance": c}
             for t, v, c in (("shape", shape, 0.25), ("colour", colour, 1 / 6))}
    (folder / "summary.json").write_text(json.dumps(
        {"probe": probe, "training": {"final_loss": 0.3, "seconds": 10.0}}))


def test_report_pairs_seeds_and_decides_only_on_every_seed(dvm, tmp_path):
    for seed, (m3ae, mae) in enumerate([(0.80, 0.70), (0.75, 0.72), (0.78, 0.60)]):
        _summary(tmp_path / f"m3ae_s{seed}", shape=m3ae, colour=0.9 - seed / 100)
        _summary(tmp_path / f"mae_s{seed}", shape=mae, colour=0.89)
    r = dvm.report(tmp_path, [0, 1, 2], docs=tmp_path / "docs")
    shape, colour = r["probe_top1"]["shape"], r["probe_top1"]["colour"]
    assert shape["m3ae"] == [0.80, 0.75, 0.78] and shape["mae"] == [0.70, 0.72, 0.60]
    assert shape["paired_gap"] == pytest.approx([0.10, 0.03, 0.18])
    assert shape["verdict"] == "M3AE ahead in every seed"
    assert colour["verdict"] == "inconclusive (seed ranges overlap)"  # 0.90, 0.89, 0.88 vs 0.89
    md = (tmp_path / "docs" / "demo_vs_mae.md").read_text()
    assert "| shape | 77.7 (80.0, 75.0, 78.0) | 67.3 (70.0, 72.0, 60.0) | +10.0, +3.0, +18.0 |" in md
    assert json.loads((tmp_path / "docs" / "demo_vs_mae.json").read_text())["seeds"] == [0, 1, 2]


def test_a_seed_missing_one_model_is_left_out(dvm, tmp_path):
    _summary(tmp_path / "m3ae_s0", 0.8, 0.9)
    _summary(tmp_path / "mae_s0", 0.7, 0.9)
    _summary(tmp_path / "m3ae_s1", 0.8, 0.9)  # its MAE run has not finished
    r = dvm.report(tmp_path, [0, 1], docs=tmp_path / "docs")
    assert r["seeds"] == [0] and r["probe_top1"]["shape"]["verdict"] == "too few seeds"


def test_runs_both_models_with_the_same_seed_and_no_captions_for_mae(dvm, tmp_path):
    out = tmp_path / "runs"
    dvm.main(["--out", str(out), "--seeds", "0", "--jobs", "2", "--docs", str(tmp_path / "docs"), "--",
              "--eval-samples", "8", "--probe-samples", "16", "train.steps=2", "train.log_every=1"])
    for model, paired in (("m3ae", 1.0), ("mae", 0.0)):
        config = json.loads((out / f"{model}_s0" / "summary.json").read_text())["config"]
        assert config["train"]["seed"] == 0 and config["data"]["paired_fraction"] == paired
    # MAE never saw a caption: its text loss was never computed (logged as 0)
    rows = [json.loads(line) for line in (out / "mae_s0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("text_loss", 0) == 0 for r in rows if "loss" in r)
    assert (tmp_path / "docs" / "demo_vs_mae.md").is_file()
