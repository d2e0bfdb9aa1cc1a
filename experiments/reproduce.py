#!/usr/bin/env python
"""Reproduce the M3AE paper's four claims at small scale, with one command.

    python experiments/reproduce.py --mode standard --processes 2 &   # twice: ~90 min on 2 CPU cores
    python experiments/reproduce.py --mode standard --processes 2
    python experiments/reproduce.py --mode gpu --budget-s 330 --device cuda
    python experiments/reproduce.py --mode gpu --smoke --device cpu   # the gpu mode's code in seconds
    python experiments/reproduce.py --mode standard --report          # tables and plots from the JSON only

Claims (Geng et al. 2022) and how each is tested here, on Tiny-ImageNet with WordNet captions
(pre-training, linear probe) and CIFAR-10 (OOD):

1. M3AE's image encoder transfers better than MAE's: linear probe on Tiny-ImageNet val.
2. A small fraction of paired captions already helps: M3AE with paired_fraction 0.1/0.3/1.0.
3. A high text mask ratio (50-90 %) beats BERT's 15 %: text_mask_ratio 0.15/0.5/0.75/0.9.
4. M3AE detects OOD data better: Mahalanobis and max-softmax AUROC, Tiny-ImageNet val vs
   CIFAR-10 test (far OOD) and CIFAR-10 classes 0-4 vs 5-9 (near OOD).

The MAE baseline is the same model, config, seed (so the same data order, augmentation and
image masks) and number of steps with ``data.paired_fraction=0``: every caption is dropped,
every batch is image-only, and the loss is MAE's pixel loss alone.

Everything lands in ``--out`` (default ``runs/reproduce/<mode>``): one folder per run with
its pre-training output and a ``result.json``. A run whose ``result.json`` exists is skipped;
an interrupted pre-training resumes from its latest checkpoint. Starting the same command
in a second terminal shares out the runs (a run being worked on holds ``running.pid``), which
is how to use more than one core or GPU. ``--report`` turns the JSON
into ``docs/results.md`` (the standard mode; other modes into ``docs/results/<mode>.md``),
``docs/results/<mode>.json`` and the PNG plots; no number in the report is typed by hand.

Modes with ``steps="plan"`` (standard, gpu) size themselves: before training, the first
process times a few steps of each model kind and one checkpoint's evaluation on this machine,
then picks the largest step count (a multiple of 100) at which every run of the mode and its
evaluation fit ``--budget-s`` with ``--processes`` processes sharing them out, dropping the
ablations before any seed when even the smallest budget does not fit. It prints the plan and
writes ``plan.json``, which every later process reads. Modes with ``cache=True`` decode each
dataset once into an image cache (``m3ae cache build``) and pre-train with ``data.source=cache``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from m3ae.io import write_json_atomic
from m3ae.training.runlock import RunLock
from m3ae.reports.stats import compare, compare_noise, compare_strict  # noqa: F401 (the tests read them here)
from reproduction import report as report_lib
from reproduction.modes import MODES, PAPER, Mode, RunSpec, run_specs, smoke_of  # noqa: F401 (MODES...: the tests)
from reproduction.runs import (build_caches, build_run_config, caption_diagnostic, claim_run_dir,  # noqa: F401
                               class_subset, eval_images, ood_eval, probe_checkpoint,
                               run_or_read, train_tokenizer)
from reproduction.report import READOUTS, Experiment  # noqa: F401 (READOUTS: the tests read it here)

ROOT = Path(__file__).resolve().parents[1]

# The modes, the paper's numbers and the runs of a mode: reproduction/modes.py; one run (data,
# config, evaluation, result): reproduction/runs.py.


# ------------------------------------------------------------------------------- planning
def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(mode: Mode, data: Path, out: Path, tokenizer: Path, device: str) -> dict:
    """What one process spends here: samples/s of each model kind's pre-training (``m3ae
    pretrain`` itself on the mode's data, after its first log window), one checkpoint's probe
    evaluation, one OOD evaluation and one caption diagnostic."""
    import tempfile

    from m3ae import load_pretrained
    from m3ae.training import pretrain

    n = mode.plan_steps
    every = max(1, n // 3)
    rates, cost = {}, {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for spec in (RunSpec("m3ae", 0), RunSpec("mae", 0, ["data.paired_fraction=0.0"], kind="mae",
                                                 paired_fraction=0.0)):
            cfg = build_run_config(spec, replace(mode, steps=n, warmup=1), data, tokenizer, device, out)
            cfg.train.log_every, cfg.train.ckpt_every, cfg.train.keep_every = every, 0, 0
            run = Path(tmp) / spec.name
            res = pretrain(cfg, run, progress=False)
            windows = [r["samples_per_s"] for r in res.history[1:]] or [res.history[-1]["samples_per_s"]]
            rates[spec.kind] = float(np.median(windows))
        model = load_pretrained(Path(tmp) / "m3ae" / "final", device, need_tokenizer=False)[0]
        sets = eval_images(data, out, mode, model.config.image_size)
        (probes, feats), cost["probe_checkpoint_s"] = _timed(lambda: probe_checkpoint(model, sets, mode, 0))
        pool = mode.pool
        _, cost["ood_s"] = _timed(lambda: ood_eval(model, sets, feats, probes[pool].probe, mode, 0))
        _, cost["caption_diag_s"] = _timed(lambda: caption_diagnostic(Path(tmp) / "m3ae" / "final", data, device,
                                                                      mode.caption_check))
    return {"samples_per_s": rates, **cost, "timed_steps": n}


def plan(mode: Mode, specs: list, measured: dict, budget_s: float, processes: int, spent_s: float) -> dict:
    """The largest step count (a multiple of 100 within ``mode.step_range``) at which every
    run and its evaluation fit ``budget_s`` of wall time with ``processes`` processes, from the
    measured costs; without the ablations when even the smallest does not fit."""
    lo, hi = mode.step_range
    n_curve = 4  # the probe curve: a checkpoint at every quarter, the last one the final model

    def costs(runs):
        per_step = sum(mode.batch_size / measured["samples_per_s"][r.kind] for r in runs)
        evals = sum(n_curve * measured["probe_checkpoint_s"] + (measured["ood_s"] if r.ood else 0)
                    + (measured["caption_diag_s"] if r.kind == "m3ae" else 0) for r in runs)
        return per_step, evals

    left = (budget_s - spent_s) * processes
    dropped: list[str] = []
    runs = list(specs)
    while True:
        per_step, evals = costs(runs)
        # A multiple of 100, so that the quarter checkpoints (the probe curve) divide it evenly.
        steps = int((left - evals) / per_step) // 100 * 100 if left > evals else 0
        ablations = [r for r in runs if not r.ood]
        if steps >= lo or not ablations:
            break
        dropped.append(ablations[-1].name)  # ablations go before any seed
        runs.remove(ablations[-1])
    fits = steps >= lo
    steps = min(max(steps, lo), hi)
    per_step, evals = costs(runs)
    return {"steps": steps, "warmup": max(1, round(steps * mode.warmup_fraction)),
            "runs": [r.name for r in runs], "dropped": dropped, "fits": fits, "budget_s": budget_s,
            "processes": processes, "planning_s": spent_s,
            "estimated_wall_s": spent_s + (evals + steps * per_step) / processes, "measured": measured}


def plan_text(p: dict, mode: Mode) -> str:
    m = p["measured"]
    rate = ", ".join(f"{k} {v:.0f} samples/s" for k, v in m["samples_per_s"].items())
    dropped = f"; left out to fit: {', '.join(p['dropped'])}" if p["dropped"] else ""
    over = "" if p["fits"] else f" (the smallest budget, {p['steps']} steps, does not fit: expect longer)"
    return (f"plan: {p['steps']} steps of batch {mode.batch_size} for {len(p['runs'])} runs "
            f"({', '.join(p['runs'])}){dropped}{over}; measured per process: {rate}, one checkpoint's probes "
            f"{m['probe_checkpoint_s']:.0f} s, OOD {m['ood_s']:.0f} s, caption check {m['caption_diag_s']:.0f} s; "
            f"estimated wall {p['estimated_wall_s'] / 60:.1f} min of the {p['budget_s'] / 60:.1f} min budget with "
            f"{p['processes']} process(es)")


def prepare(mode: Mode, data: Path, out: Path, device: str, args) -> tuple[Mode, Path, list]:
    """Caches, tokenizer and (planned modes) the plan, made by the first process while later
    ones wait for its ``plan.json``. -> (the mode with its steps, tokenizer, run specs)."""
    t_start = time.perf_counter()
    lock = RunLock(out, name="prepare.lock")
    done = out / "plan.json"
    specs = run_specs(mode)
    mine = not done.is_file() and lock.try_acquire()
    if not done.is_file() and not mine:
        print(f"waiting for the process preparing {out} (caches, tokenizer, plan)", flush=True)
        while not done.is_file():
            if not lock.try_acquire():
                time.sleep(2)
                continue
            mine = True
            break
    if mine and done.is_file():
        lock.release()  # the process that held it first finished meanwhile
    elif mine:
        try:
            if mode.cache:
                build_caches(data, out, mode, progress=not args.no_progress)
            tokenizer = train_tokenizer(out, data, mode)
            if mode.steps == "plan":
                budget = args.budget_s or mode.budget_s
                measured = measure(mode, data, out, tokenizer, device)
                p = plan(mode, specs, measured, budget, args.processes, time.perf_counter() - t_start)
            else:
                p = {"steps": mode.steps, "warmup": mode.warmup, "runs": [r.name for r in specs]}
            write_json_atomic(done, p)
        finally:
            lock.release()
    p = json.loads(done.read_text())
    if "measured" in p:
        print(plan_text(p, mode), flush=True)
    mode = replace(mode, steps=p["steps"], warmup=p["warmup"])
    return mode, out / "tokenizer.json", [r for r in specs if r.name in p["runs"]]


# ------------------------------------------------------------------------------ report
# The report itself: reproduction/report.py; what it needs of this experiment's definition
# goes in as data.
EXPERIMENT = Experiment(paper=PAPER, modes=tuple(MODES), full=MODES["full"].settings(),
                        full_runs=len(run_specs(MODES["full"])))


def summarize(results: dict[str, dict], mode_name: str, mode: Mode) -> dict:
    return report_lib.summarize(results, mode_name, mode.settings(), EXPERIMENT)


def report(out: Path, docs: Path, mode_name: str, mode: Mode | None = None) -> Path:
    return report_lib.report(out, docs, mode_name, (mode or MODES[mode_name]).settings(), EXPERIMENT)


# --------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--smoke", action="store_true",
                   help="the mode's code path at smoke size (seconds on a CPU; the numbers mean nothing)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="planned modes: wall-clock seconds every run and its evaluation must fit in")
    p.add_argument("--processes", type=int, default=1,
                   help="planned modes: how many processes (started alike) share out the runs")
    p.add_argument("--data", default=os.environ.get("M3AE_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
                   help="folder holding tiny-imagenet-captions/ and cifar10/ (default ../shared/data)")
    p.add_argument("--out", default=None, help="run folders (default runs/reproduce/<mode>)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where results.md and results/ go")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; 1 is much faster on a machine other jobs share")
    p.add_argument("--runs", nargs="*", default=None, help="only these run names (default: all of the mode)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the JSON results")
    p.add_argument("--no-report", action="store_true", help="run, but do not write docs/")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode, name = MODES[args.mode], args.mode
    if args.smoke:
        mode, name = smoke_of(mode), f"{args.mode}-smoke"
    out = Path(args.out or ROOT / "runs" / "reproduce" / name)
    docs = Path(args.docs)
    if not args.report:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        data = Path(args.data)
        out.mkdir(parents=True, exist_ok=True)
        if mode.classes:
            data = class_subset(data, out, mode.classes)
        mode, tokenizer, specs = prepare(mode, data, out, device, args)
        specs = [s for s in specs if args.runs is None or s.name in args.runs]
        for i, spec in enumerate(specs):
            t0 = time.perf_counter()
            r = run_or_read(spec, mode, data, out, tokenizer, device, progress=not args.no_progress)
            if r is None:
                print(f"[{i + 1}/{len(specs)}] {spec.name}: another process is running it; skipped", flush=True)
                continue
            print(f"[{i + 1}/{len(specs)}] {spec.name}: probe top-1 {100 * r['probe']['top1']:.2f} % "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_report:
        path = report(out, docs, name, mode)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
