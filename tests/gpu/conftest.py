"""The CUDA tests (``pytest -m gpu``). Each runs on the device M3AE_GPU_TEST_DEVICE names
(default ``cuda``): without CUDA they skip, saying why; benchmarks/device_check.sh --dry-run
runs the same tests with M3AE_GPU_TEST_DEVICE=cpu, so they are exercised before a GPU is
there (what has no CPU meaning skips with its reason)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))  # gpu_helpers

from gpu_helpers import DEVICE, WORDS  # noqa: E402


@pytest.fixture(scope="session")
def dev() -> torch.device:
    if DEVICE not in ("cuda", "cpu") and not DEVICE.startswith("cuda:"):
        pytest.fail(f"M3AE_GPU_TEST_DEVICE must be cuda, cuda:N or cpu, not {DEVICE!r}")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA is not available (M3AE_GPU_TEST_DEVICE=cpu runs these tests on the CPU)")
    return torch.device(DEVICE)


def _jpeg(rng, size: int) -> bytes:
    small = rng.integers(0, 255, (size // 4, size // 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """Two WebDataset shards of 32 captioned 48 px JPEGs each, with labels; a brace pattern."""
    import tarfile

    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(32):
                key = f"s{s}_{i:03d}"
                cap = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
                for name, data in ((f"{key}.jpg", _jpeg(rng, 48)), (f"{key}.txt", cap.encode()),
                                   (f"{key}.cls", str(i % 4).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "train-{000000..000001}.tar")


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    from m3ae.tokenizer import SPECIAL_TOKENS, from_vocab

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    from_vocab(list(SPECIAL_TOKENS) + WORDS).save(str(path))
    return path


@pytest.fixture(scope="session")
def overrides(dev, shards, tokenizer_file) -> list[str]:
    """A one-block model on 32 px images, 20 steps of batch 8 read from the shards by two
    loader workers (pinned memory on CUDA), a log and a checkpoint every 5 steps."""
    return ["model.depth=1", "model.emb_dim=32", "model.num_heads=2", "model.dec_emb_dim=32",
            "model.dec_depth=1", "model.dec_num_heads=2", "model.vocab_size=64", "model.max_text_len=16",
            "data.text_len=16", "data.source=webdataset", f"data.urls={shards}", "data.num_workers=2",
            "data.shuffle_buffer=16", f"data.tokenizer={tokenizer_file}", "train.steps=20",
            "train.batch_size=8", "train.log_every=5", "train.ckpt_every=5", "train.recon_every=0",
            "train.warmup_steps=2", "train.lr=1e-3", f"train.device={dev}"]


