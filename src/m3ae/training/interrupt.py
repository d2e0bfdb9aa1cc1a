"""Ctrl-C during training: finish the step, write a checkpoint, say how to continue.

Between :meth:`StopOnInterrupt.start` and :meth:`~StopOnInterrupt.stop`, a first SIGINT only raises a flag; the training
loop checks it after each optimizer step (so no step is left half-applied), saves, and
raises :class:`TrainingInterrupted`. A second Ctrl-C interrupts at once, as usual.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after an interrupted run saved its checkpoint; the message says how to resume."""

    def __init__(self, step: int, checkpoint: Path | None, run_dir: Path):
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint could be written"
        super().__init__(f"interrupted at step {step}; {where}. Continue with: "
                         f"m3ae pretrain --out {run_dir} --resume latest")
        self.step, self.checkpoint = step, checkpoint


class StopOnInterrupt:
    """Turn the first SIGINT into a flag (in the main thread; elsewhere it does nothing)."""

    def __init__(self):
        self.flag = False
        self._old = None

    def _handler(self, signum, frame):
        if self.flag:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, self._old)
            raise KeyboardInterrupt
        self.flag = True
        print("\nCtrl-C: finishing this step and writing a checkpoint (press again to stop at once)",
              flush=True)

    def start(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def stop(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def requested(self, info) -> bool:
        """True when any process was interrupted (ranks must stop at the same step)."""
        if info.world_size == 1:
            return self.flag
        from .distributed import all_reduce_sum

        return bool(all_reduce_sum(torch.tensor([float(self.flag)], device=info.device), info) > 0)
