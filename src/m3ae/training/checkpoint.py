"""Training checkpoints: atomic step folders, keep-last-K, ``--resume latest``.

``RUN/checkpoints/step_00001000/`` holds ``config.json`` + ``model.safetensors`` (a
pretrained folder, loadable alone) and ``trainer_state.pt`` (optimizer, scheduler, step,
random generators, data position) and, written last, ``manifest.json`` (size and SHA-256 of
each file). A folder is written under a temporary name and renamed when complete, so a crash
never leaves a half-written checkpoint that looks finished; ``--resume latest`` checks the
manifest and falls back past a damaged checkpoint, naming the file.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import torch

from ..io import atomic_write
from ..pretrained import CONFIG_NAME, WEIGHTS_NAME, check_files, save_pretrained, write_manifest

STATE_NAME = "trainer_state.pt"
# Test hook: M3AE_TEST_KILL_AT=<point>@<step> SIGKILLs the process at that point of the write
# of that step's checkpoint, so the tests can show that no crash leaves one that looks complete.
KILL_POINTS = ("after_weights", "after_optimizer", "before_rename")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the message says where."""


def _crash_point(name: str, step: int) -> None:
    if os.environ.get("M3AE_TEST_KILL_AT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
                    keep_last: int = 3, keep_every: int = 0, protect: Path | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``RUN/checkpoints/step_N`` atomically, then prune older ones.

    ``model`` is a module or a :class:`WeightsView`. A checkpoint with non-finite weights is
    refused (``FloatingPointError``): resuming from it could never recover. ``protect`` (the
    last checkpoint written before a streak of non-finite steps began) is never pruned, so
    checkpoints written during the streak cannot push it out. ``extra`` goes into ``config.json``
    (see :func:`m3ae.pretrained.save_pretrained`).
    """
    if not weights_are_finite(model):
        raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights at step {step}")

    def write(folder: Path) -> None:
        save_pretrained(model, folder, tokenizer, extra=extra, manifest=False)
        _crash_point("after_weights", step)
        with open(folder / STATE_NAME, "wb") as f:
            torch.save(state, f)
        _crash_point("after_optimizer", step)
        write_manifest(folder)
        _crash_point("before_rename", step)

    target = checkpoint_dir(run_dir) / f"step_{step:08d}"
    try:
        # The same step may be written again (a resumed run that stops there): it is replaced.
        final = atomic_write(target, write)
    except OSError as e:  # ENOSPC, EACCES, EDQUOT ...: atomic_write removed its temporary folder
        where = f" at {e.filename}" if e.filename else ""
        before = [p for p in list_checkpoints(run_dir) if p != target]
        kept = f"the newest checkpoint is still {before[-1]}" if before else "there is no earlier checkpoint"
        raise CheckpointWriteError(
            f"could not write checkpoint {target}: {e.strerror or e}{where}; nothing of it was kept and "
            f"{kept}. Free space or fix the permissions, then continue with --resume latest") from None
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


def damaged(ckpt: Path) -> str | None:
    """None for a complete, undamaged checkpoint; else which file is missing or damaged."""
    return check_files(ckpt, (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))


def resolve_resume(resume: str, run_dir: Path, say=print) -> Path | None:
    """'latest' -> newest complete and undamaged checkpoint of the run (None if there is none),
    saying which newer ones were passed over and why; else a path, which must be undamaged."""
    if resume == "latest":
        root = checkpoint_dir(run_dir)
        for tmp in sorted(root.glob(".step_*.tmp")) if root.is_dir() else []:
            say(f"--resume latest: ignoring {tmp}, a checkpoint whose writing was cut off")
        found = list_checkpoints(run_dir)
        for ckpt in reversed(found):
            problem = damaged(ckpt)
            if problem is None:
                return ckpt
            say(f"--resume latest: passing over {ckpt.name}: {problem}")
        if found:
            raise ValueError(f"--resume latest: none of the {len(found)} checkpoint(s) in {root} is complete "
                             f"(see above); resume from none of them, or start again with --overwrite")
        return None
    path = Path(resume)
    if (path / STATE_NAME).is_file():
        problem = damaged(path)
        if problem:
            raise ValueError(f"--resume {resume}: {problem}; pick another checkpoint, or --resume latest")
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
    file = Path(path) / STATE_NAME
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint without a manifest whose state file is damaged
        raise ValueError(f"{file} is damaged ({type(e).__name__}: {e})") from None

