#!/usr/bin/env python
"""Claim 1 across compute: does text help the image encoder at small scale, given more steps?

    python experiments/compute_curve.py --out /work/study/compute --until 0       # data, caches, tokenizer
    python experiments/compute_curve.py --out /work/study/compute --threads 1 &   # twice: the two
    python experiments/compute_curve.py --out /work/study/compute --threads 1     # processes share the runs
    python experiments/compute_curve.py --out /work/study/compute --report        # docs from the JSON only

Keep ``--out`` outside the work tree and run from a checkout at a fixed commit, so that work
landing meanwhile cannot change a run halfway; stopping (Ctrl-C, a killed session) loses at
most the steps since the run's last checkpoint (every 325 steps).

The standard mode's setting (tiny preset, 64 px / 8 px patches, 20,000 Tiny-ImageNet-100 caption
pairs, batch 128; ``reproduction.modes.MODES["compute"]``) with one cosine schedule per run to
10,400 steps, read out on the way at steps 650, 1,300, 2,600, 5,200 and 10,400 (:class:`Study`):

- ``mae_s{0,1,2}`` and ``m3ae_s{0,1,2}``: pre-training (the MAE run is the same run with every
  caption dropped, as in reproduce.py);
- ``supervised_s0``: the same encoder from random weights trained with cross-entropy on the
  100 class labels of the same images, same augmentation (random resized crop 0.2-1 + flip),
  batch, LR, warm-up, AdamW betas, weight decay and schedule, no decoder (the library's
  :func:`m3ae.evaluation.finetune.finetune`); ``supervised_s{1,2}`` on the same schedule up to
  step 2,600, for its seed spread.

Every readout of every run (linear probe, kNN and 10-shot probe of CLS and of the mean; the
probe at every layer at steps 2,600 and 10,400; the caption diagnostic of M3AE; OOD at the last step; the
supervised run's own head) is one JSON file ``readouts/<run>/step_<N>.json``, written as soon as
that checkpoint is evaluated. A run is advanced one milestone at a time, all runs before the
next milestone (so a stop leaves every run at a comparable budget), and resumes exactly from
its last checkpoint. Two processes started alike share the runs (``running.pid``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from m3ae.io import write_json_atomic
from m3ae.ops import POOLS
from reproduction.modes import MODES, Mode, RunSpec, smoke_of
from reproduction.runs import (build_caches, build_run_config, cache_path, caption_diagnostic, claim_run_dir,
                               class_subset, eval_images, ood_eval, probe_checkpoint, train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Study:
    """The study's schedule, all fractions of the mode's steps (10,400 for "compute")."""
    mode: Mode

    @property
    def milestones(self) -> tuple[int, ...]:  # 650, 1,300, 2,600, 5,200, 10,400
        return tuple(self.mode.steps // d for d in (16, 8, 4, 2, 1))

    @property
    def layers_at(self) -> tuple[int, ...]:  # the probe at every layer (and each pool)
        return (self.mode.steps // 4, self.mode.steps)

    @property
    def spread_at(self) -> int:  # supervised seeds 1 and 2 run this far on the same schedule
        return self.mode.steps // 4

    @property
    def ckpt_every(self) -> int:  # resume granularity (~3 min of an M3AE process on 2 cores)
        return max(1, self.mode.steps // 32)


STUDY = Study(MODES["compute"])
# --smoke: the same code on the smoke sizes, 16 steps (seconds; the numbers mean nothing).
SMOKE = Study(replace(smoke_of(MODES["compute"]), steps=16, warmup=1, classes=None))


@dataclass(frozen=True)
class Run:
    spec: RunSpec
    stop: int  # the last milestone this run goes to

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


def plan(study: Study = STUDY) -> list[Run]:
    mode = study.mode
    runs = []
    for seed in mode.seeds:
        runs.append(Run(RunSpec(f"mae_s{seed}", seed, ["data.paired_fraction=0.0"], ood=True, kind="mae",
                                paired_fraction=0.0), mode.steps))
        runs.append(Run(RunSpec(f"m3ae_s{seed}", seed, [], ood=True), mode.steps))
    for seed in (0, 1, 2):
        runs.append(Run(RunSpec(f"supervised_s{seed}", seed, [], kind="supervised"),
                        mode.steps if seed == 0 else study.spread_at))
    return runs


def readout_path(out: Path, name: str, step: int) -> Path:
    return out / "readouts" / name / f"step_{step}.json"


# ---------------------------------------------------------------------------- training
def train_to(run: Run, step: int, ctx: dict) -> Path:
    """Advance ``run`` to ``step`` (resuming from its newest checkpoint) -> its run folder."""
    run_dir = ctx["out"] / run.name
    if run.kind == "supervised":
        _supervised(run, step, run_dir, ctx)
    else:
        from m3ae.training import pretrain

        cfg = pretrain_config(run.spec, ctx)
        pretrain(cfg, run_dir, resume="latest", progress=ctx["progress"], max_steps=step)
    return run_dir


def pretrain_config(spec: RunSpec, ctx: dict):
    study = ctx["study"]
    cfg = build_run_config(spec, study.mode, ctx["data"], ctx["tokenizer"], ctx["device"], ctx["out"])
    cfg.train.ckpt_every, cfg.train.keep_every, cfg.train.keep_last = study.ckpt_every, study.milestones[0], 1
    cfg.train.log_every = max(1, study.mode.steps // 200)
    return cfg


def _supervised(run: Run, step: int, run_dir: Path, ctx: dict) -> None:
    """Cross-entropy on the labels through :func:`m3ae.evaluation.finetune.finetune`, with
    pre-training's optimiser settings, augmentation and schedule (see the module doc)."""
    from m3ae.evaluation.data import load_labelled, make_loader
    from m3ae.evaluation.features import random_init_model
    from m3ae.evaluation.finetune import finetune

    cfg = pretrain_config(run.spec, ctx)
    study, t = ctx["study"], cfg.train
    size = cfg.model.image_size
    model = random_init_model(cfg.model, run.spec.seed).to(ctx["device"])
    train = load_labelled(str(cache_path(ctx["out"], "tin-train", study.mode)), size, train=True,
                          crop_scale=tuple(cfg.data.crop_scale), randaug=None)
    val = load_labelled(str(cache_path(ctx["out"], "tin-val", study.mode)), size, limit=study.mode.val)
    res = finetune(model, make_loader(train, batch_size=t.batch_size, shuffle=True, seed=run.spec.seed),
             make_loader(val, batch_size=500), len(train.class_names), steps=t.steps, max_steps=step,
             warmup_steps=t.warmup_steps, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
             layer_decay=1.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0, grad_clip=t.grad_clip,
             class_names=train.class_names, progress=ctx["progress"], seed=run.spec.seed, run_dir=run_dir,
             save_at=study.milestones, ckpt_every=study.ckpt_every)
    write_json_atomic(run_dir / "history.json", res.history)  # its own head's val top-1 at each milestone


def model_dir(run: Run, run_dir: Path, step: int) -> Path:
    if run.kind == "supervised":
        return run_dir / f"step_{step}"
    return run_dir / "checkpoints" / f"step_{step:08d}"


# -------------------------------------------------------------------------- evaluation
def readout(run: Run, run_dir: Path, step: int, ctx: dict) -> dict:
    """Every readout of one checkpoint (see the module doc)."""
    from m3ae import load_pretrained
    from m3ae.evaluation import linear_probe
    from m3ae.evaluation.features import layer_name

    t0 = time.perf_counter()
    study = ctx["study"]
    mode = study.mode
    where = model_dir(run, run_dir, step)
    model = load_pretrained(where, ctx["device"], need_tokenizer=False)[0]
    sets = ctx["sets"]
    probes, feats = probe_checkpoint(model, sets, mode, run.spec.seed,
                                     blocks="all" if step in study.layers_at else None)
    res = {"run": run.name, "kind": run.kind, "seed": run.spec.seed, "step": step,
           "probes": {p: r.as_dict() for p, r in probes.items()}}
    if "layers" in feats:  # every block from the probes' own encoder pass; "final" is the probe above

        def top1(b, p):
            r = probes[p] if b is None else linear_probe(*(f[p] for f in feats["layers"][b]),
                                                         epochs=mode.probe_epochs, seed=run.spec.seed)
            return {k: v for k, v in r.as_dict().items() if k in ("top1", "knn_top1")}

        res["layers"] = {layer_name(b): {p: top1(b, p) for p in POOLS} for b in feats["layers"]}
    if run.kind == "m3ae":
        res["caption_diag"] = caption_diagnostic(where, ctx["data"], ctx["device"], mode.caption_check)
    if run.kind == "supervised":
        state = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else None
        res["own_head"] = next((h for h in (state or []) if h.get("step") == step), None)
    if step == mode.steps and run.spec.ood:
        res.update(ood_eval(model, sets, feats, probes[mode.pool].probe, mode, run.spec.seed))
    if run.kind != "supervised":
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = [m for m in metrics if m.get("step", 0) <= step][-1:]
        res["train"] = {k: last[0].get(k) for k in ("loss", "image_loss", "text_loss", "text_accuracy",
                                                    "samples_per_s")} if last else None
    res["eval_seconds"] = time.perf_counter() - t0
    res["finished_at"] = time.time()
    return res


def advance(run: Run, milestone: int, ctx: dict) -> bool:
    """Train ``run`` to ``milestone`` and write the readouts it lacks up to there; False when
    another process holds the run."""
    run_dir = ctx["out"] / run.name
    lock = claim_run_dir(run_dir)
    if lock is None:
        return False
    try:
        todo = [m for m in ctx["study"].milestones if m <= min(milestone, run.stop)
                and not readout_path(ctx["out"], run.name, m).is_file()]
        if not todo:
            return True
        t0 = time.perf_counter()
        train_to(run, todo[-1], ctx)
        t_train = time.perf_counter() - t0
        for m in todo:
            res = readout(run, run_dir, m, ctx)
            res["train_seconds_this_call"] = t_train if m == todo[-1] else None
            write_json_atomic(readout_path(ctx["out"], run.name, m), res)
            if ctx["publish"]:
                dst = readout_path(ctx["publish"], run.name, m)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(readout_path(ctx["out"], run.name, m), dst)
            p = res["probes"]
            print(f"{run.name} step {m}: linear CLS {100 * p['cls']['top1']:.2f} %, mean "
                  f"{100 * p['mean']['top1']:.2f} % ({res['eval_seconds']:.0f} s eval, "
                  f"{t_train:.0f} s training this call)", flush=True)
        return True
    finally:
        lock.release()


def prepare(mode: Mode, data: Path, out: Path, progress: bool) -> tuple[Path, Path]:
    """The class subset, the caches and the tokenizer (made once, shared by every run)."""
    out.mkdir(parents=True, exist_ok=True)
    if mode.classes:
        data = class_subset(data, out, mode.classes)
    build_caches(data, out, mode, progress)
    return data, train_tokenizer(out, data, mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folders (keep them outside the work tree)")
    p.add_argument("--data", default=os.environ.get("M3AE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--publish", default=str(ROOT / "docs" / "results" / "compute_curve"),
                   help="where each readout JSON is also copied (to be committed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--runs", nargs="*", default=None, help="only these runs")
    p.add_argument("--until", type=int, default=None,
                   help="stop after this milestone (default: the last; 0: only prepare data, caches and tokenizer)")
    p.add_argument("--smoke", action="store_true", help="the code path at smoke size, 16 steps (seconds)")
    p.add_argument("--report", action="store_true", help="only write the report from the published JSON")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        from reproduction.compute_report import report

        print(f"report: {report(Path(args.publish), Path(args.docs))}")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    study = SMOKE if args.smoke else STUDY
    mode, until = study.mode, study.mode.steps if args.until is None else args.until
    data, tokenizer = prepare(mode, Path(args.data), out, not args.no_progress)
    ctx = {"out": out, "data": data, "tokenizer": tokenizer, "device": args.device, "progress": not args.no_progress,
           "publish": Path(args.publish) if args.publish else None, "study": study}
    ctx["sets"] = eval_images(data, out, mode, mode.model.image_size)
    runs = [r for r in plan(study) if args.runs is None or r.name in args.runs]
    try:
        while True:
            # Breadth first: the earliest milestone any run still lacks comes first, so a stop
            # leaves the runs at comparable budgets; a run another process holds is passed over.
            pending = [(m, r) for m in study.milestones if m <= until for r in runs
                       if r.stop >= m and not readout_path(out, r.name, m).is_file()]
            if not pending:
                break
            if not any(advance(r, m, ctx) for m, r in pending):
                time.sleep(10)  # everything left is another process's
    except KeyboardInterrupt as e:  # Ctrl-C: pre-training saved its step; the same command continues
        saved = f" at step {e.step}; checkpoint {e.checkpoint}" if getattr(e, "checkpoint", None) else ""
        print(f"\ninterrupted{saved}; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"done: every run is read out up to step {until}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
