"""In-process runs of the training loop on a tiny model: precision, accumulation,
activation checkpointing, non-finite steps, optional loggers, resume via ``max_steps``."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from m3ae.training import TrainingDiverged, pretrain
from m3ae.training.loggers import read_metrics


def _run(h, tiny, tmp_path, name, *extra, **kw):
    cfg = h.tiny_config(tiny + list(extra))
    return pretrain(cfg, tmp_path / name, progress=False, **kw)


def _final(run):
    from safetensors.torch import load_file

    return load_file(str(run.run_dir / "final" / "model.safetensors"))


def test_accumulation_equals_the_larger_batch(h, tiny, tmp_path):
    one = _run(h, tiny, tmp_path, "b4", "train.steps=3", "train.batch_size=4")
    two = _run(h, tiny, tmp_path, "b2x2", "train.steps=3", "train.batch_size=2", "train.accum_steps=2")
    # Same samples per step, but micro-batch k of a step draws its masks from its own stream,
    # so masks differ: the losses agree in level only, the LR (global batch 4) exactly. The
    # exact equivalence of accumulation is checked across processes in test_distributed.py.
    assert [r["lr"] for r in one.history] == [r["lr"] for r in two.history]
    assert abs(one.history[0]["loss"] - two.history[0]["loss"]) < 0.5


def test_grad_checkpointing_changes_no_number(h, tiny, tmp_path):
    """Recomputing the blocks in backward is the same arithmetic (with accumulation on)."""
    a = _run(h, tiny, tmp_path, "a", "train.steps=2", "train.batch_size=2", "train.accum_steps=2")
    b = _run(h, tiny, tmp_path, "b", "train.steps=2", "train.batch_size=2", "train.accum_steps=2",
             "train.grad_checkpointing=true")
    assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-6)
    h.assert_weights_close(_final(a), _final(b))


def test_bf16_autocast_on_cpu_and_fp16_refused(h, tiny, tmp_path):
    fp32 = _run(h, tiny, tmp_path, "fp32", "train.steps=1", "train.batch_size=4")
    bf16 = _run(h, tiny, tmp_path, "bf16", "train.steps=1", "train.batch_size=4", "train.precision=bf16")
    # bf16 keeps ~3 significant digits; the loss of the first step agrees to about that.
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=2e-2)
    assert bf16.history[0]["loss"] != fp32.history[0]["loss"]
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        _run(h, tiny, tmp_path, "fp16", "train.steps=1", "train.precision=fp16", "train.device=cpu")


def test_image_only_run(h, tiny, tmp_path):
    run = _run(h, tiny, tmp_path, "img", "train.steps=2", "train.batch_size=4", "data.paired_fraction=0")
    assert all(r["text_loss"] == 0 and r["image_loss"] > 0 for r in run.history)


def test_nonfinite_steps_stop_the_run_naming_the_checkpoint(h, tiny, tmp_path, monkeypatch):
    from m3ae.losses import M3AELoss
    import m3ae.training.step as step

    class PoisonedAfter2(M3AELoss):
        calls = 0

        def forward(self, out, *a, **kw):
            res = super().forward(out, *a, **kw)
            PoisonedAfter2.calls += 1
            return res._replace(total=res.total * float("nan")) if PoisonedAfter2.calls > 2 else res

    monkeypatch.setattr(step, "M3AELoss", PoisonedAfter2)
    with pytest.raises(TrainingDiverged) as e:
        _run(h, tiny, tmp_path, "nan", "train.steps=10", "train.batch_size=2", "train.ckpt_every=1",
             "train.max_nonfinite_steps=3")
    msg = str(e.value)
    assert "stopping at step 5" in msg and "step_00000002" in msg and "learning rate" in msg
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]  # step 5 stops before logging
    # Skipped steps never touched the weights: the checkpoints of steps 2, 3 and 4 are equal
    # (they are written from finite weights only).
    from safetensors.torch import load_file

    ck = tmp_path / "nan" / "checkpoints"
    w2, w4 = (load_file(str(ck / f"step_0000000{s}" / "model.safetensors")) for s in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)


def test_cli_reports_divergence_without_traceback(h, tiny, tmp_path, monkeypatch, capsys):
    from m3ae.cli import main
    from m3ae.losses import M3AELoss
    import m3ae.training.step as step

    class AlwaysNan(M3AELoss):
        def forward(self, out, *a, **kw):
            res = super().forward(out, *a, **kw)
            return res._replace(total=res.total * float("nan"))

    monkeypatch.setattr(step, "M3AELoss", AlwaysNan)
    rc = main(["pretrain", "--out", str(tmp_path / "cli"), "--no-progress", *tiny, "train.steps=5",
               "train.batch_size=2", "train.max_nonfinite_steps=2"])
    err = capsys.readouterr().err
    assert rc == 3 and "stopping at step 2" in err and "no checkpoint was written before step 1" in err
    assert "Traceback" not in err


def test_optional_loggers(h, tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # "not installed"
    with pytest.raises(ImportError, match=r"pip install 'm3ae\[tensorboard\]'"):
        _run(h, tiny, tmp_path, "tb", "train.steps=1", "train.tensorboard=true")

    calls = []
    fake = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=lambda d, step: calls.append(("log", step, d)),
                                finish=lambda: calls.append(("finish",)))

    def init(**kw):
        calls.append(("init", kw))
        return run

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _run(h, tiny, tmp_path, "wb", "train.steps=2", "train.batch_size=2", "train.wandb=true",
         "train.wandb_project=proj")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2]
    assert calls[-1] == ("finish",)
    logged = [c[2] for c in calls if c[0] == "log"]
    rows = read_metrics(tmp_path / "wb" / "metrics.jsonl")
    assert [d["train/loss"] for d in logged] == [r["loss"] for r in rows]


def test_in_process_resume_is_exact(h, tiny, tmp_path):
    full = _run(h, tiny, tmp_path, "full", "train.steps=5", "train.batch_size=2")
    # data.synthetic_size=64 / batch 2: an epoch is 32 steps; interrupt at 3, resume to 5.
    _run(h, tiny, tmp_path, "part", "train.steps=5", "train.batch_size=2", "train.ckpt_every=1",
         max_steps=3)
    cfg = h.tiny_config(tiny + ["train.steps=5", "train.batch_size=2"])
    part = pretrain(cfg, tmp_path / "part", resume="latest", progress=False)
    assert part.history[0]["step"] == 4
    assert h.losses(tmp_path / "part") == h.losses(tmp_path / "full")
    a, b = _final(full), _final(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
