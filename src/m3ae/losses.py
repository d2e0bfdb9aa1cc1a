"""Pre-training losses, kept outside the model: masked-patch MSE and masked-token cross-entropy.

Both are averaged as the official JAX code does: first over the loss positions of each
sample, then over the samples that have any (a sample without an image, or whose caption
kept every token, adds nothing rather than a zero). The official text loss divides by the
whole batch instead, which pulls the loss towards zero when short captions have nothing
masked; we average over the samples that carry a loss.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .model import M3AEOutput


class LossOutput(NamedTuple):
    total: torch.Tensor
    image_loss: torch.Tensor
    text_loss: torch.Tensor
    text_accuracy: torch.Tensor  # top-1 accuracy over masked real tokens


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values, mask (B, L) -> mean over samples with any mask of the per-sample masked mean."""
    mask = mask.to(values.dtype)
    count = mask.sum(1)
    per_sample = (values * mask).sum(1) / count.clamp_min(1)
    has = (count > 0).to(values.dtype)
    return (per_sample * has).sum() / has.sum().clamp_min(1)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's per-patch normalised pixel target."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def image_loss(out: M3AEOutput, norm_pix_loss: bool = False) -> torch.Tensor:
    target = out.image_target
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (out.image_pred.float() - target.float()).pow(2).mean(-1)
    return _per_sample_mean(per_patch, out.image_mask)


def _ce_and_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V), targets (...) -> cross-entropy and top-1 hit, one pass each over V.

    Written out (log-softmax once, then a gather) rather than ``F.cross_entropy`` plus
    ``argmax``: over a 30k vocabulary the logits are the largest tensor of the step, and
    ``argmax`` is a slow scalar scan on CPU (measured 3x slower than this whole loss, see
    benchmarks/RESULTS.md). A token counts as correct when its logit is the row maximum,
    which differs from ``argmax == target`` only on exact ties.
    """
    logp = torch.log_softmax(logits, dim=-1)
    target_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        correct = (target_logp >= logp.amax(-1)).to(logp.dtype)
    return -target_logp, correct


def text_loss_and_accuracy(out: M3AEOutput) -> tuple[torch.Tensor, torch.Tensor]:
    mask = out.text_mask
    logits = out.text_logits.float()
    if logits.dim() == 2:  # logits were computed only at the masked positions
        b, t = mask.shape
        ce_flat, correct_flat = _ce_and_correct(logits, out.text_target[mask])
        ce = ce_flat.new_zeros(b, t).masked_scatter(mask, ce_flat)
        correct = ce_flat.new_zeros(b, t).masked_scatter(mask, correct_flat)
    else:
        ce, correct = _ce_and_correct(logits, out.text_target)
    return _per_sample_mean(ce, mask), _per_sample_mean(correct, mask)


class M3AELoss(nn.Module):
    """total = image_weight * image MSE + text_weight * text cross-entropy (1.0 and 0.5)."""

    def __init__(self, image_weight: float = 1.0, text_weight: float = 0.5, norm_pix_loss: bool = False):
        super().__init__()
        self.image_weight = image_weight
        self.text_weight = text_weight
        self.norm_pix_loss = norm_pix_loss

    def forward(self, out: M3AEOutput) -> LossOutput:
        zero = out.latent.new_zeros((), dtype=torch.float32)
        img = image_loss(out, self.norm_pix_loss) if out.image_pred is not None else zero
        if out.text_logits is not None:
            txt, acc = text_loss_and_accuracy(out)
        else:
            txt, acc = zero, zero
        return LossOutput(self.image_weight * img + self.text_weight * txt, img, txt, acc)
