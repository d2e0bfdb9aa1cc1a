"""Training checkpoints: atomic step folders, keep-last-K, ``--resume latest``.

``RUN/checkpoints/step_00001000/`` holds ``config.json`` + ``model.safetensors`` (a
pretrained folder, loadable alone) and ``trainer_state.pt`` (optimizer, scheduler, step,
random generators, data position). A folder is written under a temporary name and renamed
when complete, so a crash never leaves a half-written checkpoint that looks finished.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..io import atomic_write
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
    return sorted(done, key=checkpoint_step)


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


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("_")[1])


def kept_steps(steps: list[int], keep_last: int, keep_every: int = 0, protect: int | None = None) -> set[int]:
    """Steps that survive pruning: the newest ``keep_last``, multiples of ``keep_every``, and
    ``protect`` (the last good checkpoint, see :func:`save_checkpoint`)."""
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    if protect is not None:
        keep.add(protect)
    return keep


def last_good_after_resume(ckpt: Path, state: dict) -> Path | None:
    """The last good checkpoint of a run resumed from ``ckpt``: ``ckpt`` itself, unless it was
    written during a streak of non-finite steps; then the good one it recorded (if it exists)."""
    if not state.get("nonfinite_streak"):
        return ckpt
    good = state.get("last_good")
    path = Path(ckpt).parent / good if good else None
    return path if path is not None and (path / STATE_NAME).is_file() else None


def save_checkpoint(run_dir: Path, step: int, model, state: dict, tokenizer=None,
                    keep_last: int = 3, keep_every: int = 0, protect: Path | None = None) -> Path:
    """Write ``RUN/checkpoints/step_N`` atomically, then prune older ones.

    ``model`` is a module or a :class:`WeightsView`. A checkpoint with non-finite weights is
    refused (``FloatingPointError``): resuming from it could never recover. ``protect`` (the
    last checkpoint written before a streak of non-finite steps began) is never pruned, so
    checkpoints written during the streak cannot push it out.
    """
    if not weights_are_finite(model):
        raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights at step {step}")

    def write(folder: Path) -> None:
        save_pretrained(model, folder, tokenizer)
        with open(folder / STATE_NAME, "wb") as f:
            torch.save(state, f)

    # The same step may be written again (a resumed run that stops there): it is replaced.
    final = atomic_write(checkpoint_dir(run_dir) / f"step_{step:08d}", write)
    found = list_checkpoints(run_dir)
    keep = kept_steps([checkpoint_step(p) for p in found], keep_last, keep_every,
                      None if protect is None else checkpoint_step(protect))
    for p in found:
        if checkpoint_step(p) not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


def existing_run(run_dir: Path) -> str | None:
    """What in ``run_dir`` shows that a run already wrote there (checkpoints, ``final/``,
    metrics), or None for a new or empty folder. A folder holding only ``config.yaml`` and
    ``version.json`` (a run that stopped before its first step) does not count."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    if found:
        return f"{len(found)} checkpoint(s) up to {found[-1].name}"
    if (run_dir / "final" / WEIGHTS_NAME).is_file():
        return "a finished model in final/"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "metrics.jsonl"
    return None


def refuse_existing_run(run_dir: Path) -> None:
    """Raise unless ``run_dir`` is free for a new run (see :func:`existing_run`)."""
    what = existing_run(run_dir)
    if what:
        raise FileExistsError(
            f"{run_dir} already holds a run ({what}). Continue it with --resume latest, start a new "
            f"run with another --out, or pass --overwrite to delete it and start again")


def clear_run(run_dir: Path) -> None:
    """Delete what a previous run wrote into ``run_dir`` (``--overwrite``); other files stay."""
    run_dir = Path(run_dir)
    for name in ("checkpoints", "final", "reconstructions", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss_curve.png"):
        (run_dir / name).unlink(missing_ok=True)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """'latest' -> newest complete checkpoint of the run (None if there is none); else a path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_NAME).is_file():
        return path
    hint = f"; the run's checkpoints are in {checkpoint_dir(run_dir)}/step_N, or use --resume latest"
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such folder{hint}")
    if path.is_dir() and list_checkpoints(path):  # a run folder given instead of a checkpoint
        raise FileNotFoundError(f"--resume {resume} is a run folder, not a checkpoint: use "
                                f"--resume {list_checkpoints(path)[-1]}, or --out {resume} --resume latest")
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"--resume {resume} holds weights but no {STATE_NAME} (optimizer, step, "
                                f"data position), e.g. RUN/final; training resumes from a checkpoint{hint}")
    raise FileNotFoundError(f"--resume {resume}: no {STATE_NAME} in that folder{hint}")


def config_changes(saved: dict, current: dict) -> list[str]:
    """``section.field old -> new`` for every setting that differs between two
    ``Config.to_dict()``s (the checkpoint's and this run's)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    old, new = flat(saved), flat(current)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=False)

