"""Helpers for the training tests: a tiny model, a fixed tokenizer file, CLI subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# One encoder and one decoder block of width 32 on 32 px images: a step takes milliseconds.
TINY = ["model.depth=1", "model.emb_dim=32", "model.num_heads=2", "model.dec_emb_dim=32",
        "model.dec_depth=1", "model.dec_num_heads=2", "data.synthetic_size=64", "data.text_len=16",
        "model.max_text_len=16", "train.recon_every=0", "train.log_every=1", "train.warmup_steps=1",
        "train.lr=1e-3"]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A tokenizer trained once and shared by the runs, so that they need not each train one
    (tests/training/test_same_command.py runs with data.tokenizer=from-data)."""
    from m3ae.data import ShapesDataset
    from m3ae.tokenizer import train_wordpiece

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_wordpiece(ShapesDataset(64).captions(limit=64), vocab_size=200).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tokenizer_file) -> list[str]:
    return TINY + [f"data.tokenizer={tokenizer_file}", "model.vocab_size=256"]


def tiny_config(overrides: list[str]):
    from m3ae.config import build_config

    return build_config("tiny", None, overrides)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    # The same thread count in every process, so float reductions happen in the same order.
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID",
              "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def pretrain_cmd(out: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "m3ae", "pretrain", "--out", str(out), "--no-progress", *extra, *overrides]


def torchrun_cmd(nproc: int, out: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *extra, "-m", "m3ae", "pretrain", "--out", str(out), "--no-progress", *overrides]


def run_ok(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    from m3ae.training.loggers import read_metrics

    return [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def assert_weights_close(a: dict, b: dict, atol: float = 2e-6) -> None:
    """Equal up to float rounding, except the attention key biases: softmax is invariant to
    them, so their true gradient is exactly 0 and what is left is rounding noise, which
    Adam divides by its own (tiny) scale into full-size random steps."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            x, y = x[:d].tolist() + x[2 * d:].tolist(), y[:d].tolist() + y[2 * d:].tolist()
            assert max(abs(u - v) for u, v in zip(x, y)) <= atol, k
        else:
            assert (x - y).abs().max().item() <= atol, k


# What tests/training/test_distributed.py asserts for 2 processes against 1, and README.md
# quotes: logged values to a relative 1e-5, final weights to an absolute 1e-5 (measured: 6e-7;
# the attention key biases, whose true gradient is zero, are left out, see assert_weights_close).
DIST_LOSS_RTOL = 1e-5
DIST_WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="session")
def h():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(tiny_config=tiny_config, cli_env=cli_env, pretrain_cmd=pretrain_cmd,
                           torchrun_cmd=torchrun_cmd, run_ok=run_ok, losses=losses, weights=weights,
                           assert_weights_close=assert_weights_close, dist_loss_rtol=DIST_LOSS_RTOL,
                           dist_weight_atol=DIST_WEIGHT_ATOL)
