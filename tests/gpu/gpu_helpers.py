"""Helpers of the CUDA tests: the device they run on, CLI subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
DEVICE = os.environ.get("M3AE_GPU_TEST_DEVICE", "cuda")
WORDS = ["a", "red", "green", "blue", "square", "circle", "on", "the", "left", "right", "of", "picture"]


def cuda_only(dev: torch.device, why: str) -> None:
    if dev.type != "cuda":
        pytest.skip(f"no CPU meaning: {why}")


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # the same float reduction order in every process
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return env


def pretrain_cmd(out: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "m3ae", "pretrain", "--preset", "tiny", "--out", str(out), "--no-progress",
            *extra, *overrides]


def run_ok(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p
