#!/usr/bin/env python
"""The paper's central comparison on the demo's data: M3AE against MAE, linear probe.

    python experiments/demo_vs_mae.py --jobs 2            # 12 demo runs (seeds 0-5), ~70 min on 2 CPU cores
    python experiments/demo_vs_mae.py --report            # the table from finished runs only
    python experiments/demo_vs_mae.py --jobs 2 -- train.steps=1000   # other demo settings, for all runs

Each run is ``m3ae demo`` with the demo's settings and ``train.seed=S``; the MAE runs add
``data.paired_fraction=0`` (every caption dropped: image-only batches, MAE's pixel loss alone),
so a pair of runs shares its initialisation, image stream and image masks and differs only in
the captions. Both encoders are then probed as the demo probes every model (colour and kind of
the first-named shape of held-out images, frozen mean-pooled features; the same network at its
initialisation and raw pixels as further baselines). Runs go to ``--out/{m3ae,mae}_s<seed>``,
one process per run, one thread each; a finished run is not repeated and an interrupted one
continues from its checkpoint (the demo's own behaviour). ``--report`` writes
``docs/results/demo_vs_mae.json`` and ``.md``; no number there is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from m3ae.io import atomic_write

from m3ae.reports.stats import direction

HERE = Path(__file__).resolve().parent

ROOT = HERE.parent
MODELS = {"m3ae": [], "mae": ["data.paired_fraction=0"]}
TASKS = ("shape", "colour")


def run_one(out: Path, model: str, seed: int, demo_args: list[str] = ()) -> int:
    folder = out / f"{model}_s{seed}"
    if (folder / "summary.json").is_file():
        return 0
    cmd = [sys.executable, "-m", "m3ae", "demo", "--out", str(folder), "--no-progress",
           *demo_args, f"train.seed={seed}", *MODELS[model]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{model}_s{seed}.log", "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def collect(out: Path, seeds: list[int]) -> dict:
    runs = {m: {} for m in MODELS}
    for m in MODELS:
        for s in seeds:
            path = out / f"{m}_s{s}" / "summary.json"
            if path.is_file():
                summary = json.loads(path.read_text())
                runs[m][s] = {"probe": {t: summary["probe"][t] for t in TASKS},
                              "final_loss": summary["training"]["final_loss"],
                              "train_seconds": summary["training"]["seconds"]}
    return runs


def verdict(m3ae: list[float], mae: list[float]) -> str:
    """The reports' seed-range rule (:func:`m3ae.reports.stats.direction`), in this table's words."""
    if len(m3ae) < 2 or len(m3ae) != len(mae):
        return "too few seeds"
    return {1: "M3AE ahead in every seed", -1: "MAE ahead in every seed",
            0: "inconclusive (seed ranges overlap)"}[direction(m3ae, mae)]


def report(out: Path, seeds: list[int], docs: Path = ROOT / "docs" / "results") -> dict:
    runs = collect(out, seeds)
    done = [s for s in seeds if s in runs["m3ae"] and s in runs["mae"]]
    table = {}
    for t in TASKS:
        row = {m: [runs[m][s]["probe"][t]["trained"] for s in done] for m in MODELS}
        row["random_init"] = [runs["m3ae"][s]["probe"][t]["random_init"] for s in done]
        row["pixels"] = [runs["m3ae"][s]["probe"][t]["pixels"] for s in done]
        row["paired_gap"] = [a - b for a, b in zip(row["m3ae"], row["mae"])]
        row["chance"] = runs["m3ae"][done[0]]["probe"][t]["chance"] if done else None
        row["verdict"] = verdict(row["m3ae"], row["mae"])
        table[t] = row
    result = {"what": __doc__.split("\n\n")[0], "seeds": done,
              "command": f"python experiments/demo_vs_mae.py --jobs 2 --seeds {' '.join(map(str, seeds))}",
              "probe_top1": table, "runs": runs}
    atomic_write(docs / "demo_vs_mae.json", json.dumps(result, indent=1) + "\n")
    atomic_write(docs / "demo_vs_mae.md", render(result))
    return result


def _cell(xs: list[float]) -> str:
    if not xs:
        return "-"
    seeds = ", ".join(f"{100 * x:.1f}" for x in xs)
    return f"{100 * statistics.mean(xs):.1f} ({seeds})"


def render(r: dict) -> str:
    lines = ["# M3AE vs MAE on the demo's data (linear probe)", "",
             f"`{r['command']}`: `m3ae demo` pre-trained with captions (M3AE) and without them "
             "(MAE, `data.paired_fraction=0`), same seeds, steps and masks; then a linear probe on "
             "frozen mean-pooled image features of held-out images. Top-1 %, mean (per seed "
             f"{', '.join(map(str, r['seeds']))}).", "",
             "| task | M3AE | MAE | M3AE - MAE (per seed) | same network at init | raw pixels | chance | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for t, row in r["probe_top1"].items():
        gaps = ", ".join(f"{100 * g:+.1f}" for g in row["paired_gap"])
        chance = "-" if row["chance"] is None else f"{100 * row['chance']:.1f}"
        lines.append(f"| {t} | {_cell(row['m3ae'])} | {_cell(row['mae'])} | {gaps} | {_cell(row['random_init'])} "
                     f"| {_cell(row['pixels'])} | {chance} | {row['verdict']} |")
    lines += ["", "A verdict needs every seed of one model above every seed of the other. Per-run "
              "summaries (words, reconstructions, pictures) are in each run's folder; an MAE run's "
              "word and caption numbers are meaningless (it never saw text)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_args", nargs="*", help="passed to every m3ae demo (after --), e.g. -- train.steps=300")
    p.add_argument("--out", type=Path, default=Path("runs/demo_vs_mae"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results", help="where the table goes")
    p.add_argument("--report", action="store_true", help="only write the table from finished runs")
    a = p.parse_args(argv)
    if not a.report:
        # Interleaved (M3AE s0, MAE s0, M3AE s1, ...) so that both models meet the same load.
        jobs = [(m, s) for s in a.seeds for m in MODELS]
        with ThreadPoolExecutor(a.jobs) as pool:
            codes = list(pool.map(lambda job: run_one(a.out, *job, a.demo_args), jobs))
        for (m, s), code in zip(jobs, codes):
            if code:
                print(f"{m} seed {s} failed (exit {code}); see {a.out / f'{m}_s{s}.log'}", file=sys.stderr)
    r = report(a.out, a.seeds, a.docs)
    print(render(r))


if __name__ == "__main__":
    main()
