"""``m3ae pretrain``: the pre-training loop, from one CPU process to many GPUs on many nodes.

:class:`m3ae.training.step.TrainStep` is one optimizer step (micro-batches -> masked forward
-> loss -> backward -> clip -> AdamW -> LR schedule, and why any number of processes
computes the same numbers). This module sets a run up (run folder, tokenizer, model,
restoring a checkpoint), runs the steps and the callbacks around them: JSON-lines metrics
(TensorBoard / W&B optional) and a tqdm bar every ``log_every`` steps, reconstruction
pictures, atomic checkpoints for exact resume, and the stop after too many non-finite steps
in a row (checked when device values are read anyway: at log, picture and checkpoint
steps). Only rank 0 writes files.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data import build_pretrain_loader, build_text_encoder
from ..model import M3AE
from ..visualize import plot_loss_curve, save_reconstruction_grid
from .checkpoint import load_trainer_state, resolve_resume, save_checkpoint
from .distributed import DistInfo, barrier, broadcast_object, init_distributed, shutdown_distributed
from .loggers import MetricsLogger
from .step import TrainStep


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where and what to try."""


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0


class _BatchStream:
    """Endless batches from a :class:`m3ae.data.PretrainLoader`, epoch after epoch.

    The loader itself knows its exact position (epoch, samples read on this process, or per
    worker for shard streams) and restores it; this only restarts it at epoch ends."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def state(self) -> dict:
        return self.loader.state_dict()

    def load_state(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def __next__(self) -> dict:
        for _ in range(2):  # a fresh epoch must yield at least one batch
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("the data source produced no batch in a whole epoch; is it empty?")


def _rng_state(device: torch.device) -> dict:
    st = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda_rng"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in st:
        torch.cuda.set_rng_state(st["cuda_rng"], device)


def _shared_text_encoder(cfg: Config, info: DistInfo, ckpt: Path | None):
    """Rank 0's tokenizer on every rank (a tokenizer trained on the fly must be identical
    everywhere); when resuming, the one saved with the checkpoint."""
    from tokenizers import Tokenizer

    from ..pretrained import TOKENIZER_NAME
    from ..tokenizer import TextEncoder

    text = None
    if info.is_main:
        if ckpt is not None and not cfg.data.tokenizer and (ckpt / TOKENIZER_NAME).is_file():
            text = (ckpt / TOKENIZER_NAME).read_text()
        else:
            text = build_text_encoder(cfg.data).tokenizer.to_str()
    text = broadcast_object(text, info)
    return TextEncoder(Tokenizer.from_str(text), cfg.data.text_len)


def _resume_target(resume: str | None, run_dir: Path, info: DistInfo) -> Path | None:
    # torchrun --max-restarts restarts dead workers with the same arguments; continuing from
    # the newest checkpoint is the only sensible thing for a restarted worker to do.
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "latest"
    if not resume:
        return None
    ckpt = resolve_resume(resume, run_dir) if info.is_main else None
    found = broadcast_object(None if ckpt is None else str(ckpt), info)
    return None if found is None else Path(found)


def pretrain(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
             max_steps: int | None = None) -> PretrainResult:
    """Pre-train an M3AE as ``cfg`` says, writing everything into ``run_dir``.

    ``resume`` is ``"latest"`` or a checkpoint folder. ``max_steps`` stops early (the LR
    schedule still follows ``cfg.train.steps``), which the tests use to interrupt a run.
    Started by ``torchrun`` or ``srun`` this process becomes one rank of a data-parallel run.
    """
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, Path(run_dir), resume, progress, max_steps, info)
    finally:
        if owns_group:
            shutdown_distributed()


def _pretrain(cfg: Config, run_dir: Path, resume: str | None, progress: bool, max_steps: int | None,
              info: DistInfo) -> PretrainResult:
    run = _Run(cfg, run_dir, resume, max_steps, info)
    try:
        run.loop(progress)
    finally:
        run.logger.close()
    return run.finish()


class _Run:
    """One pre-training run: set-up and restore, the step loop, the callbacks around steps."""

    def __init__(self, cfg: Config, run_dir: Path, resume: str | None, max_steps: int | None, info: DistInfo):
        tcfg = cfg.train
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier(info)
        torch.manual_seed(tcfg.seed)  # the same initial weights on every rank (FSDP2 relies on it)
        ckpt = _resume_target(resume, run_dir, info)
        self.text_encoder = _shared_text_encoder(cfg, info, ckpt)
        _check_sizes(cfg, self.text_encoder.vocab_size)
        if info.is_main:
            _write_run_files(cfg, run_dir, info.world_size)
        self.model = M3AE(cfg.model).to(info.device)
        st = _load_weights(self.model, ckpt) if ckpt is not None else None  # before FSDP shards them
        self.step = TrainStep(self.model, cfg, info)
        loader = build_pretrain_loader(cfg.data, cfg.model.image_size, self.text_encoder, tcfg.batch_size,
                                       seed=tcfg.seed, rank=info.rank, world_size=info.world_size)
        self.stream = _BatchStream(loader)
        self.start_step = 0
        if st is not None:
            self.step.load_state_dict(st, str(ckpt))
            self.start_step = st["step"]
            _set_rng_state(st, info.device)
            self.stream.load_state(_data_position(st, info, ckpt))
            if info.is_main:  # also without a progress bar: which checkpoint a run continued from matters
                tqdm.write(f"resumed from {ckpt} at step {self.start_step}")
        self.end_step = tcfg.steps if max_steps is None else min(tcfg.steps, max_steps)
        self.logger = MetricsLogger(run_dir, cfg, enabled=info.is_main, resume_step=self.start_step)
        self.last_good_ckpt = ckpt
        self.history: list[dict] = []
        self.vis_batch = None

    def loop(self, progress: bool) -> None:
        tcfg = self.cfg.train
        bar = tqdm(range(self.start_step, self.end_step), initial=self.start_step, total=self.end_step,
                   disable=not (progress and self.info.is_main), desc="pretrain", dynamic_ncols=True, unit="step")
        self._t_last, self._n_last = time.perf_counter(), 0
        try:
            for step in bar:
                micro = [next(self.stream) for _ in range(tcfg.accum_steps)]
                if self.vis_batch is None and micro[0].get("image") is not None:
                    self.vis_batch = micro[0]
                self.step(step, micro)
                self._n_last += tcfg.global_batch(self.info.world_size)
                self._after_step(step + 1, bar)
        finally:
            bar.close()

    def _after_step(self, done: int, bar) -> None:
        """The callbacks. Device values are read only here, at log and checkpoint steps (the
        same steps on every rank, so a stop is collective)."""
        tcfg = self.cfg.train
        log = done % tcfg.log_every == 0 or done == self.end_step
        ckpt = (tcfg.ckpt_every and done % tcfg.ckpt_every == 0) or done == self.end_step
        if log or ckpt:
            streak = self.step.longest_bad_streak()
            if tcfg.max_nonfinite_steps and streak >= tcfg.max_nonfinite_steps:
                raise TrainingDiverged(_diverged_message(done, streak, self.last_good_ckpt, tcfg))
        if log:
            self._log(done, bar)
        if self._pictures_due(done):
            g = torch.Generator(device=self.info.device).manual_seed(1234)
            save_reconstruction_grid(self.model, self.vis_batch,
                                     self.run_dir / "reconstructions" / f"step_{done:08d}.png",
                                     self.text_encoder, generator=g, norm_pix_loss=tcfg.norm_pix_loss)
        if ckpt:
            path = self._save(done)
            if not self.step.in_bad_streak():  # "good": written before a streak of non-finite steps
                self.last_good_ckpt = path or self.last_good_ckpt

    def _pictures_due(self, done: int) -> bool:
        every = self.cfg.train.recon_every
        return (self.info.is_main and not self.step.fsdp and bool(every) and self.vis_batch is not None
                and (done % every == 0 or done == self.end_step))

    def _log(self, done: int, bar) -> None:
        now = time.perf_counter()
        row = {"step": done, **self.step.metrics(), "samples_per_s": self._n_last / max(now - self._t_last, 1e-9)}
        self._t_last, self._n_last = now, 0
        self.history.append(row)
        self.logger.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", img=f"{row['image_loss']:.3f}", txt=f"{row['text_loss']:.3f}",
                        acc=f"{row['text_accuracy']:.2f}", sps=f"{row['samples_per_s']:.0f}")

    def _save(self, done: int) -> Path | None:
        """Every rank calls this (FSDP gathers collectively); rank 0 writes."""
        info, cfg = self.info, self.cfg
        weights = self.step.full_weights()
        step_state = self.step.state_dict()
        # Every rank's data position: shard streams are at different places on different ranks.
        data_states = [None] * info.world_size
        if info.world_size > 1:
            torch.distributed.all_gather_object(data_states, self.stream.state())
        else:
            data_states = [self.stream.state()]
        path = None
        if info.is_main:
            state = {"step": done, **step_state, **_rng_state(info.device), "data": data_states[0],
                     "data_per_rank": data_states, "world_size": info.world_size, "config": cfg.to_dict()}
            path = save_checkpoint(self.run_dir, done, weights, state, self.text_encoder.tokenizer,
                                   keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
        barrier(info)  # nobody runs ahead (or exits) while rank 0 is still writing
        return path

    def finish(self) -> PretrainResult:
        done_any = self.end_step > self.start_step
        if done_any:
            weights = self.step.full_weights()
            if self.info.is_main:
                from ..pretrained import save_pretrained

                save_pretrained(weights, self.run_dir / "final", self.text_encoder.tokenizer)
                if self.logger.path.exists():
                    plot_loss_curve(self.logger.path, self.run_dir / "loss_curve.png")
        barrier(self.info)
        last = self.history[-1] if done_any and self.history else {}
        return PretrainResult(self.run_dir, self.end_step, last.get("loss", float("nan")), self.history,
                              int(self.step.skipped))


def _check_sizes(cfg: Config, vocab_size: int) -> None:
    if vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size={vocab_size} or more")
    if cfg.data.text_len > cfg.model.max_text_len:
        raise ValueError(f"data.text_len={cfg.data.text_len} exceeds model.max_text_len={cfg.model.max_text_len}")


def _write_run_files(cfg: Config, run_dir: Path, world: int) -> None:
    from .. import __version__

    tcfg = cfg.train
    cfg.save(run_dir / "config.yaml")
    (run_dir / "version.json").write_text(json.dumps({
        "m3ae": __version__, "torch": torch.__version__, "git": _git_commit(), "world_size": world,
        "global_batch": tcfg.global_batch(world), "peak_lr": tcfg.lr_for(world),
        "strategy": tcfg.strategy if world > 1 else "single"}, indent=2))


def _load_weights(model: M3AE, ckpt: Path) -> dict:
    """Load a checkpoint's weights into ``model``; return its trainer state."""
    from safetensors.torch import load_file

    from ..pretrained import WEIGHTS_NAME, load_state_dict_checked

    load_state_dict_checked(model, load_file(str(ckpt / WEIGHTS_NAME), device="cpu"))
    return load_trainer_state(ckpt)


def _data_position(st: dict, info: DistInfo, ckpt: Path) -> dict:
    """This rank's data position from a checkpoint, converted when the process count changed."""
    world, old_world = info.world_size, st.get("world_size", 1)
    per_rank = st.get("data_per_rank") or [st["data"]]
    data = dict(per_rank[info.rank] if old_world == world and len(per_rank) == world else per_rank[0])
    if old_world == world:
        return data
    if data.get("kind") != "map":
        raise ValueError(f"{ckpt} was written by {old_world} processes reading a shard stream; "
                         f"resume it with {old_world} processes")
    # The strided shares of W processes after p samples each cover the first W x p of the
    # epoch order, so the position converts when it divides evenly.
    seen = data["position"] * old_world
    if seen % world:
        raise ValueError(f"{ckpt} was written by {old_world} processes at epoch position {seen}, "
                         f"which {world} processes cannot split evenly; resume with {old_world}")
    data.update(position=seen // world, world_size=world, rank=info.rank)
    return data


def _diverged_message(step: int, bad: int, last_ckpt: Path | None, tcfg) -> str:
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (f"stopping at step {step}: {bad} steps in a row had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={tcfg.max_nonfinite_steps}); {where}. Likely causes: a learning "
            f"rate too high for this batch size (lower train.base_lr/train.lr or lengthen "
            f"train.warmup_steps), fp16 overflow (use train.precision=bf16), no gradient clipping "
            f"(train.grad_clip), or bad input data (NaN pixels, empty captions). Resume with "
            f"--resume latest after changing the config.")


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


__all__ = ["pretrain", "PretrainResult", "TrainingDiverged"]
