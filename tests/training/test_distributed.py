"""Two gloo processes on CPU (through ``torchrun`` and the CLI) against one process with the
same global batch: the same logged losses and the same final weights up to float rounding."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

CASES = {
    # Every other caption dropped: ranks hold different numbers of captions, and a rank whose
    # batch has none leaves the text-side parameters out of its graph.
    "ddp-mixed-captions": (["data.paired_fraction=0.5"], 1),
    # No captions at all (an MAE run), with gradient accumulation (DDP no_sync).
    "ddp-image-only-accum": (["data.paired_fraction=0", "train.accum_steps=2"], 1),
    "fsdp-mixed-captions": (["data.paired_fraction=0.5", "train.strategy=fsdp"], 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_match_one(case, h, tiny, tmp_path):
    extra, _ = CASES[case]
    common = tiny + extra + ["train.steps=3"]
    h.run_ok(h.torchrun_cmd(2, tmp_path / "two", common + ["train.batch_size=2"]))
    h.run_ok(h.pretrain_cmd(tmp_path / "one", common + ["train.batch_size=4"]))
    for key in ("loss", "image_loss", "text_loss", "text_accuracy", "lr"):
        assert h.losses(tmp_path / "two", key) == pytest.approx(h.losses(tmp_path / "one", key),
                                                                rel=h.dist_loss_rtol, abs=1e-6), key
    if "mixed" in case:
        # The case is only a test if some step has a rank with no caption at all.
        from m3ae.data import EpochSampler, keeps_caption

        shards = [[i for i, _ in EpochSampler(64, seed=0, rank=r, world_size=2)][:6] for r in range(2)]
        assert any(not any(keeps_caption(f"shapes-0-{i:08d}", 0.5) for i in s[k:k + 2])
                   for s in shards for k in (0, 2, 4))
    if "image-only" in case:
        assert set(h.losses(tmp_path / "one", "text_loss")) == {0.0}
    h.assert_weights_close(h.weights(tmp_path / "two"), h.weights(tmp_path / "one"), atol=h.dist_weight_atol)
    # Only rank 0 wrote: one metrics row per step, one checkpoint folder.
    assert len(h.losses(tmp_path / "two")) == 3
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step_00000003"]


def test_skip_counts_are_summed_over_ranks_and_workers(h, tiny, tmp_path):
    """Issue 13, case 1: each rank (and each of its loader workers) reads its own share; the
    metrics and the final line count all of them."""
    import io
    import json

    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(buf, "JPEG")
        (folder / f"{i:02d}.jpg").write_bytes(buf.getvalue() if i % 3 else b"junk")  # 4 junk files
    # Two steps of 2 ranks x 3 samples: the whole folder, once.
    p = h.run_ok(h.torchrun_cmd(2, tmp_path / "run", tiny + [
        "data.source=imagefolder", f"data.urls={folder}", "data.max_skip_fraction=0.5",
        "data.num_workers=2", "train.steps=2", "train.batch_size=3"]))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/seen"] == 12 and rows[-1]["data/skipped/bad_image"] == 4
    assert len(rows[-1]["data/examples"]["bad_image"]) == 3
    assert "data: read 12, skipped 4 (33.33%); bad_image 4" in p.stdout
