"""Every CUDA path of m3ae, on the device M3AE_GPU_TEST_DEVICE names (conftest.py): pre-training
in each precision from shards and from the cache, SIGKILL + resume, the fused text loss, compile,
FSDP2, host syncs, the evaluation commands, GPU JPEG decoding and parity with the official code."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpu_helpers import HERE, cli_env, cuda_only, pretrain_cmd, run_ok
from m3ae.cli import COMMANDS, main
from m3ae.config import build_config
from m3ae.training.loggers import read_metrics

pytestmark = pytest.mark.gpu


def _pretrain(out: Path, overrides: list[str], *extra: str) -> list[dict]:
    """``m3ae pretrain`` in this process (the command a user types); its metrics rows."""
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--no-progress", *extra, *overrides]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), rows
    assert (out / "final" / "model.safetensors").is_file()
    return rows


@pytest.fixture(scope="module")
def fp32_run(dev, overrides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "run"
    rows = _pretrain(out, overrides, "train.precision=fp32")
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    return out


def test_pretrain_fp32_from_shards_pinned(dev, overrides, fp32_run):
    """20 steps in fp32 (fp32_run) and the loader it used: pinned host batches on CUDA, and
    the step's copies are non-blocking (model_inputs)."""
    from m3ae.data import build_pretrain_loader, build_text_tokenizer

    cfg = build_config("tiny", None, overrides)
    loader = build_pretrain_loader(cfg.data, cfg.model.image_size, build_text_tokenizer(cfg.data), 8)
    batch = next(iter(loader))
    assert batch["image"].is_pinned() == (dev.type == "cuda") and batch["text"].is_pinned() == (dev.type == "cuda")
    assert read_metrics(fp32_run / "metrics.jsonl")[-1]["data/seen"] >= 160


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_mixed_precision(dev, overrides, precision, tmp_path):
    if precision == "fp16":
        cuda_only(dev, "fp16 training needs the CUDA gradient scaler (the CPU refuses train.precision=fp16)")
    # No loader workers: fp32_run and the resume test exercise them; here the step is the subject.
    rows = _pretrain(tmp_path / "run", overrides, f"train.precision={precision}", "data.num_workers=0")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_pretrain_from_the_cache(dev, overrides, shards, tmp_path):
    if "cache" not in COMMANDS:
        pytest.skip("m3ae has no `cache` subcommand yet (issue 27, item 1: data.source=cache)")
    from m3ae.data.webdataset import expand_urls

    cache = tmp_path / "cache"
    assert main(["cache", "build", *expand_urls(shards), "-o", str(cache), "--image-size", "32"]) == 0
    data = [o for o in overrides if not o.startswith(("data.source=", "data.urls=", "data.num_workers="))]
    _pretrain(tmp_path / "run", data, "data.source=cache", f"data.urls={cache}", "data.num_workers=0")


def test_sigkill_then_resume_is_bit_identical(dev, overrides, tmp_path):
    """The rule (docs/training.md): with train.deterministic=true a run killed at any step and
    resumed with --resume latest ends bit for bit like an uninterrupted one, on CUDA too
    (12 steps over two epochs, killed after step 5, from the shards through two workers)."""
    from safetensors.torch import load_file

    ov = overrides + ["train.steps=12", "train.ckpt_every=1", "train.keep_last=2", "train.deterministic=true"]
    ref = tmp_path / "ref"
    run_ok(pretrain_cmd(ref, ov))
    out = tmp_path / "run"
    proc = subprocess.Popen(pretrain_cmd(out, ov), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    target, deadline = out / "checkpoints" / "step_00000005", time.time() + 240
    while not target.exists():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL and not (out / "final").exists()
    p = run_ok(pretrain_cmd(out, ov, "--resume", "latest"))
    assert "resumed from" in p.stdout + p.stderr
    a, b = read_metrics(out / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exactly
    wa, wb = load_file(str(out / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _model_and_batch(dev, overrides: list[str]):
    """A fresh model on ``dev`` and one host batch of random images and captions (pinned on CUDA)."""
    from m3ae.model import M3AE

    cfg = build_config("tiny", None, overrides)
    torch.manual_seed(0)
    model = M3AE(cfg.model).to(dev)
    g = torch.Generator().manual_seed(1)
    b, t, m = 8, 16, cfg.model
    text = torch.randint(5, m.vocab_size, (b, t), generator=g)
    pad = torch.arange(t)[None] >= torch.randint(4, t + 1, (b,), generator=g)[:, None]
    batch = {"image": torch.randn(b, 3, m.image_size, m.image_size, generator=g), "text": text.masked_fill(pad, 0),
             "text_padding_mask": pad, "image_valid": None}
    if dev.type == "cuda":
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return model, batch


def _train_step(dev, model, overrides: list[str]):
    from m3ae.training.distributed import DistInfo
    from m3ae.training.step import TrainStep

    return TrainStep(model, build_config("tiny", None, overrides), DistInfo(device=dev))


def test_fused_text_loss_equals_the_plain_path(dev, overrides):
    model, batch = _model_and_batch(dev, overrides)
    plain_model = copy.deepcopy(model)
    fused = _train_step(dev, model, overrides + ["train.fused_text_loss=true"])
    plain = _train_step(dev, plain_model, overrides + ["train.fused_text_loss=false"])
    for step in range(3):
        fused(step, [batch])
        plain(step, [batch])
        a, b = fused.metrics(), plain.metrics()
        for k in ("loss", "image_loss", "text_loss", "text_accuracy", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (step, k, a[k], b[k])
        if step == 0:  # gradients, not later weights: AdamW's first steps amplify rounding in tiny gradients
            for (n, p), q in zip(model.named_parameters(), plain_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_no_host_sync_between_log_steps(dev, overrides):
    cuda_only(dev, "torch.cuda.set_sync_debug_mode watches CUDA synchronisations")
    model, batch = _model_and_batch(dev, overrides)
    step = _train_step(dev, model, overrides)
    step(0, [batch])  # first-step allocations and lazy initialisation are allowed to sync
    step.metrics()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(i, [batch])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step.metrics()["loss"] > 0  # the log step reads the device, once


def test_compiled_training_step(dev, overrides, fp32_run, tmp_path):
    cuda_only(dev, "torch.compile of the step takes minutes on 2 CPU cores; the GPU run is what matters")
    rows = _pretrain(tmp_path / "run", overrides, "train.compile=true")
    ref = read_metrics(fp32_run / "metrics.jsonl")
    # Fused kernels round differently; 20 steps stay within a percent of eager.
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-2)


def test_fsdp2_in_one_process(dev, overrides, tmp_path):
    """FSDP2's fully_shard as wrap_model applies it, on a one-process group: the same losses
    and weights as the unsharded model over three AdamW steps."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from m3ae.losses import M3AELoss
    from m3ae.training.distributed import DistInfo, wrap_model
    from m3ae.training.step import LossModule, plan_batch

    model, batch = _model_and_batch(dev, overrides)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{tmp_path}/pg",
                            rank=0, world_size=1)
    try:
        m = build_config("tiny", None, overrides).model
        plan = plan_batch(batch, m.num_patches, m.image_mask_ratio, m.text_mask_ratio)
        x = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        g = torch.Generator().manual_seed(2)
        noise = [torch.rand(8, m.num_patches, generator=g).to(dev), torch.rand(8, 16, generator=g).to(dev)]
        plain = LossModule(copy.deepcopy(model), M3AELoss(), anchor=True)
        # wrap_model shards only with several processes: the lie is in that check alone.
        sharded = wrap_model(LossModule(model, M3AELoss(), anchor=True), "fsdp", DistInfo(world_size=2, device=dev))
        assert isinstance(next(sharded.parameters()), DTensor)
        opts = [torch.optim.AdamW(mod.parameters(), lr=1e-3, foreach=True) for mod in (plain, sharded)]
        for _ in range(3):
            losses = []
            for mod, opt in zip((plain, sharded), opts):
                opt.zero_grad()
                out = mod(x["image"], x["text"], x["text_padding_mask"], None, *noise, float(plan.counts.images),
                          float(plan.rows), float(plan.rows), plan.counts.text_tokens)
                out.total.backward()
                opt.step()
                losses.append(out.total.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for (n, p), q in zip(plain.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(q.full_tensor(), p, rtol=1e-5, atol=1e-6, msg=n)
    finally:
        dist.destroy_process_group()


def test_evaluation_commands(dev, fp32_run, tmp_path):
    model, d = str(fp32_run / "final"), ["--device", str(dev), "--no-progress"]
    assert main(["embed", model, "--data", "shapes:40:3", "-o", str(tmp_path / "f.npy"), *d]) == 0
    assert main(["linear-probe", model, "--train", "shapes:64:0", "--val", "shapes:32:1", "--epochs", "5",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "probe"), *d]) == 0
    assert main(["finetune", model, "--train", "shapes:32:0", "--val", "shapes:16:1", "--epochs", "1",
                 "--batch-size", "16", "--out", str(tmp_path / "ft"), *d]) == 0
    assert main(["ood", model, "--id-train", "shapes:48:0", "--id-test", "shapes:24:1", "--ood", "shapes:24:2",
                 "--probe-epochs", "3", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "ood"), *d]) == 0
    import numpy as np
    assert np.load(tmp_path / "f.npy").shape == (40, 32)
    for name in ("probe", "ft", "ood"):
        assert json.loads((tmp_path / name / "results.json").read_text())


def test_gpu_jpeg_decode(dev, overrides, tmp_path):
    """data.decode_device=cuda: nvJPEG's batches match the CPU loader's (two JPEG decoders: their
    IDCT and chroma upsampling differ by a few levels; a wrong crop or flip is tens of levels off
    on average), and a pre-training run reads its shards that way."""
    cuda_only(dev, "data.decode_device=cuda (tests/data/test_device_decode.py runs the batched path on the CPU)")
    from m3ae.data import build_pretrain_loader, build_text_tokenizer
    from m3ae.data.transforms import IMAGENET_STD

    cfg = build_config("tiny", None, overrides + ["data.num_workers=0"])
    enc = build_text_tokenizer(cfg.data)
    batches = []
    for where in ("cpu", str(dev)):
        cfg.data.decode_device = where
        torch.manual_seed(0)
        batches.append(next(iter(build_pretrain_loader(cfg.data, 32, enc, 8, seed=3))))
    a, b = batches
    assert a["key"] == b["key"] and b["image"].device.type == "cuda"
    diff = (a["image"] - b["image"].cpu()).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    assert diff.mean() < 2.0 and diff.max() < 64, (diff.mean(), diff.max())
    _pretrain(tmp_path / "run", overrides, f"data.decode_device={dev}")


def test_parity_with_the_official_code_fp32(dev, official_fixtures):
    spec = importlib.util.spec_from_file_location("_official", HERE.parent / "interop" / "test_official.py")
    off = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(off)
    from m3ae.interop.official import build_model, load_official_checkpoint

    z = off._ref(official_fixtures)
    cfg, state, _ = load_official_checkpoint(official_fixtures / "m3ae_small.pkl")
    model = build_model(cfg, state).to(dev)
    image, text, pad = (t.to(dev) for t in off._inputs(z))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    try:
        with torch.no_grad():
            rep = model.forward_features(image, text, pad)
            out = model(image, text, pad, image_mask_ratio=0.0, text_mask_ratio=0.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert off._maxabs(rep.cpu(), z["m3ae_representation"]) < off.TOL
    assert off._maxabs(out.image_pred.cpu(), z["m3ae_image_output"]) < off.TOL
    assert off._maxabs(out.text_logits.cpu(), z["m3ae_text_output"]) < off.TOL
