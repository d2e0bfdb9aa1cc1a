"""A newcomer's first hour (issue 16): one-line messages for bad values, safe run folders,
captions from real-world files, install details. Through ``m3ae.cli.main`` in-process (what
the terminal shows is stdout/stderr and the exit code)."""
import io
import json
import os
from pathlib import Path

import pytest
import torch

from m3ae.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.emb_dim=32", "model.depth=1", "model.dec_emb_dim=32", "model.dec_depth=1",
         "train.batch_size=8", "train.log_every=1", "data.synthetic_size=64", "train.recon_every=0"]


class Ran:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


@pytest.fixture
def m3ae(capfd):  # file descriptors: HF tokenizers (Rust) write to fd 2 directly
    def run(*args, check=True):
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        if check and code != 0:
            raise AssertionError(f"exit {code}\n{out}\n{err}")
        return Ran(code, out, err)
    return run


def one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_rerunning_into_a_run_folder_is_refused_and_overwrite_restarts(m3ae, tmp_path):
    out = tmp_path / "run"
    m3ae("pretrain", "--out", out, "--no-progress", "train.steps=2", "train.ckpt_every=1", *SMALL)
    p = m3ae("pretrain", "--out", out, "--no-progress", "train.steps=1", *SMALL, check=False)
    one_line_error(p, "already holds a run", "--resume latest", "--overwrite")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    p = m3ae("pretrain", "--out", out, "--no-progress", "--overwrite", "train.steps=1", *SMALL)
    assert "done: 1 steps" in p.stdout and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    one_line_error(m3ae("pretrain", "--out", out, "--resume", out / "final", check=False),
                   "holds weights but no trainer_state.pt")


def test_resuming_a_finished_run_says_it_had_finished(m3ae, tmp_path):
    """Issue 32: it said "done: 2 steps, final loss nan"."""
    out = tmp_path / "run"
    m3ae("pretrain", "--out", out, "--no-progress", "train.steps=2", *SMALL)
    p = m3ae("pretrain", "--out", out, "--no-progress", "--resume", "latest")
    assert p.stdout.splitlines()[-1] == (f"already finished: {out} is at step 2 (train.steps=2); nothing was "
                                         "trained. To continue it, resume with a larger train.steps=N")
    p = m3ae("pretrain", "--out", out, "--no-progress", "--resume", "latest", "train.steps=3")
    assert p.stdout.splitlines()[-1].startswith("done: 3 steps, final loss ") and "nan" not in p.stdout


@pytest.mark.parametrize("override,needle", [
    ("train.batch_size=four", "train.batch_size must be a whole number, got 'four'"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.lr=0", "train.lr must be a positive learning rate"),
    ("train.batch_sise=4", "did you mean 'batch_size'?"),
    ("train.device=gpu", "not a device name"),
])
def test_bad_values_are_one_line_errors(m3ae, tmp_path, override, needle):
    p = m3ae("pretrain", "--out", tmp_path / "r", override, check=False)
    one_line_error(p, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(m3ae, tmp_path):
    one_line_error(m3ae("pretrain", "--out", tmp_path / "r", "train.device=cuda", check=False), "no usable CUDA GPU")
    assert not (tmp_path / "r").exists()


def test_a_wrong_data_path_is_reported_before_the_tokenizer(m3ae, tmp_path):
    p = m3ae("pretrain", "--out", tmp_path / "r", "data.source=webdataset", f"data.urls={tmp_path}/x-{{0..1}}.tar",
             check=False)
    one_line_error(p, "shard(s) do not exist")
    p = m3ae("pretrain", "--out", tmp_path / "r", "data.source=table", f"data.urls={tmp_path}/caps.csv", check=False)
    one_line_error(p, "caps.csv is not an existing file")
    assert not (tmp_path / "r").exists()


def test_convert_official_on_a_pytorch_file_says_what_it_is(m3ae, tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "model.pt")
    one_line_error(m3ae("convert-official", tmp_path / "model.pt", tmp_path / "out", check=False),
                   "is a PyTorch file", "not an official JAX M3AE checkpoint")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    one_line_error(m3ae("convert-official", tmp_path / "junk.pkl", tmp_path / "out", check=False),
                   "not an official JAX M3AE checkpoint", "{step, epoch, variant, state}")


def test_a_closed_pipe_is_not_a_traceback(tmp_path, monkeypatch):
    """`m3ae tokenizer encode ... | head -1`: the reader goes away while we print."""
    import sys

    from m3ae.tokenizer import from_vocab

    from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]).save(str(tmp_path / "tok.json"))

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["tokenizer", "encode", str(tmp_path / "tok.json"), "a cat"]) == 0  # no exception


def test_tokenizer_keeps_accents_and_case_when_asked_and_records_it(m3ae, tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("cá cà cả cã cạ ca ở Hà Nội\n" * 20, encoding="utf-8")
    p = m3ae("tokenizer", "train", caps, "-o", tmp_path / "vi.json", "--vocab-size", "80", "--min-frequency", "1",
             "--keep-accents", "--cased")
    assert "cased, accents kept" in p.stdout
    # Off a terminal, HF's progress bar would add escape codes or blank lines: only our line shows.
    assert p.stderr == "" and p.stdout.startswith("wrote") and p.stdout.count("\n") == 1, repr(p.stdout)
    norm = json.loads((tmp_path / "vi.json").read_text())["normalizer"]
    assert norm["strip_accents"] is False and norm["lowercase"] is False
    enc = m3ae("tokenizer", "encode", tmp_path / "vi.json", "cá cà cả cã cạ ca Hà").stdout.splitlines()
    assert enc[0].split() == ["cá", "cà", "cả", "cã", "cạ", "ca", "Hà"] and len(set(enc[1].split())) == 7
    m3ae("tokenizer", "train", caps, "-o", tmp_path / "uncased.json", "--vocab-size", "80", "--min-frequency", "1")
    enc = m3ae("tokenizer", "encode", tmp_path / "uncased.json", "cá cà").stdout.splitlines()
    assert enc[0].split() == ["ca", "ca"]  # the BERT-uncased default


def test_pyproject_uses_an_spdx_license_string():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    assert "download.pytorch.org/whl/cpu" in (ROOT / "README.md").read_text()


def test_safetensors_files_follow_the_umask(tmp_path):
    from m3ae.pretrained import save_safetensors

    old = os.umask(0o022)
    try:
        path = save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        path2 = save_safetensors({"w": __import__("numpy").zeros(2)}, tmp_path / "f.safetensors")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644) == oct(path2.stat().st_mode & 0o777)
    assert not list(tmp_path.glob("*.tmp"))
