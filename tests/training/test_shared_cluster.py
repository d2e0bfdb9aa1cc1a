"""Issue 25: reliability on shared clusters. One writer per run folder (case 1), resume on
another number of processes that loses no count or sample (case 2), all ranks stopping
together (case 3), and checkpoints that survive a kill (case 4), a full or unwritable disk
(case 5) and damaged files (case 6)."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from m3ae.cli import main
from m3ae.training import TrainingDiverged, pretrain
from m3ae.training.checkpoint import list_checkpoints, resolve_resume
from m3ae.training.loggers import read_metrics


def _cfg(h, tiny, *extra):
    return h.tiny_config(tiny + ["train.batch_size=2", *extra])


def _lock(run: Path) -> Path:
    return run / ".lock"


# ----------------------------------------------------------------------------- case 1: one writer
@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_holders_lock_taken_over(h, tiny, tmp_path, capsys):
    run = tmp_path / "run"
    over = tiny + ["train.batch_size=2", "train.ckpt_every=1", "train.keep_last=1"]
    first = subprocess.Popen(h.pretrain_cmd(run, over + ["train.steps=100000"]), env=h.cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list_checkpoints(run):  # the first run is under way
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline, "the first run made no progress"
            time.sleep(0.05)
        capsys.readouterr()
        rc = main(["pretrain", "--out", str(run), "--no-progress", "--resume", "latest", *over, "train.steps=3"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"pid {first.pid} on {socket.gethostname()}" in err and "in use by another run" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert json.loads(_lock(run).read_text())["pid"] == first.pid  # the holder's lock is untouched
    finally:
        first.kill()
        first.wait(60)
    # SIGKILL left the lock behind; on this host its holder is known dead, so it is taken over.
    assert json.loads(_lock(run).read_text())["pid"] == first.pid
    done = read_metrics(run / "metrics.jsonl")[-1]["step"]
    res = pretrain(h.tiny_config(over + [f"train.steps={done + 1}"]), run, progress=False, resume="latest")
    out = capsys.readouterr().out
    assert f"taking over {_lock(run)}, left by pid {first.pid}" in out and "no longer running" in out
    assert res.steps == done + 1 and not _lock(run).exists()


@pytest.mark.slow
def test_sigterm_removes_the_lock(h, tiny, tmp_path):
    """SLURM's preemption and time limit send SIGTERM: a requeued job may start on another
    node, where a lock left behind would be refused."""
    run = tmp_path / "run"
    proc = subprocess.Popen(h.pretrain_cmd(run, tiny + ["train.batch_size=2", "train.steps=100000"]),
                            env=h.cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or not read_metrics(run / "metrics.jsonl"):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)
    assert json.loads(_lock(run).read_text())["pid"] == proc.pid
    proc.terminate()
    assert proc.wait(60) == -signal.SIGTERM  # it still ends as SIGTERM ends a process
    assert not _lock(run).exists()


def test_the_lock_is_held_while_running_and_released_on_every_exit_path(h, tiny, tmp_path, monkeypatch, request):
    from m3ae.training import loggers
    from m3ae.training.interrupt import TrainingInterrupted

    seen = []
    log = loggers.MetricsLogger.log

    def note_lock(self, row):
        holder = json.loads(_lock(self.path.parent).read_text())
        seen.append((holder["pid"], holder["host"]))
        log(self, row)

    monkeypatch.setattr(loggers.MetricsLogger, "log", note_lock)
    pretrain(_cfg(h, tiny, "train.steps=2"), tmp_path / "ok", progress=False)  # normal end
    assert seen == [(os.getpid(), socket.gethostname())] * 2 and not _lock(tmp_path / "ok").exists()
    with pytest.raises(TrainingDiverged):  # the non-finite stop
        pretrain(_cfg(h, tiny, "train.steps=3", "train.lr=1e39"), tmp_path / "nan", progress=False)
    assert not _lock(tmp_path / "nan").exists()
    with pytest.raises(ValueError, match="model.max_text_len"):  # an error before the first step
        pretrain(_cfg(h, tiny, "data.text_len=64"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # a failed start still leaves no folder

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))

    def ctrl_c(self, row):
        log(self, row)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loggers.MetricsLogger, "log", ctrl_c)
    with pytest.raises(TrainingInterrupted):
        pretrain(_cfg(h, tiny, "train.steps=3"), tmp_path / "cut", progress=False)
    assert not _lock(tmp_path / "cut").exists()


def test_a_lock_held_from_another_host_is_refused_with_the_way_out(h, tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _lock(run).write_text(json.dumps({"pid": 1, "host": "node-17", "started": 0}))
    with pytest.raises(FileExistsError, match=r"in use by another run \(pid 1 on node-17.*delete .*\.lock by hand"):
        pretrain(_cfg(h, tiny, "train.steps=1"), run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written


# -------------------------------------------------------------------- case 2: another world size
def _image_folder(root: Path) -> Path:
    """12 images, every third one junk (as in test_distributed.py): 2 steps of 6 read it once."""
    from PIL import Image

    root.mkdir()
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(buf, "JPEG")
        (root / f"{i:02d}.jpg").write_bytes(buf.getvalue() if i % 3 else b"junk")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_loses_no_count_or_sample(h, tiny, tmp_path, before, after):
    """Step 1 on ``before`` processes, step 2 on ``after`` (global batch 6 both times): the
    whole 12-image folder is read once, and the counts are those of one uninterrupted epoch."""
    folder = _image_folder(tmp_path / "imgs")
    common = tiny + ["data.source=imagefolder", f"data.urls={folder}", "data.max_skip_fraction=0.5"]

    def launch(n, *extra):
        args = common + [f"train.batch_size={6 // n}", *extra]
        return h.run_ok(h.torchrun_cmd(n, tmp_path / "run", args) if n > 1 else h.pretrain_cmd(tmp_path / "run", args))

    launch(before, "train.steps=1")
    p = launch(after, "train.steps=2", "--resume", "latest")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["data/seen"], r["data/skipped"]) for r in rows][-1] == (2, 12, 4)
    assert rows[0]["data/seen"] == 6
    assert "data: read 12, skipped 4 (33.33%); bad_image 4" in p.stdout


# ------------------------------------------------------------------ case 3: all ranks stop together
@pytest.mark.slow
def test_when_one_rank_stops_on_bad_data_every_rank_stops_with_its_message(h, tiny, tmp_path):
    """Only rank 1's share of the epoch is junk; rank 1 stops on data.max_skip_fraction at its
    first batch, and rank 0 (whose data is fine) must not wait for it in a collective."""
    from PIL import Image

    from m3ae.data import EpochSampler

    folder = tmp_path / "imgs"
    folder.mkdir()
    rank1 = {i for i, _ in EpochSampler(16, seed=0, rank=1, world_size=2, even=True)}
    for i in range(16):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(buf, "JPEG")
        (folder / f"{i:02d}.jpg").write_bytes(b"junk" if i in rank1 else buf.getvalue())
    logs = tmp_path / "logs"
    cmd = h.torchrun_cmd(2, tmp_path / "run", tiny + [
        "data.source=imagefolder", f"data.urls={folder}", "data.max_skip_fraction=0.5", "train.steps=4",
        "train.batch_size=2"], f"--log-dir={logs}", "--redirects=3")
    # Before the fix rank 1 alone stopped with the message; rank 0, in DDP's all-reduce, ended in a
    # gloo 'connection closed by peer' traceback once rank 1 exited (the timeout bounds a hang).
    p = subprocess.run(cmd, env=h.cli_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode != 0
    err = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    assert sorted(err) == [0, 1], list(logs.rglob("*"))
    for rank, text in err.items():
        lines = [x for x in text.splitlines() if x.startswith("m3ae pretrain:")]
        assert len(lines) == 1, (rank, text[-3000:])
        assert lines[0].startswith("m3ae pretrain: error: rank 1 of 2 stopped the run: data source imagefolder")
        assert "more than data.max_skip_fraction=0.5" in lines[0] and "Traceback" not in text, (rank, text[-3000:])
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert not _lock(tmp_path / "run").exists()


# --------------------------------------------------------------- case 4: SIGKILL inside the write
@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_weights", "after_optimizer", "before_rename"])
def test_a_kill_inside_a_checkpoint_write_resumes_from_the_last_complete_one(h, tiny, tmp_path, point, capsys):
    run = tmp_path / "run"
    over = tiny + ["train.batch_size=2", "train.steps=4", "train.ckpt_every=2", "train.keep_last=1"]
    env = dict(h.cli_env(), M3AE_TEST_KILL_AT=f"{point}@4")
    p = subprocess.run(h.pretrain_cmd(run, over), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    # The write of step 4 was cut off; rotation ran only after a complete write, so step 2 is kept.
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]
    assert (run / "checkpoints" / ".step_00000004.tmp").is_dir()
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--no-progress", "--resume", "latest", *over]) == 0
    out = capsys.readouterr().out
    assert f"ignoring {run / 'checkpoints' / '.step_00000004.tmp'}, a checkpoint whose writing was cut off" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in out
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004"]
    assert not (run / "checkpoints" / ".step_00000004.tmp").exists()


# ---------------------------------------------------------- case 5: a full or unwritable disk
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(h, tiny, tmp_path, monkeypatch, capsys,
                                                                          code):
    import safetensors.torch

    real = safetensors.torch.save_file  # m3ae.io.save_safetensors looks it up at each call

    def fail_at_step_4(tensors, filename, metadata=None):
        if "step_00000004" in filename:
            Path(filename).write_bytes(b"half a file")  # what a full disk leaves
            raise OSError(code, os.strerror(code), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_at_step_4)
    run = tmp_path / "run"
    rc = main(["pretrain", "--out", str(run), "--no-progress", *tiny, "train.batch_size=2", "train.steps=6",
               "train.ckpt_every=2", "train.keep_last=1"])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert err.count("\n") == 1 and "Traceback" not in err
    ck = run / "checkpoints"
    assert err.startswith(f"m3ae pretrain: error: could not write checkpoint {ck / 'step_00000004'}: "
                          f"{os.strerror(code)} at {ck / '.step_00000004.tmp' / '.model.safetensors.tmp'}")
    assert f"the newest checkpoint is still {ck / 'step_00000002'}" in err
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]  # nothing half-written left
    assert resolve_resume("latest", run) == ck / "step_00000002"
    assert not (run / "final").exists() and not _lock(run).exists()


def test_a_full_disk_while_logging_metrics_is_one_line_and_exit_4(h, tiny, tmp_path, monkeypatch, capsys):
    """Issue 32: a full disk while appending metrics.jsonl ended in a traceback (one process)."""
    import builtins

    from m3ae.training import loggers

    class FullDisk:
        def __init__(self, path):
            self.f = builtins.open(path, "a")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])  # what a full disk leaves: a torn line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "metrics.jsonl"))

    def open_full_at_step_5(path, mode="r", *args, **kwargs):
        if mode == "a" and len(read_metrics(path)) == 4:
            return FullDisk(path)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(loggers, "open", open_full_at_step_5, raising=False)
    run = tmp_path / "run"
    over = [*tiny, "train.batch_size=2", "train.steps=6", "train.ckpt_every=2"]
    rc = main(["pretrain", "--out", str(run), "--no-progress", *over])
    err = capsys.readouterr().err
    assert rc == 4 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"m3ae pretrain: error: could not append step 5 to {run / 'metrics.jsonl'}: "
                   f"{os.strerror(errno.ENOSPC)}; the run stopped there. Free space or fix the permissions, then "
                   "continue from its newest checkpoint with --resume latest (metrics.jsonl is cut back to that "
                   "step)\n")
    assert not _lock(run).exists() and resolve_resume("latest", run).name == "step_00000004"
    monkeypatch.undo()  # space freed
    assert main(["pretrain", "--out", str(run), "--no-progress", "--resume", "latest", *over]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------- case 6: damaged files
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {"model.safetensors": _truncate, "trainer_state.pt": _flip, "config.json": Path.unlink}


@pytest.fixture(scope="module")
def two_checkpoints(tiny, h, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("damaged") / "run"
    pretrain(h.tiny_config(tiny + ["train.batch_size=2", "train.steps=4", "train.ckpt_every=2"]), run,
             progress=False)
    return run


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_passed_over_and_named(two_checkpoints, tmp_path, name, capsys):
    import shutil

    from m3ae import load_pretrained
    from m3ae.model import M3AE

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    bad = run / "checkpoints" / "step_00000004"
    DAMAGE[name](bad / name)
    capsys.readouterr()
    assert resolve_resume("latest", run) == run / "checkpoints" / "step_00000002"
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"--resume latest: passing over step_00000004: {bad / name}")
    with pytest.raises(ValueError, match=f"--resume {bad}: {bad / name} is (damaged|missing)"):
        resolve_resume(str(bad), run)
    if name != "trainer_state.pt":  # the model's own files: loading names them in one line
        with pytest.raises((ValueError, FileNotFoundError), match=str(bad / name) if name != "config.json"
                           else f"{bad} is not a pretrained M3AE folder: config.json is missing"):
            M3AE.from_pretrained(bad)
        capsys.readouterr()
        rc = main(["embed", str(bad), "--data", "shapes:8", "-o", str(tmp_path / "f.npy"), "--device", "cpu",
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and name in err and "Traceback" not in err, err
    else:
        load_pretrained(bad)  # the weights themselves are fine
    # Every checkpoint damaged: refused, not resumed from.
    DAMAGE[name](run / "checkpoints" / "step_00000002" / name)
    with pytest.raises(ValueError, match="none of the 2 checkpoint"):
        resolve_resume("latest", run)
