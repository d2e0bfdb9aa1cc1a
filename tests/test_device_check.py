"""benchmarks/device_check.sh --dry-run: every part of the device call runs on the CPU at smoke
size and reports success (or says why it skips), so the script cannot rot before a GPU comes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"a_pytest_gpu", "b_eager_bf16", "b_compiled_bf16", "b_eager_fp32_tf32", "b_memory", "c_official_jax",
         "d_jpeg_decode", "e_reproduce_gpu"}


@pytest.mark.slow
def test_dry_run_reports_every_part(shared_data, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), M3AE_SHARED=str(shared_data.parent))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {r["part"]: r["status"] for r in summary["parts"]}
    assert set(status) == PARTS
    bad = {k: v for k, v in status.items() if v != "ok" and not v.startswith("skipped: ")}
    assert not bad, (bad, p.stdout[-3000:])
    assert summary["ok"] and summary["dry_run"]
    for name in ("a_pytest_gpu", "b_eager_bf16", "b_memory", "d_jpeg_decode"):  # these have a CPU meaning
        assert status[name] == "ok"
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what a device call brings back
    assert next(r for r in summary["parts"] if r["part"] == "d_jpeg_decode")["result"]["device_half_samples_per_s"] > 0
