"""A tiny pretrained folder, trained once per test session on the built-in shapes (seconds)."""
from __future__ import annotations

import pytest

TINY = ["model.emb_dim=32", "model.depth=2", "model.num_heads=2", "model.dec_emb_dim=32", "model.dec_depth=1",
        "model.dec_num_heads=2", "train.steps=8", "train.batch_size=16", "train.warmup_steps=2",
        "train.log_every=4", "train.recon_every=0", "train.ckpt_every=0", "data.synthetic_size=256",
        "train.device=cpu"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from m3ae.config import build_config
    from m3ae.training import pretrain

    run = tmp_path_factory.mktemp("tiny_run")
    pretrain(build_config("tiny", overrides=TINY), run, progress=False)
    return run / "final"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from m3ae import load_pretrained

    return load_pretrained(tiny_model_dir, "cpu", need_tokenizer=True)[:2]
