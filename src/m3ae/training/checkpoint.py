"""Training checkpoints: atomic step folders, keep-last-K, ``--resume latest``.

``RUN/checkpoints/step_00001000/`` holds ``config.json`` + ``model.safetensors`` (a
pretrained folder, loadable alone) and ``trainer_state.pt`` (optimizer, scheduler, step,
random generators, data position). A folder is written under a temporary name and renamed
when complete, so a crash never leaves a half-written checkpoint that looks finished.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..pretrained import WEIGHTS_NAME, save_pretrained

STATE_NAME = "trainer_state.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file()
            and (p / WEIGHTS_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def weights_are_finite(model_or_state) -> bool:
    """True when every floating tensor of a module (or a state dict) is finite."""
    tensors = (model_or_state.values() if isinstance(model_or_state, dict)
               else model_or_state.state_dict().values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class WeightsView:
    """A model's config and an already-gathered state dict, saved like the model itself
    (FSDP gathers the full weights on rank 0; there is no unsharded module to hand over)."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


def _fsync_tree(folder: Path) -> None:
    # The rename below is only atomic for data already on disk; flush every file first.
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform/file system; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def kept_steps(steps: list[int], keep_last: int, keep_every: int = 0) -> set[int]:
    """Steps that survive pruning: the newest ``keep_last`` and multiples of ``keep_every``."""
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def save_checkpoint(run_dir: Path, step: int, model, state: dict, tokenizer=None,
                    keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write ``RUN/checkpoints/step_N`` atomically, then prune older ones.

    ``model`` is a module or a :class:`WeightsView`. A checkpoint with non-finite weights is
    refused (``FloatingPointError``): resuming from it could never recover.
    """
    if not weights_are_finite(model):
        raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights at step {step}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer)
    with open(tmp / STATE_NAME, "wb") as f:
        torch.save(state, f)
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (e.g. a resumed run that stops there)
        old = root / f".old_step_{step:08d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    found = list_checkpoints(run_dir)
    keep = kept_steps([int(p.name.split("_")[1]) for p in found], keep_last, keep_every)
    for p in found:
        if int(p.name.split("_")[1]) not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """'latest' -> newest complete checkpoint of the run (None if there is none); else a path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume {resume}: no {STATE_NAME} in that folder")
    return path


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=False)

