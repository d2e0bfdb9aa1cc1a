"""Training throughput, FLOP utilisation and peak memory of ``m3ae pretrain``'s step on this device.

Times :class:`m3ae.training.step.TrainStep` (the object ``m3ae pretrain`` runs: host-side
batch planning and caption trimming, masking noise, forward, loss with its denominators,
backward, gradient norm/clip, AdamW with the non-finite skip, LR schedule) on synthetic
host batches shaped like the loader's, and prints a table (and ``--json out.json``):
samples/s as the median over ``--steps`` timed steps after warm-up; model FLOPs per sample
counted with ``torch.utils.flop_counter.FlopCounterMode``; the achieved FLOP/s; the
device's own matmul peak measured in the same run and dtype, so that the utilisation ratio
(MFU) means something on a shared, noisy machine; and peak memory.

The run is configured like ``m3ae pretrain``: ``--config`` (default: bench-cpu.yaml beside
this script) or ``--preset``, then ``section.field=value`` overrides, so optimisations are
switched through public config only::

    python benchmarks/train_throughput.py --threads 2                              # bench-cpu, fp32
    python benchmarks/train_throughput.py --threads 2 train.precision=bf16         # bf16 autocast
    python benchmarks/train_throughput.py --threads 2 train.fused_text_loss=false  # unfused text head
    python benchmarks/train_throughput.py --preset base --batch 256 --text-len 64 train.precision=bf16

Analytic FLOPs (a multiply-add = 2 FLOPs; forward only, backward ~2x forward): a block of
width D over N tokens costs 24*N*D^2 (qkv 6, out-proj 2, MLP 16) + 4*N^2*D (scores and
weighted sum). At bench-cpu (D=192, 6 blocks, 1+16+8=25 encoder tokens; decoder D=128, 2
blocks, 1+64+32=97 tokens) that is 133 MFLOP in the encoder, 81 MFLOP in the decoder, 250
MFLOP in the text head when it runs over all 32 positions (2*32*128*30522) and ~8 MFLOP in
the patch embedding and image head: ~0.47 GFLOP forward, ~1.4 GFLOP per sample per
training step. The counter reports what the step really executes (the text head only at
masked tokens, trimmed captions); ``plain_flops_per_sample`` is the full path's count (head
everywhere, untrimmed) so that speed-ups from doing less work are not hidden in the MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from m3ae.config import build_config  # noqa: E402
from m3ae.losses import M3AELoss  # noqa: E402
from m3ae.model import M3AE  # noqa: E402
from m3ae.training.distributed import DistInfo  # noqa: E402
from m3ae.training.step import TrainStep  # noqa: E402

BENCH_CPU = HERE / "bench-cpu.yaml"


# ------------------------------------------------------------------------ inputs
def synthetic_batches(cfg, n: int, min_len: int, max_len: int, seed: int = 0) -> list[dict]:
    """``n`` distinct host batches as the loader yields them: random pixels; captions of
    ``min_len..max_len`` real tokens (uniform per sample, like real captions), padded with
    id 0 to ``data.text_len``."""
    g = torch.Generator().manual_seed(seed)
    b, t, size = cfg.train.batch_size, cfg.data.text_len, cfg.model.image_size
    max_len = min(max_len, t)
    out = []
    for _ in range(n):
        lengths = torch.randint(min(min_len, max_len), max_len + 1, (b,), generator=g)
        pad = torch.arange(t)[None, :] >= lengths[:, None]
        low = min(1000, cfg.model.vocab_size // 2)  # ordinary words, not special tokens
        text = torch.randint(low, cfg.model.vocab_size, (b, t), generator=g).masked_fill(pad, 0)
        out.append({"image": torch.randn(b, 3, size, size, generator=g), "text": text, "text_padding_mask": pad})
    return out


def build_step(cfg, device: torch.device) -> TrainStep:
    """The trainer's step object for ``cfg`` on one device."""
    torch.manual_seed(cfg.train.seed)
    return TrainStep(M3AE(cfg.model).to(device), cfg, DistInfo(device=device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------ measurements
def analytic_forward_flops(cfg, batch: int, text_len: int) -> int:
    """Matmul FLOPs of one plain forward (text head over every position), by formula.

    The training step costs about 3x this (backward = two matmuls per forward matmul, less
    the input gradient of the patch embedding); see the module docstring for bench-cpu.
    """
    from m3ae.ops import num_kept

    d, dd, n_img = cfg.emb_dim, cfg.dec_emb_dim, cfg.num_patches
    hid, dhid = int(d * cfg.mlp_ratio), int(dd * cfg.mlp_ratio)
    n_enc = 1 + num_kept(n_img, cfg.image_mask_ratio) + num_kept(text_len, cfg.text_mask_ratio)
    n_dec = 1 + n_img + text_len

    def blocks(n, w, h, depth):  # qkv + proj + fc1 + fc2, then q@k^T and attn@v
        return depth * (2 * n * w * (3 * w + w + 2 * h) + 4 * n * n * w)

    f = 2 * n_img * cfg.patch_dim * d                       # patch embedding
    f += blocks(n_enc, d, hid, cfg.depth)
    f += 2 * n_enc * d * dd                                 # decoder_embed
    f += blocks(n_dec, dd, dhid, cfg.dec_depth)
    f += 2 * n_img * dd * cfg.patch_dim + 2 * text_len * dd * cfg.vocab_size  # heads
    return batch * f


def _cpu_flash_attention_flops():
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
    ``scaled_dot_product_attention`` uses here; count it with the same formulas."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def count_flops(step_like, batches) -> float:
    """Mean FLOPs of one forward+backward over the given batches (the optimizer is not a matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for b in batches:
        with FlopCounterMode(display=False, custom_mapping=_cpu_flash_attention_flops()) as fc:
            step_like(b)
        total += fc.get_total_flops()
    return total / len(batches)


def matmul_peak(device, dtype, n: int, reps: int = 5, min_time: float = 0.3, flop: list | None = None) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (the same threads as training).
    ``flop`` (a list) receives [FLOPs, CPU seconds] of the timed matmuls, for a CPU-time rate."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync(device)
    best = 0.0
    total, cpu = 0, 0.0
    for _ in range(reps):
        iters, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            torch.mm(a, b, out=c)
            iters += 1
            sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        cpu += time.process_time() - c0
        total += 2 * n ** 3 * iters
        best = max(best, 2 * n ** 3 * iters / dt)
    if flop is not None:
        flop[:] = [total, cpu]
    return best


def measured_peak(device, precision: str) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sizes = (1024, 2048) if device.type == "cpu" else (8192,)
    per = {n: matmul_peak(device, dtype, n) for n in sizes}
    return {"peak_flops": max(per.values()), "peak_by_size": {str(k): v for k, v in per.items()}}


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_peak() -> bool:
    """Reset the kernel's high-water mark of this process (Linux: VmHWM) so it covers only the steps."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bench_config(args):
    """The run's Config: a config file or preset, the shorthand flags, then the overrides."""
    overrides = [f"train.device={args.device}"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    if args.text_len:
        overrides += [f"data.text_len={args.text_len}", f"model.max_text_len={args.text_len}"]
    if args.plain:
        overrides.append("train.fused_text_loss=false")
    config = None if args.preset else str(args.config or BENCH_CPU)
    return build_config(args.preset, config, overrides + args.overrides)


def _timed_steps(step: TrainStep, batches, args, device, dtype) -> tuple[list[float], list[float]]:
    """Step times and, between steps, a short matmul burst measuring the peak the device gives
    *now*: on a shared machine the load drifts within a run, so each step is compared with
    the peak measured next to it and the utilisation is the median of those per-step ratios."""
    accum = step.cfg.train.accum_steps
    burst_n = 1024 if device.type == "cpu" else 8192
    times, cpu_times, local_peaks, cpu_peaks = [], [], [], []
    for i in range(args.steps):
        micro = [batches[(i * accum + k) % len(batches)] for k in range(accum)]
        t0, c0 = time.perf_counter(), time.process_time()
        step(args.warmup + i, micro)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        flop = []
        local_peaks.append(matmul_peak(device, dtype, burst_n, reps=1, min_time=args.burst_s, flop=flop))
        cpu_peaks.append(flop[0] / max(flop[1], 1e-9))
    return times, local_peaks, cpu_times, cpu_peaks


def run(args) -> dict:
    cfg = bench_config(args)
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    precision = cfg.train.precision
    batch = cfg.train.global_batch()
    batches = synthetic_batches(cfg, args.distinct_batches, args.min_len, args.max_len, args.seed)
    step = build_step(cfg, device)
    model = step.model

    # FLOPs of what the step executes, and of the plain path (head everywhere, no trimming).
    def plain(b):
        x = {k: v.to(device) for k, v in b.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            M3AELoss()(model(**x)).total.backward()
        model.zero_grad(set_to_none=True)

    flops = count_flops(lambda b: step(0, [b] * cfg.train.accum_steps), batches) / batch
    plain_flops = count_flops(plain, batches[:1]) / cfg.train.batch_size
    peak_before = measured_peak(device, precision)
    for i in range(args.warmup):
        step(i, [batches[i % len(batches)]] * cfg.train.accum_steps)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_rss_peak()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    times, local_peaks, cpu_times, cpu_peaks = _timed_steps(step, batches, args, device, dtype)
    last = step.metrics()  # the one host read, after the timed steps (as m3ae pretrain at log_every)
    peak_after = measured_peak(device, precision)
    peak = max(peak_before["peak_flops"], peak_after["peak_flops"])
    med = statistics.median(times)
    sps = batch / med
    mem = ({"max_memory_allocated": torch.cuda.max_memory_allocated()} if device.type == "cuda" else
           {"rss_peak_during_steps" if rss_reset else "rss_peak_process": vm_hwm_bytes() if rss_reset
            else rss_peak_bytes()})
    quart = statistics.quantiles(times, n=4) if len(times) >= 4 else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": args.preset or str(args.config or BENCH_CPU.name), "overrides": args.overrides,
        "train": {k: getattr(cfg.train, k) for k in ("precision", "fused_text_loss", "compile",
                                                     "grad_checkpointing", "accum_steps", "grad_clip")},
        "step_class": f"{type(step).__module__}.{type(step).__qualname__}",
        "batch": batch, "text_len": cfg.data.text_len, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "step_time_median_s": med, "step_time_min_s": min(times),
        "step_time_iqr_s": [quart[0], quart[2]] if quart else None,
        "samples_per_s": sps, "samples_per_s_best": batch / min(times),
        "flops_per_sample": flops, "plain_flops_per_sample": plain_flops,
        "analytic_plain_forward_flops_per_sample": analytic_forward_flops(cfg.model, 1, cfg.data.text_len),
        "achieved_flops": flops * sps, "peak_matmul_flops": peak,
        "peak_detail": {"before": peak_before, "after": peak_after, "between_steps": local_peaks},
        "mfu": statistics.median(flops * batch / t / pk for t, pk in zip(times, local_peaks)),
        "mfu_plain_flops": statistics.median(plain_flops * batch / t / pk for t, pk in zip(times, local_peaks)),
        "mfu_vs_best_peak": flops * sps / peak, "local_peak_median_flops": statistics.median(local_peaks),
        "nominal_peak_flops": args.nominal_peak_tflops * 1e12 if args.nominal_peak_tflops else None,
        "mfu_vs_nominal": flops * sps / (args.nominal_peak_tflops * 1e12) if args.nominal_peak_tflops else None,
        # CPU time of this process (all its threads): on a CPU shared with other jobs the
        # wall time counts the time the scheduler gave to others, the CPU time does not.
        **({"step_cpu_time_median_s": statistics.median(cpu_times),
            "samples_per_cpu_s": batch / statistics.median(cpu_times),
            "peak_matmul_flops_per_cpu_s": statistics.median(cpu_peaks),
            "mfu_cpu_time": flops * batch / statistics.median(cpu_times) / statistics.median(cpu_peaks)}
           if device.type == "cpu" else {}),
        "memory_bytes": mem, "last_losses": {k: last[k] for k in ("loss", "image_loss", "text_loss",
                                                                  "text_accuracy", "grad_norm")},
    }


def table(r: dict) -> str:
    g = 1e9
    rows = [
        ("config / batch / device", f"{r['config']} / {r['batch']} / {r['device']} ({r['threads']} threads)"),
        ("step / train settings", f"{r['step_class']} / " + ", ".join(f"{k}={v}" for k, v in r["train"].items())),
        ("step time, median (s)", f"{r['step_time_median_s']:.4f}"),
        ("samples/s (median step)", f"{r['samples_per_s']:.1f}"),
        ("GFLOP per sample (executed / plain path)",
         f"{r['flops_per_sample'] / g:.3f} / {r['plain_flops_per_sample'] / g:.3f}"),
        ("achieved GFLOP/s", f"{r['achieved_flops'] / g:.1f}"),
        ("measured matmul peak GFLOP/s (best / median between steps)",
         f"{r['peak_matmul_flops'] / g:.1f} / {r['local_peak_median_flops'] / g:.1f}"),
        ("MFU vs peak between steps (executed / plain-path FLOPs)",
         f"{100 * r['mfu']:.1f}% / {100 * r['mfu_plain_flops']:.1f}%"),
        ("MFU vs best peak of the run", f"{100 * r['mfu_vs_best_peak']:.1f}%"),
        *([("per CPU-second: samples / matmul peak GFLOP / MFU",
            f"{r['samples_per_cpu_s']:.1f} / {r['peak_matmul_flops_per_cpu_s'] / g:.1f} / "
            f"{100 * r['mfu_cpu_time']:.1f}% (step CPU time {r['step_cpu_time_median_s']:.4f} s)")]
          if "samples_per_cpu_s" in r else []),
        *([("MFU vs nominal peak", f"{100 * r['mfu_vs_nominal']:.1f}% of {r['nominal_peak_flops'] / 1e12:.0f} TFLOP/s")]
          if r["mfu_vs_nominal"] else []),
        *[(f"memory: {k} (MiB)", f"{v / 2**20:.0f}") for k, v in r["memory_bytes"].items()],
        ("last losses", ", ".join(f"{k}={v:.4f}" for k, v in r["last_losses"].items())),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="section.field=value, as for m3ae pretrain")
    p.add_argument("--config", default=None, help=f"YAML/JSON run config (default {BENCH_CPU.name})")
    p.add_argument("--preset", default=None, help="a library model preset instead of --config (base, large, ...)")
    p.add_argument("--batch", type=int, default=None, help="shorthand for train.batch_size")
    p.add_argument("--text-len", type=int, default=0, help="shorthand for data.text_len (and model.max_text_len)")
    p.add_argument("--plain", action="store_true", help="shorthand for train.fused_text_loss=false")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--min-len", type=int, default=10, help="fewest real caption tokens")
    p.add_argument("--max-len", type=int, default=25, help="most real caption tokens")
    p.add_argument("--burst-s", type=float, default=0.15, help="seconds of matmul after each step (local peak)")
    p.add_argument("--distinct-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 for fp32 matmuls")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--nominal-peak-tflops", type=float, default=0.0,
                   help="also report MFU against this datasheet peak (H200 dense bf16: 790)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    r = run(args)
    print(table(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
