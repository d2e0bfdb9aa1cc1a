"""Peak memory of one training forward+backward, with and without activation checkpointing.

Each measurement runs in a fresh process, so allocations of one do not hide in another:
the model and its gradients are built, then the peak over one forward+backward is read
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the kernel's resident-set high-water mark,
reset just before the step). The difference between two batch sizes gives the memory per
sample, from which larger batches are extrapolated (clearly labelled as such).

    python benchmarks/memory.py --config large --batch 4 8 --json benchmarks/results/memory-large-cpu.json
    python benchmarks/memory.py --config large --batch 64 --device cuda --precision bf16   # GPU, measured
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def measure_one(config: str, batch: int, ckpt: bool, device: str, precision: str, text_len: int) -> dict:
    from train_throughput import reset_rss_peak, synthetic_batches, vm_hwm_bytes

    from m3ae.config import build_config
    from m3ae.losses import M3AELoss
    from m3ae.model import M3AE

    dev = torch.device(device)
    cfg = build_config(config, None, [f"train.batch_size={batch}"] +
                       ([f"data.text_len={text_len}", f"model.max_text_len={text_len}"] if text_len else []))
    model = M3AE(cfg.model).to(dev).train()
    model.set_grad_checkpointing(ckpt)
    # measured at the full padded length (no trimming): the larger case
    b = {k: v.to(dev) for k, v in synthetic_batches(cfg, 1, 10, 25)[0].items()}
    # Gradients exist in a real step (and Adam's two moments would too): allocate them first
    # so the peak below is the step's own working memory on top of weights + grads.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    n_params = sum(p.numel() for p in model.parameters())
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: VmRSS now, VmHWM (reset here) after the step
        before = _vm_rss()
        if not reset_rss_peak():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    with autocast:
        losses = M3AELoss()(model(**b, text_logits=False), text_head=model.text_head)
    losses.total.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = vm_hwm_bytes()
    return {"config": config, "batch": batch, "grad_checkpointing": ckpt, "device": device,
            "precision": precision, "params": n_params, "before_step_bytes": before, "peak_bytes": peak,
            "step_working_bytes": peak - before, "loss": float(losses.total)}


def _vm_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="large")
    p.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--text-len", type=int, default=0)
    p.add_argument("--extrapolate-to", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure_one(a.config, a.batch[0], a.ckpt, a.device, a.precision, a.text_len)))
        return
    rows = []
    for ckpt in (False, True):
        for b in a.batch:
            cmd = [sys.executable, __file__, "--one", "--config", a.config, "--batch", str(b), "--device", a.device,
                   "--precision", a.precision, "--text-len", str(a.text_len)] + (["--ckpt"] if ckpt else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{a.config} batch {b} checkpointing={ckpt}: before {r['before_step_bytes'] / 2**30:.2f} GiB, "
                  f"peak {r['peak_bytes'] / 2**30:.2f} GiB, step working set {r['step_working_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    result = {"measured": rows}
    if len(a.batch) >= 2:
        lo, hi = min(a.batch), max(a.batch)
        extra = {}
        for ckpt in (False, True):
            r = {x["batch"]: x for x in rows if x["grad_checkpointing"] == ckpt}
            per_sample = (r[hi]["peak_bytes"] - r[lo]["peak_bytes"]) / (hi - lo)
            fixed = r[lo]["peak_bytes"] - per_sample * lo
            n = a.extrapolate_to
            # Adam's two fp32 moments are not allocated in this forward+backward; add them.
            adam = 2 * 4 * r[lo]["params"]
            extra[f"checkpointing={ckpt}"] = {
                "per_sample_bytes": per_sample, "fixed_bytes": fixed,
                f"extrapolated_peak_at_batch_{n}_bytes": fixed + per_sample * n,
                f"extrapolated_peak_at_batch_{n}_with_adam_state_bytes": fixed + per_sample * n + adam}
            e = extra[f"checkpointing={ckpt}"]
            print(f"EXTRAPOLATED (linear in batch from {lo} and {hi}) checkpointing={ckpt}: "
                  f"{per_sample / 2**20:.0f} MiB per sample; batch {n}: "
                  f"{e[f'extrapolated_peak_at_batch_{n}_bytes'] / 2**30:.1f} GiB, with Adam state "
                  f"{e[f'extrapolated_peak_at_batch_{n}_with_adam_state_bytes'] / 2**30:.1f} GiB")
        result["extrapolated"] = extra
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
