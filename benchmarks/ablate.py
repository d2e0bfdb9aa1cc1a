"""Before/after table: runs train_throughput.py once per variant, round-robin for ``--repeats``
rounds (so the load of a shared machine falls on every variant alike), and prints medians.

    python benchmarks/ablate.py --repeats 3 --out benchmarks/results/ablation-cpu.json -- --threads 1

Variants differ only in ``section.field=value`` config overrides of the trainer's step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Each variant is m3ae pretrain's step with config overrides (public switches only).
VARIANTS = {
    "fp32 (the default config)": [],
    "  text head + log-softmax instead of the fused head": ["train.fused_text_loss=false"],
    "  activation checkpointing": ["train.grad_checkpointing=true"],
    "  without keeping freed memory": ["train.keep_freed_memory=false"],
    "bf16 autocast": ["train.precision=bf16"],
    "  bf16, text head + log-softmax instead of the fused head": ["train.precision=bf16",
                                                                   "train.fused_text_loss=false"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (substring match)")
    p.add_argument("--out", default=None)
    p.add_argument("--keep", default=None, help="keep each run's JSON in this folder")
    p.add_argument("--summarise", default=None, help="only tabulate the run JSONs already in this folder")
    p.add_argument("extra", nargs="*", help="arguments passed to every run (after --)")
    a = p.parse_args()
    names = [n for n in VARIANTS if not a.only or any(s in n for s in a.only)]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    if a.summarise:
        for f in sorted(Path(a.summarise).glob("*-*.json")):
            i = int(f.name.split("-")[0])
            runs.setdefault(list(VARIANTS)[i], []).append(json.loads(f.read_text()))
        runs = {n: rs for n, rs in runs.items() if rs}
        return report(runs, a)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for i, n in enumerate(names):
                out = Path(a.keep or tmp) / f"{list(VARIANTS).index(n)}-{r}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(HERE / "train_throughput.py"), *VARIANTS[n], *a.extra, "--json", str(out)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[n].append(json.loads(out.read_text()))
                res = runs[n][-1]
                print(f"[round {r}] {n.strip()}: {res['samples_per_s']:.1f} samples/s, MFU {100 * res['mfu']:.1f}%",
                      file=sys.stderr, flush=True)
    report(runs, a)


def report(runs: dict[str, list[dict]], a) -> None:
    """Medians per variant. On a shared machine absolute samples/s swing with the load, so
    compare ``samples/s per peak`` (samples/s divided by the matmul peak measured between
    the steps of the same run, in samples per GFLOP of peak): the load slows both alike.
    On a CPU, ``samples per CPU-s`` (per second of this process's CPU time) does not count
    the time the scheduler gave to other jobs at all."""
    rows = []
    print("| variant | runs | samples/s (median) | samples/s per peak GFLOP/s | step s | GFLOP/sample executed |"
          " matmul peak GFLOP/s | MFU | MFU (plain FLOPs) | samples per CPU-s | MFU (CPU time) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, rs in runs.items():
        med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
        norm = statistics.median(x["samples_per_s"] / (x.get("local_peak_median_flops", x["peak_matmul_flops"]) / 1e9)
                                 for x in rs)
        row = {"variant": n.strip(), "samples_per_s": med("samples_per_s"), "step_s": med("step_time_median_s"),
               "gflop_per_sample": med("flops_per_sample") / 1e9,
               "peak_gflops": statistics.median(x.get("local_peak_median_flops", x["peak_matmul_flops"])
                                                for x in rs) / 1e9,
               "mfu": med("mfu"), "mfu_plain": med("mfu_plain_flops"), "samples_per_s_per_peak_gflops": norm,
               "all_samples_per_s": [x["samples_per_s"] for x in rs], "command": rs[0]["command"]}
        if all("samples_per_cpu_s" in x for x in rs):  # CPU runs: CPU time, blind to other jobs' load
            row.update(samples_per_cpu_s=med("samples_per_cpu_s"), mfu_cpu_time=med("mfu_cpu_time"),
                       all_samples_per_cpu_s=[x["samples_per_cpu_s"] for x in rs])
        cpu = (f" {row['samples_per_cpu_s']:.1f} | {100 * row['mfu_cpu_time']:.1f}% |" if "samples_per_cpu_s" in row
               else " - | - |")
        rows.append(row)
        print(f"| {n.strip()} | {len(rs)} | {row['samples_per_s']:.1f} | {norm:.3f} | {row['step_s']:.3f} | "
              f"{row['gflop_per_sample']:.3f} | "
              f"{row['peak_gflops']:.0f} | {100 * row['mfu']:.1f}% | {100 * row['mfu_plain']:.1f}% |" + cpu)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
