"""``m3ae pretrain``: the pre-training loop, from one CPU process to many GPUs on many nodes.

:class:`m3ae.training.step.TrainStep` is one optimizer step (micro-batches -> masked forward
-> loss -> backward -> clip -> AdamW -> LR schedule, and why any number of processes
computes the same numbers). This module sets a run up (run folder, tokenizer, model,
restoring a checkpoint), runs the steps and the callbacks around them: JSON-lines metrics
(TensorBoard / W&B optional) and a tqdm bar every ``log_every`` steps, reconstruction
pictures, atomic checkpoints for exact resume, and the stop after too many non-finite steps
in a row (checked when device values are read anyway: at log, picture and checkpoint
steps). Only rank 0 writes files, and only while it holds the run folder's lock
(:mod:`m3ae.training.runlock`). A rank that fails outside the step's own collectives (its
data, rank 0's files) tells the others at the next step boundary, and all stop together.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data import build_dataset, build_pretrain_loader, build_text_tokenizer
from ..data.decode import DataError
from ..data.loader import resume_position
from ..model import M3AE
from ..optim import lr_at
from ..tokenizer import SPECIAL_TOKENS
from ..visualize import plot_loss_curve, save_reconstruction_grid
from .checkpoint import (CheckpointWriteError, clear_run, config_changes, last_good_after_resume,
                         load_trainer_state, refuse_existing_run, resolve_resume, save_checkpoint)
from .distributed import (DistInfo, barrier, broadcast_object, control_group, first_failure, gather_objects,
                          init_distributed, shutdown_distributed)
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .loggers import MetricsLogger
from .nonfinite import overflow_message, streak_message
from .step import TrainStep


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where and what to try."""


class RankFailed(RuntimeError):
    """Another rank stopped with an error; the message is that rank's."""


# What a rank's failure becomes on the other ranks: the same kind, so the same exit code and
# the same one-line message everywhere (anything else arrives as RankFailed).
_SHARED_ERRORS = {cls.__name__: cls for cls in (DataError, TrainingDiverged, CheckpointWriteError,
                                                 FileNotFoundError, FileExistsError, ValueError)}


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    data_summary: str = ""  # samples read and skipped per reason, over all ranks and workers
    start_step: int = 0  # the step it resumed at (>= steps: it had finished, nothing was trained)


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


def _shared_tokenizer(cfg: Config, info: DistInfo, ckpt: Path | None):
    """Rank 0's tokenizer on every rank (a tokenizer trained on the fly must be identical
    everywhere); when resuming, always the one saved with the checkpoint: the model's token
    ids mean what they meant when the run started (a ``from-data`` tokenizer trained again
    would number its tokens differently)."""
    from tokenizers import Tokenizer

    from ..factory import get_tokenizer
    from ..pretrained import TOKENIZER_NAME
    from ..tokenizer import TextTokenizer

    text = None
    if info.is_main:
        if ckpt is not None and (ckpt / TOKENIZER_NAME).is_file():
            text = get_tokenizer(ckpt, cfg.data.text_len).tokenizer.to_str()  # the one way in
        else:
            text = build_text_tokenizer(cfg.data).tokenizer.to_str()
    text = broadcast_object(text, info)
    return TextTokenizer(Tokenizer.from_str(text), cfg.data.text_len)


def _resume_target(resume: str | None, run_dir: Path, info: DistInfo) -> Path | None:
    if not resume:
        return None
    ckpt, problem = None, None
    if info.is_main:
        try:
            ckpt = resolve_resume(resume, run_dir, say=tqdm.write)
        except (FileNotFoundError, ValueError) as e:
            problem = e
    found, problem = broadcast_object((None if ckpt is None else str(ckpt), problem), info)
    if problem is not None:
        raise problem
    if found is None and info.is_main:
        tqdm.write(f"--resume {resume}: no checkpoint in {run_dir / 'checkpoints'} yet; starting a new run "
                   "at step 0")
    return None if found is None else Path(found)


def _check_run_folder(run_dir: Path, resume: str | None, overwrite: bool, info: DistInfo) -> None:
    """A new run must not write into an old one: its checkpoints and metrics would mix."""
    problem = None
    if info.is_main and not resume and not overwrite:
        try:
            refuse_existing_run(run_dir)
        except FileExistsError as e:
            problem = str(e)
    problem = broadcast_object(problem, info)
    if problem:
        raise FileExistsError(problem)


def _vocab_note(cfg: Config, text_tokenizer) -> str | None:
    """A note when the model has more token ids than the tokenizer (they are never used)."""
    n, v = text_tokenizer.vocab_size, cfg.model.vocab_size
    if n >= v or n <= len(SPECIAL_TOKENS) or (cfg.data.source == "synthetic" and not cfg.data.tokenizer):
        return None  # equal, image-only (no text), or the built-in data's deliberately small vocabulary
    return (f"note: model.vocab_size={v} but the tokenizer has {n} tokens: ids {n}..{v - 1} are never "
            f"used (wasted rows in the text embedding and head); model.vocab_size={n} fits exactly")


def pretrain(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
             max_steps: int | None = None, overwrite: bool = False) -> PretrainResult:
    """Pre-train an M3AE as ``cfg`` says, writing everything into ``run_dir``.

    ``resume`` is ``"latest"`` (continue the newest checkpoint, or start when there is none)
    or a checkpoint folder. Without it, a ``run_dir`` that already holds a run is refused
    (``FileExistsError``) unless ``overwrite`` deletes that run first. ``max_steps`` stops
    early (the LR schedule still follows ``cfg.train.steps``), which the tests use to
    interrupt a run. Ctrl-C finishes the step, writes a checkpoint and raises
    :class:`TrainingInterrupted`. Started by ``torchrun`` or ``srun`` this process becomes
    one rank of a data-parallel run.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run or replace it")
    # torchrun --max-restarts restarts dead workers with the same arguments; continuing from
    # the newest checkpoint is the only sensible thing for a restarted worker to do.
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume, overwrite = "latest", False
    if cfg.train.deterministic:
        # Read when cuBLAS makes its first handle, so before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # a run never dies of it
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, Path(run_dir), resume, progress, max_steps, info, overwrite)
    finally:
        if owns_group:
            shutdown_distributed()


def _pretrain(cfg: Config, run_dir: Path, resume: str | None, progress: bool, max_steps: int | None,
              info: DistInfo, overwrite: bool = False) -> PretrainResult:
    lock = _take_lock(run_dir, info)
    try:
        run = PretrainRun(cfg, run_dir, resume, max_steps, info, overwrite)
        interrupt = StopOnInterrupt().start()  # Ctrl-C: finish the step, save, then stop
        try:
            run.loop(progress, interrupt)
        finally:
            interrupt.stop()
            run.logger.close()
        return run.finish()
    finally:
        if lock is not None:
            lock.release()


def _take_lock(run_dir: Path, info: DistInfo):
    """Rank 0 takes the run folder's lock before anything in it is read or written; every
    rank refuses together when another run holds it."""
    from .runlock import RunFolderLocked, RunLock

    lock, problem = None, None
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire(say=tqdm.write)
        except RunFolderLocked as e:
            problem = str(e)
        except OSError as e:  # an unwritable --out: said once, on every rank
            problem = f"cannot create the run folder's lock {Path(run_dir) / '.lock'}: {e.strerror or e}"
    problem = broadcast_object(problem, info)
    if problem:
        raise RunFolderLocked(problem)
    return lock


class PretrainRun:
    """One pre-training run: set-up and restore, the step loop, the callbacks around steps."""

    def __init__(self, cfg: Config, run_dir: Path, resume: str | None, max_steps: int | None, info: DistInfo,
                 overwrite: bool):
        tcfg = cfg.train
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        # Everything is checked before anything is written (a run that cannot start leaves no
        # folder behind), and the data first: a wrong path is the first thing to report.
        _check_run_folder(run_dir, resume, overwrite, info)
        ckpt = _resume_target(resume, run_dir, info)
        dataset = build_dataset(cfg.data, cfg.model.image_size, train=True, seed=tcfg.seed, rank=info.rank,
                                world_size=info.world_size, batch_size=tcfg.batch_size)
        torch.manual_seed(tcfg.seed)  # the same initial weights on every rank (FSDP2 relies on it)
        self.text_tokenizer = _shared_tokenizer(cfg, info, ckpt)
        _check_sizes(cfg, self.text_tokenizer, info)
        self.model = M3AE(cfg.model).to(info.device)
        st = _load_weights(self.model, ckpt) if ckpt is not None else None  # before FSDP shards them
        self.step = TrainStep(self.model, cfg, info)
        self.loader = build_pretrain_loader(cfg.data, cfg.model.image_size, self.text_tokenizer, tcfg.batch_size,
                                            seed=tcfg.seed, rank=info.rank, world_size=info.world_size,
                                            dataset=dataset, device=info.device)
        self.stream = _BatchStream(self.loader)
        if info.is_main:
            if overwrite:
                clear_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_run_files(cfg, run_dir, info.world_size)
        barrier(info)
        self.start_step, self.last_good_ckpt = 0, None
        if st is not None:
            self._restore(st, ckpt)
        self.end_step = tcfg.steps if max_steps is None else min(tcfg.steps, max_steps)
        self.logger = MetricsLogger(run_dir, cfg, enabled=info.is_main, resume_step=self.start_step)
        self.history: list[dict] = []
        self.vis_batch = None
        self.saved_at = self.start_step
        self._deferred: str | None = None  # a failure of rank 0's own files, told at the next step boundary
        self._control = control_group(info)

    def _restore(self, st: dict, ckpt: Path) -> None:
        self.step.load_state_dict(st, str(ckpt))
        self.start_step = st["step"]
        self.last_good_ckpt = last_good_after_resume(ckpt, st)  # written before any streak
        _set_rng_state(st, self.info.device)
        position, note = resume_position(st, self.loader, self.info.rank, self.info.world_size, ckpt)
        if note and self.info.is_main:
            tqdm.write(note)
        self.stream.load_state(position)
        if self.info.is_main:  # also without a progress bar: which checkpoint a run continued from matters
            tqdm.write(f"resumed from {ckpt} at step {self.start_step}")
            changed = config_changes(st.get("config", self.cfg.to_dict()), self.cfg.to_dict())
            if changed:
                tqdm.write(f"the config differs from the checkpoint's ({'; '.join(changed)}): the new values "
                           f"apply from step {self.start_step + 1}, LR schedule and optimizer settings included")

    def loop(self, progress: bool, interrupt: StopOnInterrupt) -> None:
        tcfg, info = self.cfg.train, self.info
        bar = tqdm(range(self.start_step, self.end_step), initial=self.start_step, total=self.end_step,
                   disable=not (progress and info.is_main), desc="pretrain", dynamic_ncols=True, unit="step")
        self._t_last, self._n_last, self._data_s, self._steps_last = time.perf_counter(), 0, 0.0, 0
        try:
            for step in bar:
                t_wait = time.perf_counter()
                try:
                    micro = [next(self.stream) for _ in range(tcfg.accum_steps)]
                except Exception as e:
                    self._stop_together(e)
                self._data_s += time.perf_counter() - t_wait  # the time this step waited for its batches
                self._steps_last += 1
                self._stop_together(None)
                if self.vis_batch is None and micro[0].get("image") is not None:
                    self.vis_batch = micro[0]
                self.step(step, micro)
                self._n_last += tcfg.global_batch(info.world_size)
                self._after_step(step + 1, bar)
                if interrupt.requested(info):
                    if self.saved_at != step + 1:
                        self._save(step + 1)
                    raise TrainingInterrupted(step + 1, self.run_dir / "checkpoints" / f"step_{step + 1:08d}",
                                              self.run_dir)
            self._stop_together(None)
        finally:
            bar.close()

    def _stop_together(self, error: BaseException | None) -> None:
        """Collective, at a step boundary: raise on every rank when any rank failed (this one
        with ``error``, or rank 0 earlier with a deferred failure), with that rank's message."""
        if error is None and self._deferred is not None:
            error, self._deferred = RankFailed(self._deferred), None
        if not self.info.distributed:
            if error is not None:
                raise error
            return
        told = None if error is None else f"{type(error).__name__}\0{error}"
        failure = first_failure(told, self.info, self._control)
        if failure is None:
            return
        src, told = failure
        kind, msg = told.split("\0", 1)
        if not msg.startswith("rank "):
            msg = f"rank {src} of {self.info.world_size} stopped the run: {msg}"
        if error is not None and kind not in _SHARED_ERRORS:
            raise error  # this rank's own unexpected error: keep its traceback
        raise _SHARED_ERRORS.get(kind, RankFailed)(msg) from None

    def _on_main(self, fn, *args, **kwargs) -> None:
        """Rank 0's own writes (metrics rows, pictures): a failure waits for the next step
        boundary, where every rank stops with it (the others are in a collective by then)."""
        if not self.info.distributed:
            fn(*args, **kwargs)
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._deferred = self._deferred or f"{type(e).__name__}: {e}"

    def _after_step(self, done: int, bar) -> None:
        """The callbacks. Device values are read only here, at log and checkpoint steps (the
        same steps on every rank, so a stop is collective)."""
        tcfg = self.cfg.train
        log = done % tcfg.log_every == 0 or done == self.end_step
        ckpt = (tcfg.ckpt_every and done % tcfg.ckpt_every == 0) or done == self.end_step
        if log or ckpt:
            self._check_finite(done)
        if log:
            self._log(done, bar)
        if self._pictures_due(done):
            g = torch.Generator(device=self.info.device).manual_seed(1234)
            self._on_main(save_reconstruction_grid, self.model, self.vis_batch,
                          self.run_dir / "reconstructions" / f"step_{done:08d}.png",
                          self.text_tokenizer, generator=g, norm_pix_loss=tcfg.norm_pix_loss)
        if ckpt:
            path = self._save(done)
            if not self.step.in_bad_streak():  # "good": written before a streak of non-finite steps
                self.last_good_ckpt = path or self.last_good_ckpt

    def _check_finite(self, done: int) -> None:
        """Stop (before logging or saving) after an update that made the weights non-finite,
        or after ``train.max_nonfinite_steps`` skipped steps in a row."""
        tcfg = self.cfg.train
        overflow = self.step.first_nonfinite_update()
        if overflow is not None:
            lr = lr_at(overflow - 1, tcfg, self.info.world_size)  # the LR that update used
            raise TrainingDiverged(overflow_message(overflow, lr, self.last_good_ckpt))
        streak = self.step.longest_bad_streak()
        if tcfg.max_nonfinite_steps and streak >= tcfg.max_nonfinite_steps:
            raise TrainingDiverged(streak_message(done, streak, self.last_good_ckpt, tcfg.max_nonfinite_steps))

    def _pictures_due(self, done: int) -> bool:
        every = self.cfg.train.recon_every
        return (self.info.is_main and not self.step.fsdp and bool(every) and self.vis_batch is not None
                and (done % every == 0 or done == self.end_step))

    def _log(self, done: int, bar) -> None:
        now = time.perf_counter()
        steps = max(self._steps_last, 1)
        # step_time: wall time per step; data_time: the part of it spent waiting for the batch
        # (open_clip's and timm's names): data_time near step_time means the loader is the bottleneck.
        row = {"step": done, **self.step.metrics(), "samples_per_s": self._n_last / max(now - self._t_last, 1e-9),
               "step_time": (now - self._t_last) / steps, "data_time": self._data_s / steps}
        data = _data_counts(self.loader, self.info)  # a collective: every rank logs here
        row.update(data.metrics())
        self._t_last, self._n_last, self._data_s, self._steps_last = now, 0, 0.0, 0
        self.history.append(row)
        self._on_main(self.logger.log, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", img=f"{row['image_loss']:.3f}", txt=f"{row['text_loss']:.3f}",
                        acc=f"{row['text_accuracy']:.2f}", sps=f"{row['samples_per_s']:.0f}",
                        data=f"{row['data_time']:.3f}s/{row['step_time']:.3f}s",
                        **({"skipped": data.postfix()} if data.postfix() else {}))

    def _save(self, done: int) -> Path | None:
        """Every rank calls this (FSDP gathers collectively); rank 0 writes. During a streak of
        non-finite steps the last good checkpoint is kept out of rotation."""
        info, cfg = self.info, self.cfg
        weights = self.step.full_weights()
        step_state = self.step.state_dict()
        # Every rank's data position: shard streams are at different places on different ranks.
        data_states = gather_objects(self.stream.state(), info)
        streak, last_good = self.step.bad_streak(), self.last_good_ckpt
        path, problem = None, None
        if info.is_main:
            state = {"step": done, **step_state, **_rng_state(info.device), "data": data_states[0],
                     "data_per_rank": data_states, "world_size": info.world_size, "config": cfg.to_dict(),
                     "nonfinite_streak": streak, "last_good": last_good.name if last_good is not None else None}
            try:
                path = save_checkpoint(self.run_dir, done, weights, state, self.text_tokenizer.tokenizer,
                                       keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every,
                                       protect=last_good if streak else None, extra=self._recorded())
            except CheckpointWriteError as e:
                problem = str(e)
        # Nobody runs ahead (or exits) while rank 0 is still writing, and all stop if it failed.
        problem = broadcast_object(problem, info)
        if problem:
            raise CheckpointWriteError(problem)
        self.saved_at = done
        return path

    def _recorded(self) -> dict:
        """What a model folder records beside the model config: the image head's target."""
        return {"norm_pix_loss": self.cfg.train.norm_pix_loss}

    def finish(self) -> PretrainResult:
        done_any = self.end_step > self.start_step
        problem = None
        if done_any:
            weights = self.step.full_weights()
            if self.info.is_main:
                from ..pretrained import save_pretrained

                try:
                    save_pretrained(weights, self.run_dir / "final", self.text_tokenizer.tokenizer,
                                    extra=self._recorded())
                except OSError as e:
                    problem = (f"could not write the final model to {self.run_dir / 'final'}: {e.strerror or e}"
                               f"{f' at {e.filename}' if e.filename else ''}; the checkpoints are intact "
                               f"(--resume latest writes it again)")
                if problem is None and self.logger.path.exists():
                    plot_loss_curve(self.logger.path, self.run_dir / "loss_curve.png")
        summary = _data_counts(self.loader, self.info).summary()  # for the run's final line
        problem = broadcast_object(problem, self.info)
        if problem:
            raise CheckpointWriteError(problem)
        last = self.history[-1] if done_any and self.history else {}
        return PretrainResult(self.run_dir, self.end_step, last.get("loss", float("nan")), self.history,
                              int(self.step.skipped), summary, self.start_step)


def _check_sizes(cfg: Config, text_tokenizer, info: DistInfo) -> None:
    vocab_size = text_tokenizer.vocab_size
    if vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size={vocab_size} or more")
    if info.is_main and _vocab_note(cfg, text_tokenizer):
        tqdm.write(_vocab_note(cfg, text_tokenizer))
    if cfg.data.text_len > cfg.model.max_text_len:
        raise ValueError(f"data.text_len={cfg.data.text_len} exceeds model.max_text_len={cfg.model.max_text_len}")


def _write_run_files(cfg: Config, run_dir: Path, world: int) -> None:
    from .._version import __version__
    from ..io import write_json_atomic

    tcfg = cfg.train
    cfg.save(run_dir / "config.yaml")
    write_json_atomic(run_dir / "version.json", {
        "m3ae": __version__, "torch": torch.__version__, "git": _git_commit(), "world_size": world,
        "global_batch": tcfg.global_batch(world), "peak_lr": tcfg.lr_for(world),
        "strategy": tcfg.strategy if world > 1 else "single"})


def _load_weights(model: M3AE, ckpt: Path) -> dict:
    """Load a checkpoint's weights into ``model``; return its trainer state."""
    from ..pretrained import load_weights

    load_weights(model, ckpt)  # what from_pretrained does, into the model built from this run's config
    return load_trainer_state(ckpt)


def _data_counts(loader, info: DistInfo):
    """The skip counter of every rank (each already sums its loader workers) added up."""
    from ..data import SkipCounter

    return SkipCounter.merged(gather_objects(loader.skips.state_dict(), info), loader.skips.source)


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


__all__ = ["pretrain", "PretrainResult", "TrainingDiverged", "TrainingInterrupted"]
