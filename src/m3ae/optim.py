"""What every optimiser in the package shares: the parameter groups (no weight decay where the
model says so, optional layer-wise LR scales) and the warmup + cosine schedule. Pre-training
(:mod:`m3ae.training.optim`), the linear probe and fine-tuning build on them."""
from __future__ import annotations

import math
from typing import Callable

from torch import nn


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
