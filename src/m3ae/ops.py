"""Small tensor helpers shared by every path: patchify, sin-cos tables, masking, gather,
and the fused text head + cross-entropy.

Each idea lives here once; the model, the losses, the visualisations and the checkpoint
converters all call these functions rather than re-deriving the layouts.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


# ---------------------------------------------------------------------------- patches
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row by row, inside a patch (y, x, channel).

    This is MAE's order and the official JAX M3AE order (channels last inside a patch).
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, H, W). A square grid unless given."""
    b, n, _ = patches.shape
    p = patch_size
    if grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


# ---------------------------------------------------------------------- sin-cos tables
def sincos_1d(dim: int, positions: torch.Tensor | int) -> torch.Tensor:
    """Fixed 1-D table: ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 1 / 10000^(i / (dim/2))``.

    Returns (len(positions), dim) float32. Computed in float64 so that tables for long
    sequences match the NumPy reference to float32 precision.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions)
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """Fixed 2-D table for a row-major patch grid, (grid_h * grid_w, dim).

    As in MAE: the first half of the channels encodes the column index, the second half the
    row index, each with the 1-D formula at dim/2.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


# -------------------------------------------------------------------------- masking
class Masking(NamedTuple):
    """One modality's random masking for a batch.

    ``ids_shuffle`` orders each sample's positions as kept first, then masked, then invalid
    (padding); ``ids_restore`` undoes it. The encoder gets the first ``num_slots`` positions;
    ``slot_valid`` says which of those slots hold a real kept token (samples keep different
    numbers of caption tokens, so the tail of the slots is padding). ``mask`` is True at the
    positions the loss is computed on: valid and not kept.
    """

    ids_shuffle: torch.Tensor  # (B, L) long
    ids_restore: torch.Tensor  # (B, L) long
    slot_valid: torch.Tensor   # (B, num_slots) bool
    mask: torch.Tensor         # (B, L) bool, True = hidden from the encoder and valid
    complete: bool = False     # every position sits in its own slot (no masking at all)

    @property
    def num_slots(self) -> int:
        return self.slot_valid.shape[1]

    @property
    def ids_keep(self) -> torch.Tensor:
        return self.ids_shuffle[:, : self.num_slots]


def num_kept(num_valid: torch.Tensor | int, mask_ratio: float):
    """Tokens kept out of ``num_valid``: ``floor(num_valid * (1 - mask_ratio))``.

    The same rounding as MAE's ``int(L * (1 - mask_ratio))``, applied per sample to the
    real (non-padding) tokens. At ratio 0.75 a caption of 10 real tokens keeps 2.
    """
    keep_frac = 1.0 - float(mask_ratio)
    if isinstance(num_valid, (int, np.integer)):
        return int(num_valid * keep_frac + 1e-6)
    if isinstance(num_valid, np.ndarray):  # host-side bookkeeping of a batch (no device read)
        return np.floor(num_valid.astype(np.float64) * keep_frac + 1e-6).astype(np.int64)
    return torch.floor(num_valid.to(torch.float64) * keep_frac + 1e-6).long()


def random_masking(valid: torch.Tensor, mask_ratio: float, *,
                   generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None,
                   all_valid: bool = False) -> Masking:
    """Independent random masking per sample over the valid positions of each row.

    ``valid`` (B, L) bool marks real tokens (False = padding or an absent modality).
    Each sample keeps ``num_kept(valid.sum(1), mask_ratio)`` of its valid tokens, chosen
    uniformly at random; padding is never kept. The number of encoder slots is the static
    bound ``num_kept(L, mask_ratio)`` so that no host synchronisation is needed. Pass
    ``all_valid=True`` when every position is known valid (images) to skip the bookkeeping.
    ``noise`` (B, L) in [0, 1) replaces the random draw (as in MAE), for reproducible tests.
    """
    b, length = valid.shape
    if not 0.0 <= mask_ratio < 1.0 + 1e-9:
        raise ValueError(f"mask ratio must be in [0, 1], got {mask_ratio}")
    if noise is None:
        noise = torch.rand(b, length, device=valid.device, generator=generator)
    # Invalid positions sort after every valid one.
    noise = noise.masked_fill(~valid, 2.0)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    slots = num_kept(length, mask_ratio)
    rank = ids_restore  # rank of each position in the shuffled order
    if all_valid:
        slot_valid = torch.ones(b, slots, dtype=torch.bool, device=valid.device)
        mask = rank >= slots
    else:
        keep = num_kept(valid.sum(1), mask_ratio)  # (B,)
        slot_valid = torch.arange(slots, device=valid.device)[None, :] < keep[:, None]
        mask = (rank >= keep[:, None]) & valid
    return Masking(ids_shuffle, ids_restore, slot_valid, mask)


def hide_a_quarter_first(noise: torch.Tensor, rows: int) -> torch.Tensor:
    """Image masking noise (B, g*g) of a g x g patch grid -> the same where, in the first
    ``rows`` rows, the quarter of the grid holding the row's largest value is raised by 1, so
    :func:`random_masking` hides that whole quarter before any other patch (when the ratio
    hides at least a quarter; the other hidden patches stay uniformly random).

    The quarter is as random as the noise; the rows are the first of a shuffled batch, so
    which samples get it is random too. Whole objects then vanish from the image often, which
    uniform masking rarely does to an object of several patches: then only the caption can
    say what was there (the demo uses it to make text->image reconstruction common)."""
    b, length = noise.shape
    g = math.isqrt(length)
    if g * g != length:
        raise ValueError(f"image noise length {length} is not a square patch grid")
    half = torch.arange(g, device=noise.device) * 2 // g  # 0 = first half, 1 = second half
    quarter_of = (half[:, None] * 2 + half[None, :]).reshape(-1)  # (L,) quarter index per patch
    rows = min(rows, b)
    chosen = quarter_of[noise[:rows].argmax(1)]  # (rows,)
    out = noise.clone()
    out[:rows] += (quarter_of[None, :] == chosen[:, None]).to(noise.dtype)
    return out


def no_masking(valid: torch.Tensor, all_valid: bool = False) -> Masking:
    """Keep every valid position in place (for features and ratio-0 forwards)."""
    b, length = valid.shape
    ids = torch.arange(length, device=valid.device).expand(b, length)
    slot_valid = torch.ones_like(valid) if all_valid else valid
    return Masking(ids, ids, slot_valid, torch.zeros_like(valid), complete=True)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), ids (B, K) -> (B, K, D): the tokens at ``ids`` for each sample."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def keep_tokens(x: torch.Tensor, valid: torch.Tensor, mask_ratio: float, generator=None, noise=None,
                all_valid: bool = False) -> tuple[torch.Tensor, Masking]:
    """Embedded tokens of one modality (B, L, D) -> the kept ones (the encoder's slots) and
    their masking; ``mask_ratio`` 0 keeps every token in order."""
    if mask_ratio > 0:
        m = random_masking(valid, mask_ratio, generator=generator, noise=noise, all_valid=all_valid)
        return gather_tokens(x, m.ids_keep), m
    return x, no_masking(valid, all_valid=all_valid)


def restore_tokens(y: torch.Tensor, m: Masking, mask_token: torch.Tensor, pos: torch.Tensor,
                   type_emb) -> torch.Tensor:
    """Encoder slots of one modality -> full-length decoder tokens in the original order, the
    dropped ones replaced by ``mask_token``, plus positions and type (:func:`keep_tokens` undone)."""
    b, length = m.ids_restore.shape
    if m.complete:  # unmasked: every slot holds its own token (padding too, as officially)
        return y + pos[:, :length] + type_emb
    # Slots past a sample's kept count hold dropped tokens: hide them behind the mask token.
    y = torch.where(m.slot_valid[..., None], y, mask_token.to(y.dtype))
    if y.shape[1] < length:
        y = torch.cat([y, mask_token.to(y.dtype).expand(b, length - y.shape[1], -1)], dim=1)
    y = gather_tokens(y, m.ids_restore)
    return y + pos[:, :length] + type_emb


POOLS = ("cls", "mean")


def pool_tokens(tokens: torch.Tensor, valid: torch.Tensor | None, pool: str) -> torch.Tensor:
    """(B, N, D) encoder tokens -> (B, D): CLS (position 0) or the mean over the valid
    non-CLS tokens (``valid`` (B, N) bool, None = all valid)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        w = torch.ones(tokens.shape[:2], device=tokens.device) if valid is None else valid.float()
        w = w.clone()
        w[:, 0] = 0  # CLS is not a token of the input
        return (tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def resolve_blocks(spec, depth: int) -> tuple[int | None, ...]:
    """Which layers a sweep reads: ``"all"`` (every block, then the final normalised output),
    or a comma-separated string / sequence of block indices (0-based, negative from the end)
    and ``"final"`` / None. Negative indices become non-negative, so ``-1`` and ``depth - 1``
    are one layer (one cache entry); order is kept, repeats dropped."""
    if isinstance(spec, str):
        spec = [*range(depth), None] if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    out: list[int | None] = []
    for b in spec:
        if b is None or b == "final":
            b = None
        else:
            try:
                b = int(b)
            except (TypeError, ValueError):
                raise ValueError(f"blocks are 'all', 'final' or integers, got {b!r}") from None
            if not -depth <= b < depth:
                raise ValueError(f"block {b} is out of range for an encoder of depth {depth}")
            b %= depth
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError("no blocks given")
    return tuple(out)


def trim_text_padding(text: torch.Tensor | None, padding_mask: torch.Tensor | None,
                      length: int | None = None):
    """Cut captions (B, T) and their padding mask to the batch's longest real caption.

    Positions that are padding in every row add nothing to the model's result: they are
    never kept by :func:`random_masking`, are masked out of both attentions, and carry no
    loss. Trimming them saves encoder slots (the static bound ``floor(T * (1 - r))``
    shrinks with T), decoder positions and text-head rows. Call it on the batch before the
    model (it reads the length on the host, which would be a sync on a GPU; a loader can
    do it in its collate function instead, or pass the ``length`` it already knows).
    Captions are assumed right-padded.
    """
    if text is None or padding_mask is None:
        return text, padding_mask
    if length is not None:
        return text[:, :length], padding_mask[:, :length]
    real = ~padding_mask.bool()
    # Index of the last real token + 1, over the batch; at least 1 so shapes stay valid.
    pos = torch.arange(1, text.shape[1] + 1, device=text.device)
    length = max(1, int((real * pos).amax()))
    return text[:, :length], padding_mask[:, :length]


# ------------------------------------------------------- text head + cross-entropy
class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i * CE(h_i @ W^T + b, t_i)`` with the gradient computed in the forward.

    The logits never exist in full: each block of rows gets its logits, their
    log-sum-exp, the loss, and at once d(loss)/d(logits) = w_i * (softmax - onehot) in the
    same buffer, which is multiplied into the gradients of ``h``, ``W`` and ``b`` while
    it is still in cache. Backward only scales those by the incoming scalar gradient, so the
    row weights must be known in the forward (they are: per-sample means over masked
    tokens). Compared with ``linear`` + ``log_softmax`` + ``gather`` this saves the
    (N, V) log-probabilities, the (N, V) one-hot gradient and four passes over them.
    Without ``need_grad`` (no_grad, or no input requires a gradient) only the loss is computed.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, row_weight, rows_per_block, compute_dtype, need_grad):
        n, d = h.shape
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums in >= float32
        # The bias rides along as an extra input column of ones: one plain matmul is
        # measurably faster on CPU than addmm's broadcast of a (V,) bias over (N, V), and
        # the bias gradient then falls out of the weight-gradient matmul.
        w_aug = torch.cat([weight, bias[:, None]], 1).to(compute_dtype)               # (V, D+1)
        h_aug = torch.cat([h, h.new_ones(n, 1)], 1).to(compute_dtype)                 # (N, D+1)
        nll = torch.empty(n, dtype=acc, device=h.device)
        hit = torch.empty(n, dtype=acc, device=h.device)
        grad_h = torch.empty(n, d, dtype=acc, device=h.device) if need_grad else None
        grad_wb = None  # [dW | db], in acc
        row_weight = row_weight.to(acc)
        for s in range(0, n, rows_per_block):
            e = min(s + rows_per_block, n)
            hc, tc, wc = h_aug[s:e], target[s:e, None], row_weight[s:e, None]
            logits = torch.mm(hc, w_aug.t()).to(acc)
            top = logits.amax(-1, keepdim=True)
            target_logit = logits.gather(1, tc)
            hit[s:e] = (target_logit >= top).squeeze(1).to(acc)
            probs = logits.sub_(top).exp_()  # in place: the logits are not needed again
            z = probs.sum(-1, keepdim=True)
            nll[s:e] = (z.log() + top - target_logit).squeeze(1)
            if not need_grad:
                continue
            probs.mul_(wc / z).scatter_add_(1, tc, -wc)  # now w_i * (softmax - onehot)
            g = probs.to(compute_dtype)
            grad_h[s:e] = torch.mm(g, w_aug[:, :d])
            if grad_wb is None:
                grad_wb = torch.mm(g.t(), hc).to(acc)
            elif g.dtype == grad_wb.dtype:
                torch.addmm(grad_wb, g.t(), hc, out=grad_wb)
            else:  # accumulate low-precision blocks in float32
                grad_wb.add_(torch.mm(g.t(), hc))
        ctx.mark_non_differentiable(nll, hit)
        if not need_grad:
            return (nll * row_weight).sum(), nll, hit
        if grad_wb is None:  # no rows
            grad_wb = w_aug.new_zeros(w_aug.shape, dtype=acc)
        ctx.save_for_backward(grad_h.to(h.dtype), grad_wb[:, :d].to(weight.dtype), grad_wb[:, d].to(bias.dtype))
        return (nll * row_weight).sum(), nll, hit

    @staticmethod
    def backward(ctx, grad, _grad_nll, _grad_hit):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, grad_b * grad, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         target: torch.Tensor, row_weight: torch.Tensor,
                         block_elements: int | None = None):
    """Cross-entropy of a linear head without materialising its (N, V) logits.

    h (N, D), weight (V, D), bias (V,), target (N,), row_weight (N,) -> (weighted sum
    ``sum_i row_weight_i * nll_i``, nll (N,), hit (N,)); only the sum carries a gradient.
    ``hit`` is 1 where the target's logit is the row maximum (top-1 up to exact ties).
    Rows are processed in blocks of about ``block_elements`` logits (default 2**24 on CPU,
    where one block per step measured fastest for bench-cpu, 2**28 on GPUs, where bigger
    matmuls are better and memory is plentiful; the GPU default is not tuned). Under
    autocast the matmuls run in the autocast dtype and the softmax in float32, as the
    unfused path does.
    """
    if block_elements is None:
        block_elements = 2 ** 24 if h.device.type == "cpu" else 2 ** 28
    dtype = h.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    rows = max(1, block_elements // weight.shape[0])
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, weight, bias))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, bias, target, row_weight, rows, dtype, need_grad)
