"""Fine-tuning the encoder for classification: the whole encoder or only its last k blocks
(the paper's partial fine-tuning), with layer-wise LR decay, label smoothing and the usual
augmentation (random resized crop + horizontal flip, from :func:`load_labelled(train=True)`).

The classifier is the pretrained encoder (the decoder is dropped from the optimiser) with
a linear head on the CLS feature. Layer-wise decay scales block ``i``'s LR by
``layer_decay ** (depth + 1 - layer_id)`` with ``layer_id`` from :meth:`M3AE.group_matcher`
(0 = embeddings, i+1 = block i, depth+1 = final norm and head), as BEiT and MAE do. AdamW,
warm-up then cosine decay; no weight decay on biases, norms, tokens and embedding tables.

The official recipe's regularisers come from torchvision: Mixup and CutMix on each batch
(``transforms.v2.MixUp`` / ``CutMix``, one of the two per batch, CutMix with probability
``switch_prob``; the targets become class probabilities), stochastic depth in the encoder
(``torchvision.ops.StochasticDepth``, rising to ``drop_path`` at the last block) and
RandAugment in the data (:func:`m3ae.evaluation.data.load_labelled`). The defaults are the
official fine-tuning command's: mixup 0.8, cutmix 1.0, switch prob 0.5, label smoothing 0.1,
drop path 0.1, RandAugment 2 ops at magnitude 9.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..data import model_inputs
from ..io import atomic_write, save_safetensors
from ..model import M3AE
from .. import optim
from ..optim import warmup_cosine
from .features import pool_tokens


class Classifier(nn.Module):
    """Encoder of an :class:`M3AE` + linear head on the pooled (CLS or mean) image feature."""

    def __init__(self, model: M3AE, num_classes: int, pool: str = "cls", class_names=None):
        super().__init__()
        self.model, self.pool, self.class_names = model, pool, class_names
        self.head = nn.Linear(model.config.emb_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head starts from uniform logits
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(pool_tokens(self.model.forward_features(image), None, self.pool))

    def no_weight_decay(self) -> set[str]:
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    def layer_id(self, name: str) -> int:
        """Layer for layer-wise LR decay (:meth:`M3AE.group_matcher`; the head is the last),
        or -1 for what classifying does not use (decoder, heads, mask tokens): never trained."""
        if not name.startswith("model."):
            return self.model.config.depth + 1
        inner = name[len("model."):]
        if not inner.startswith(("patch_embed", "text_embed", "cls_token", "encoder")) or "decoder" in inner:
            return -1
        return self.model.group_matcher(inner)

    def save(self, directory: str | Path) -> Path:
        """``classifier.safetensors`` + ``classifier.json`` (model config, classes, pooling)."""
        from dataclasses import asdict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith(("model.decoder", "model.image_head", "model.text_head"))}
        save_safetensors(state, directory / "classifier.safetensors")
        atomic_write(directory / "classifier.json", json.dumps(
            {"model": asdict(self.model.config), "num_classes": self.head.out_features, "pool": self.pool,
             "class_names": self.class_names}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str = "cpu") -> Classifier:
        from ..config import ModelConfig

        directory = Path(directory)
        if not (directory / "classifier.json").is_file():
            raise FileNotFoundError(f"{directory} is not a fine-tuned classifier folder (no classifier.json)")
        meta = json.loads((directory / "classifier.json").read_text())
        clf = cls(M3AE(ModelConfig(**meta["model"])), meta["num_classes"], meta["pool"], meta["class_names"])
        missing, unexpected = clf.load_state_dict(load_file(str(directory / "classifier.safetensors"),
                                                            device=map_location), strict=False)
        if unexpected or any(not k.startswith(("model.decoder", "model.image_head", "model.text_head",
                                               "model.image_mask", "model.text_mask", "model.decoder_"))
                             for k in missing):
            raise ValueError(f"{directory}: classifier weights do not fit (missing {missing}, unexpected {unexpected})")
        return clf.eval()

    @torch.no_grad()
    def predict_logits_loader(self, loader, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        self.eval()
        device = next(self.parameters()).device
        logits, labels = [], []
        for batch in tqdm(loader, disable=not progress, desc="classify"):
            logits.append(self(model_inputs(batch, device)["image"]).float().cpu())
            labels.append(batch["label"])
        return torch.cat(logits), torch.cat(labels)


def freeze_and_group(clf: Classifier, lr: float, weight_decay: float, layer_decay: float,
                     last_blocks: int | None) -> list[dict]:
    """Freezes what is not fine-tuned, then groups the trainable parameters by (LR scale, weight
    decay) with pre-training's decay rule (:func:`m3ae.optim.param_groups`). ``last_blocks=k``
    trains only the last k blocks, the final norm and the head; ``None`` the whole encoder."""
    depth = clf.model.config.depth
    for name, p in clf.named_parameters():
        p.requires_grad_(clf.layer_id(name) >= (0 if last_blocks is None else depth + 1 - last_blocks))
    groups = optim.param_groups(clf, weight_decay, lr_scale=lambda name: layer_decay ** (depth + 1 - clf.layer_id(name)))
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def batch_mixer(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5):
    """``(images, labels) -> (mixed images, target probabilities (B, C))``, or None when both
    alphas are 0. Mixup and CutMix with Beta(alpha, alpha) weights; with both on, CutMix is
    chosen with probability ``switch_prob`` for each batch."""
    from torchvision.transforms import v2

    if mixup < 0 or cutmix < 0 or not 0 <= switch_prob <= 1:
        raise ValueError(f"mixup and cutmix must be >= 0 and switch_prob in [0, 1], got {mixup}, {cutmix}, {switch_prob}")
    ops = []
    if mixup > 0:
        ops.append((v2.MixUp(alpha=mixup, num_classes=num_classes), 1 - switch_prob))
    if cutmix > 0:
        ops.append((v2.CutMix(alpha=cutmix, num_classes=num_classes), switch_prob))
    if not ops:
        return None
    if len(ops) == 1:
        return ops[0][0]
    return v2.RandomChoice([op for op, _ in ops], p=[p for _, p in ops])


@dataclass
class FinetuneResult:
    top1: float
    top5: float | None  # None with 5 classes or fewer (it would be 100%)
    history: list = field(default_factory=list)
    classifier: Classifier = field(default=None, repr=False)
    chance: float | None = None

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "chance": self.chance, "history": self.history}


def finetune(model: M3AE, train_loader, val_loader, num_classes: int, *, last_blocks: int | None = None,
             epochs: int = 10, batch_size: int | None = None, base_lr: float = 5e-4, lr: float | None = None,
             layer_decay: float = 0.75, weight_decay: float = 0.05, label_smoothing: float = 0.1,
             warmup_epochs: float = 1.0, pool: str = "cls", class_names=None, grad_clip: float = 0.0,
             mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5, drop_path: float = 0.1,
             progress: bool = True, seed: int = 0, steps: int | None = None, warmup_steps: int | None = None,
             betas: tuple[float, float] = (0.9, 0.999), run_dir: str | Path | None = None, save_at=(),
             ckpt_every: int = 0, max_steps: int | None = None) -> FinetuneResult:
    """Fine-tune on ``train_loader`` (augmented batches), report top-1/top-5 on ``val_loader``
    after each epoch. ``lr`` defaults to ``base_lr * batch_size / 256`` (MAE's scaling).
    ``mixup`` / ``cutmix``: Beta alphas (0 = off); ``drop_path``: the encoder's stochastic
    depth at its last block during fine-tuning (the model keeps it, inactive in eval mode).

    ``steps`` trains that many optimiser steps instead of ``epochs`` (with ``warmup_steps``),
    measuring ``val_loader`` at each step of ``save_at`` and at the end rather than after each
    epoch. With ``run_dir`` the run is resumable: its state (classifier, optimiser, step, data
    position) is written to ``run_dir/state`` every ``ckpt_every`` steps and at each step of
    ``save_at``, where the encoder is also saved as a pretrained folder ``run_dir/step_N``
    (so it can be probed like any model); calling again with the same ``run_dir`` continues
    from the saved state, exactly when the loader is indexable (its order and augmentation come
    from the step, see :func:`m3ae.evaluation.data.make_loader`). ``max_steps`` stops early
    (the LR schedule still follows ``steps``), as :func:`m3ae.training.pretrain` does."""
    from .linear_probe import topk_accuracy

    torch.manual_seed(seed)
    if last_blocks is not None and not 0 <= last_blocks <= model.config.depth:
        raise ValueError(f"last_blocks must be in [0, {model.config.depth}], got {last_blocks}")
    device = next(model.parameters()).device
    model.set_drop_path(drop_path)
    mixer = batch_mixer(num_classes, mixup, cutmix, switch_prob)
    clf = Classifier(model, num_classes, pool, class_names).to(device)
    batch_size = batch_size or train_loader.batch_size
    lr = lr if lr is not None else base_lr * batch_size / 256
    opt = torch.optim.AdamW(freeze_and_group(clf, lr, weight_decay, layer_decay, last_blocks), lr=lr, betas=betas)
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        raise ValueError("fine-tuning needs a dataset of known size; for WebDataset shards pass a limit "
                         "(the number of training samples)") from None
    if steps is None:
        total, warm = max(1, epochs * steps_per_epoch), warmup_epochs * steps_per_epoch
    else:
        total, warm = steps, warmup_steps if warmup_steps is not None else warmup_epochs * steps_per_epoch
    save_at = sorted({int(s) for s in save_at if 0 < int(s) <= total})
    state = _FinetuneState(run_dir, train_loader) if run_dir is not None else None
    # ``loss_sum``: the training loss summed (times samples) since the last measurement.
    history, step, loss_sum = state.load(clf, opt) if state else ([], 0, [0.0, 0])
    end = total if max_steps is None else min(total, max_steps)

    def measure(**where) -> None:
        logits, labels = clf.predict_logits_loader(val_loader)
        clf.train()
        history.append({**where, "train_loss": loss_sum[0] / max(loss_sum[1], 1), **topk_accuracy(logits, labels)})
        loss_sum[:] = [0.0, 0]

    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    with tqdm(total=end, initial=step, disable=not progress, desc="finetune", dynamic_ncols=True) as bar:
        while step < end:
            clf.train()
            for batch in train_loader:
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"] * warmup_cosine(step, total, warm)
                loss, n = _train_step(clf, opt, batch, loss_fn, mixer, grad_clip)
                step += 1
                bar.update(1)
                loss_sum[0] += loss * n
                loss_sum[1] += n
                if steps is not None and (step in save_at or step == total):
                    measure(step=step)
                    if state:
                        clf.model.save_pretrained(state.dir / f"step_{step}")
                if state and (step in save_at or step == end or (ckpt_every and step % ckpt_every == 0)):
                    state.save(clf, opt, step, history, loss_sum)
                if step >= end:
                    break
            if steps is None and step % steps_per_epoch == 0:  # epoch mode: measured after every epoch
                measure(epoch=step // steps_per_epoch)
    last = history[-1] if history else {"top1": float("nan")}
    return FinetuneResult(last["top1"], last.get("top5"), history, clf.eval(), 1.0 / num_classes)


def _train_step(clf: Classifier, opt, batch: dict, loss_fn, mixer, grad_clip: float) -> tuple[float, int]:
    """One optimiser step on ``batch`` -> (its loss, its number of images)."""
    device = next(clf.parameters()).device
    image, target = model_inputs(batch, device)["image"], batch["label"].to(device)
    if mixer is not None:
        image, target = mixer(image, target)  # target: (B, C) class probabilities
    loss = loss_fn(clf(image), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    return loss.item(), len(image)


class _FinetuneState:
    """A fine-tuning run's resumable state in ``run_dir/state``: the classifier and optimiser
    (torch.save), the step, the history, the loader's position and torch's CPU RNG. Written atomically, so an
    interrupted run continues from its last save."""

    def __init__(self, run_dir: str | Path, loader):
        if not hasattr(loader, "state_dict") or not hasattr(getattr(loader, "sampler", None), "epoch"):
            raise ValueError("a resumable fine-tuning run (run_dir) needs an indexable dataset with the "
                             "seeded sampler of make_loader(shuffle=True): an image folder or a cache folder")
        self.dir, self.loader = Path(run_dir), loader
        self.path = self.dir / "state"

    def load(self, clf: Classifier, opt) -> tuple[list, int, list]:
        if not self.path.is_file():
            return [], 0, [0.0, 0]
        st = torch.load(self.path, map_location=next(clf.parameters()).device, weights_only=False)
        clf.load_state_dict(st["classifier"])
        opt.load_state_dict(st["optimizer"])
        self.loader.load_state_dict(st["data"])
        torch.set_rng_state(st["rng"])  # drop path and Mixup/CutMix draw from it
        return st["history"], st["step"], st["loss_sum"]

    def save(self, clf: Classifier, opt, step: int, history: list, loss_sum: list) -> None:
        st = {"classifier": clf.state_dict(), "optimizer": opt.state_dict(), "step": step, "history": history,
              "loss_sum": list(loss_sum),
              "data": self.loader.state_dict(), "rng": torch.get_rng_state()}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: torch.save(st, tmp))
