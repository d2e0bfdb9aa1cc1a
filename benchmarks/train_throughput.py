"""Training throughput, FLOP utilisation and peak memory of M3AE on the current device.

Prints a table (and ``--json out.json``): samples/s of full training steps (forward, loss,
backward, gradient clipping, AdamW) as the median over ``--steps`` timed steps after
warm-up; model FLOPs per sample counted with ``torch.utils.flop_counter.FlopCounterMode``;
the achieved FLOP/s; the device's own matmul peak measured in the same run and dtype, so
that the utilisation ratio (MFU) means something on a shared, noisy machine; and peak memory.

Each optimisation has a switch so that before/after can be measured one at a time::

    python benchmarks/train_throughput.py --config bench-cpu --plain      # everything off
    python benchmarks/train_throughput.py --config bench-cpu              # everything that measured faster
    python benchmarks/train_throughput.py --config bench-cpu --text-logits all   # one switch back

Analytic FLOPs (a multiply-add = 2 FLOPs; forward only, backward ~2x forward): a block of
width D over N tokens costs 24*N*D^2 (qkv 6, out-proj 2, MLP 16) + 4*N^2*D (scores and
weighted sum). At ``bench-cpu`` (D=192, 6 blocks, 1+16+8=25 encoder tokens; decoder
D=128, 2 blocks, 1+64+32=97 tokens) that is 133 MFLOP in the encoder, 81 MFLOP in the
decoder, 250 MFLOP in the text head when it runs over all 32 positions (2*32*128*30522)
and ~8 MFLOP in the patch embedding and image head: ~0.47 GFLOP forward, ~1.4 GFLOP per
sample per training step. The counter below reports what the chosen path really executes
(fewer with masked logits or trimmed captions); ``plain_flops_per_sample`` is the full
path's count so that speed-ups from doing less work are not hidden in the MFU.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from m3ae.config import model_config  # noqa: E402
from m3ae.losses import M3AELoss  # noqa: E402
from m3ae.model import M3AE  # noqa: E402
from m3ae.ops import trim_text_padding  # noqa: E402
from m3ae.training.optim import param_groups  # noqa: E402

DEFAULT_BATCH = {"bench-cpu": 32, "base": 256, "large": 64}


# ------------------------------------------------------------------------ inputs
def synthetic_batches(cfg, batch: int, n: int, text_len: int, min_len: int, max_len: int,
                      device, seed: int = 0) -> list[dict]:
    """``n`` distinct batches: random pixels; captions of ``min_len..max_len`` real tokens
    (uniform per sample, like real captions), padded with id 0 to ``text_len``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
        text = torch.randint(1000, cfg.vocab_size, (batch, text_len), generator=g)
        lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
        pad = torch.arange(text_len)[None, :] >= lengths[:, None]
        text = text.masked_fill(pad, 0)
        # The longest caption, known on the host as a collate function would know it, so
        # that trimming needs no device-to-host read on a GPU.
        out.append({"image": image.to(device), "text": text.to(device),
                    "text_padding_mask": pad.to(device), "longest": int(lengths.max())})
    return out


# ------------------------------------------------------------------------ the step
@dataclass
class Switches:
    text_logits: str = "fused"    # "all": the head over every position (plain); "masked": only at masked tokens
    trim_text: bool = True        # cut captions to the batch's longest before the model
    optimizer: str = "fused"      # "plain" (per-parameter loop), "foreach", "fused"
    host_sync: bool = False       # read the losses with .item() every step (as a naive loop does)
    precision: str = "fp32"       # "fp32" or "bf16" (autocast)
    compile: bool = False
    grad_checkpointing: bool = False
    channels_last: bool = False
    fast_ce: bool = True          # losses._ce_and_correct (one log-softmax, amax) vs cross_entropy + argmax
    malloc_keep: bool = True      # glibc: keep freed memory in the process instead of unmapping it
    fp32_cpu_attention: bool = True  # under CPU autocast, attention in float32 (bf16 kernels are slow)
    clip_in_optimizer: bool = False  # fused AdamW divides by the clip factor (grad_scale) instead of a multiply pass


MAX_GRAD_NORM = 1.0  # gradient clipping, as the trainer's default train.grad_clip

PLAIN = Switches(text_logits="all", trim_text=False, optimizer="plain", host_sync=True, fast_ce=False,
                 malloc_keep=False, fp32_cpu_attention=False)


def reference_ce_and_correct(logits, targets):
    """The loss as first written: ``F.cross_entropy`` and ``argmax`` (kept for before/after)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.movedim(-1, 1) if logits.dim() > 2 else logits, targets, reduction="none")
    return ce, (logits.argmax(-1) == targets).to(ce.dtype)


def keep_freed_memory() -> bool:
    """Tell glibc not to hand large freed blocks back to the OS.

    Gradients, logits and activations of tens of MB are freed and re-allocated every step.
    By default glibc serves them with mmap/munmap, so each step pays page faults and the
    kernel's zeroing of fresh pages; keeping them in the heap reuses the same memory.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))


def build(cfg, sw: Switches, device, lr: float = 1.5e-4 * 32 / 256):
    model = M3AE(cfg).to(device)
    model.set_grad_checkpointing(sw.grad_checkpointing)
    model.train()
    kw = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[sw.optimizer]
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=lr, betas=(0.9, 0.95), **kw)
    return model, M3AELoss(), opt


def make_step(model, criterion, opt, sw: Switches, device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=sw.precision == "bf16")

    def loss_fn(inputs):
        with autocast:
            out = model(**inputs, text_logits=sw.text_logits)
            return criterion(out)

    import m3ae.losses

    if sw.clip_in_optimizer and sw.optimizer != "fused":
        raise ValueError("--clip-in-optimizer needs --optimizer fused (only the fused AdamW kernel "
                         "takes a gradient scale)")
    if not sw.fast_ce:
        m3ae.losses._ce_and_correct = reference_ce_and_correct
    if sw.malloc_keep and device.type == "cpu":
        keep_freed_memory()
    import m3ae.model

    m3ae.model.FLOAT32_CPU_AUTOCAST_ATTENTION = sw.fp32_cpu_attention
    fwd = torch.compile(loss_fn) if sw.compile else loss_fn

    def step(batch):
        inputs = dict(batch)
        longest = inputs.pop("longest", None)
        if sw.trim_text:
            inputs["text"], inputs["text_padding_mask"] = trim_text_padding(
                inputs["text"], inputs["text_padding_mask"], longest)
        if sw.channels_last:
            inputs["image"] = inputs["image"].contiguous(memory_format=torch.channels_last)
        losses = fwd(inputs)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        if sw.clip_in_optimizer:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            opt.grad_scale = (norm / MAX_GRAD_NORM).clamp_min(1.0)  # fused AdamW divides the gradients by it
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=sw.optimizer != "plain")
        opt.step()
        if sw.host_sync:
            return {k: v.item() for k, v in losses._asdict().items()}
        return losses

    return step


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


def matmul_peak(device, dtype, n: int, reps: int = 5, min_time: float = 0.3) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (the same threads as training)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync(device)
    best = 0.0
    for _ in range(reps):
        iters, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=c)
            iters += 1
            sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = max(best, 2 * n ** 3 * iters / dt)
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


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    cfg = model_config(args.config)
    batch = args.batch or DEFAULT_BATCH.get(args.config, 32)
    text_len = args.text_len or cfg.max_text_len
    sw = Switches(**{**asdict(PLAIN if args.plain else Switches()), **{
        k: v for k, v in dict(text_logits=args.text_logits, trim_text=args.trim_text,
                              optimizer=args.optimizer, host_sync=args.host_sync,
                              compile=args.compile, grad_checkpointing=args.grad_checkpointing,
                              channels_last=args.channels_last, fast_ce=args.fast_ce,
                              malloc_keep=args.malloc_keep,
                              fp32_cpu_attention=args.fp32_cpu_attention,
                              clip_in_optimizer=args.clip_in_optimizer).items() if v is not None}})
    sw.precision = args.precision
    torch.manual_seed(args.seed)
    batches = synthetic_batches(cfg, batch, args.distinct_batches, text_len, args.min_len,
                                min(args.max_len, text_len), device, args.seed)
    model, criterion, opt = build(cfg, sw, device)
    step = make_step(model, criterion, opt, sw, device)

    # FLOPs of what this path executes, and of the plain path (logits everywhere, no trim).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=sw.precision == "bf16")

    def fwd_bwd(b, logits, trim):
        inputs = dict(b)
        longest = inputs.pop("longest", None)
        if trim:
            inputs["text"], inputs["text_padding_mask"] = trim_text_padding(b["text"], b["text_padding_mask"], longest)
        with autocast:
            losses = criterion(model(**inputs, text_logits=logits))
        losses.total.backward()
        model.zero_grad(set_to_none=True)

    flops = count_flops(lambda b: fwd_bwd(b, sw.text_logits, sw.trim_text), batches) / batch
    plain_flops = count_flops(lambda b: fwd_bwd(b, "all", False), batches[:1]) / batch

    peak_before = measured_peak(device, sw.precision)

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_rss_peak()
    # Between steps, a short matmul burst measures the peak the device gives *now*: on a
    # shared machine the load drifts within a run, so each step is compared with the peak
    # measured next to it and the utilisation is the median of those per-step ratios.
    dtype = torch.bfloat16 if sw.precision == "bf16" else torch.float32
    burst_n = 1024 if device.type == "cpu" else 8192
    times, local_peaks = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - t0)
        local_peaks.append(matmul_peak(device, dtype, burst_n, reps=1, min_time=args.burst_s))
    last = out if isinstance(out, dict) else {k: v.item() for k, v in out._asdict().items()}

    peak_after = measured_peak(device, sw.precision)
    peak = max(peak_before["peak_flops"], peak_after["peak_flops"])
    med = statistics.median(times)
    sps = batch / med
    step_mfu = [flops * batch / t / pk for t, pk in zip(times, local_peaks)]
    mem = {}
    if device.type == "cuda":
        mem["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    else:
        mem["rss_peak_during_steps" if rss_reset else "rss_peak_process"] = (
            vm_hwm_bytes() if rss_reset else rss_peak_bytes())
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": args.config, "batch": batch, "text_len": text_len, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "switches": asdict(sw), "params": n_params,
        "step_time_median_s": med, "step_time_min_s": min(times),
        "step_time_iqr_s": [statistics.quantiles(times, n=4)[0], statistics.quantiles(times, n=4)[2]]
        if len(times) >= 4 else None,
        "samples_per_s": sps, "samples_per_s_best": batch / min(times),
        "flops_per_sample": flops, "plain_flops_per_sample": plain_flops,
        "analytic_plain_forward_flops_per_sample": analytic_forward_flops(cfg, 1, text_len),
        "achieved_flops": flops * sps, "peak_matmul_flops": peak,
        "peak_detail": {"before": peak_before, "after": peak_after, "between_steps": local_peaks},
        "mfu": statistics.median(step_mfu),
        "mfu_plain_flops": statistics.median(plain_flops * batch / t / pk for t, pk in zip(times, local_peaks)),
        "mfu_vs_best_peak": flops * sps / peak, "local_peak_median_flops": statistics.median(local_peaks),
        "nominal_peak_flops": args.nominal_peak_tflops * 1e12 if args.nominal_peak_tflops else None,
        "mfu_vs_nominal": flops * sps / (args.nominal_peak_tflops * 1e12) if args.nominal_peak_tflops else None,
        "memory_bytes": mem, "last_losses": last,
    }


def table(r: dict) -> str:
    g = 1e9
    rows = [
        ("config / batch / device", f"{r['config']} / {r['batch']} / {r['device']} ({r['threads']} threads)"),
        ("switches", ", ".join(f"{k}={v}" for k, v in r["switches"].items())),
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
    p.add_argument("--config", default="bench-cpu", help="model preset (bench-cpu, tiny, small, base, large, ...)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--text-len", type=int, default=0, help="padded caption length (0 = max_text_len)")
    p.add_argument("--min-len", type=int, default=10, help="fewest real caption tokens")
    p.add_argument("--max-len", type=int, default=25, help="most real caption tokens")
    p.add_argument("--burst-s", type=float, default=0.15, help="seconds of matmul after each step (local peak)")
    p.add_argument("--distinct-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 for fp32 matmuls")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--nominal-peak-tflops", type=float, default=0.0,
                   help="also report MFU against this datasheet peak (H200 dense bf16: 790)")
    p.add_argument("--plain", action="store_true", help="start from the plain path (every optimisation off)")
    # Optimisation switches; unset = the default of --plain or of the optimised path.
    p.add_argument("--text-logits", choices=("all", "masked", "fused"), default=None)
    p.add_argument("--trim-text", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--optimizer", choices=("plain", "foreach", "fused"), default=None)
    p.add_argument("--host-sync", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fast-ce", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--malloc-keep", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fp32-cpu-attention", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--clip-in-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="fused AdamW only: clip through its grad_scale (measured, not used by the trainer)")
    args = p.parse_args(argv)
    if args.clip_in_optimizer and (args.optimizer or ("plain" if args.plain else "fused")) != "fused":
        p.error("--clip-in-optimizer needs the fused AdamW (--optimizer fused)")
    return args


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
