"""The CLI as a user types it, in subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["model.emb_dim=32", "model.depth=1", "model.dec_emb_dim=32", "model.dec_depth=1",
         "train.batch_size=8", "train.log_every=1", "data.synthetic_size=64"]


def m3ae(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    p = subprocess.run([sys.executable, "-m", "m3ae", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_help_on_every_subcommand():
    top = m3ae("--help").stdout
    from m3ae.cli import COMMANDS

    for name in COMMANDS:
        assert name in top
        assert "usage: m3ae " + name in m3ae(name, "--help").stdout


def test_pretrain_then_resume(tmp_path):
    out = tmp_path / "run"
    p = m3ae("pretrain", "--preset", "tiny", "--out", out, "--no-progress", "train.steps=3",
             "train.ckpt_every=2", *SMALL)
    assert "done: 3 steps" in p.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "reconstructions" / "step_00000003.png").is_file()
    # Continue the same run for two more steps: config comes from the run folder.
    p = m3ae("pretrain", "--out", out, "--resume", "latest", "--no-progress", "train.steps=5")
    assert "done: 5 steps" in p.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("args,msg", [
    (["pretrain", "--out", "X", "train.nope=1"], "unknown TrainConfig field"),
    (["pretrain", "--out", "X", "--config", "/no/such.yaml"], "does not exist"),
    (["pretrain", "--out", "X", "data.source=webdataset", "data.urls=/no/shard-{0..1}.tar",
      "data.tokenizer=/no/vocab.txt"], "shard(s) do not exist"),  # the data is checked first
    (["pretrain", "--out", "X", "data.tokenizer=/no/vocab.txt"], "neither a file"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, msg):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    p = m3ae(*args, check=False)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr


def test_tokenizer_train_and_encode(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("a red circle on the left\na blue square\n" * 10)
    m3ae("tokenizer", "train", caps, "-o", tmp_path / "tok.json", "--vocab-size", "60", "--min-frequency", "1")
    assert "red circle" in m3ae("tokenizer", "encode", tmp_path / "tok.json", "A red circle").stdout


def test_demo_writes_its_outputs(tmp_path):
    p = m3ae("demo", "--out", tmp_path / "demo", "--no-progress", "--eval-samples", "20", "--probe-samples", "40",
             "train.steps=2",
             "train.recon_every=0", *SMALL)
    assert "colour words:" in p.stdout and "try next" in p.stdout
    for name in ("summary.md", "summary.json", "reconstructions.png", "cross_modal.png", "loss_curve.png",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "colour words:" in (tmp_path / "demo" / "summary.md").read_text()
