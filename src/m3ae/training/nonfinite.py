"""Non-finite training: the post-update weight check and the messages that stop a run.

Two ways a run goes non-finite, both ending with :class:`~m3ae.training.TrainingDiverged`
(the CLI's exit code 3 and a one-line message, no traceback):

* a streak of steps whose loss or gradient is not finite: each is skipped (no update), and
  ``train.max_nonfinite_steps`` of them in a row stop the run (:func:`streak_message`);
* an update with a finite loss and gradient that makes the weights non-finite (an LR so
  high that AdamW's step overflows float32): nothing later can recover from it, so the run
  stops at that step, before anything is logged or written (:func:`overflow_message`).

Both messages name the last good checkpoint, the newest one written before the trouble;
checkpoint rotation never deletes it (:func:`m3ae.training.checkpoint.save_checkpoint`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .distributed import DistInfo, all_reduce_sum

CAUSES = ("Likely causes: a learning rate too high for this batch size (lower train.base_lr/train.lr "
          "or lengthen train.warmup_steps), fp16 overflow (use train.precision=bf16), no gradient "
          "clipping (train.grad_clip), or bad input data (NaN pixels, empty captions).")


def nonfinite_parameters(params, info: DistInfo) -> torch.Tensor:
    """How many parameters hold a non-finite value, over every rank, as a device tensor (one
    reduction and no host read; under FSDP each rank holds only its shard)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    local = [t for t in local if t.numel()]  # an FSDP shard can be empty
    if not local:
        return torch.zeros(1)
    # A tensor is finite iff its min and max are (both propagate NaN): two fast reductions
    # with no (numel,) temporaries, unlike isfinite(t).all() (timed in benchmarks/RESULTS.md,
    # "Profile of the step before this round").
    ends = torch.stack([e for t in local for e in torch.aminmax(t)]).reshape(-1, 2)
    bad = (~torch.isfinite(ends)).any(1).sum().float().reshape(1)
    return all_reduce_sum(bad, info) if info.distributed else bad


def _fallback(last_good: Path | None, first_bad: int) -> str:
    if last_good is not None:
        return (f"the last good checkpoint (written before step {first_bad}) is {last_good}; after "
                f"changing the config, continue from it with --resume {last_good}")
    return (f"no checkpoint was written before step {first_bad}, where the trouble began; change the "
            f"config and start again")


def streak_message(step: int, streak: int, last_good: Path | None, max_steps: int) -> str:
    return (f"stopping at step {step}: {streak} steps in a row had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={max_steps}); {_fallback(last_good, step - streak + 1)}. {CAUSES}")


def overflow_message(step: int, lr: float, last_good: Path | None) -> str:
    return (f"stopping at step {step}: its update (LR {lr:.3g}) made the weights non-finite although "
            f"its loss and gradient were finite; nothing of this step was logged or written. "
            f"{_fallback(last_good, step)}. {CAUSES}")
