"""Issue 13, cases 3-6 and 8: divergence stopped cleanly, the last good checkpoint kept and
named, a changed LR honoured on resume, a from-data tokenizer reused on resume, and the
documented tolerance of the 2-process test."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from m3ae.training import TrainingDiverged, lr_at, pretrain
from m3ae.training.checkpoint import kept_steps, list_checkpoints


def _run(h, tiny, tmp_path, name, *extra, **kw):
    return pretrain(h.tiny_config(tiny + list(extra)), tmp_path / name, progress=False, **kw)


def _poison_loss_after(monkeypatch, good_calls: int):
    """Make every loss after the first ``good_calls`` NaN."""
    from m3ae.losses import M3AELoss
    import m3ae.training.step as step

    class Poisoned(M3AELoss):
        calls = 0

        def forward(self, out, *a, **kw):
            res = super().forward(out, *a, **kw)
            Poisoned.calls += 1
            return res._replace(total=res.total * float("nan")) if Poisoned.calls > good_calls else res

    monkeypatch.setattr(step, "M3AELoss", Poisoned)


def _named_checkpoint(msg: str) -> Path | None:
    found = re.search(r"is (\S+step_\d+);", msg)
    return Path(found.group(1)) if found else None


def test_update_that_overflows_the_weights_stops_cleanly(h, tiny, tmp_path, capsys):
    """Case 3: lr=1e39, checkpoint every step: step 1 is finite, its update is not."""
    from m3ae.cli import main

    out = tmp_path / "lr"
    rc = main(["pretrain", "--out", str(out), "--no-progress", *tiny, "train.steps=4", "train.batch_size=2",
               "train.lr=1e39", "train.ckpt_every=1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "stopping at step 1: its update (LR 1e+39) made the weights non-finite" in err
    assert "no checkpoint was written before step 1" in err and "Traceback" not in err
    assert list_checkpoints(out) == [] and not (out / "final").exists()


def test_streak_keeps_and_names_the_last_good_checkpoint(h, tiny, tmp_path, monkeypatch):
    """Case 4: with keep_last=2, the checkpoints of steps 3 and 4 (written during the streak)
    would rotate step 2 out; it must survive and be the one the message names."""
    _poison_loss_after(monkeypatch, 2)
    with pytest.raises(TrainingDiverged) as e:
        _run(h, tiny, tmp_path, "nan", "train.steps=10", "train.batch_size=2", "train.ckpt_every=1",
             "train.keep_last=2", "train.max_nonfinite_steps=3")
    named = _named_checkpoint(str(e.value))
    assert named is not None and named.name == "step_00000002" and named.is_dir()
    assert "stopping at step 5" in str(e.value) and f"--resume {named}" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == [
        "step_00000002", "step_00000003", "step_00000004"]
    # Resuming from a checkpoint written during the streak still knows the good one.
    from m3ae.training.checkpoint import last_good_after_resume, load_trainer_state

    ck4 = tmp_path / "nan" / "checkpoints" / "step_00000004"
    assert last_good_after_resume(ck4, load_trainer_state(ck4)) == named


def test_streak_from_the_first_step_names_no_checkpoint_wrongly(h, tiny, tmp_path, monkeypatch):
    """Case 4: checkpoints of steps 2 and 4 were written during a streak that began at step 1;
    none of them is 'good', and the message says exactly that."""
    _poison_loss_after(monkeypatch, 0)
    with pytest.raises(TrainingDiverged) as e:
        _run(h, tiny, tmp_path, "nan", "train.steps=10", "train.batch_size=2", "train.ckpt_every=2",
             "train.max_nonfinite_steps=5")
    msg = str(e.value)
    assert "stopping at step 5" in msg and "no checkpoint was written before step 1" in msg
    assert "yet" not in msg and _named_checkpoint(msg) is None
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["step_00000002", "step_00000004"]


def test_rotation_never_deletes_the_protected_checkpoint():
    assert kept_steps([2, 3, 4, 5], keep_last=2, protect=2) == {2, 4, 5}
    assert kept_steps([2, 3, 4, 5], keep_last=2, keep_every=3, protect=None) == {3, 4, 5}


def test_resume_with_a_changed_lr_follows_the_new_schedule(h, tiny, tmp_path, capsys):
    """Case 5: resume at step 4 with train.lr=1e-5; steps 5-8 follow the new schedule."""
    common = ["train.steps=8", "train.batch_size=2", "train.ckpt_every=4", "train.warmup_steps=2"]
    _run(h, tiny, tmp_path, "r", *common, max_steps=4)
    capsys.readouterr()
    cfg = h.tiny_config(tiny + common + ["train.lr=1e-5", "train.weight_decay=0.2"])
    resumed = pretrain(cfg, tmp_path / "r", resume="latest", progress=False)
    assert [r["step"] for r in resumed.history] == [5, 6, 7, 8]
    assert [r["lr"] for r in resumed.history] == pytest.approx([lr_at(s, cfg.train) for s in (5, 6, 7, 8)],
                                                               rel=1e-12)
    assert resumed.history[0]["lr"] < 1e-5  # not the old 1e-3 schedule
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "train.lr 0.001 -> 1e-05" in out and "train.weight_decay 0.05 -> 0.2" in out


def test_optimizer_hyperparameters_come_from_the_config_on_resume():
    from torch import nn

    from m3ae.config import TrainConfig
    from m3ae.optim import build_optimizer, build_scheduler, config_hyperparameters

    model = nn.Linear(3, 2)
    old = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05, warmup_steps=1, steps=10))
    build_scheduler(old, TrainConfig(lr=1e-3, warmup_steps=1, steps=10))
    model(torch.randn(4, 3)).sum().backward()
    old.step()
    new_cfg = TrainConfig(lr=1e-5, weight_decay=0.3, betas=(0.8, 0.9), warmup_steps=1, steps=10)
    new = build_optimizer(model, new_cfg)
    build_scheduler(new, new_cfg)
    with config_hyperparameters(new):
        new.load_state_dict(old.state_dict())
    sched = build_scheduler(new, new_cfg, start_step=1)
    assert [g["weight_decay"] for g in new.param_groups] == [0.3, 0.0]
    assert all(g["betas"] == (0.8, 0.9) for g in new.param_groups)
    assert sched.get_last_lr() == [pytest.approx(lr_at(1, new_cfg))] * 2
    assert torch.equal(new.state[model.weight]["exp_avg"], old.state[model.weight]["exp_avg"])


def test_from_data_tokenizer_is_reused_on_resume(h, tiny, tmp_path, monkeypatch):
    """Case 6: a resumed data.tokenizer=from-data run uses the checkpoint's tokenizer.json
    (training it again numbers the tokens differently)."""
    import m3ae.data.builders as data

    trained = []
    real = data.train_wordpiece

    def counting(*a, **kw):
        trained.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(data, "train_wordpiece", counting)
    common = ["data.tokenizer=from-data", "data.tokenizer_vocab_size=120", "train.steps=4",
              "train.batch_size=2", "train.ckpt_every=2"]
    _run(h, tiny, tmp_path, "fd", *common, max_steps=2)
    assert len(trained) == 1
    _run(h, tiny, tmp_path, "fd", *common, resume="latest")
    assert len(trained) == 1  # not trained again
    run = tmp_path / "fd"
    first = (run / "checkpoints" / "step_00000002" / "tokenizer.json").read_text()
    assert (run / "final" / "tokenizer.json").read_text() == first
    assert (run / "checkpoints" / "step_00000004" / "tokenizer.json").read_text() == first


def test_readme_states_the_tolerance_the_distributed_test_checks(h):
    """Case 8: the README's claim about 2 processes quotes what test_distributed.py asserts."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    claim = re.search(r"A 2-process gloo run[^.]*\.", readme)
    assert claim is not None
    text = " ".join(claim.group(0).split())

    def written(x: float) -> str:  # 1e-05 -> "1e-5", as the README writes it
        return f"{x:.0e}".replace("e-0", "e-")

    assert f"relative {written(h.dist_loss_rtol)}" in text, text
    assert f"absolute {written(h.dist_weight_atol)}" in text, text
