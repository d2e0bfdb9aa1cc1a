"""Linear probing on frozen features, as in MAE and the paper, plus a kNN check.

The probe is ``BatchNorm1d(affine=False)`` followed by one linear layer (MAE's recipe: the
parameter-free BatchNorm whitens each feature so one learning rate suits every encoder; it
folds into the linear layer after training). It trains on cached features, so an epoch is a
few matrix products and runs in seconds on a CPU. Optimiser: SGD with momentum 0.9, no
weight decay, linear warm-up then cosine decay, as MAE (which uses LARS for its 16k batch;
at the small batches used here plain SGD behaves the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..optim import warmup_cosine
from .features import Features


class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE's probe initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    @torch.no_grad()
    def predict_logits(self, features: np.ndarray | torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        self.eval()
        x = torch.as_tensor(features, dtype=torch.float32)
        return torch.cat([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _check_labels(f: Features, what: str) -> None:
    if len(f) == 0:
        raise ValueError(f"the {what} features are empty")
    if (f.labels < 0).any():
        raise ValueError(f"{int((f.labels < 0).sum())} {what} samples have no label (.cls); a probe needs labels")


def num_classes_of(*sets: Features) -> int:
    n = max(int(f.labels.max()) + 1 for f in sets)
    names = next((f.class_names for f in sets if f.class_names), None)
    return max(n, len(names)) if names else n


def train_linear_probe(train: Features, num_classes: int | None = None, epochs: int = 90,
                       batch_size: int = 256, lr: float | None = None, base_lr: float = 0.1,
                       warmup_epochs: int = 10, weight_decay: float = 0.0, seed: int = 0,
                       progress: bool = False, desc: str = "linear probe") -> LinearProbe:
    """Fit a :class:`LinearProbe` on ``train``. ``lr`` defaults to ``base_lr * batch_size / 256``."""
    _check_labels(train, "training")
    num_classes = num_classes or num_classes_of(train)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(train.features, dtype=torch.float32)
    y = torch.as_tensor(train.labels, dtype=torch.long)
    probe = LinearProbe(x.shape[1], num_classes)
    lr = lr if lr is not None else base_lr * batch_size / 256
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    batch_size = min(batch_size, len(x))
    steps_per_epoch = max(1, len(x) // batch_size)  # drop the ragged last batch: BatchNorm needs > 1 row
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm))
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    for _ in tqdm(range(epochs), disable=not progress, desc=desc, unit="epoch", dynamic_ncols=True, leave=False):
        order = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = loss_fn(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


def topk_accuracy(logits: torch.Tensor, labels, ks=(1, 5)) -> dict[str, float]:
    """Fraction of samples whose label is among the k highest logits. A k >= the number of
    classes (other than 1) is left out: it would be 100% by construction."""
    labels = torch.as_tensor(labels)
    out = {}
    for k in ks:
        if k > 1 and k >= logits.shape[1]:
            continue
        hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
        out[f"top{k}"] = hit.float().mean().item()
    return out


@torch.no_grad()
def knn_classify(train: Features, test: Features, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Weighted kNN on cosine similarity (as in DINO): each of the ``k`` nearest training
    features votes for its class with weight ``exp(sim / temperature)``. -> class scores (N, C)."""
    num_classes = num_classes or num_classes_of(train, test)
    tr = nn.functional.normalize(torch.as_tensor(train.features, dtype=torch.float32), dim=1)
    te = nn.functional.normalize(torch.as_tensor(test.features, dtype=torch.float32), dim=1)
    ytr = torch.as_tensor(train.labels, dtype=torch.long)
    k = min(k, len(tr))
    scores = []
    for i in range(0, len(te), batch_size):
        sim, idx = (te[i:i + batch_size] @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, ytr[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


@dataclass
class ProbeResult:
    top1: float
    top5: float | None  # None with 5 classes or fewer (it would be 100%)
    knn_top1: float
    knn_top5: float | None
    num_train: int
    num_eval: int
    num_classes: int
    chance: float
    probe: LinearProbe = field(repr=False, default=None)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "probe"}


def probe_warmup_epochs(epochs: int) -> int:
    """MAE's (and the official README's) 10 warm-up epochs; short probes warm up for at most
    half their epochs so that some training happens at the peak LR."""
    return max(1, min(10, epochs // 2))


def linear_probe(train: Features, test: Features, epochs: int = 90, batch_size: int = 256,
                 lr: float | None = None, knn_k: int = 20, seed: int = 0, progress: bool = False,
                 desc: str = "linear probe") -> ProbeResult:
    """Train the probe on ``train`` and report top-1/top-5 of it and of kNN on ``test``."""
    _check_labels(test, "evaluation")
    c = num_classes_of(train, test)
    probe = train_linear_probe(train, c, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                               warmup_epochs=probe_warmup_epochs(epochs), progress=progress, desc=desc)
    acc = topk_accuracy(probe.predict_logits(test.features), test.labels)
    knn = topk_accuracy(knn_classify(train, test, knn_k, num_classes=c), test.labels)
    return ProbeResult(acc["top1"], acc.get("top5"), knn["top1"], knn.get("top5"), len(train), len(test), c,
                       1.0 / c, probe)
