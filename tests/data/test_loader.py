"""Scale: exactly-once over ranks x workers, shard splitting, resume, skip threshold, losses."""
from __future__ import annotations

import pytest
import torch

from helpers import image_bytes, pair_shards
from m3ae.config import DataConfig
from m3ae.data import Collator, DataError, EpochSampler, build_pretrain_loader
from m3ae.losses import M3AELoss
from m3ae.model import M3AE


def keys_of(loader, limit=None):
    out = []
    for i, b in enumerate(loader, 1):
        out += b["key"]
        if limit is not None and i >= limit:
            break
    return out


def text_cfg(tmp_path, n=101, **kw):
    p = tmp_path / "lines.txt"
    p.write_text("".join(f"line {i}\n" for i in range(n)))
    return DataConfig(source="text", urls=str(p), **kw)


@pytest.mark.parametrize("train", [False, True])
def test_exactly_once_two_ranks_two_workers(tmp_path, train):
    cfg = text_cfg(tmp_path, 101, num_workers=2)
    per_rank = [keys_of(build_pretrain_loader(cfg, 16, None, 8, train=train, rank=r, world_size=2))
                for r in range(2)]
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything))  # no duplicates
    if train:  # equal shares; the one leftover line of 101 is left out this epoch
        assert [len(k) for k in per_rank] == [50, 50]
    else:
        assert sorted(everything) == sorted(f"lines.txt:{i + 1}" for i in range(101))  # no gaps


def test_sampler_epochs_and_positions():
    s = EpochSampler(10, seed=3, rank=1, world_size=2)
    first = [i for i, _ in s]
    s.set_position(0, 2)
    assert [i for i, _ in s] == first[2:] and len(s) == 3
    s.set_position(1, 0)
    assert sorted(i for i, _ in s) != sorted(first) or [i for i, _ in s] != first  # a new order


def test_shards_split_over_ranks_and_workers(tmp_path):
    cfg = DataConfig(source="webdataset", urls=pair_shards(tmp_path, 4, 6), num_workers=2, shuffle_buffer=5)
    per_rank = [keys_of(build_pretrain_loader(cfg, 16, None, 4, rank=r, world_size=2)) for r in range(2)]
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(f"s{s}_{i:03d}" for s in range(4) for i in range(6))
    assert len(per_rank[0]) == 12


def test_too_few_shards_and_resampling(tmp_path):
    pattern = pair_shards(tmp_path, 1, 8)
    with pytest.raises(DataError, match="1 shard\\(s\\) for 2 readers"):
        build_pretrain_loader(DataConfig(source="webdataset", urls=pattern, num_workers=2), 16, None, 4)
    cfg = DataConfig(source="webdataset", urls=pattern, num_workers=2, resample=True, shuffle_buffer=0)
    keys = keys_of(build_pretrain_loader(cfg, 16, None, 4), limit=6)  # endless: both workers draw
    assert len(keys) == 24 and set(keys) == {f"s0_{i:03d}" for i in range(8)}


def test_resume_map_source(tmp_path):
    cfg = text_cfg(tmp_path, 40, num_workers=2)
    full = keys_of(build_pretrain_loader(cfg, 16, None, 4, seed=5))
    a = build_pretrain_loader(cfg, 16, None, 4, seed=5)
    head = keys_of(a, limit=3)
    state = a.state_dict()
    assert state["kind"] == "map" and state["position"] == 12
    b = build_pretrain_loader(cfg, 16, None, 4, seed=5)
    b.load_state_dict(state)
    assert head + keys_of(b) == full


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_shard_stream(tmp_path, workers):
    cfg = DataConfig(source="webdataset", urls=pair_shards(tmp_path, 4, 6), num_workers=workers, shuffle_buffer=5)
    full = keys_of(build_pretrain_loader(cfg, 16, None, 4, seed=1))
    a = build_pretrain_loader(cfg, 16, None, 4, seed=1)
    head = keys_of(a, limit=3)
    state = a.state_dict()
    b = build_pretrain_loader(cfg, 16, None, 4, seed=1)
    b.load_state_dict(state)
    tail = keys_of(b)
    # Nothing repeated, nothing skipped. With workers, the DataLoader deals batches round-robin
    # starting from worker 0 again, so only the interleaving of the workers' batches changes.
    assert (head + tail == full) if workers == 0 else (sorted(head + tail) == sorted(full))
    assert len(set(head + tail)) == len(full)
    assert sorted(full) == sorted(f"s{s}_{i:03d}" for s in range(4) for i in range(6))
    assert b.state_dict()["epoch"] == 1
    c = build_pretrain_loader(DataConfig(**{**cfg.__dict__, "num_workers": workers + 1}), 16, None, 4, seed=1)
    with pytest.raises(DataError, match="same number"):
        c.load_state_dict(state)


def test_resume_mixture(tmp_path):
    (tmp_path / "t.txt").write_text("".join(f"t{i}\n" for i in range(7)))
    cfg = DataConfig(source="mixture", mixture_mode="sample", shuffle_buffer=4, mixture=[
        {"source": "webdataset", "urls": pair_shards(tmp_path, 1, 9)}, {"source": "text", "urls": str(tmp_path / "t.txt")}])
    full = keys_of(build_pretrain_loader(cfg, 16, None, 3), limit=8)
    a = build_pretrain_loader(cfg, 16, None, 3)
    head = keys_of(a, limit=3)
    b = build_pretrain_loader(cfg, 16, None, 3)
    b.load_state_dict(a.state_dict())
    assert head + keys_of(b, limit=5) == full


def test_too_many_skips_stop_the_run(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(seed=i, size=(12, 12)) if i < 6 else b"garbage")
    cfg = DataConfig(source="imagefolder", urls=str(tmp_path), max_skip_fraction=0.2)
    with pytest.raises(DataError, match=r"imagefolder .*4 of 10 samples were skipped.*bad_image 4"):
        keys_of(build_pretrain_loader(cfg, 16, None, 5))
    ok = build_pretrain_loader(DataConfig(**{**cfg.__dict__, "max_skip_fraction": 0.5}), 16, None, 5)
    assert len(keys_of(ok)) == 6 and ok.skips.skipped["bad_image"] == 4
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="every sample read was skipped"):
        keys_of(build_pretrain_loader(DataConfig(**{**cfg.__dict__, "max_skip_fraction": 1.0}), 16, None, 5))


def test_losses_average_over_samples_that_have_them(tiny_cfg):
    """A mixture batch: image-only, text-only and paired samples; the image loss averages over
    the samples that have an image, so adding text-only samples does not dilute it."""
    torch.manual_seed(0)
    model = M3AE(tiny_cfg).eval()
    b, t = 4, 8
    image = torch.randn(b, 3, tiny_cfg.image_size, tiny_cfg.image_size)
    text = torch.randint(5, tiny_cfg.vocab_size, (b, t))
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1] = True  # sample 1: image only (all-padding caption)
    valid = torch.tensor([True, True, False, True])  # sample 2: text only
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(image, text, pad, valid, generator=g)
    losses = M3AELoss(1.0, 0.5)(out)
    assert out.image_mask[2].sum() == 0 and out.text_mask[1].sum() == 0
    per_img = ((out.image_pred - out.image_target) ** 2).mean(-1)
    m = out.image_mask.float()
    per_sample = (per_img * m).sum(1) / m.sum(1).clamp_min(1)
    expect_img = per_sample[[0, 1, 3]].mean()
    assert torch.allclose(losses.image_loss, expect_img, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(out.text_logits.transpose(1, 2), out.text_target, reduction="none")
    tm = out.text_mask.float()
    per_txt = (ce * tm).sum(1) / tm.sum(1).clamp_min(1)
    has = tm.sum(1) > 0
    # The text loss follows the official code by default: the sum of per-sample means over the
    # whole batch (the image-only sample adds 0); text_norm="text" averages over captioned samples.
    assert torch.allclose(losses.text_loss, per_txt.sum() / b, atol=1e-5)
    assert torch.allclose(M3AELoss(1.0, 0.5, text_norm="text")(out).text_loss, per_txt[has].mean(), atol=1e-5)
    # A text-only batch (image=None): the image loss is 0, the total is the weighted text loss.
    with torch.no_grad():
        out2 = model(None, text, pad, None, generator=g)
    l2 = M3AELoss(1.0, 0.5)(out2)
    assert float(l2.image_loss) == 0.0 and torch.allclose(l2.total, 0.5 * l2.text_loss)


def test_collator_drops_skips_and_keeps_events():
    samples = [{"key": "a", "image": torch.zeros(3, 4, 4), "caption": None, "label": 2, "_events": []},
               {"key": "b", "_skip": "bad_image", "_events": [("skip", "bad_image", "b")]}]
    batch = Collator(None)(samples)
    assert batch["key"] == ["a"] and batch["num_read"] == 2 and batch["label"].tolist() == [2]
    assert batch["data_events"] == [("skip", "bad_image", "b")]
    empty = Collator(None)(samples[1:])
    assert empty["key"] == [] and empty["image"] is None


@pytest.mark.parametrize("stop", [3, 4])
def test_stream_resume_with_workers_continues_with_the_reader_whose_turn_it_was(tmp_path, stop):
    """Two workers take turns; after an odd number of batches the next one is worker 1's,
    and a resumed loader (whose DataLoader asks its worker 0 first) must yield that one."""
    from m3ae.tokenizer import SPECIAL_TOKENS, TextTokenizer, from_vocab

    cfg = DataConfig(source="webdataset", urls=pair_shards(tmp_path / "s", 2, 12), shuffle_buffer=4, num_workers=2)
    enc = TextTokenizer(from_vocab(list(SPECIAL_TOKENS) + ["caption"] + [str(i) for i in range(12)]), 8)
    ref = [b["key"] for b in build_pretrain_loader(cfg, 16, enc, 4, seed=1)]
    first = build_pretrain_loader(cfg, 16, enc, 4, seed=1)
    it = iter(first)
    keys = [next(it)["key"] for _ in range(stop)]
    state = first.state_dict()
    del it
    again = build_pretrain_loader(cfg, 16, enc, 4, seed=1)
    again.load_state_dict(state)
    assert keys + [b["key"] for b in again] == ref


# Resume on another number of processes (end to end: tests/training/test_shared_cluster.py).
def _old_ranks_read(order, world, p):
    return [i for r in range(world) for i in order[r::world][:len(order) // world][:p]]


@pytest.mark.parametrize("old,new,p", [(2, 1, 5), (1, 2, 10), (2, 3, 5), (2, 3, 6), (3, 2, 7), (1, 3, 1)])
def test_a_map_position_converts_so_every_sample_is_read_once(old, new, p):
    """Old ranks read ``p`` samples each of a 64-sample epoch; the new ranks finish it."""
    from m3ae.data import EpochSampler
    from m3ae.data.loader import convert_map_position

    order = [i for i, _ in EpochSampler(64, seed=3, even=True)]
    read = _old_ranks_read(order, old, p)
    pos = convert_map_position([{"kind": "map", "epoch": 0, "position": p}] * old, new)
    for r in range(new):
        s = EpochSampler(64, seed=3, rank=r, world_size=new, even=True)
        s.set_position(pos["epoch"], pos["position"], pos["offset"])
        read += [i for i, _ in s]
    assert len(read) == len(set(read))  # none twice
    # none dropped, except the < new leftover an even split always leaves at an epoch's end
    assert sorted(read) == sorted(order[:len(read)]) and 64 - len(read) < new
    if (old * p) % new == 0:  # the same order a run of `new` ranks would have read
        assert pos == {"epoch": 0, "position": old * p // new, "offset": 0}


def test_counts_of_all_old_ranks_continue_on_another_world_size(tmp_path):
    from m3ae.data import SkipCounter
    from m3ae.data.loader import data_position

    def skips(seen, bad, fixed):
        c = SkipCounter()
        c.add([("skip", "bad_image", f"k{seen}")] * bad + [("fix", "empty_caption", "e")] * fixed +
              [("shard", "cut_shard", "s")], seen=seen)
        return c.state_dict()

    st = {"world_size": 2, "data_per_rank": [
        {"kind": "map", "epoch": 1, "position": 6, "world_size": 2, "rank": 0, "skips": skips(40, 3, 1)},
        {"kind": "map", "epoch": 1, "position": 6, "world_size": 2, "rank": 1, "skips": skips(40, 5, 2)}]}
    new = [data_position(st, r, 3, tmp_path)[0] for r in range(3)]
    total = SkipCounter.merged([d["skips"] for d in new])
    assert (total.seen, dict(total.skipped), dict(total.fixed), dict(total.shards)) == (
        80, {"bad_image": 8}, {"empty_caption": 3}, {"cut_shard": 2})
    assert [d["position"] for d in new] == [4] * 3 and {d["world_size"] for d in new} == {3}
    # A stream's per-worker positions cannot map onto other reader slots: said, and afresh.
    stream = {"world_size": 2, "data_per_rank": [
        dict(d, kind="stream", num_workers=2, worker_pos={"0": 7, "1": 9}) for d in st["data_per_rank"]]}
    pos, note = data_position(stream, 0, 1, tmp_path / "step_00000005")
    assert pos["worker_pos"] == {} and pos["epoch"] == 1 and pos["skips"]["seen"] == 80
    assert note.startswith("note:") and "step_00000005 was written by 2 processes" in note
    assert "epoch 1 starts afresh" in note and "\n" not in note
