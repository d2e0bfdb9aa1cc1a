"""The benchmark scripts measure the trainer's own step and report consistent numbers
(their timings are never asserted)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from m3ae.config import build_config, model_config
from m3ae.model import M3AE
from m3ae.training import trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_times_the_trainers_step_class(bench):
    cfg = build_config("tiny", None, ["train.batch_size=2", "model.vocab_size=300", "data.text_len=16"])
    step = bench.build_step(cfg, torch.device("cpu"))
    assert type(step) is trainer.TrainStep and bench.TrainStep is trainer.TrainStep
    batch = bench.synthetic_batches(cfg, 1, 3, 16)[0]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "image": (2, 3, 32, 32), "text": (2, 16), "text_padding_mask": (2, 16)}
    before = step.model.text_head.weight.detach().clone()
    step(0, [batch])
    assert not torch.equal(before, step.model.text_head.weight)  # it trained
    assert step.metrics()["text_loss"] > 1.0


def test_bench_cpu_config_is_the_size_the_formula_describes(bench):
    cfg = build_config(None, str(ROOT / "benchmarks" / "bench-cpu.yaml"), [])
    m = cfg.model
    assert (m.image_size, m.patch_size, m.emb_dim, m.depth, m.dec_emb_dim, m.vocab_size) == (64, 8, 192, 6, 128, 30522)
    assert cfg.train.batch_size == 32 and cfg.data.text_len == 32
    # the text head over 32 positions is the largest single term (as the docstring says)
    head = 2 * 32 * m.dec_emb_dim * m.vocab_size
    assert head > 0.5 * bench.analytic_forward_flops(m, 1, 32)


def test_counted_flops_match_the_formula(bench):
    """FlopCounterMode on a plain forward = the analytic count the benchmark states."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_config("tiny", vocab_size=300, max_text_len=16)
    model = M3AE(cfg)
    g = torch.Generator().manual_seed(2)
    image = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(5, 300, (3, 16), generator=g)
    with FlopCounterMode(display=False, custom_mapping=bench._cpu_flash_attention_flops()) as fc:
        model(image, text, torch.zeros(3, 16, dtype=torch.bool))
    assert fc.get_total_flops() == bench.analytic_forward_flops(cfg, 3, 16)


def test_benchmark_script_runs_and_reports_consistent_numbers(bench, tmp_path):
    out = tmp_path / "r.json"
    r = bench.main(["--preset", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1",
                    "--distinct-batches", "2", "--text-len", "16", "--json", str(out),
                    "model.vocab_size=300", "train.accum_steps=2"])
    saved = json.loads(out.read_text())
    assert saved["step_class"] == "m3ae.training.step.TrainStep" and saved["batch"] == 8
    assert saved["samples_per_s"] == pytest.approx(8 / saved["step_time_median_s"])
    assert saved["achieved_flops"] == pytest.approx(saved["flops_per_sample"] * saved["samples_per_s"])
    assert saved["mfu_vs_best_peak"] == pytest.approx(saved["achieved_flops"] / saved["peak_matmul_flops"])
    assert 0 < saved["mfu"] < 1.5 and len(saved["peak_detail"]["between_steps"]) == 2
    # the masked-token text head + trimming execute fewer FLOPs than the plain path
    assert 0 < r["flops_per_sample"] < r["plain_flops_per_sample"]
    assert all(torch.isfinite(torch.tensor(v)) for v in saved["last_losses"].values())
    # CPU time (blind to other jobs on a shared CPU): the same relations
    assert saved["samples_per_cpu_s"] == pytest.approx(8 / saved["step_cpu_time_median_s"])
    assert saved["mfu_cpu_time"] == pytest.approx(
        saved["flops_per_sample"] * saved["samples_per_cpu_s"] / saved["peak_matmul_flops_per_cpu_s"])
    assert 0 < saved["mfu_cpu_time"] < 1.5
    # switches are config fields
    plain = bench.parse_args(["--plain", "train.precision=bf16"])
    cfg = bench.bench_config(plain)
    assert cfg.train.fused_text_loss is False and cfg.train.precision == "bf16" and cfg.train.batch_size == 32
