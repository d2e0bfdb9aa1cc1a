"""``m3ae pretrain``: the pre-training loop.

One step: a batch -> masked forward -> loss -> backward -> clip -> AdamW -> LR schedule.
Around it: JSON-lines metrics, a tqdm bar, reconstruction pictures, checkpoints and resume.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data import build_pretrain_loader, build_text_encoder, model_inputs
from ..losses import M3AELoss
from ..model import M3AE
from ..visualize import plot_loss_curve, save_reconstruction_grid
from .checkpoint import load_trainer_state, resolve_resume, save_checkpoint
from .optim import build_optimizer, build_scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0


class _BatchStream:
    """Endless batches from a loader; for a map-style source, tracks (epoch, position)."""

    def __init__(self, loader, batch_size: int):
        self.loader, self.batch_size = loader, batch_size
        self.sampler = getattr(loader, "sampler", None)
        self.resumable = hasattr(self.sampler, "set_position")
        self.epoch, self.position = 0, 0
        self._it = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                if self.resumable:
                    self.sampler.set_position(self.epoch, self.position)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.position += self.batch_size
                return batch
            except StopIteration:
                self._it = None
                if self.position == 0:
                    raise RuntimeError("the data source produced no batch; is it empty or smaller than "
                                       "one batch?") from None
                self.epoch, self.position = self.epoch + 1, 0


def pretrain(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
             max_steps: int | None = None) -> PretrainResult:
    """Pre-train an M3AE as ``cfg`` says, writing everything into ``run_dir``.

    ``resume`` is ``"latest"`` or a checkpoint folder. ``max_steps`` stops early (the LR
    schedule still follows ``cfg.train.steps``), which the tests use to interrupt a run.
    """
    from .. import __version__

    tcfg, run_dir = cfg.train, Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tcfg.device)
    torch.manual_seed(tcfg.seed)

    text_encoder = build_text_encoder(cfg.data)
    if text_encoder.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {text_encoder.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size={text_encoder.vocab_size} or more")
    if cfg.data.text_len > cfg.model.max_text_len:
        raise ValueError(f"data.text_len={cfg.data.text_len} exceeds model.max_text_len={cfg.model.max_text_len}")
    cfg.save(run_dir / "config.yaml")
    (run_dir / "version.json").write_text(json.dumps({"m3ae": __version__, "torch": torch.__version__,
                                                      "git": _git_commit()}, indent=2))

    model = M3AE(cfg.model).to(device)
    criterion = M3AELoss(tcfg.image_loss_weight, tcfg.text_loss_weight, tcfg.norm_pix_loss)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    loader = build_pretrain_loader(cfg.data, cfg.model.image_size, text_encoder, tcfg.batch_size,
                                   seed=tcfg.seed)
    stream = _BatchStream(loader, tcfg.batch_size)
    mask_gen = torch.Generator(device=device).manual_seed(tcfg.seed + 1)

    start_step, skipped = 0, 0
    if resume:
        ckpt = resolve_resume(resume, run_dir)
        if ckpt is not None:
            from ..pretrained import WEIGHTS_NAME, load_state_dict_checked
            from safetensors.torch import load_file

            load_state_dict_checked(model, load_file(str(ckpt / WEIGHTS_NAME), device=str(device)))
            st = load_trainer_state(ckpt)
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            start_step, skipped = st["step"], st.get("skipped_steps", 0)
            torch.set_rng_state(st["torch_rng"])
            mask_gen.set_state(st["mask_rng"])
            stream.load_state(st["data"])
            if progress:
                tqdm.write(f"resumed from {ckpt} at step {start_step}")

    metrics_path = run_dir / "metrics.jsonl"
    if start_step == 0 and metrics_path.exists():
        metrics_path.unlink()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    vis_batch = None
    history: list[dict] = []
    end_step = tcfg.steps if max_steps is None else min(tcfg.steps, max_steps)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=end_step, disable=not progress,
               desc="pretrain", dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), 0
    model.train()
    last = {}
    for step in bar:
        batch = next(stream)
        if vis_batch is None and batch.get("image") is not None:
            vis_batch = batch
        inputs = model_inputs(batch, device)
        with autocast:
            out = model(**inputs, generator=mask_gen, text_logits="masked")
            losses = criterion(out)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                     if tcfg.grad_clip > 0 else torch.zeros(()))
        if not (torch.isfinite(losses.total) and torch.isfinite(grad_norm)):
            skipped += 1  # a non-finite step is skipped, never applied
        else:
            optimizer.step()
        scheduler.step()
        n_last += tcfg.batch_size

        done = step + 1
        if done % tcfg.log_every == 0 or done == end_step:
            now = time.perf_counter()
            last = {"step": done, "lr": scheduler.get_last_lr()[0], "loss": losses.total.item(),
                    "image_loss": losses.image_loss.item(), "text_loss": losses.text_loss.item(),
                    "text_accuracy": losses.text_accuracy.item(), "grad_norm": float(grad_norm),
                    "samples_per_s": n_last / max(now - t_last, 1e-9), "skipped_steps": skipped}
            t_last, n_last = now, 0
            history.append(last)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", img=f"{last['image_loss']:.3f}",
                            txt=f"{last['text_loss']:.3f}", acc=f"{last['text_accuracy']:.2f}",
                            sps=f"{last['samples_per_s']:.0f}")
        if tcfg.recon_every and vis_batch is not None and (done % tcfg.recon_every == 0 or done == end_step):
            g = torch.Generator(device=device).manual_seed(1234)
            save_reconstruction_grid(model, vis_batch, run_dir / "reconstructions" / f"step_{done:08d}.png",
                                     text_encoder, generator=g, norm_pix_loss=tcfg.norm_pix_loss)
        if (tcfg.ckpt_every and done % tcfg.ckpt_every == 0) or done == end_step:
            state = {"step": done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state(), "mask_rng": mask_gen.get_state(),
                     "data": stream.state(), "skipped_steps": skipped, "config": cfg.to_dict()}
            save_checkpoint(run_dir, done, model, state, text_encoder.tokenizer, keep_last=tcfg.keep_last)

    if done_any := (end_step > start_step):
        model.save_pretrained(run_dir / "final", text_encoder.tokenizer)
        if metrics_path.exists():
            plot_loss_curve(metrics_path, run_dir / "loss_curve.png")
    final = last.get("loss", float("nan")) if done_any else float("nan")
    return PretrainResult(run_dir, end_step, final, history, skipped)


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


__all__ = ["pretrain", "PretrainResult", "resolve_device"]
