"""Shared fixtures. Tests that need ../shared (real data, official checkpoints) skip with a
reason when it is absent, except in CI, where M3AE_REQUIRE_SHARED_DATA=1 makes that a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("M3AE_SHARED", ROOT.parent / "shared"))


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is absent (the shared data/fixtures folder ships with the project's CI)"
        if os.environ.get("M3AE_REQUIRE_SHARED_DATA"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared_data() -> Path:
    return _need(SHARED / "data")


@pytest.fixture
def official_fixtures() -> Path:
    return _need(SHARED / "fixtures" / "official-jax")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    from m3ae.config import model_config

    return model_config("tiny", vocab_size=200, max_text_len=16)


def make_batch(cfg, b: int = 4, t: int = 12, lengths=None, seed: int = 0):
    """Random images and captions; ``lengths`` real tokens per sample (rest padding)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(5, cfg.vocab_size, (b, t), generator=g)
    lengths = lengths or [t - i for i in range(b)]
    pad = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    text = text.masked_fill(pad, 0)
    return image, text, pad


@pytest.fixture
def batch_factory():
    return make_batch
