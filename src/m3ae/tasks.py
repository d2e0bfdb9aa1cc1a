"""What a trained M3AE can do with one image and a caption, each a few lines over the model.

* :func:`fill_mask` -- the words the model puts at each ``[MASK]`` of a caption, with or
  without the image (without it, the caption alone: the text-only answer to compare with);
* :func:`reconstruct` -- hide patches of an image and let the decoder fill them in, with and
  without the caption;
* :func:`zero_shot` -- rank class names by how well the model predicts them in a template,
  the scoring of ``m3ae zero-shot`` (:mod:`m3ae.evaluation.zero_shot`).

Images may be anything the model's transform takes (a PIL image, a uint8 (H, W, 3) array, a
uint8 (3, H, W) tensor) or an already normalised float tensor (3, H, W) / (B, 3, H, W).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .evaluation.zero_shot import build_prompt, class_scores, hidden_token_logits, masked_prompt, prompt_log_likelihood
from .factory import ImageTransform
from .model import M3AE
from .tokenizer import TextTokenizer

__all__ = ["fill_mask", "reconstruct", "zero_shot", "Reconstruction"]


def _require_tokenizer(tokenizer, task: str) -> None:
    """One line instead of an AttributeError deep inside, for a model folder without a tokenizer."""
    if tokenizer is None:
        raise ValueError(f"{task} needs the model's tokenizer, and it was given None (a model folder without "
                         "tokenizer.json: add one with `m3ae convert-official CHECKPOINT OUT --tokenizer VOCAB`, "
                         "or load one with m3ae.get_tokenizer(PATH))")


def _images(model: M3AE, image) -> torch.Tensor | None:
    """Anything the transform takes, or normalised floats -> (B, 3, S, S) on the model's device."""
    if image is None:
        return None
    device = next(model.parameters()).device
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != model.config.in_chans:
            raise ValueError(f"normalised images must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        return x.to(device)
    if isinstance(image, (list, tuple)):
        t = ImageTransform(model.config.image_size)
        return torch.stack([t(i) for i in image]).to(device)
    return ImageTransform(model.config.image_size)(image)[None].to(device)


@torch.no_grad()
def fill_mask(model: M3AE, tokenizer: TextTokenizer, image, text: str, top_k: int = 5
              ) -> list[list[tuple[str, float]]]:
    """For each ``[MASK]`` in ``text`` (left to right), the ``top_k`` words the model predicts
    there with their probabilities, given the image (``None``: the caption alone).

    Example: ``fill_mask(model, tokenizer, image, "a picture of a [MASK] circle")`` ->
    ``[[("red", 0.97), ...]]``. Each ``[MASK]`` is one token; the others are predicted
    together, each without seeing the rest. Only words the tokenizer can produce are ranked
    (never special tokens, nor ids past its vocabulary when the model's is larger); the
    probabilities are over those words.
    """
    _require_tokenizer(tokenizer, "fill_mask")
    if not isinstance(text, str):
        raise TypeError(f"fill_mask takes one caption (a str), got {type(text).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    model.eval()
    prompt = masked_prompt(tokenizer, text)
    x = _images(model, image)
    if x is not None and x.shape[0] != 1:
        raise ValueError(f"fill_mask takes one image, got {x.shape[0]}")
    logits = hidden_token_logits(model, x, prompt, 1)[0].float()  # (T, V)
    words = tokenizer.word_mask(logits.shape[-1]).to(logits.device)
    probs = logits.masked_fill(~words, float("-inf")).softmax(-1)
    out = []
    for pos in prompt.hidden.nonzero()[:, 0].tolist():
        p, ids = probs[pos].topk(min(top_k, int(words.sum())))
        out.append([(w, float(q)) for w, q in zip(tokenizer.decode_tokens(ids.tolist()), p.tolist())])
    return out


class Reconstruction(NamedTuple):
    """Pictures of :func:`reconstruct` (PIL images at the model's image size). The
    reconstructions show the visible patches as they were and the decoder's prediction in the
    hidden ones; ``with_caption`` is None when no caption was given."""

    original: object
    masked: object  # hidden patches grey
    without_caption: object
    with_caption: object | None


def _pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def reconstruct(model: M3AE, tokenizer: TextTokenizer | None, image, caption: str | None = None,
                mask_ratio: float = 0.75, seed: int = 0, *, norm_pix_loss: bool | None = None) -> Reconstruction:
    """Hide ``mask_ratio`` of the image's patches (a draw fixed by ``seed``) and reconstruct
    them, from the visible patches alone and, with ``caption`` (needs ``tokenizer``; None will
    do without one), from the visible patches and the whole caption: the same patches hidden
    in both. The arguments come in the order of :func:`fill_mask` and :func:`zero_shot`.

    ``norm_pix_loss``: whether the model predicts per-patch normalised pixels; None (default)
    reads it from the model (``model.norm_pix_loss``, recorded in its folder from
    ``train.norm_pix_loss``). The prediction is then shown in the input's patch statistics.
    """
    from .visualize import reconstruction_images

    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if caption is not None:
        _require_tokenizer(tokenizer, "reconstruct with a caption")
    x = _images(model, image)
    if x.shape[0] != 1:
        raise ValueError(f"reconstruct takes one image, got {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, model.config.num_patches, generator=g).to(x.device)
    out = model.reconstruct(x, image_mask_ratio=mask_ratio, image_noise=noise)
    original, masked, without = reconstruction_images(model, x, out, norm_pix_loss)
    with_caption = None
    if caption is not None:
        ids, pad = tokenizer(caption)
        out = model.reconstruct(x, ids.to(x.device), pad.to(x.device), image_mask_ratio=mask_ratio,
                                text_mask_ratio=0.0, image_noise=noise)
        with_caption = _pil(reconstruction_images(model, x, out, norm_pix_loss)[2][0])
    return Reconstruction(_pil(original[0]), _pil(masked[0]), _pil(without[0]), with_caption)


@torch.no_grad()
def zero_shot(model: M3AE, tokenizer: TextTokenizer, image, class_names: list[str],
              template: str = "a photo of a {}.", calibrate: bool = False, normalize: str = "mean"):
    """Class names ranked for an image: ``[(name, score), ...]`` best first, or one such list
    per image for a batch or a list of images.

    The score is ``m3ae zero-shot``'s: the mean log-likelihood of the name's tokens in
    ``template`` (``{}`` = the name; ``[MASK]`` = words the prompt cannot know), with the
    name hidden and the image visible. ``calibrate`` subtracts the same score with no image,
    so what counts is what the image adds.
    """
    _require_tokenizer(tokenizer, "zero_shot")
    if not class_names:
        raise ValueError("zero_shot needs at least one class name")
    model.eval()
    x = _images(model, image)
    prompts = [build_prompt(tokenizer, template, c) for c in class_names]
    scores = class_scores(model, x, prompts, normalize).float().cpu()
    if calibrate:
        scores = scores - torch.stack([prompt_log_likelihood(model, None, p, 1, normalize)[0]
                                       for p in prompts]).float().cpu()
    ranked = [sorted(zip(class_names, row.tolist()), key=lambda kv: -kv[1]) for row in scores]
    single = not isinstance(image, (list, tuple)) and not (isinstance(image, torch.Tensor) and image.dim() == 4)
    return ranked[0] if single else ranked
