"""Cross-modal attention pictures (the paper's Figs. 7-8).

The encoder sequence of an image+caption input is ``[CLS, patch_1..patch_L, word_1..word_T]``.
Attention weights are averaged over heads. ``layer="rollout"`` (the default) is attention
rollout (Abnar & Zuidema 2020): each layer's head-averaged map mixed half-and-half with the
identity for the residual path, ``A' = 0.5 A + 0.5 I``, and the layers multiplied from the
first to the last, so a row says how much each input token contributed to an output token
through every layer. An integer ``layer`` shows that single layer's map (0-based).

From a word to the image we take that word's row restricted to the patches and renormalise
it to sum to one over the patches (a word also attends to words and to CLS; the picture
asks only where in the image it looks). From a patch to the caption, the same over the
caption's real (non-padding) words.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import M3AE
from ..visualize import new_figure, save_figure


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer (B, heads, N, N) maps -> (B, N, N) rollout; every row sums to one."""
    out = None
    for a in maps:
        a = a.float().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


@torch.no_grad()
def token_attention(model: M3AE, image: torch.Tensor, text: torch.Tensor, text_padding_mask: torch.Tensor,
                    layer: str | int = "rollout") -> torch.Tensor:
    """(B, N, N) head-averaged attention for image+caption inputs: rollout or one layer."""
    model.eval()
    maps = model.attention_maps(image, text, text_padding_mask)
    if layer == "rollout":
        return attention_rollout(maps)
    layer = int(layer)
    if not -len(maps) <= layer < len(maps):
        raise ValueError(f"layer {layer} is out of range for an encoder of depth {len(maps)}")
    return maps[layer].float().mean(1)


def word_to_image(attn: torch.Tensor, num_patches: int, word_index: int) -> torch.Tensor:
    """(B, N, N) -> (B, num_patches): word ``word_index``'s attention over the patches, sums to 1."""
    row = attn[:, 1 + num_patches + word_index, 1:1 + num_patches]
    return row / row.sum(-1, keepdim=True).clamp_min(1e-12)


def patch_to_text(attn: torch.Tensor, num_patches: int, patch_index: int,
                  text_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, N, N) -> (B, T): patch ``patch_index``'s attention over the real caption words, sums to 1."""
    row = attn[:, 1 + patch_index, 1 + num_patches:].masked_fill(text_padding_mask, 0.0)
    return row / row.sum(-1, keepdim=True).clamp_min(1e-12)


# Words that say little about where to look in the image (the default --word skips them).
STOP_WORDS = frozenset("a an the of on in at to and or with is are its it this that by for from as".split())


def last_content_word(tokens: list[str]) -> int | None:
    """Index of the first piece of the caption's last word that is not punctuation or a stop
    word ("a red circle on the left." -> "left"), or None when there is none."""
    starts = [i for i, t in enumerate(tokens) if not t.startswith("##")]
    for i in reversed(starts):
        end = next((j for j in starts if j > i), len(tokens))
        word = tokens[i] + "".join(t[2:] for t in tokens[i + 1:end])
        if any(ch.isalnum() for ch in word) and word.lower() not in STOP_WORDS:
            return i
    return None


def find_word(text_tokenizer, ids: torch.Tensor, pad: torch.Tensor, word: str) -> int | None:
    """Position of the first token of ``word`` in one caption, or None."""
    target = text_tokenizer.ids(word)
    seq = ids[~pad].tolist()
    for i in range(len(seq) - len(target) + 1):
        if target and seq[i:i + len(target)] == target:
            return i
    return None


def save_attention_figure(model: M3AE, text_tokenizer, batch: dict, path: str | Path, word: str | None = None,
                          patch: int | None = None, layer: str | int = "rollout", n: int = 4) -> Path:
    """One row per sample: the image, the chosen word's attention over it as a heat map, and
    the chosen patch's attention over the caption as shaded words.

    ``word`` defaults to each caption's last content word (:func:`last_content_word`);
    ``patch`` (row-major index) to the centre."""
    from matplotlib.patches import Rectangle

    from ..data.transforms import denormalize

    if batch.get("text") is None:
        raise ValueError("attention pictures need captions (image+text inputs)")
    device = next(model.parameters()).device
    image, text, pad = (batch[k][:n].to(device) for k in ("image", "text", "text_padding_mask"))
    cfg = model.config
    g = cfg.grid_size
    patch = g * (g // 2) + g // 2 if patch is None else int(patch)
    if not 0 <= patch < cfg.num_patches:
        raise ValueError(f"patch must be in [0, {cfg.num_patches}), got {patch}")
    attn = token_attention(model, image, text, pad, layer)
    p2t = patch_to_text(attn, cfg.num_patches, patch, pad).cpu()
    pixels = denormalize(image).cpu()
    how = "rollout" if layer == "rollout" else f"layer {layer}"
    rows = image.shape[0]
    fig, axes = new_figure(rows, 3, figsize=(9, 2.6 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for i in range(rows):
        tokens = text_tokenizer.decode_tokens(text[i][~pad[i]].cpu())
        w = find_word(text_tokenizer, text[i].cpu(), pad[i].cpu(), word) if word else last_content_word(tokens)
        img = pixels[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img)
        py, px = divmod(patch, g)
        axes[i, 0].add_patch(Rectangle((px * cfg.patch_size - 0.5, py * cfg.patch_size - 0.5),
                                       cfg.patch_size, cfg.patch_size, fill=False, ec="cyan", lw=1.5))
        axes[i, 0].set_title("image (patch in cyan)", fontsize=8)
        axes[i, 1].imshow(img)
        if w is None:
            axes[i, 1].set_title(f"'{word}' not in caption" if word else "no content word", fontsize=8)
        else:
            heat = word_to_image(attn[i:i + 1], cfg.num_patches, w)[0].reshape(g, g).cpu().numpy()
            im = axes[i, 1].imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, cfg.image_size - 0.5,
                                                                        cfg.image_size - 0.5, -0.5))
            # The weights over the patches sum to 1: the bar shows the share each patch gets.
            fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            axes[i, 1].set_title(f"'{tokens[w]}' -> image ({how})", fontsize=8)
        ax = axes[i, 2]
        ax.axis("off")
        ax.set_title(f"patch {patch} -> words ({how})", fontsize=8)
        weights = p2t[i][~pad[i].cpu()]
        top = float(weights.max()) or 1.0
        x, y = 0.0, 0.85
        for tok, a in zip(tokens, weights.tolist()):
            shown = tok[2:] if tok.startswith("##") else tok
            if x > 0.8:
                x, y = 0.0, y - 0.18
            t = ax.text(x, y, shown, fontsize=8, transform=ax.transAxes,
                        bbox=dict(facecolor=(1, 0, 0, a / top), edgecolor="none", pad=1.5))
            fig.canvas.draw()  # needed for the text extent
            bb = t.get_window_extent().transformed(ax.transAxes.inverted())
            x += bb.width + 0.02
        for a_ in axes[i, :2]:
            a_.set_xticks([])
            a_.set_yticks([])
    return save_figure(fig, path, dpi=120)
