"""Pre-training's AdamW and learning-rate schedule, built from a :class:`TrainConfig` on the
shared pieces in :mod:`m3ae.optim`."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import TrainConfig
from ..optim import param_groups, warmup_cosine  # noqa: F401 (also imported from here)


def build_optimizer(model: nn.Module, cfg: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr_for(world_size), betas=tuple(cfg.betas))
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_scales)
    params = [p for g in groups for p in g["params"]]
    # The fused kernel updates all tensors in one pass (faster than foreach on CPU:
    # benchmarks/RESULTS.md, "What each switch does"); sharded (DTensor) parameters keep foreach.
    plain = all(type(p) is torch.nn.Parameter for p in params)
    return torch.optim.AdamW(groups, **({"fused": True} if plain else {"foreach": True}), **kwargs)


def lr_at(step: int, cfg: TrainConfig, world_size: int = 1) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine from peak to ``min_lr``.

    The peak follows the global batch, so it depends on the number of processes."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr_for(world_size), cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, world_size: int = 1,
                    start_step: int = 0):
    """The schedule of ``cfg`` (see :func:`lr_at`), positioned after ``start_step`` steps.

    A resumed run builds its schedule this way from the *current* config and the step alone,
    rather than loading the checkpoint's scheduler state, whose ``base_lrs`` would silently
    bring back the old peak LR. The LR of every step is the same closed form either way, so an
    unchanged config resumes bit-exactly."""
    peak = cfg.lr_for(world_size)
    for group in optimizer.param_groups:
        group["initial_lr"] = peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, world_size) / peak,
                                             last_epoch=start_step - 1)


@contextlib.contextmanager
def config_hyperparameters(optimizer: torch.optim.Optimizer):
    """Load an optimizer state inside this block to keep the hyperparameters the optimizer was
    built with (from the config: weight decay, betas, ...) while taking the state (moments,
    step counts) from the checkpoint; ``load_state_dict`` alone restores the saved ones."""
    built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, hyper in zip(optimizer.param_groups, built):
        group.update(hyper)
