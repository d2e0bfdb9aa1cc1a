"""One optimiser step of ``m3ae pretrain``: the unit the trainer, the benchmark and the tests drive.

:class:`TrainStep` takes ``train.accum_steps`` micro-batches as the loader yields them (host
tensors) and

1. plans them on the host: the caption padding to cut and what the losses will count
   (:func:`m3ae.losses.loss_sample_counts`), summed over processes into the denominators;
2. per micro-batch: moves it to the device, draws its masking noise, runs model + loss
   under autocast and backward (DDP/FSDP average the gradients on the last one);
3. measures (and with ``train.grad_clip`` clips) the global gradient norm;
4. applies AdamW unless the step is non-finite, and advances the LR schedule.

Nothing here reads a device value on the host (a GPU never waits for Python): a non-finite
step is skipped on the device, as AMP's GradScaler does it (fused AdamW skips its whole
update where ``found_inf`` is 1), the skip counters stay on the device, and the losses are
read only when the trainer asks for them (:meth:`TrainStep.metrics`, every ``log_every``).

Why a run gives the same numbers for any number of processes (same global batch):

- data: every process draws the same epoch order and takes a strided share of it
  (:class:`m3ae.data.EpochSampler`), so the processes' batches of one step together are
  the single-process batch; augmentation is a function of a per-sample seed;
- masking: the noise of micro-step ``m`` is drawn for the whole global batch from a generator
  seeded by ``(seed, m)`` and each process takes the rows of its own samples, so every
  sample gets the same mask whichever process holds it (and resuming needs no generator
  state);
- loss: it averages over the samples that carry a loss. Each process divides its sum by
  (that count over the global batch) / (processes x micro-batches), so the gradient
  average of DDP/FSDP equals the gradient of the global mean, also when processes hold
  different numbers of captions.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import model_inputs
from ..losses import LossCounts, LossOutput, M3AELoss, loss_sample_counts
from ..model import M3AE
from ..ops import hide_a_quarter_first, trim_text_padding
from .checkpoint import WeightsView
from .distributed import DistInfo, all_reduce_sum, wrap_model
from .nonfinite import nonfinite_parameters
from ..optim import build_optimizer, build_scheduler, config_hyperparameters


class LossModule(nn.Module):
    """Model + loss as one module, the unit DDP/FSDP wrap and ``torch.compile`` compiles.

    A batch without captions leaves the text-side parameters (text embedding, text head,
    text mask/type tokens) out of the graph, and DDP without ``find_unused_parameters``
    would then wait forever for their gradients. With ``anchor`` (several processes),
    adding 0 x one element of every parameter outside the transformer blocks keeps them all
    in the graph: their gradient is exactly 0 and every other gradient is unchanged. (Blocks
    are always used; under FSDP2 only the root's parameters are unsharded here, which are
    exactly these.) A single process does without it (its backward materialises a zero
    gradient the size of each such parameter, and adds it: ~40% of the parameters, the
    vocabulary tables); :class:`TrainStep` gives the parameters left out a zero gradient.
    """

    def __init__(self, model: M3AE, criterion: M3AELoss, anchor: bool = True):
        super().__init__()
        self.model, self.criterion, self.anchor = model, criterion, anchor

    def forward(self, image, text, text_padding_mask, image_valid, image_noise, text_noise,
                image_denom, text_denom, accuracy_denom, masked_tokens: int) -> LossOutput:
        out = self.model(image, text, text_padding_mask, image_valid, image_noise=image_noise,
                         text_noise=text_noise, text_logits=False)
        losses = self.criterion(out, image_denom, text_denom, accuracy_denom,
                                text_head=self.model.text_head, masked_tokens=masked_tokens)
        if not self.anchor:
            return losses
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


def keep_freed_memory() -> bool:
    """glibc: never return freed memory to the OS (no mmap for big blocks, no heap trimming).

    A CPU step frees and re-allocates the same big buffers every time (the text head's
    logits, the vocabulary-sized gradients); by default glibc unmaps or trims them and the
    next step page-faults them back in, zeroed by the kernel. Process-wide; False where the
    C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def precision_context(precision: str, device: torch.device):
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU (it relies on a gradient scaler); "
                         "use train.precision=bf16 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class BatchPlan(NamedTuple):
    """Host-side facts of one micro-batch, known before anything runs on the device."""

    rows: int
    text_len: int          # caption length as loaded (the masking noise is drawn for it)
    trimmed_len: int       # the longest real caption: the padding after it is cut
    counts: LossCounts


def plan_batch(batch: dict, num_patches: int, image_mask_ratio: float, text_mask_ratio: float) -> BatchPlan:
    """:class:`BatchPlan` of a loader batch (host tensors; nothing is read from a device)."""
    image, pad = batch.get("image"), batch.get("text_padding_mask")
    present = None if image is None else (batch["image_valid"] if batch.get("image_valid") is not None
                                          else image.shape[0])
    counts = loss_sample_counts(present, pad, num_patches, image_mask_ratio, text_mask_ratio)
    rows = next(t.shape[0] for t in (image, batch.get("text")) if t is not None)
    if pad is None:
        return BatchPlan(rows, 0, 0, counts)
    real_columns = np.flatnonzero((~pad.numpy()).any(0))
    trimmed = int(real_columns[-1]) + 1 if len(real_columns) else 1
    return BatchPlan(rows, pad.shape[1], trimmed, counts)


class TrainStep:
    """The training step of ``m3ae pretrain`` for ``model`` as ``cfg.train`` says.

    It owns the wrapped model (DDP/FSDP), the optimizer, the LR schedule and (fp16) the
    gradient scaler. ``step(index, micro_batches)`` runs one optimizer step; the results
    stay on the device until :meth:`metrics` reads them. Build it after loading weights (FSDP
    shards what is there), then :meth:`load_state_dict` to resume.
    """

    def __init__(self, model: M3AE, cfg: Config, info: DistInfo | None = None):
        self.model, self.cfg = model, cfg
        self.info = info or DistInfo(device=next(model.parameters()).device)
        tcfg, world, device = cfg.train, self.info.world_size, self.info.device
        self.fsdp = world > 1 and tcfg.strategy == "fsdp"
        self._autocast = precision_context(tcfg.precision, device)  # refuses fp16 without a GPU
        model.set_grad_checkpointing(tcfg.grad_checkpointing)
        if device.type == "cpu" and tcfg.keep_freed_memory:
            keep_freed_memory()
        criterion = M3AELoss(tcfg.image_loss_weight, tcfg.text_loss_weight, tcfg.norm_pix_loss,
                             tcfg.text_loss_norm, tcfg.fused_text_loss)
        self.module = wrap_model(LossModule(model, criterion, anchor=self.info.distributed), tcfg.strategy, self.info)
        self.optimizer = build_optimizer(model, tcfg, world)  # after fully_shard: DTensor parameters
        self.scheduler = build_scheduler(self.optimizer, tcfg, world)
        self.scaler = torch.amp.GradScaler("cuda") if tcfg.precision == "fp16" else None
        self._forward = torch.compile(self.module) if tcfg.compile else self.module
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        # fused AdamW takes a found_inf flag; the foreach one (FSDP's DTensors) does not.
        self._skip_on_device = all(g.get("fused") for g in self.optimizer.param_groups)
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.skipped, self._streak, self._worst = zero.clone(), zero.clone(), zero.clone()
        self._overflow_step = zero - 1  # the first update that made the weights non-finite
        self._logged = torch.zeros(5, device=device)  # non-finite, total, image, text, accuracy
        self._grad_norm = torch.zeros((), device=device)
        self.module.train()

    # ---------------------------------------------------------------- the step
    def __call__(self, step: int, micro: list[dict]) -> None:
        mcfg, accum = self.cfg.model, len(micro)
        plans = [plan_batch(b, mcfg.num_patches, mcfg.image_mask_ratio, mcfg.text_mask_ratio) for b in micro]
        denoms = self._denominators(plans)
        self.optimizer.zero_grad(set_to_none=True)
        logged = torch.zeros(5, device=self.info.device)
        for k, (batch, plan) in enumerate(zip(micro, plans)):
            losses = self._micro_step(step * accum + k, batch, plan, denoms, last=k == accum - 1)
            vals = torch.stack([losses.total, losses.image_loss, losses.text_loss,
                                losses.text_accuracy]).detach().float()
            logged[0] += (~torch.isfinite(vals[0])).float()
            logged[1:] += vals / accum
        if not self.info.distributed:  # what LossModule's anchor does with several processes
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._update(step, all_reduce_sum(logged, self.info))

    def _denominators(self, plans: list[BatchPlan]):
        """(image, text, accuracy) denominators: global counts / (processes x micro-batches)."""
        world, accum = self.info.world_size, len(plans)
        counts = [sum(p.counts.images for p in plans), sum(p.counts.texts for p in plans),
                  sum(p.rows for p in plans)]
        if world > 1:  # summed on the device: no host read, and the same value on every rank
            total = torch.tensor(counts, dtype=torch.float64).to(self.info.device, non_blocking=True)
            image, accuracy, rows = (all_reduce_sum(total, self.info).clamp_min(1) / (world * accum)).float()
        else:
            image, accuracy, rows = (max(c, 1.0) / accum for c in counts)
        return image, (rows if self.cfg.train.text_loss_norm == "batch" else accuracy), accuracy

    def _micro_step(self, micro_step: int, batch: dict, plan: BatchPlan, denoms, last: bool) -> LossOutput:
        info, mcfg, seed = self.info, self.cfg.model, self.cfg.train.seed
        batch = dict(batch)
        # Padding after the longest caption changes no number; cutting it saves work.
        batch["text"], batch["text_padding_mask"] = trim_text_padding(
            batch.get("text"), batch.get("text_padding_mask"), plan.trimmed_len)
        x = model_inputs(batch, info.device)
        img_noise = (masking_noise(seed, micro_step, 0, plan.rows, mcfg.num_patches, info, info.device,
                                   self.cfg.train.quarter_mask_fraction) if x["image"] is not None else None)
        # Noise for the untrimmed length, then sliced: a token's noise does not depend on how
        # long the other captions of its batch (or of another rank's batch) are.
        txt_noise = (masking_noise(seed, micro_step, 1, plan.rows, plan.text_len, info, info.device)
                     [:, :plan.trimmed_len] if x["text"] is not None else None)
        with self._gradient_sync(last):
            with self._autocast:
                losses = self._forward(x["image"], x["text"], x["text_padding_mask"], x["image_valid"],
                                       img_noise, txt_noise, *denoms, plan.counts.text_tokens)
            loss = losses.total / self.cfg.train.accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return losses

    def _gradient_sync(self, last: bool):
        """DDP/FSDP all-reduce the gradients on the last micro-batch only."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(last)
        elif self.info.world_size > 1 and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _update(self, step: int, logged: torch.Tensor) -> None:
        """Clip, apply AdamW unless non-finite (decided on the device), advance the schedule."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        clip = self.cfg.train.grad_clip
        norm = (torch.nn.utils.clip_grad_norm_(self._params, clip) if clip > 0
                else torch.nn.utils.get_total_norm(grads))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        loss_bad = logged[0] > 0
        bad = loss_bad | ~torch.isfinite(norm)  # the same on every rank: both are global
        if self._skip_on_device:
            self.optimizer.found_inf = bad.float()  # GradScaler's protocol with fused optimizers
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bool(bad):  # foreach AdamW has no found_inf: one host read per step
            self.optimizer.step()
        # An applied update can itself overflow the weights (an LR far too high): remembered
        # on the device; the trainer stops at its next host read (:meth:`first_nonfinite_update`).
        overflow = ~bad & (nonfinite_parameters(self._params, self.info)[0] > 0) & (self._overflow_step < 0)
        self._overflow_step = torch.where(overflow, step + 1, self._overflow_step)
        if self.scaler is not None:
            self.scaler.update()
        with warnings.catch_warnings():
            # The schedule follows steps, skipped or not; torch warns when the very first
            # optimizer step was skipped, which is intended here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.skipped += bad
        # fp16 overflow with a finite loss is the scaler's business (it lowers its scale).
        counted = loss_bad if self.scaler is not None else bad
        self._streak = torch.where(bad, self._streak + counted, 0)
        self._worst = torch.maximum(self._worst, self._streak)
        self._logged, self._grad_norm = logged, norm

    # ---------------------------------------------------------------- host reads
    def metrics(self) -> dict:
        """The last step's losses (mean over processes), gradient norm and skip count."""
        vals = (self._logged[1:] / self.info.world_size).tolist()
        return {"lr": self.scheduler.get_last_lr()[0], "loss": vals[0], "image_loss": vals[1],
                "text_loss": vals[2], "text_accuracy": vals[3], "grad_norm": float(self._grad_norm),
                "skipped_steps": int(self.skipped)}

    def longest_bad_streak(self) -> int:
        """Most non-finite steps in a row since the last call (then forgotten)."""
        worst = int(self._worst)
        self._worst = self._streak.clone()
        return worst

    def in_bad_streak(self) -> bool:
        return self.bad_streak() > 0

    def bad_streak(self) -> int:
        """Non-finite steps in a row up to now (0 after an applied step)."""
        return int(self._streak)

    def first_nonfinite_update(self) -> int | None:
        """The step (1-based) whose applied update made the weights non-finite, if any."""
        step = int(self._overflow_step)
        return step if step >= 0 else None

    # ---------------------------------------------------------------- state
    def full_weights(self):
        """The whole model's weights on CPU (a collective under FSDP: every rank calls it)."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return WeightsView(self.model.config, {k.removeprefix("model."): v for k, v in sd.items()})

    def state_dict(self) -> dict:
        """Optimizer, schedule, scaler and skip count (a collective under FSDP; the optimizer
        state is gathered on rank 0 only otherwise)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.module, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict() if self.info.is_main else None
        return {"optimizer": optim, "optimizer_format": "fqn" if self.fsdp else "torch",
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "skipped_steps": int(self.skipped)}

    def load_state_dict(self, st: dict, source: str = "the checkpoint") -> None:
        saved = st.get("optimizer_format", "torch")
        if saved != ("fqn" if self.fsdp else "torch"):
            raise ValueError(f"{source} was written with strategy {'fsdp' if saved == 'fqn' else 'ddp/single'}; "
                             f"resume it with the same train.strategy (and more than one process for fsdp)")
        with config_hyperparameters(self.optimizer):  # the config's LR, decay, betas win
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.module, self.optimizer, st["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(st["optimizer"])
        # The config's schedule at the checkpoint's step (a loaded scheduler state would bring
        # back the old peak LR; with an unchanged config both are the same, bit for bit).
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, self.info.world_size, start_step=st["step"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.skipped.fill_(st.get("skipped_steps", 0))


__all__ = ["TrainStep", "LossModule", "BatchPlan", "plan_batch", "masking_noise", "precision_context",
           "keep_freed_memory"]
