"""Training checkpoints: atomic step folders, keep-last-K, ``--resume latest``.

``RUN/checkpoints/step_00001000/`` holds ``config.json`` + ``model.safetensors`` (a
pretrained folder, loadable alone) and ``trainer_state.pt`` (optimizer, scheduler, step,
random generators, data position). A folder is written under a temporary name and renamed
when complete, so a crash never leaves a half-written checkpoint that looks finished.
"""
from __future__ import annotations

import math
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


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def save_checkpoint(run_dir: Path, step: int, model, state: dict, tokenizer=None,
                    keep_last: int = 3) -> Path:
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
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
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


def is_finite_number(x: float) -> bool:
    return math.isfinite(x)
