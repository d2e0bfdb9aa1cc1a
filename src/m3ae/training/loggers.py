"""Where metrics go: JSON lines always; TensorBoard and Weights & Biases when asked for.

The optional back-ends are imported only when enabled, so neither is a dependency; a run
that enables a missing one stops at start-up with the pip command that installs it.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..io import atomic_write
from ..io import read_jsonl as read_metrics  # the rows of a metrics.jsonl (a torn last line dropped)


def _import_optional(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"train.{extra}=true needs the '{extra}' package: pip install 'm3ae[{extra}]' "
                          f"(or set train.{extra}=false)") from e


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows up to ``last_step``: a resumed run re-logs the steps after its checkpoint,
    so the file ends up with every step exactly once."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsWriteError(RuntimeError):
    """metrics.jsonl could not be appended to (disk full, no permission); the message says where."""


class MetricsLogger:
    """Rank 0's sink for one row of scalars per logged step."""

    def __init__(self, run_dir: Path, cfg, enabled: bool = True, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step == 0:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, resume_step)
        tcfg = cfg.train
        if tcfg.tensorboard:
            tb = _import_optional("torch.utils.tensorboard", "tensorboard")
            self.tb = tb.SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)
        if tcfg.wandb:
            wandb = _import_optional("wandb", "wandb")
            # The run id is the folder's name, so a resumed run continues the same W&B run.
            self.wandb = wandb.init(project=tcfg.wandb_project, name=Path(run_dir).name,
                                    id=_wandb_id(run_dir), resume="allow", config=cfg.to_dict(),
                                    dir=str(run_dir))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # ENOSPC, EACCES, EDQUOT ...: a torn last line is dropped when read
            raise MetricsWriteError(
                f"could not append step {step} to {self.path}: {e.strerror or e}; the run stopped there. Free "
                "space or fix the permissions, then continue from its newest checkpoint with --resume latest "
                "(metrics.jsonl is cut back to that step)") from None
        # Scalars only: the JSON line also holds example keys of skipped samples.
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "-", Path(run_dir).resolve().name)[:64] or "m3ae"
