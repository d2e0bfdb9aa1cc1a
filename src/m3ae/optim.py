"""Every optimiser in the package: the parameter groups (no weight decay where the model says
so, optional layer-wise LR scales) and the warmup + cosine schedule, which pre-training, the
linear probe and fine-tuning share; and pre-training's AdamW and schedule, built from a
:class:`TrainConfig` (:func:`build_optimizer`, :func:`build_scheduler`). One module outside
``training/``, so that evaluation uses it without importing the trainer."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norm_scales: bool = False,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """The trainable parameters in two groups: decayed weights, and what
    ``model.no_weight_decay()`` names or is a vector (biases, norms: no decay).

    ``decay_norm_scales`` moves the LayerNorm scales into the decayed group, which is what
    the official JAX code's weight-decay mask does (the paper's numbers were trained so).
    ``lr_scale(name)`` (layer-wise LR decay) instead makes one group per distinct (LR scale,
    weight decay), in the order the parameters come, each with its ``"lr_scale"``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    norm_scales = {f"{mod}.weight".lstrip(".") for mod, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    # Without lr_scale always these two groups, even if one is empty: saved optimizer states have that shape.
    groups = {} if lr_scale is not None else {True: {"params": [], "weight_decay": weight_decay},
                                  False: {"params": [], "weight_decay": 0.0}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = (decay_norm_scales and name in norm_scales) or (name not in skip and p.dim() > 1)
        if lr_scale is None:
            groups[decayed]["params"].append(p)
            continue
        scale, wd = lr_scale(name), (weight_decay if decayed else 0.0)
        groups.setdefault((scale, wd), {"params": [], "lr_scale": scale, "weight_decay": wd})["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, total: float, warmup: float, peak: float = 1.0, end: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: linear warmup to ``peak`` over the
    first ``warmup`` steps (step 0 already trains, at ``peak / warmup``), then a cosine from
    ``peak`` down to ``end``, reached at ``total`` and held after it. Pre-training, the linear
    probe and fine-tuning all use it (the last two as a factor: ``peak=1``, ``end=0``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Pre-training's optimiser and schedule, from its config.
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
