"""Pre-training losses, kept outside the model: masked-patch MSE and masked-token cross-entropy.

Both are averaged first over the loss positions of each sample. The image loss then averages
over the samples that have an image. The text loss, by default (``text_norm="batch"``, the
official JAX code), divides the sum of per-sample means by the number of samples in the
batch, so a sample without a caption adds 0 and a batch with 10 % captions has a text term
about 10x weaker than a fully paired one, as in the paper's paired-fraction runs;
``text_norm="text"`` divides by the samples that carry a text loss instead. The text
accuracy (a metric) always averages over the samples that carry a text loss.
:func:`loss_sample_counts` predicts those counts from a batch alone, before the forward
(the trainer needs them across processes).
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


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """values, mask (B, L) -> mean over samples with any mask of the per-sample masked mean.

    ``denom`` replaces the number of samples that carry a loss. Data-parallel training
    passes (samples carrying a loss in the whole global batch) / (processes x micro-batches),
    so that averaging the gradients of all micro-batches gives exactly the global mean.
    """
    mask = mask.to(values.dtype)
    count = mask.sum(1)
    per_sample = (values * mask).sum(1) / count.clamp_min(1)
    has = (count > 0).to(values.dtype)
    return (per_sample * has).sum() / (has.sum().clamp_min(1) if denom is None else denom)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's per-patch normalised pixel target."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def image_loss(out: M3AEOutput, norm_pix_loss: bool = False, denom=None) -> torch.Tensor:
    target = out.image_target
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (out.image_pred.float() - target.float()).pow(2).mean(-1)
    return _per_sample_mean(per_patch, out.image_mask, denom)


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


def text_loss_and_accuracy(out: M3AEOutput, denom=None, norm: str = "batch",
                           accuracy_denom=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-token cross-entropy and top-1 accuracy. ``denom`` overrides the loss's
    denominator (see the module docstring for ``norm``), ``accuracy_denom`` the accuracy's."""
    mask = out.text_mask
    if denom is None and norm == "batch":
        denom = mask.shape[0]
    if out.text_token_loss is not None:  # the forward fused the head and the cross-entropy
        tl = out.text_token_loss
        if denom is None:
            denom = mask.any(1).sum().clamp_min(1)
        hit = tl.hit.new_zeros(mask.shape).masked_scatter(mask, tl.hit)
        return tl.per_sample_sum / denom, _per_sample_mean(hit, mask, accuracy_denom)
    logits = out.text_logits.float()
    if logits.dim() == 2:  # logits were computed only at the masked positions
        b, t = mask.shape
        ce_flat, correct_flat = _ce_and_correct(logits, out.text_target[mask])
        ce = ce_flat.new_zeros(b, t).masked_scatter(mask, ce_flat)
        correct = ce_flat.new_zeros(b, t).masked_scatter(mask, correct_flat)
    else:
        ce, correct = _ce_and_correct(logits, out.text_target)
    return _per_sample_mean(ce, mask, denom), _per_sample_mean(correct, mask, accuracy_denom)


class M3AELoss(nn.Module):
    """total = image_weight * image MSE + text_weight * text cross-entropy (1.0 and 0.5)."""

    def __init__(self, image_weight: float = 1.0, text_weight: float = 0.5, norm_pix_loss: bool = False,
                 text_norm: str = "batch"):
        super().__init__()
        if text_norm not in ("batch", "text"):
            raise ValueError(f"text_norm must be 'batch' or 'text', got {text_norm!r}")
        self.image_weight = image_weight
        self.text_weight = text_weight
        self.norm_pix_loss = norm_pix_loss
        self.text_norm = text_norm

    def forward(self, out: M3AEOutput, image_denom=None, text_denom=None, accuracy_denom=None) -> LossOutput:
        """``*_denom``: see :func:`_per_sample_mean` (None: this batch's own count)."""
        zero = out.latent.new_zeros((), dtype=torch.float32)
        img = image_loss(out, self.norm_pix_loss, image_denom) if out.image_pred is not None else zero
        if out.text_logits is not None or out.text_token_loss is not None:
            txt, acc = text_loss_and_accuracy(out, text_denom, self.text_norm, accuracy_denom)
        else:
            txt, acc = zero, zero
        return LossOutput(self.image_weight * img + self.text_weight * txt, img, txt, acc)


def loss_sample_counts(image_valid_or_present, text_padding_mask, num_patches: int,
                       image_mask_ratio: float, text_mask_ratio: float) -> tuple[int, int]:
    """How many samples of a batch carry an image loss and a text loss, from the batch alone.

    ``image_valid_or_present``: a (B,) bool tensor of samples with an image, an int B when
    all have one, or None/0 when the batch has no image. ``text_padding_mask``: (B, T) bool
    or None. Mirrors :func:`m3ae.ops.random_masking`: a sample carries a loss when at least
    one of its valid positions is masked, which depends only on how many it has. (With
    ``text_norm="batch"`` the text loss divides by the batch size instead.)
    """
    from .ops import num_kept

    n_img = 0
    if image_valid_or_present is not None and image_mask_ratio > 0:
        hides = num_patches - num_kept(num_patches, image_mask_ratio) > 0
        if isinstance(image_valid_or_present, torch.Tensor):
            present = int(image_valid_or_present.bool().sum())
        else:
            present = int(image_valid_or_present)
        n_img = present if hides else 0
    n_txt = 0
    if text_padding_mask is not None and text_mask_ratio > 0:
        nv = (~text_padding_mask.bool()).sum(1)
        n_txt = int(((nv - num_kept(nv, text_mask_ratio)) > 0).sum())
    return n_img, n_txt
