"""Where the time of ``m3ae pretrain``'s step goes: torch.profiler over a few steps of the
same ``TrainStep`` that ``train_throughput.py`` times (same config and overrides).

    python benchmarks/profile_step.py --threads 1 --steps 3            # bench-cpu.yaml, fp32
    python benchmarks/profile_step.py --threads 1 --steps 3 train.precision=bf16

Prints the top ops by self CPU time (the profiler's clock is wall time: on a CPU shared
with other jobs the shares are noisy, the CPU time per step is not), and the step's CPU
time and minor page faults per step (memory freed to the OS and faulted back in).
"""
from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("train_throughput", HERE / "train_throughput.py")
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="section.field=value, as for m3ae pretrain")
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--trace", default=None, help="also write a Chrome trace here")
    p.add_argument("--shapes", action="store_true", help="group the ops by input shapes too")
    a = p.parse_args(argv)
    config = ["--config", a.config] if a.config else []
    args = tt.parse_args(["--threads", str(a.threads), "--device", "cpu", *config, *a.overrides])
    torch.set_num_threads(a.threads)
    cfg = tt.bench_config(args)
    batches = tt.synthetic_batches(cfg, args.distinct_batches, args.min_len, args.max_len, args.seed)
    step = tt.build_step(cfg, torch.device("cpu"))
    for i in range(a.warmup):
        step(i, [batches[i % len(batches)]])
    cpu, faults = [], []
    for i in range(a.steps):  # unprofiled: CPU time and page faults per step
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        step(a.warmup + i, [batches[i % len(batches)]])
        cpu.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
        for i in range(a.steps):
            step(a.warmup + a.steps + i, [batches[i % len(batches)]])
    step.metrics()
    ka = prof.key_averages(group_by_input_shape=a.shapes)
    total = sum(e.self_cpu_time_total for e in ka)
    print(f"config: {args.config or tt.BENCH_CPU.name} {' '.join(a.overrides)}; threads {a.threads}; "
          f"batch {cfg.train.batch_size}")
    med = statistics.median(cpu)
    print(f"unprofiled step CPU time: median {med:.4f} s ({cfg.train.batch_size / med:.1f} samples per "
          f"CPU-second); minor page faults per step: median {statistics.median(faults):.0f}")
    print(f"profiled: {a.steps} steps, self CPU time {total / 1e6:.3f} s in all ({total / 1e6 / a.steps:.4f} s per step)\n")
    print("| op | self CPU % | self CPU ms per step | calls per step |")
    print("|---|---|---|---|")
    for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        key = f"{e.key} {e.input_shapes}" if a.shapes else e.key
        print(f"| `{key}` | {100 * e.self_cpu_time_total / total:.1f} | "
              f"{e.self_cpu_time_total / 1e3 / a.steps:.1f} | {e.count / a.steps:.0f} |")
    ops = sum(e.count for e in ka if e.key.startswith("aten::")) / a.steps
    print(f"\naten ops per step: {ops:.0f}")
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    sys.exit(main())
