"""Pictures: reconstruction grids (original / masked / reconstruction) and loss curves."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .data.transforms import denormalize
from .io import read_jsonl
from .ops import patchify, unpatchify


def new_figure(nrows: int = 1, ncols: int = 1, figsize=None, **subplot_kw):
    """A matplotlib figure and its axes, without pyplot: no GUI backend is chosen or
    switched (a notebook user's backend stays as it was), and nothing is left open."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out and write (creating folders) a figure of :func:`new_figure`; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


@torch.no_grad()
def reconstruction_images(model, image: torch.Tensor, out, norm_pix_loss: bool | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (original, masked, reconstruction with visible patches pasted back), pixels in [0, 1].

    With a per-patch normalised target (norm_pix_loss; None: what the model's folder recorded,
    ``model.norm_pix_loss``) the prediction is put back in the input's patch statistics before
    display, as MAE's visualisation does.
    """
    if norm_pix_loss is None:
        norm_pix_loss = getattr(model, "norm_pix_loss", False)
    p = model.config.patch_size
    target = patchify(image, p)
    pred = out.image_pred.float()
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    mask = out.image_mask[..., None].to(pred.dtype)
    pasted = denormalize(unpatchify(target * (1 - mask) + pred * mask, p))
    original = denormalize(image)
    hidden = unpatchify(mask.expand_as(target), p)  # 1 on masked pixels
    masked = original * (1 - hidden) + 0.5 * hidden  # masked patches shown grey
    return original, masked, pasted


def caption_with_predictions(text_tokenizer, ids, padding, text_mask, logits_row) -> str:
    """Caption tokens with masked ones shown as [true→predicted]."""
    words = []
    pred = None
    if logits_row is not None:  # only ids the tokenizer produces for words, as fill_mask ranks them
        allowed = text_tokenizer.word_mask(logits_row.shape[-1]).to(logits_row.device)
        pred = logits_row.masked_fill(~allowed, float("-inf")).argmax(-1)
    for j in range(ids.shape[0]):
        if padding[j]:
            break
        # Ids the tokenizer lacks (a model vocabulary larger than the tokenizer's) show as [UNK].
        tok = text_tokenizer.decode_tokens([ids[j]])[0]
        if text_mask[j] and pred is not None:
            guess = text_tokenizer.decode_tokens([pred[j]])[0]
            words.append(f"[{tok}→{guess}]" if guess != tok else f"[{tok}]")
        else:
            words.append(tok)
    return " ".join(words).replace(" ##", "")


@torch.no_grad()
def save_reconstruction_grid(model, batch: dict, path: str | Path, text_tokenizer=None, n: int = 6,
                             generator: torch.Generator | None = None, norm_pix_loss: bool | None = None) -> Path:
    """A PNG with one row per sample: original, masked, reconstruction (+ caption predictions)."""
    device = next(model.parameters()).device
    image = batch["image"][:n].to(device)
    text = pad = None
    if batch.get("text") is not None:
        text = batch["text"][:n].to(device)
        pad = batch["text_padding_mask"][:n].to(device)
    out = model.reconstruct(image, text, pad, generator=generator)
    orig, masked, recon = (t.cpu() for t in reconstruction_images(model, image, out, norm_pix_loss))
    rows = image.shape[0]
    fig, axes = new_figure(rows, 3, figsize=(7.5, 2.3 * rows + 0.3), squeeze=False)
    for i in range(rows):
        for j, (im, title) in enumerate(((orig, "original"), (masked, "masked"), (recon, "reconstruction"))):
            ax = axes[i, j]
            ax.imshow(im[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        if text is not None and text_tokenizer is not None:
            cap = caption_with_predictions(text_tokenizer, text[i].cpu(), pad[i].cpu(), out.text_mask[i].cpu(),
                                           out.text_logits[i].cpu())
            # Whole words only: a predicted word is shown as one [token] that must not be cut.
            axes[i, 1].set_xlabel(textwrap.fill(cap, 70, break_long_words=False, break_on_hyphens=False),
                                  fontsize=6.5)
    return save_figure(fig, path, dpi=110)


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path,
                    keys=("loss", "image_loss", "text_loss", "text_accuracy")) -> Path:
    """Plot the training metrics logged as JSON lines."""
    rows = [r for r in read_jsonl(metrics_jsonl) if "step" in r and "loss" in r]
    # A panel that is 0 throughout (the text panels of an image-only run) says nothing: omit it.
    keys = [k for k in keys if any(r.get(k) for r in rows)] or list(keys[:1])
    fig, axes = new_figure(1, len(keys), figsize=(3.3 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)
