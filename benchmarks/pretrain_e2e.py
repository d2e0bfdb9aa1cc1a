"""``m3ae pretrain`` end to end against its own step: what users get, and how far from the step.

Runs ``m3ae pretrain`` (a subprocess, as a user would) on the Tiny-ImageNet caption shards,
streaming them (``data.source=webdataset``) and/or from an image cache of the same shards
(``data.source=cache``, built once before timing), reads the samples/s it logs
(``metrics.jsonl``, every ``--log-every`` steps; the first window, with start-up, is left
out), then times the same configuration's :class:`m3ae.training.step.TrainStep` on
synthetic batches with ``train_throughput.py``. With ``--rounds N`` the runs are interleaved
(source after source, then the step, N times) so that a machine whose speed drifts affects
them alike. Prints every figure and each source's ratio to the step; the gap is data loading
(decode, augmentation, tokenisation), logging and checkpointing.

    python benchmarks/pretrain_e2e.py --threads 2 --steps 60
    python benchmarks/pretrain_e2e.py --threads 2 --size standard --sources webdataset,cache --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tiny-imagenet-captions"
SHARDS = DATA / "train-{000000..000007}.tar.gz"

# Run sizes: the arguments that select them for m3ae pretrain and for train_throughput.py, and
# the cache's image size. "standard" is experiments/reproduce.py's standard mode: the tiny
# preset at 64 px with 8-px patches, 64-token captions, batch 128.
_STANDARD = ["model.image_size=64", "model.patch_size=8", "model.vocab_size=4096"]
SIZES = {  # options, then section.field=value overrides, for each program
    "bench-cpu": dict(pretrain=(["--config", str(HERE / "bench-cpu.yaml")], []),
                      step=(["--config", str(HERE / "bench-cpu.yaml")], []), image_size=None),
    "standard": dict(pretrain=(["--preset", "tiny"], [*_STANDARD, "data.text_len=64", "train.batch_size=128"]),
                     step=(["--preset", "tiny", "--batch", "128", "--text-len", "64"], _STANDARD), image_size=64),
}


def _src_on_path():
    sys.path.insert(0, str(HERE.parent / "src"))


def tokenizer_file(args, folder: Path) -> str:
    """``--tokenizer``, or WordPiece trained on the captions of one shard (not timed)."""
    if args.tokenizer:
        return args.tokenizer
    _src_on_path()
    from m3ae.config import DataConfig
    from m3ae.data import source_captions
    from m3ae.tokenizer import train_wordpiece

    path = folder / "tokenizer.json"
    caps = list(source_captions(DataConfig(source="webdataset", urls=str(DATA / "train-000000.tar.gz"))))
    train_wordpiece(caps, vocab_size=4096 if args.size == "standard" else 8192).save(str(path))
    return str(path)


def build_cache(args, folder: Path, image_size: int) -> tuple[str, float]:
    """The shards as an image cache (timed, reported apart: it is paid once per dataset)."""
    _src_on_path()
    from m3ae.data.cache import build_cache as build
    from m3ae.data.cache import source_config

    t0 = time.perf_counter()
    build([source_config(args.shards)], folder / "cache", image_size, progress=False)
    return str(folder / "cache"), time.perf_counter() - t0


def end_to_end(args, out: Path, source: str, urls: str, tokenizer: str) -> dict:
    overrides = [f"data.source={source}", f"data.urls={urls}", f"data.tokenizer={tokenizer}",
                 f"data.num_workers={args.workers if source != 'cache' else 0}", f"train.steps={args.steps}",
                 f"train.log_every={args.log_every}", "train.recon_every=0", "train.ckpt_every=0",
                 "train.device=cpu", *args.overrides]
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    opts, size_overrides = SIZES[args.size]["pretrain"]
    cmd = [sys.executable, "-m", "m3ae", "pretrain", *opts, "--out", str(out), "--no-progress", "--overwrite",
           *size_overrides, *overrides]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["samples_per_s"] for r in rows[1:]]  # the first window holds the start-up
    if not windows:
        raise SystemExit(f"need at least two log windows: raise --steps above --log-every={args.log_every}")
    return {"command": " ".join(cmd), "samples_per_s": statistics.median(windows), "windows": windows}


def step_only(args, folder: Path) -> dict:
    """train_throughput.py on the same config, in a fresh process like the end-to-end run."""
    out = folder / "step.json"
    opts, size_overrides = SIZES[args.size]["step"]
    cmd = [sys.executable, str(HERE / "train_throughput.py"), *opts, "--steps", str(args.step_steps), "--warmup", "3",
           "--device", "cpu", "--json", str(out), *size_overrides, *args.overrides]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="section.field=value for every run")
    p.add_argument("--shards", default=str(SHARDS))
    p.add_argument("--size", choices=sorted(SIZES), default="bench-cpu")
    p.add_argument("--sources", default="webdataset", help="comma-separated: webdataset, cache")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (medians reported)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: trained on one shard's captions)")
    p.add_argument("--steps", type=int, default=60, help="steps of each end-to-end run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--step-steps", type=int, default=10, help="timed steps of the step-only run")
    p.add_argument("--workers", type=int, default=0, help="data.num_workers of the streaming run")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not set(sources) <= {"webdataset", "cache"}:
        raise SystemExit(f"--sources: webdataset and/or cache, not {args.sources!r}")
    r: dict = {"size": args.size, "threads": args.threads, "workers": args.workers, "rounds": args.rounds,
               "sources": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tokenizer_file(args, tmp)
        urls = {"webdataset": args.shards}
        if "cache" in sources:
            size = SIZES[args.size]["image_size"] or 64
            urls["cache"], r["cache_build_s"] = build_cache(args, tmp, size)
        runs: dict[str, list[dict]] = {s: [] for s in sources}
        steps = []
        for _ in range(args.rounds):
            for s in sources:
                runs[s].append(end_to_end(args, tmp / f"run-{s}", s, urls[s], tok))
            steps.append(step_only(args, tmp))
    step_sps = statistics.median(x["samples_per_s"] for x in steps)
    r["step_samples_per_s"] = step_sps
    r["step"] = {k: steps[-1][k] for k in ("command", "samples_per_s", "step_time_median_s", "mfu", "train")}
    r["step_rounds"] = [x["samples_per_s"] for x in steps]
    for s in sources:
        sps = statistics.median(x["samples_per_s"] for x in runs[s])
        r["sources"][s] = {"samples_per_s": sps, "ratio": sps / step_sps,
                           "rounds": [x["samples_per_s"] for x in runs[s]], "command": runs[s][-1]["command"]}
        print(f"m3ae pretrain end to end, {s:10s}: {sps:7.1f} samples/s ({100 * sps / step_sps:.0f} % of the step; "
              f"rounds {', '.join(f'{x:.1f}' for x in r['sources'][s]['rounds'])})")
    print(f"TrainStep alone:                    {step_sps:7.1f} samples/s "
          f"(rounds {', '.join(f'{x:.1f}' for x in r['step_rounds'])})")
    if "cache_build_s" in r:
        print(f"cache build (once per dataset):     {r['cache_build_s']:7.1f} s")
    if len(sources) == 1:  # the keys of earlier versions of this benchmark
        only = r["sources"][sources[0]]
        r.update(end_to_end_samples_per_s=only["samples_per_s"], ratio=only["ratio"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
