"""A real run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one,
both with ``--resume latest`` and when ``torchrun --max-restarts`` restarts the worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

STEPS = 16


@pytest.fixture(scope="module")
def overrides(tiny) -> list[str]:
    # synthetic_size=24 / batch 2 = 12 steps an epoch: the runs cross an epoch boundary.
    return [o for o in tiny if not o.startswith("data.synthetic_size")] + [
        "data.synthetic_size=24", f"train.steps={STEPS}", "train.batch_size=2", "train.ckpt_every=1",
        "train.keep_last=2"]


@pytest.fixture(scope="module")
def reference(overrides, h, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    h.run_ok(h.pretrain_cmd(out, overrides))
    return out


def _kill_when_checkpointed(proc: subprocess.Popen, run_dir: Path, step: int, pid_of=None) -> None:
    """SIGKILL once the checkpoint of ``step`` exists (the run is then somewhere after it)."""
    target = run_dir / "checkpoints" / f"step_{step:08d}"
    deadline = time.time() + 240
    while not target.exists():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    os.kill(pid_of() if pid_of else proc.pid, signal.SIGKILL)


def _assert_same_as_reference(h, run_dir: Path, reference: Path) -> None:
    from m3ae.training.loggers import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none missing, none twice
    assert h.losses(run_dir) == h.losses(reference)  # exactly, not approximately
    # Every tensor bit for bit. (Not the file's bytes: safetensors writes its metadata map in
    # hash order, which differs from process to process.)
    a, b = h.weights(run_dir), h.weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].view(-1).view(torch.int32).equal(b[k].view(-1).view(torch.int32)), k


def test_sigkill_then_resume_latest_is_bit_identical(h, overrides, reference, tmp_path):
    _kill_resume_and_compare(h, overrides, tmp_path / "run", reference)


def _kill_resume_and_compare(h, overrides: list[str], out: Path, reference: Path) -> None:
    """Start the run, SIGKILL it after its step-3 checkpoint, ``--resume latest``, and
    require it to end as ``reference`` did."""
    proc = subprocess.Popen(h.pretrain_cmd(out, overrides), env=h.cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _kill_when_checkpointed(proc, out, 3)
    assert proc.wait(60) == -signal.SIGKILL
    assert not (out / "final").exists()
    p = h.run_ok(h.pretrain_cmd(out, overrides, "--resume", "latest"))
    assert "resumed from" in p.stdout + p.stderr
    _assert_same_as_reference(h, out, reference)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker")
def test_torchrun_restarts_a_killed_worker_which_resumes(h, overrides, reference, tmp_path):
    out = tmp_path / "run"
    cmd = h.torchrun_cmd(1, out, overrides, "--max-restarts=1", "--monitor-interval=0.2")
    proc = subprocess.Popen(cmd, env=h.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def worker() -> int:
        kids = _children(proc.pid)
        assert len(kids) == 1, kids
        return kids[0]

    _kill_when_checkpointed(proc, out, 3, pid_of=worker)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout + stderr
    _assert_same_as_reference(h, out, reference)


@pytest.fixture(scope="module")
def cache_overrides(overrides, tmp_path_factory) -> list[str]:
    """The same run on an image cache of 24 samples (data.source=cache): 12 steps an epoch."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from helpers import pair_shards

    from m3ae.data.cache import build_cache, source_config

    root = tmp_path_factory.mktemp("cache")
    build_cache([source_config(pair_shards(root / "shards", 2, 12, varied=True))], root / "cache", 32,
                progress=False)
    return overrides + ["data.source=cache", f"data.urls={root / 'cache'}"]


@pytest.mark.parametrize("tokenizer", ["file", "from-data"])
def test_sigkill_then_resume_from_a_cache_is_bit_identical(h, cache_overrides, tokenizer, tmp_path):
    """Also with a tokenizer trained at start-up: the reference trains its own, which must be
    the one the killed run trained and saved with its checkpoint (issue 32)."""
    if tokenizer == "from-data":
        cache_overrides = cache_overrides + ["data.tokenizer=from-data", "data.tokenizer_vocab_size=120"]
    reference = tmp_path / "reference"
    h.run_ok(h.pretrain_cmd(reference, cache_overrides))
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/seen"] for r in rows] == [2 * r["step"] for r in rows]
    _kill_resume_and_compare(h, cache_overrides, tmp_path / "run", reference)
