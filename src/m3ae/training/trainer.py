"""``m3ae pretrain``: the pre-training loop, from one CPU process to many GPUs on many nodes.

One optimizer step: ``accum_steps`` micro-batches -> masked forward -> loss -> backward
(gradients averaged across processes by DDP or FSDP2) -> clip -> AdamW -> LR schedule.
Around it: JSON-lines metrics (TensorBoard / W&B optional), a tqdm bar, reconstruction
pictures, atomic checkpoints and exact resume. Only rank 0 writes files.

Why a run gives the same numbers for any number of processes (same global batch):

- data: every process draws the same epoch order and takes a strided share of it
  (:class:`m3ae.data.EpochSampler`), so the processes' batches of one step together are
  the single-process batch; augmentation is a function of a per-sample seed;
- masking: the noise of step ``s`` is drawn for the whole global batch from a generator
  seeded by ``(seed, s)`` and each process takes the rows of its own samples, so every
  sample gets the same mask whichever process holds it (and resuming needs no generator
  state);
- loss: it averages over the samples that carry a loss. Each process divides its sum by
  (that count over the global batch) / (processes x micro-batches), so the gradient
  average of DDP/FSDP equals the gradient of the global mean, also when processes hold
  different numbers of captions.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config
from ..data import build_dataset, build_pretrain_loader, build_text_encoder, model_inputs
from ..losses import LossOutput, M3AELoss, loss_sample_counts
from ..model import M3AE
from ..ops import hide_a_quarter_first, trim_text_padding
from ..tokenizer import SPECIAL_TOKENS
from ..visualize import plot_loss_curve, save_reconstruction_grid
from .checkpoint import (WeightsView, clear_run, config_changes, last_good_after_resume, load_trainer_state,
                         refuse_existing_run, resolve_resume, save_checkpoint)
from .distributed import (DistInfo, all_reduce_sum, barrier, broadcast_object, gather_objects,
                          init_distributed, resolve_device, shutdown_distributed, wrap_model)
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .loggers import MetricsLogger
from .nonfinite import overflow_message, parameters_finite, streak_message
from .optim import build_optimizer, build_scheduler, config_hyperparameters


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where and what to try."""


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    data_summary: str = ""  # samples read and skipped per reason, over all ranks and workers


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


class _TrainStep(nn.Module):
    """Model + loss as one module, the unit DDP/FSDP wrap and ``torch.compile`` compiles.

    A batch without captions leaves the text-side parameters (text embedding, text head,
    text mask/type tokens) out of the graph, and DDP without ``find_unused_parameters``
    would then wait forever for their gradients. Adding 0 x one element of every parameter
    outside the transformer blocks keeps them all in the graph: their gradient is exactly 0
    and every other gradient is unchanged. (Blocks are always used; under FSDP2 only the
    root's parameters are unsharded here, which are exactly these.)
    """

    def __init__(self, model: M3AE, criterion: M3AELoss):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, image, text, text_padding_mask, image_valid, image_noise, text_noise,
                image_denom, text_denom, accuracy_denom) -> LossOutput:
        out = self.model(image, text, text_padding_mask, image_valid, image_noise=image_noise,
                         text_noise=text_noise, text_logits="fused")
        losses = self.criterion(out, image_denom, text_denom, accuracy_denom)
        anchor = sum(p.reshape(-1)[:1].sum() for n, p in self.model.named_parameters()
                     if not n.startswith(("encoder.blocks.", "decoder.blocks.")))
        return losses._replace(total=losses.total + 0.0 * anchor)


def masking_noise(seed: int, micro_step: int, stream: int, rows: int, length: int, info: DistInfo,
                  device: torch.device, quarter_fraction: float = 0.0) -> torch.Tensor:
    """This process's rows of the global batch's masking noise (see the module docstring).

    Rank ``r`` holds global rows ``r, r + W, r + 2W, ...`` (the sampler's striding).
    ``quarter_fraction`` > 0 (image noise): that fraction of the global batch hides a whole
    quarter of the image first (:func:`m3ae.ops.hide_a_quarter_first`)."""
    g = torch.Generator(device=device).manual_seed(
        (seed * 1_000_003 + micro_step * 2 + stream) % (2**63 - 1))
    full = torch.rand(rows * info.world_size, length, generator=g, device=device)
    if quarter_fraction > 0:
        full = hide_a_quarter_first(full, round(quarter_fraction * full.shape[0]))
    return full[info.rank::info.world_size]


def _precision_context(precision: str, device: torch.device):
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU (it relies on a gradient scaler); "
                         "use train.precision=bf16 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())


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
    everywhere); when resuming, always the one saved with the checkpoint: the model's token
    ids mean what they meant when the run started (a ``from-data`` tokenizer trained again
    would number its tokens differently)."""
    from tokenizers import Tokenizer

    from ..pretrained import TOKENIZER_NAME
    from ..tokenizer import TextEncoder

    text = None
    if info.is_main:
        if ckpt is not None and (ckpt / TOKENIZER_NAME).is_file():
            text = (ckpt / TOKENIZER_NAME).read_text()
        else:
            text = build_text_encoder(cfg.data).tokenizer.to_str()
    text = broadcast_object(text, info)
    return TextEncoder(Tokenizer.from_str(text), cfg.data.text_len)


def _resume_target(resume: str | None, run_dir: Path, info: DistInfo) -> Path | None:
    if not resume:
        return None
    ckpt = resolve_resume(resume, run_dir) if info.is_main else None
    found = broadcast_object(None if ckpt is None else str(ckpt), info)
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


def _vocab_note(cfg: Config, text_encoder) -> str | None:
    """A note when the model has more token ids than the tokenizer (they are never used)."""
    n, v = text_encoder.vocab_size, cfg.model.vocab_size
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
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, Path(run_dir), resume, progress, max_steps, info, overwrite)
    finally:
        if owns_group:
            shutdown_distributed()


def _pretrain(cfg: Config, run_dir: Path, resume: str | None, progress: bool, max_steps: int | None,
              info: DistInfo, overwrite: bool = False) -> PretrainResult:
    from .. import __version__

    tcfg, device, world = cfg.train, info.device, info.world_size
    main = info.is_main
    autocast = _precision_context(tcfg.precision, device)
    # Everything is checked before anything is written (a run that cannot start leaves no
    # folder behind), and the data first: a wrong path is the first thing to report.
    _check_run_folder(run_dir, resume, overwrite, info)
    ckpt = _resume_target(resume, run_dir, info)
    dataset = build_dataset(cfg.data, cfg.model.image_size, train=True, seed=tcfg.seed, rank=info.rank,
                            world_size=world, batch_size=tcfg.batch_size)
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank (FSDP2 relies on it)

    text_encoder = _shared_text_encoder(cfg, info, ckpt)
    if text_encoder.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {text_encoder.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size={text_encoder.vocab_size} or more")
    if main and _vocab_note(cfg, text_encoder):
        tqdm.write(_vocab_note(cfg, text_encoder))
    if cfg.data.text_len > cfg.model.max_text_len:
        raise ValueError(f"data.text_len={cfg.data.text_len} exceeds model.max_text_len={cfg.model.max_text_len}")

    model = M3AE(cfg.model).to(device)
    model.set_grad_checkpointing(tcfg.grad_checkpointing)
    criterion = M3AELoss(tcfg.image_loss_weight, tcfg.text_loss_weight, tcfg.norm_pix_loss, tcfg.text_loss_norm)
    fsdp = world > 1 and tcfg.strategy == "fsdp"
    st = None
    if ckpt is not None:
        from safetensors.torch import load_file

        from ..pretrained import WEIGHTS_NAME, load_state_dict_checked

        weights = load_file(str(ckpt / WEIGHTS_NAME), device="cpu")
        load_state_dict_checked(model, weights)  # before sharding: FSDP2 shards what is loaded
        st = load_trainer_state(ckpt)
        saved_fmt = st.get("optimizer_format", "torch")
        if saved_fmt != ("fqn" if fsdp else "torch"):
            raise ValueError(f"{ckpt} was written with strategy "
                             f"{'fsdp' if saved_fmt == 'fqn' else 'ddp/single'}; resume it with the same "
                             f"train.strategy (and more than one process for fsdp)")
    train_step = wrap_model(_TrainStep(model, criterion), tcfg.strategy, info)
    optimizer = build_optimizer(model, tcfg, world)  # after fully_shard: its parameters are DTensors
    scheduler = build_scheduler(optimizer, tcfg, world)
    scaler = torch.amp.GradScaler("cuda") if tcfg.precision == "fp16" else None
    step_fn = torch.compile(train_step) if tcfg.compile else train_step

    loader = build_pretrain_loader(cfg.data, cfg.model.image_size, text_encoder, tcfg.batch_size,
                                   seed=tcfg.seed, rank=info.rank, world_size=world, dataset=dataset)
    stream = _BatchStream(loader)
    if main:
        if overwrite:
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        (run_dir / "version.json").write_text(json.dumps({
            "m3ae": __version__, "torch": torch.__version__, "git": _git_commit(), "world_size": world,
            "global_batch": tcfg.global_batch(world), "peak_lr": tcfg.lr_for(world),
            "strategy": tcfg.strategy if world > 1 else "single"}, indent=2))
    barrier(info)

    start_step, skipped = 0, 0
    if st is not None:
        with config_hyperparameters(optimizer):  # [issue 13] the config's LR, decay, betas win
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(train_step, optimizer, st["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_step, skipped = st["step"], st.get("skipped_steps", 0)
        scheduler = build_scheduler(optimizer, tcfg, world, start_step=start_step)  # the config's schedule
        _set_rng_state(st, device)
        old_world = st.get("world_size", 1)
        per_rank = st.get("data_per_rank") or [st["data"]]
        data = dict(per_rank[info.rank] if old_world == world and len(per_rank) == world else per_rank[0])
        if old_world != world:
            if data.get("kind") != "map":
                raise ValueError(f"{ckpt} was written by {old_world} processes reading a shard stream; "
                                 f"resume it with {old_world} processes")
            # The strided shares of W processes after p samples each cover the first W x p of
            # the epoch order, so the position converts when it divides evenly.
            seen = data["position"] * old_world
            if seen % world:
                raise ValueError(f"{ckpt} was written by {old_world} processes at epoch position {seen}, "
                                 f"which {world} processes cannot split evenly; resume with {old_world}")
            data.update(position=seen // world, world_size=world, rank=info.rank)
        stream.load_state(data)
        if main:  # also without a progress bar: which checkpoint a run continued from matters
            tqdm.write(f"resumed from {ckpt} at step {start_step}")
            changed = config_changes(st.get("config", cfg.to_dict()), cfg.to_dict())
            if changed:
                tqdm.write(f"the config differs from the checkpoint's ({'; '.join(changed)}): the new values "
                           f"apply from step {start_step + 1}, LR schedule and optimizer settings included")

    logger = MetricsLogger(run_dir, cfg, enabled=main, resume_step=start_step)
    end_step = tcfg.steps if max_steps is None else min(tcfg.steps, max_steps)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=end_step,
               disable=not (progress and main), desc="pretrain", dynamic_ncols=True, unit="step")
    history: list[dict] = []
    last: dict = {}
    vis_batch = None
    A = tcfg.accum_steps
    mcfg = cfg.model
    last_ckpt = None if st is None else last_good_after_resume(ckpt, st)  # written before any streak
    bad_run = 0
    params = [p for p in train_step.parameters() if p.requires_grad]
    t_last, n_last = time.perf_counter(), 0
    train_step.train()
    saved_at = start_step
    interrupt = StopOnInterrupt().start()  # Ctrl-C: finish the step, save, then stop
    try:
        for step in bar:
            micro = [next(stream) for _ in range(A)]
            if vis_batch is None and micro[0].get("image") is not None:
                vis_batch = micro[0]
            counts = torch.zeros(3, dtype=torch.float64, device=device)  # image, text, rows
            for batch in micro:
                img = batch.get("image")
                present = None if img is None else (batch["image_valid"] if batch.get("image_valid")
                                                    is not None else img.shape[0])
                counts += torch.tensor(loss_sample_counts(present, batch.get("text_padding_mask"),
                                                          mcfg.num_patches, mcfg.image_mask_ratio,
                                                          mcfg.text_mask_ratio) + (len(batch["key"]),),
                                       dtype=torch.float64, device=device)
            counts = all_reduce_sum(counts, info).tolist()
            image_denom, accuracy_denom, rows_denom = (max(c, 1.0) / (world * A) for c in counts)
            text_denom = rows_denom if tcfg.text_loss_norm == "batch" else accuracy_denom

            optimizer.zero_grad(set_to_none=True)
            logged = torch.zeros(5, dtype=torch.float32, device=device)  # bad, total, img, txt, acc
            for k, batch in enumerate(micro):
                full_len = batch["text"].shape[1] if batch.get("text") is not None else 0
                # Cut caption padding on the host (no device sync): identical results, less work.
                batch = dict(batch)
                batch["text"], batch["text_padding_mask"] = trim_text_padding(batch.get("text"),
                                                                              batch.get("text_padding_mask"))
                inputs = model_inputs(batch, device)
                rows = next(t.shape[0] for t in inputs.values() if t is not None)
                m = step * A + k
                img_noise = (masking_noise(tcfg.seed, m, 0, rows, mcfg.num_patches, info, device,
                                           tcfg.quarter_mask_fraction)
                             if inputs["image"] is not None else None)
                # Noise for the untrimmed length, then sliced: a token's noise does not depend on
                # how long the other captions of its batch (or of another rank's batch) are.
                txt_noise = (masking_noise(tcfg.seed, m, 1, rows, full_len, info, device)[:, :inputs["text"].shape[1]]
                             if inputs["text"] is not None else None)
                sync = k == A - 1
                ctx = contextlib.nullcontext()
                if world > 1 and not fsdp and not sync:
                    ctx = train_step.no_sync()  # accumulate locally; all-reduce on the last one
                if fsdp:
                    train_step.set_requires_gradient_sync(sync)
                with ctx:
                    with autocast:
                        losses = step_fn(inputs["image"], inputs["text"], inputs["text_padding_mask"],
                                         inputs["image_valid"], img_noise, txt_noise, image_denom,
                                         text_denom, accuracy_denom)
                    loss = losses.total / A
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                vals = torch.stack([losses.total, losses.image_loss, losses.text_loss,
                                    losses.text_accuracy]).detach().float()
                logged[0] += (~torch.isfinite(vals[0])).float()
                logged[1:] += vals / A
            if scaler is not None:
                scaler.unscale_(optimizer)
            # clip with max_norm=inf multiplies by exactly 1: the norm is still measured.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip if tcfg.grad_clip > 0
                                                       else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            logged = all_reduce_sum(logged, info)
            loss_bad = bool(logged[0] > 0)
            grads_bad = not bool(torch.isfinite(grad_norm))
            if loss_bad or grads_bad:
                skipped += 1  # a non-finite step is skipped, never applied (the same on every rank)
                # fp16 overflow with a finite loss is the scaler's business: it lowers its scale.
                bad_run = bad_run + 1 if (loss_bad or scaler is None) else bad_run
                optimizer.zero_grad(set_to_none=True)
            else:
                bad_run = 0
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                if not parameters_finite(params, info):  # [issue 13] never log, save or train on them
                    raise TrainingDiverged(overflow_message(step + 1, scheduler.get_last_lr()[0], last_ckpt))
            if scaler is not None:
                scaler.update()
            with warnings.catch_warnings():
                # The schedule follows steps, skipped or not; torch warns when the very first
                # optimizer step was skipped, which is intended here.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            n_last += tcfg.global_batch(world)
            done = step + 1
            if tcfg.max_nonfinite_steps and bad_run >= tcfg.max_nonfinite_steps:
                raise TrainingDiverged(streak_message(done, bad_run, last_ckpt, tcfg.max_nonfinite_steps))

            if done % tcfg.log_every == 0 or done == end_step:
                now = time.perf_counter()
                vals = (logged[1:] / world).tolist()
                last = {"step": done, "lr": scheduler.get_last_lr()[0], "loss": vals[0],
                        "image_loss": vals[1], "text_loss": vals[2], "text_accuracy": vals[3],
                        "grad_norm": float(grad_norm), "samples_per_s": n_last / max(now - t_last, 1e-9),
                        "skipped_steps": skipped}
                data = _data_counts(loader, info)  # [issue 13] a collective: every rank logs here
                last.update(data.metrics())
                t_last, n_last = now, 0
                history.append(last)
                logger.log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", img=f"{last['image_loss']:.3f}",
                                txt=f"{last['text_loss']:.3f}", acc=f"{last['text_accuracy']:.2f}",
                                sps=f"{last['samples_per_s']:.0f}",
                                **({"skipped": data.postfix()} if data.postfix() else {}))
            if (main and not fsdp and tcfg.recon_every and vis_batch is not None
                    and (done % tcfg.recon_every == 0 or done == end_step)):
                g = torch.Generator(device=device).manual_seed(1234)
                save_reconstruction_grid(model, vis_batch, run_dir / "reconstructions" / f"step_{done:08d}.png",
                                         text_encoder, generator=g, norm_pix_loss=tcfg.norm_pix_loss)
            if (tcfg.ckpt_every and done % tcfg.ckpt_every == 0) or done == end_step:
                path = _save(run_dir, done, model, train_step, optimizer, scheduler, scaler, stream,
                             skipped, cfg, text_encoder, info, fsdp, bad_run, last_ckpt)
                saved_at = done
                if bad_run == 0:  # "good": written before a streak of non-finite steps began
                    last_ckpt = path or last_ckpt
            if interrupt.requested(info):
                if saved_at != done:
                    _save(run_dir, done, model, train_step, optimizer, scheduler, scaler, stream,
                          skipped, cfg, text_encoder, info, fsdp, bad_run, last_ckpt)
                raise TrainingInterrupted(done, run_dir / "checkpoints" / f"step_{done:08d}", run_dir)
    finally:
        interrupt.stop()
        bar.close()
        logger.close()

    if done_any := (end_step > start_step):
        weights = _full_weights(model, train_step, fsdp)
        if main:
            from ..pretrained import save_pretrained

            save_pretrained(weights, run_dir / "final", text_encoder.tokenizer)
            if logger.path.exists():
                plot_loss_curve(logger.path, run_dir / "loss_curve.png")
    summary = _data_counts(loader, info).summary()  # [issue 13] for the run's final line
    barrier(info)
    final = last.get("loss", float("nan")) if done_any else float("nan")
    return PretrainResult(run_dir, end_step, final, history, skipped, summary)


def _full_weights(model: M3AE, train_step: nn.Module, fsdp: bool):
    """The whole model's weights on CPU (a collective under FSDP: every rank must call it)."""
    if not fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(train_step, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return WeightsView(model.config, {k.removeprefix("model."): v for k, v in sd.items()})


def _save(run_dir, done, model, train_step, optimizer, scheduler, scaler, stream, skipped, cfg,
          text_encoder, info: DistInfo, fsdp: bool, bad_run: int = 0, last_good: Path | None = None):
    """Every rank calls this (FSDP gathers collectively); rank 0 writes. During a streak of
    non-finite steps (``bad_run`` > 0) the last good checkpoint is kept out of rotation."""
    weights = _full_weights(model, train_step, fsdp)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(train_step, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim_state = optimizer.state_dict() if info.is_main else None
    # Every rank's data position: shard streams are at different places on different ranks.
    data_states = [None] * info.world_size
    if info.world_size > 1:
        torch.distributed.all_gather_object(data_states, stream.state())
    else:
        data_states = [stream.state()]
    path = None
    if info.is_main:
        state = {"step": done, "optimizer": optim_state, "optimizer_format": "fqn" if fsdp else "torch",
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                 **_rng_state(info.device), "data": data_states[0], "data_per_rank": data_states,
                 "world_size": info.world_size,
                 "skipped_steps": skipped, "config": cfg.to_dict(), "nonfinite_streak": bad_run,
                 "last_good": last_good.name if last_good is not None else None}
        protect = last_good if bad_run else None
        path = save_checkpoint(run_dir, done, weights, state, text_encoder.tokenizer,
                               keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every, protect=protect)
    barrier(info)  # nobody runs ahead (or exits) while rank 0 is still writing
    return path


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


__all__ = ["pretrain", "PretrainResult", "resolve_device", "TrainingDiverged", "TrainingInterrupted", "masking_noise"]
