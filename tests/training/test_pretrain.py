import json

import pytest
import torch
from safetensors.torch import load_file

from m3ae.config import build_config
from m3ae.model import M3AE
from m3ae.training import lr_at, pretrain
from m3ae.training.checkpoint import list_checkpoints

SMALL = ["model.emb_dim=64", "model.depth=2", "model.dec_emb_dim=32", "model.dec_depth=1",
         "train.batch_size=16", "train.log_every=1", "train.recon_every=0", "data.synthetic_size=512",
         "data.crop_scale=[0.9,1.0]"]


def test_loss_falls_on_built_in_data(tmp_path):
    cfg = build_config("tiny", None, SMALL + ["train.steps=40", "train.lr=2e-3", "train.warmup_steps=5",
                                              "train.ckpt_every=0"])
    res = pretrain(cfg, tmp_path, progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "loss_curve.png").is_file()
    assert M3AE.from_pretrained(tmp_path / "final").config.emb_dim == 64
    saved = (tmp_path / "config.yaml").read_text()
    assert "emb_dim: 64" in saved and json.loads((tmp_path / "version.json").read_text())["m3ae"]


def test_resume_continues_exactly(tmp_path):
    over = SMALL + ["train.steps=6", "train.lr=1e-3", "train.warmup_steps=2", "train.ckpt_every=3"]
    full = pretrain(build_config("tiny", None, over), tmp_path / "a", progress=False)
    pretrain(build_config("tiny", None, over), tmp_path / "b", progress=False, max_steps=3)
    resumed = pretrain(build_config("tiny", None, over), tmp_path / "b", resume="latest", progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, 7))


def test_keep_last_checkpoints(tmp_path):
    cfg = build_config("tiny", None, SMALL + ["train.steps=5", "train.ckpt_every=1", "train.keep_last=2"])
    pretrain(cfg, tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary or stepped-aside folder


def test_lr_schedule_warmup_then_cosine():
    cfg = build_config("tiny", None, ["train.steps=110", "train.warmup_steps=10", "train.lr=1.0"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-9)


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    cfg = build_config("tiny", None, SMALL + ["model.vocab_size=10"])
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(cfg, tmp_path, progress=False)


def test_logs_data_time_and_records_norm_pix_loss(tmp_path, monkeypatch):
    import time

    import m3ae
    from m3ae.training import trainer

    slow = trainer._BatchStream.__next__

    def waiting(self):  # a loader that keeps every step waiting 50 ms for its batch
        time.sleep(0.05)
        return slow(self)

    monkeypatch.setattr(trainer._BatchStream, "__next__", waiting)
    cfg = build_config("tiny", None, SMALL + ["train.steps=4", "train.log_every=2", "train.ckpt_every=2",
                                              "train.norm_pix_loss=true"])
    pretrain(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:  # open_clip / timm's data_time beside the step time, in seconds per step
        assert 0.05 <= r["data_time"] < r["step_time"], r
    # Every model folder the run writes says what the image head predicts; loading reads it.
    for folder in (tmp_path / "final", *list_checkpoints(tmp_path)):
        assert json.loads((folder / "config.json").read_text())["norm_pix_loss"] is True
    assert m3ae.load_pretrained(tmp_path, device="cpu")[0].norm_pix_loss is True
