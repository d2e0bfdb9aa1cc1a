"""Fast checks of the pieces: ranks from the environment, data sharding, masking noise,
loss normalisation across processes, checkpoint pruning and refusal, metrics files."""
from __future__ import annotations

import json

import pytest
import torch

from m3ae.data import EpochSampler
from m3ae.losses import M3AELoss, loss_sample_counts
from m3ae.model import M3AE
from m3ae.training.checkpoint import (WeightsView, kept_steps, list_checkpoints, resolve_resume,
                                      save_checkpoint)
from m3ae.training.distributed import DistInfo, env_rank_info
from m3ae.training.loggers import read_metrics, truncate_metrics
from m3ae.training.step import masking_noise


def test_rank_from_torchrun_then_slurm_then_single():
    assert env_rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (3, 1, 8)
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    assert env_rank_info(slurm) == (5, 1, 16)
    # torchrun inside a SLURM job: torchrun's own variables win.
    assert env_rank_info({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == (0, 0, 2)
    assert env_rank_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 0, 1)
    assert env_rank_info({}) == (0, 0, 1)


def test_rank_shards_of_a_step_are_the_single_process_batch():
    size, world, b = 23, 2, 3  # 23 is odd: one sample per epoch is dropped for equal shares
    single = [i for i, _ in EpochSampler(size, seed=7)]
    seeds = dict(EpochSampler(size, seed=7))
    shards = [list(EpochSampler(size, seed=7, rank=r, world_size=world, even=True)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 11
    for step in range(len(shards[0]) // b):
        together = sorted(i for s in shards for i, _ in s[step * b:(step + 1) * b])
        assert together == sorted(single[step * b * world:(step + 1) * b * world])
    # A sample keeps its augmentation seed whichever rank reads it.
    assert all(seeds[i] == s for shard in shards for i, s in shard)
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(10, rank=2, world_size=2)


def test_masking_noise_rows_follow_the_samples():
    full = masking_noise(3, 5, 0, 6, 10, DistInfo(), torch.device("cpu"))
    parts = [masking_noise(3, 5, 0, 3, 10, DistInfo(rank=r, world_size=2), torch.device("cpu"))
             for r in range(2)]
    # rank r holds the global rows r, r + 2, r + 4 (the sampler's striding)
    assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
    assert not torch.equal(full, masking_noise(3, 6, 0, 6, 10, DistInfo(), torch.device("cpu")))
    # A quarter hidden first in half the global batch: chosen before the rows are split.
    full = masking_noise(3, 5, 0, 6, 16, DistInfo(), torch.device("cpu"), quarter_fraction=0.5)
    parts = [masking_noise(3, 5, 0, 3, 16, DistInfo(rank=r, world_size=2), torch.device("cpu"), 0.5)
             for r in range(2)]
    assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
    assert (full[:3] >= 1).sum(1).tolist() == [4, 4, 4] and (full[3:] < 1).all()


def test_loss_counts_and_global_normalisation(tiny_cfg, batch_factory):
    torch.manual_seed(0)
    model = M3AE(tiny_cfg)
    image, text, pad = batch_factory(tiny_cfg, b=6, t=8, lengths=[8, 1, 5, 3, 2, 8])
    g = torch.Generator().manual_seed(0)
    inoise, tnoise = torch.rand(6, tiny_cfg.num_patches, generator=g), torch.rand(6, 8, generator=g)
    crit = M3AELoss()
    out = model(image, text, pad, image_noise=inoise, text_noise=tnoise)
    n_img, n_txt, n_tok = loss_sample_counts(6, pad, tiny_cfg.num_patches, 0.75, 0.75)
    assert n_tok == int(out.text_mask.sum())  # the text head's rows, known before the forward
    # A 1-token caption keeps floor(0.25) = 0 tokens, so it is masked: every sample counts;
    # the counts are what the loss itself divides by.
    assert (n_img, n_txt) == (6, int(out.text_mask.any(1).sum())) == (6, 6)
    full = crit(out)
    assert torch.allclose(crit(out, 6.0, 6.0).total, full.total, rtol=0, atol=0)
    # Two "processes" holding 4 and 2 samples: with the global count / world size as the
    # denominator, the mean of their losses is the full batch's loss (plain per-process means are not).
    halves = []
    for sl in (slice(0, 4), slice(4, 6)):
        o = model(image[sl], text[sl], pad[sl], image_noise=inoise[sl], text_noise=tnoise[sl])
        halves.append((crit(o, 6 / 2, 6 / 2), crit(o)))
    assert torch.allclose((halves[0][0].total + halves[1][0].total) / 2, full.total, atol=1e-6)
    assert not torch.allclose((halves[0][1].total + halves[1][1].total) / 2, full.total, atol=1e-3)
    # Captions with a single real token at ratio 0.9 keep 0 and mask 1; no caption -> no text count.
    assert loss_sample_counts(None, None, 64, 0.75, 0.75) == (0, 0, 0)
    assert loss_sample_counts(torch.tensor([True, False, True]), None, 64, 0.75, 0.9) == (2, 0, 0)


def _tiny_model():
    from m3ae.config import model_config

    return M3AE(model_config("tiny", depth=1, dec_depth=1, emb_dim=32, dec_emb_dim=32, num_heads=2,
                             dec_num_heads=2, vocab_size=50))


def test_checkpoint_pruning_keeps_last_and_every(tmp_path):
    assert kept_steps([1, 2, 3, 4, 5, 6], keep_last=2, keep_every=3) == {3, 5, 6}
    assert kept_steps([1, 2, 3], keep_last=0) == {1, 2, 3}
    model = _tiny_model()
    for step in range(1, 8):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2, keep_every=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006", "step_00000007"]
    assert resolve_resume("latest", tmp_path).name == "step_00000007"
    # A half-written folder (a crash before the rename) is never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".tmp_step_00000009").mkdir()
    assert resolve_resume("latest", tmp_path).name == "step_00000007"
    with pytest.raises(FileNotFoundError, match="no such folder.*checkpoints/step_N"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    # The weights file alone loads into a model.
    from m3ae.model import M3AE as _M

    loaded = _M.from_pretrained(tmp_path / "checkpoints" / "step_00000007")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    model = _tiny_model()
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    with torch.no_grad():
        model.decoder.norm.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match="step 2"):
        save_checkpoint(tmp_path, 2, model, {"step": 2})
    sd = {k: v.clone() for k, v in _tiny_model().state_dict().items()}
    sd["text_head.bias"][0] = float("inf")
    with pytest.raises(FloatingPointError):
        save_checkpoint(tmp_path, 3, WeightsView(model.config, sd), {"step": 3})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_metrics_truncation_drops_later_and_torn_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    truncate_metrics(path, 3)
    assert read_metrics(path) == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.3}]


def test_lr_scales_with_the_global_batch():
    from m3ae.config import TrainConfig

    cfg = TrainConfig(batch_size=32, accum_steps=2, base_lr=1.6e-4)
    assert cfg.global_batch(4) == 256
    assert cfg.lr_for(4) == pytest.approx(1.6e-4) and cfg.lr_for(1) == pytest.approx(0.4e-4)
    assert TrainConfig(lr=1e-3).lr_for(8) == 1e-3
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="deepspeed")


def test_fidelity_defaults_follow_the_official_code():
    from m3ae.config import Config
    from m3ae.evaluation.linear_probe import probe_warmup_epochs

    cfg = Config()
    assert cfg.train.grad_clip == 0  # official: clip at 1e9, i.e. never; MAE does not clip
    assert cfg.data.text_len == 64 == cfg.model.max_text_len
    assert cfg.train.text_loss_norm == "batch"
    assert cfg.model.text_embed_init_std == 1.0
    assert probe_warmup_epochs(90) == 10 and probe_warmup_epochs(50) == 10 and probe_warmup_epochs(4) == 2


def test_decay_norm_scales_reproduces_the_official_weight_decay_mask(official_fixtures):
    """With train.decay_norm_scales=true the decayed set is exactly the official code's mask
    (reference.json), which decays LayerNorm scales; the default differs only there."""
    import json

    from m3ae.interop.official import flax_name
    from m3ae.optim import param_groups

    ref = json.loads((official_fixtures / "reference.json").read_text())["m3ae_weight_decay_mask"]
    official = {flax_name(k.removeprefix("params/")): v for k, v in ref.items()}
    assert None not in official
    from m3ae.config import model_config

    model = M3AE(model_config("tiny", image_size=32, patch_size=8, emb_dim=64, depth=2, num_heads=4,
                              dec_emb_dim=32, dec_depth=2, dec_num_heads=4, vocab_size=1000))
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(names.values()) == set(official)
    for flag in (True, False):
        decayed = {names[id(p)] for p in param_groups(model, 0.05, decay_norm_scales=flag)[0]["params"]}
        diff = {n for n in official if official[n] != (n in decayed)}
        if flag:
            assert diff == set()
        else:
            assert diff and all(".norm" in n and n.endswith(".weight") for n in diff)


def test_warmup_cosine_is_the_closed_form():
    """The one schedule of pre-training, the linear probe and fine-tuning, at its landmarks."""
    import math

    from m3ae.optim import warmup_cosine

    peak, end, total, warm = 2.0, 0.1, 110, 10
    lr = [warmup_cosine(s, total, warm, peak, end) for s in range(total + 5)]
    assert lr[0] == pytest.approx(peak / warm)  # warm-up start: step 0 already trains
    assert lr[warm - 1] == pytest.approx(peak) and lr[warm] == pytest.approx(peak)  # warm-up end, cosine start
    assert lr[60] == pytest.approx((peak + end) / 2)  # cosine midpoint
    assert lr[35] == pytest.approx(end + (peak - end) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr[total] == pytest.approx(end) and lr[-1] == pytest.approx(end)  # reached at the end, then held
    assert all(a >= b for a, b in zip(lr[warm:], lr[warm + 1:]))
    assert warmup_cosine(60, total, warm) == pytest.approx(0.5)  # the probe's and fine-tuning's factor form
    assert warmup_cosine(0, 10, 2.5) == pytest.approx(0.4)  # fractional warm-up (fine-tuning's epochs * steps)
    assert warmup_cosine(0, 10, 0) == 1.0  # no warm-up: the cosine from the first step


def test_an_existing_process_group_gives_the_ranks(monkeypatch):
    """A group the caller made (any init method) is the truth, not the launcher's variables."""
    import torch.distributed as dist

    from m3ae.training.distributed import init_distributed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size) == (2, 4)
