"""t-SNE of encoder features coloured by class (scikit-learn), several models side by side."""
from __future__ import annotations

from pathlib import Path
from ..visualize import new_figure, save_figure


def save_tsne(named_features: list, path: str | Path, class_names: list[str] | None = None,
              perplexity: float = 30.0, seed: int = 0, title: str = "") -> Path:
    """t-SNE (scikit-learn) of each ``(name, Features)`` in its own panel, coloured by class
    (e.g. M3AE and MAE side by side); ``title`` (e.g. the data set) goes above them."""
    import numpy as np
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    fig, axes = new_figure(1, len(named_features), figsize=(4.2 * len(named_features) + 1.2, 4), squeeze=False)
    for ax, (name, f) in zip(axes[0], named_features):
        perp = min(perplexity, max(2.0, (len(f) - 1) / 3))  # TSNE needs perplexity < n_samples
        xy = TSNE(2, perplexity=perp, init="pca", random_state=seed).fit_transform(f.features.astype(np.float64))
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=f.labels, cmap="tab10" if f.labels.max() < 10 else "tab20",
                        s=6, vmin=0, vmax=max(int(f.labels.max()), 1))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    names = class_names or named_features[0][1].class_names
    if names and len(names) <= 20:
        handles = [Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i)), label=c)
                   for i, c in enumerate(names)]
        axes[0, -1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=120)
