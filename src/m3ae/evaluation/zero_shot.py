"""Zero-shot classification by reconstruction (beyond the paper).

For each class, the caption ``template.format(class name)`` goes in with the image; exactly
the class-name tokens are hidden from the encoder (the template tokens stay visible) and the
text head predicts them. The class score is the log-likelihood of its own tokens,

    score(c) = mean over the class tokens t of log p(t | image, visible template tokens),

i.e. normalised by the number of tokens (``normalize="sum"`` keeps the total, which favours
short names). The masked tokens are predicted together in one pass, each without seeing the
others, so for a multi-token name this is a pseudo-log-likelihood.

``[MASK]`` in the template marks extra positions that are hidden too but not scored: words
the caption would hold that the prompt cannot know (the built-in captions put a size and a
colour before the shape: ``"a picture of a [MASK] [MASK] {}"``).

``calibrate=True`` subtracts the same score computed with no image (the decoder's prior for
the class name in that template), so the score measures what the image adds: a pointwise
mutual information between image and class name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import model_inputs
from ..model import M3AE
from ..tokenizer import TextTokenizer

MASK_WORD = "[MASK]"


@dataclass
class Prompt:
    ids: torch.Tensor    # (T,) token ids, padded to the text encoder's length
    pad: torch.Tensor    # (T,) bool, True at padding
    hidden: torch.Tensor  # (T,) bool, positions hidden from the encoder
    scored: torch.Tensor  # (T,) bool, the class-name positions (a subset of ``hidden``)


def build_prompt(text_tokenizer: TextTokenizer, template: str, class_name: str) -> Prompt:
    """Tokenise ``template`` around ``class_name`` piece by piece, so the class tokens'
    positions are known exactly (BERT's pre-tokeniser splits at spaces and punctuation, so
    joining the pieces' ids gives the same ids as tokenising the whole caption)."""
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template must hold exactly one '{{}}', got {template!r}")
    before, after = template.split("{}")
    ids, hidden, scored = [], [], []

    def add(text: str, is_class: bool) -> None:
        for k, piece in enumerate(text.split(MASK_WORD)):
            if k > 0:  # a [MASK] placeholder: hidden, not scored; its id never reaches the encoder
                ids.append(text_tokenizer.mask_id if text_tokenizer.mask_id is not None else text_tokenizer.pad_id)
                hidden.append(True)
                scored.append(False)
            for t in text_tokenizer.ids(piece) if piece.strip() else []:
                ids.append(t)
                hidden.append(is_class)
                scored.append(is_class)

    add(before, False)
    add(class_name, True)
    add(after, False)
    n, length = len(ids), text_tokenizer.text_len
    if not any(scored):
        raise ValueError(f"class name {class_name!r} has no tokens")
    if n > length:
        raise ValueError(f"prompt for {class_name!r} has {n} tokens, more than the text length {length}")
    if not n - sum(hidden):
        raise ValueError(f"the template {template!r} leaves no caption token visible")
    out = torch.full((length,), text_tokenizer.pad_id, dtype=torch.long)
    out[:n] = torch.tensor(ids)
    pad = torch.arange(length) >= n
    h = torch.zeros(length, dtype=torch.bool)
    h[:n] = torch.tensor(hidden)
    s = torch.zeros(length, dtype=torch.bool)
    s[:n] = torch.tensor(scored)
    return Prompt(out, pad, h, s)


def masked_prompt(text_tokenizer: TextTokenizer, text: str) -> Prompt:
    """A caption with ``[MASK]`` placeholders -> a :class:`Prompt` whose hidden (and scored)
    positions are the placeholders, for predicting the words there (fill in the blank)."""
    if MASK_WORD not in text:
        raise ValueError(f"the prompt needs at least one {MASK_WORD} to fill in, got {text!r}")
    ids, hidden = [], []
    for k, piece in enumerate(text.split(MASK_WORD)):
        if k > 0:  # the id never reaches the encoder: the position is hidden
            ids.append(text_tokenizer.mask_id if text_tokenizer.mask_id is not None else text_tokenizer.pad_id)
            hidden.append(True)
        toks = text_tokenizer.tokenizer.encode(piece, add_special_tokens=False).ids if piece.strip() else []
        ids += toks
        hidden += [False] * len(toks)
    n, length = len(ids), text_tokenizer.text_len
    if n > length:
        raise ValueError(f"the prompt has {n} tokens, more than the model's caption length {length}")
    if all(hidden):
        raise ValueError(f"the prompt {text!r} leaves no caption token visible")
    out = torch.full((length,), text_tokenizer.pad_id, dtype=torch.long)
    out[:n] = torch.tensor(ids)
    h = torch.zeros(length, dtype=torch.bool)
    h[:n] = torch.tensor(hidden)
    return Prompt(out, torch.arange(length) >= n, h, h.clone())


@torch.no_grad()
def hidden_token_logits(model: M3AE, image: torch.Tensor | None, prompt: Prompt, batch: int) -> torch.Tensor:
    """Text-head logits (B, T, V) with exactly the prompt's hidden positions masked from the
    encoder (and the image, when given, fully visible)."""
    device = next(model.parameters()).device
    text = prompt.ids.to(device).expand(batch, -1)
    pad = prompt.pad.to(device).expand(batch, -1)
    n_valid = int((~prompt.pad).sum())
    n_hidden = int(prompt.hidden.sum())
    # Noise below 0.5 sorts first = kept; the mask ratio keeps exactly the visible tokens
    # (num_kept = floor(n_valid * (1 - ratio)) = n_valid - n_hidden).
    noise = torch.where(prompt.hidden, 0.75, 0.25).to(device).expand(batch, -1)
    ratio = n_hidden / n_valid
    out = model(image, text, pad, image_mask_ratio=0.0, text_mask_ratio=ratio, text_noise=noise)
    expected = prompt.hidden.to(device).expand(batch, -1)
    if not torch.equal(out.text_mask, expected):
        raise RuntimeError("internal error: the masked caption tokens are not the prompt's hidden tokens")
    return out.text_logits


@torch.no_grad()
def prompt_log_likelihood(model: M3AE, image: torch.Tensor | None, prompt: Prompt, batch: int,
                          normalize: str = "mean") -> torch.Tensor:
    """Score (B,) of the prompt's class tokens for each image (or for no image when None)."""
    logits = hidden_token_logits(model, image, prompt, batch)
    text = prompt.ids.to(logits.device).expand(batch, -1)
    logp = logits.float().log_softmax(-1).gather(-1, text[..., None])[..., 0]  # (B, T)
    scored = prompt.scored.to(logp.device).float()
    total = (logp * scored).sum(-1)
    if normalize == "mean":
        return total / scored.sum()
    if normalize == "sum":
        return total
    raise ValueError("normalize must be 'mean' or 'sum'")


def class_name_warnings(text_tokenizer: TextTokenizer, class_names: list[str]) -> list[str]:
    """Class names the tokenizer cannot represent well: with [UNK] pieces (the model cannot
    score them at all) or split into mostly single letters (words it never learnt)."""
    out = []
    for name in class_names:
        tokens = text_tokenizer.tokenizer.encode(name, add_special_tokens=False).tokens
        if "[UNK]" in tokens:
            out.append(f"class {name!r} tokenises to {tokens}: [UNK] pieces cannot be told apart, "
                       "so its score says little (a tokenizer trained on captions in its language helps)")
        elif len(tokens) >= 3 and 2 * sum(len(t.removeprefix("##")) == 1 for t in tokens) >= len(tokens):
            out.append(f"class {name!r} splits into letter pieces {tokens}: the tokenizer (and so the "
                       "model) never saw it as a word")
    return out


@dataclass
class ZeroShotResult:
    accuracy: float
    accuracy_calibrated: float
    chance: float
    majority: float  # accuracy of always predicting the most frequent class
    num_samples: int
    per_class_predictions: dict  # class name -> how often it was predicted (raw score)
    prompts: list[str]
    confusion: list  # [true class][predicted class] counts (raw score)
    warnings: list  # class names the tokenizer represents badly (see class_name_warnings)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def class_scores(model: M3AE, image: torch.Tensor, prompts: list[Prompt], normalize: str = "mean") -> torch.Tensor:
    """Scores (B, C) of one prompt per class (:func:`build_prompt`) for a batch of images."""
    return torch.stack([prompt_log_likelihood(model, image, p, image.shape[0], normalize) for p in prompts], dim=1)


@torch.no_grad()
def zero_shot_scores(model: M3AE, text_tokenizer: TextTokenizer, loader, class_names: list[str],
                     template: str = "a photo of a {}.", normalize: str = "mean",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (scores (N, C) with the image, prior (C,) with no image, labels (N,))."""
    model.eval()
    prompts = [build_prompt(text_tokenizer, template, c) for c in class_names]
    prior = torch.stack([prompt_log_likelihood(model, None, p, 1, normalize)[0] for p in prompts]).cpu()
    scores, labels = [], []
    total = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    with tqdm(total=total, disable=not progress, desc="zero-shot", unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            image = model_inputs(batch, next(model.parameters()).device)["image"]
            scores.append(class_scores(model, image, prompts, normalize).cpu())
            labels.append(batch["label"])
            bar.update(image.shape[0])
    return torch.cat(scores), prior, torch.cat(labels)


def zero_shot_classify(model: M3AE, text_tokenizer: TextTokenizer, loader, class_names: list[str],
                       template: str = "a photo of a {}.", normalize: str = "mean",
                       progress: bool = True) -> ZeroShotResult:
    """Accuracy of the best-scoring class name, raw and calibrated by the no-image prior."""
    scores, prior, labels = zero_shot_scores(model, text_tokenizer, loader, class_names, template, normalize, progress)
    if (labels < 0).any():
        raise ValueError("zero-shot accuracy needs a label for every sample")
    pred = scores.argmax(1)
    pred_cal = (scores - prior).argmax(1)
    counts = torch.bincount(labels, minlength=len(class_names))
    return ZeroShotResult(
        accuracy=(pred == labels).float().mean().item(),
        accuracy_calibrated=(pred_cal == labels).float().mean().item(),
        chance=1.0 / len(class_names), majority=(counts.max() / counts.sum()).item(),
        num_samples=len(labels),
        per_class_predictions={c: int((pred == i).sum()) for i, c in enumerate(class_names)},
        prompts=[template.format(c) for c in class_names],
        confusion=torch.bincount(labels * len(class_names) + pred, minlength=len(class_names) ** 2)
        .reshape(len(class_names), -1).tolist(),
        warnings=class_name_warnings(text_tokenizer, class_names))


def plot_confusion(result: ZeroShotResult, class_names: list[str], path, title: str = ""):
    """The zero-shot confusion matrix as a PNG (rows: true class, columns: predicted)."""
    from ..visualize import new_figure, save_figure

    c = torch.tensor(result.confusion, dtype=torch.float)
    share = (c / c.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(class_names)
    fig, ax = new_figure(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"zero-shot: {result.accuracy:.1%} (chance {result.chance:.1%})", fontsize=9)
    return save_figure(fig, path, dpi=120)
