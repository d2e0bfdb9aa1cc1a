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

import numpy as np
import torch
from torch import nn

from .config import TextLossNorm, check_choice
from .model import M3AEOutput
from .ops import linear_cross_entropy, num_kept


class LossOutput(NamedTuple):
    total: torch.Tensor
    image_loss: torch.Tensor
    text_loss: torch.Tensor
    text_accuracy: torch.Tensor  # top-1 accuracy over masked real tokens


def sample_mean_weights(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, L) bool -> (B, L) weights ``1 / (positions of the sample)`` at its loss positions.

    The one normalisation rule of both losses: ``(values * weights).sum()`` is the sum over
    samples of each sample's mean over its loss positions; dividing it by a number of
    samples (see :func:`_denominator`) gives the loss."""
    mask = mask.to(dtype)
    return mask / mask.sum(1, keepdim=True).clamp_min(1)


def _denominator(mask: torch.Tensor, denom, whole_batch: bool = False):
    """``denom`` if given (data-parallel training passes (samples carrying a loss in the
    global batch) / (processes x micro-batches), so that averaging the gradients of all
    micro-batches gives the global mean); else the batch size, or the samples that carry a loss."""
    if denom is not None:
        return denom
    return mask.shape[0] if whole_batch else mask.any(1).sum().clamp_min(1)


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
    return (per_patch * sample_mean_weights(out.image_mask)).sum() / _denominator(out.image_mask, denom)


def _ce_and_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), targets (N,) -> cross-entropy and top-1 hit, one pass each over V.

    Written out (log-softmax once, then a gather) rather than ``F.cross_entropy`` plus
    ``argmax``: ``argmax`` is a slow scalar scan on CPU (measured 3x slower than this whole
    loss, see benchmarks/RESULTS.md). A token counts as correct when its logit is the row
    maximum, which differs from ``argmax == target`` only on exact ties.
    """
    logp = torch.log_softmax(logits, dim=-1)
    target_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        correct = (target_logp >= logp.amax(-1)).to(logp.dtype)
    return -target_logp, correct


def masked_positions(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Flat indices of the True entries of ``mask`` in row-major order.

    ``count``, when the caller knows it on the host (the trainer does, from the batch's
    padding), sizes the result statically, so that a GPU needs no device-to-host read."""
    flat = mask.reshape(-1)
    if count is None:
        return flat.nonzero().squeeze(1)
    return torch.nonzero_static(flat, size=count).squeeze(1)


def text_loss_and_accuracy(out: M3AEOutput, text_head: nn.Linear | None = None, denom=None,
                           norm: str = "batch", accuracy_denom=None, fused: bool = True,
                           masked_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-token cross-entropy and top-1 accuracy (see the module docstring for ``norm``).

    The head's input is ``out.text_hidden`` with ``text_head``, or, without a head, the
    logits ``out.text_logits``. Only the masked tokens' rows are scored: with a head and
    ``fused`` through :func:`m3ae.ops.linear_cross_entropy` (no (N, V) logits are stored;
    the same losses and gradients), else through the head and a log-softmax.
    ``denom``/``accuracy_denom`` override the denominators; ``masked_tokens`` is the number
    of True entries of ``out.text_mask`` when known on the host (see :func:`masked_positions`).
    """
    mask = out.text_mask
    rows = masked_positions(mask, masked_tokens)
    weight = sample_mean_weights(mask).reshape(-1)[rows]
    target = out.text_target.reshape(-1)[rows]
    if text_head is not None and fused:
        h = out.text_hidden.reshape(-1, out.text_hidden.shape[-1])[rows]
        total, _, hit = linear_cross_entropy(h, text_head.weight, text_head.bias, target, weight)
    else:
        if text_head is not None:
            logits = text_head(out.text_hidden.reshape(-1, out.text_hidden.shape[-1])[rows])
        elif out.text_logits is not None:
            logits = out.text_logits.reshape(-1, out.text_logits.shape[-1])[rows]
        else:
            raise ValueError("the text loss needs out.text_logits or the head (text_head=model.text_head)")
        nll, hit = _ce_and_correct(logits.float(), target)
        total = (nll * weight).sum()
    loss = total / _denominator(mask, denom, whole_batch=norm == "batch")
    return loss, (hit * weight).sum() / _denominator(mask, accuracy_denom)


class M3AELoss(nn.Module):
    """total = image_weight * image MSE + text_weight * text cross-entropy (1.0 and 0.5)."""

    def __init__(self, image_weight: float = 1.0, text_weight: float = 0.5, norm_pix_loss: bool = False,
                 text_norm: str = "batch", fused_text_loss: bool = True):
        super().__init__()
        check_choice("text_norm", text_norm, TextLossNorm)
        self.image_weight = image_weight
        self.text_weight = text_weight
        self.norm_pix_loss = norm_pix_loss
        self.text_norm = text_norm
        self.fused_text_loss = fused_text_loss

    def forward(self, out: M3AEOutput, image_denom=None, text_denom=None, accuracy_denom=None, *,
                text_head: nn.Linear | None = None, masked_tokens: int | None = None) -> LossOutput:
        """``*_denom``: see :func:`_denominator` (None: this batch's own count). ``text_head``
        (``model.text_head``) scores ``out.text_hidden``; without it ``out.text_logits`` are used."""
        zero = out.latent.new_zeros((), dtype=torch.float32)
        img = image_loss(out, self.norm_pix_loss, image_denom) if out.image_pred is not None else zero
        if out.text_mask is not None and (text_head is not None or out.text_logits is not None):
            txt, acc = text_loss_and_accuracy(out, text_head, text_denom, self.text_norm, accuracy_denom,
                                              self.fused_text_loss, masked_tokens)
        else:
            txt, acc = zero, zero
        return LossOutput(self.image_weight * img + self.text_weight * txt, img, txt, acc)


class LossCounts(NamedTuple):
    images: int       # samples that carry an image loss
    texts: int        # samples that carry a text loss
    text_tokens: int  # masked real caption tokens (the rows the text head scores)


def _host_array(x) -> np.ndarray:
    # .numpy() refuses device tensors, so this bookkeeping can never wait on a GPU.
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def loss_sample_counts(image_valid_or_present, text_padding_mask, num_patches: int,
                       image_mask_ratio: float, text_mask_ratio: float) -> LossCounts:
    """What a batch's losses will count, from the batch alone (host tensors), before the forward.

    ``image_valid_or_present``: a (B,) bool tensor of samples with an image, an int B when
    all have one, or None/0 when the batch has no image. ``text_padding_mask``: (B, T) bool
    or None. Mirrors :func:`m3ae.ops.random_masking`: a sample keeps ``num_kept`` of its
    valid positions and carries a loss when at least one is masked, which depends only on
    how many it has. (With ``text_norm="batch"`` the text loss divides by the batch size.)
    """
    n_img = 0
    if image_valid_or_present is not None and image_mask_ratio > 0:
        hides = num_patches - num_kept(num_patches, image_mask_ratio) > 0
        present = _host_array(image_valid_or_present)
        present = int(present.astype(bool).sum()) if present.ndim else int(present)
        n_img = present if hides else 0
    n_txt = n_tok = 0
    if text_padding_mask is not None and text_mask_ratio > 0:
        nv = (~_host_array(text_padding_mask).astype(bool)).sum(1)
        masked = nv - num_kept(nv, text_mask_ratio)
        n_txt, n_tok = int((masked > 0).sum()), int(masked.sum())
    return LossCounts(n_img, n_txt, n_tok)
