"""Out-of-distribution detection: Mahalanobis distance and maximum softmax probability.

Convention: every score is a *confidence* -- higher means "more in-distribution". The
in-distribution test samples are the positives, so AUROC is the probability that a random
in-distribution sample scores above a random OOD one (ties count one half), and FPR@95 is
the fraction of OOD samples accepted at the threshold that accepts 95% of the
in-distribution ones (Hendrycks & Gimpel 2017; Lee et al. 2018; Fort et al. 2021).

Mahalanobis (Lee et al. 2018): class means and one covariance shared by all classes,
fitted on in-distribution training features; the confidence is ``-min_c (x - mu_c)^T
Sigma^-1 (x - mu_c)``. The covariance is the maximum-likelihood one (divided by N), and its
pseudo-inverse is used so that a feature dimension with no variance does not blow up.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..visualize import new_figure, save_figure


# ---------------------------------------------------------------------------- scores
@dataclass
class Mahalanobis:
    means: np.ndarray      # (C, D)
    precision: np.ndarray  # (D, D), pseudo-inverse of the shared covariance

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> Mahalanobis:
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if (y < 0).any():
            raise ValueError("Mahalanobis needs a class label for every in-distribution training sample")
        classes = np.unique(y)
        means = np.zeros((int(y.max()) + 1, x.shape[1]))
        centred = np.empty_like(x)
        for c in classes:
            means[c] = x[y == c].mean(0)
            centred[y == c] = x[y == c] - means[c]
        cov = centred.T @ centred / len(x)
        means = means[classes] if len(classes) != len(means) else means
        return cls(means, np.linalg.pinv(cov, hermitian=True))

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each sample to each class mean, (N, C)."""
        diff = np.asarray(features, dtype=np.float64)[:, None, :] - self.means[None]  # (N, C, D)
        return np.einsum("ncd,de,nce->nc", diff, self.precision, diff)

    def score(self, features: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """Confidence = minus the squared distance to the closest class mean, (N,)."""
        return np.concatenate([-self.distances(features[i:i + batch_size]).min(1)
                               for i in range(0, len(features), batch_size)])


def max_softmax(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    return torch.as_tensor(logits).float().softmax(-1).max(-1).values.numpy().astype(np.float64)


# --------------------------------------------------------------------------- metrics
def _targets(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(is in-distribution, score) for scikit-learn's metrics."""
    a, b = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("AUROC needs in-distribution and OOD scores")
    return np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (fpr, tpr, thresholds), thresholds decreasing from +inf, one point per distinct score,
    starting at (0, 0). In-distribution = positive; accept when score >= threshold."""
    from sklearn.metrics import roc_curve as sk_roc_curve  # imported when used: it takes a second

    return sk_roc_curve(*_targets(id_scores, ood_scores), drop_intermediate=False)


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve = P(score_id > score_ood) + P(equal) / 2 (Mann-Whitney U)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_targets(id_scores, ood_scores)))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the highest threshold that accepts at least ``tpr``
    of the in-distribution samples."""
    fprs, tprs, _ = roc_curve(id_scores, ood_scores)
    return float(fprs[np.searchsorted(tprs, tpr - 1e-12, side="left")])


# ---------------------------------------------------------------------------- driver
@dataclass
class OODResult:
    scores: dict  # name -> (id scores, ood scores)
    metrics: dict  # name -> {"auroc", "fpr95"}
    id_accuracy: float | None = None  # the MSP classifier's accuracy on the in-distribution test set


def ood_scores(id_train, id_test, ood_test, probe=None, probe_epochs: int = 90, seed: int = 0,
               id_logits=None, ood_logits=None) -> OODResult:
    """Mahalanobis and MSP confidences for :class:`~m3ae.evaluation.features.Features` sets.

    ``probe`` is a classifier over the same features (e.g. from
    :func:`~m3ae.evaluation.linear_probe.train_linear_probe`); without one a linear probe is
    trained on ``id_train`` for the MSP score. ``id_logits``/``ood_logits`` (e.g. of a
    fine-tuned :class:`~m3ae.evaluation.finetune.Classifier`) replace the probe's for MSP.
    """
    from .linear_probe import num_classes_of, topk_accuracy, train_linear_probe

    maha = Mahalanobis.fit(id_train.features, id_train.labels)
    if id_logits is None or ood_logits is None:
        if probe is None:
            probe = train_linear_probe(id_train, num_classes_of(id_train), epochs=probe_epochs, seed=seed)
        id_logits = probe.predict_logits(id_test.features)
        ood_logits = probe.predict_logits(ood_test.features)
    id_logits = torch.as_tensor(id_logits)
    scores = {
        "mahalanobis": (maha.score(id_test.features), maha.score(ood_test.features)),
        "msp": (max_softmax(id_logits), max_softmax(ood_logits)),
    }
    metrics = {k: {"auroc": auroc(*v), "fpr95": fpr_at_tpr(*v)} for k, v in scores.items()}
    acc = topk_accuracy(id_logits, id_test.labels, ks=(1,))["top1"] if (id_test.labels >= 0).all() else None
    return OODResult(scores, metrics, acc)


def plot_roc(result: OODResult, path: str | Path, title: str = "") -> Path:
    fig, ax = new_figure(figsize=(4.2, 4))
    for name, (a, b) in result.scores.items():
        fpr, tpr, _ = roc_curve(a, b)
        m = result.metrics[name]
        ax.plot(fpr, tpr, label=f"{name}: AUROC {m['auroc']:.3f}, FPR@95 {m['fpr95']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.axhline(0.95, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("false positive rate (OOD accepted)")
    ax.set_ylabel("true positive rate (in-dist. accepted)")
    ax.set_title(title or "OOD detection", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=130)
