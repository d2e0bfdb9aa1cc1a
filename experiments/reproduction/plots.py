"""The reproduction report's plots: the four claims side by side, and the probe and every
readout along pre-training (from :func:`.report.summarize`'s summary)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from m3ae.ops import POOLS


def make_plots(s: dict, docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = docs / "results"
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    c1 = s["claim1"]
    ax = axes[0]
    for i, (k, lab) in enumerate((("mae_top1", "MAE"), ("m3ae_top1", "M3AE"))):
        ax.bar(i, np.mean(c1[k]) if c1[k] else 0, color=("tab:gray", "tab:blue")[i], alpha=0.6)
        ax.scatter([i] * len(c1[k]), c1[k], color="k", s=12, zorder=3)
    if c1["chance"]:
        ax.axhline(c1["chance"], ls=":", color="r", lw=1, label="chance")
        ax.legend(fontsize=7)
    ax.set_xticks([0, 1], ["MAE", "M3AE"])
    ax.set_ylabel("Tiny-ImageNet val top-1 (%)")
    ax.set_title("1: linear probe (dots = seeds)", fontsize=9)
    for ax, key, xlabel, title in ((axes[1], "claim2", "paired fraction (0 = MAE)", "2: paired fraction"),
                                   (axes[2], "claim3", "text mask ratio", "3: text mask ratio")):
        pts = sorted((float(k), v) for k, v in s[key]["top1"].items() if v == v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{title} (seed {s['settings']['seeds'][0]})", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[3]
    keys = [k for k in s["claim4"] if not k.endswith("id_accuracy")]
    for j, (model, color) in enumerate((("mae", "tab:gray"), ("m3ae", "tab:blue"))):
        vals = [s["claim4"][k][model] for k in keys]
        xs = np.arange(len(keys)) + (j - 0.5) * 0.38
        ax.bar(xs, [np.mean(v) if v else 0 for v in vals], 0.38, color=color, alpha=0.6, label=model.upper())
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(keys)), [k.replace("ood_", "").replace("/", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("AUROC (%)")
    ax.axhline(50, ls=":", color="r", lw=1)
    ax.set_title("4: OOD detection", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"m3ae reproduction, {s['mode']} mode", fontsize=10)
    fig.tight_layout()
    path = out / f"{s['mode']}_claims.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths = [str(path)]
    if s.get("curve"):
        paths.append(plot_curve(s, out / f"{s['mode']}_curve.png"))
    if s.get("readout_curve"):
        paths.append(plot_readouts(s, out / f"{s['mode']}_readouts.png"))
    return paths


def plot_curve(s: dict, path: Path) -> str:
    """Probe top-1 against pre-training steps, one line per run, for every pool."""
    pools = [p for p in POOLS if any(p in s["curve"].get(k, {}) for k in ("mae", "m3ae"))]
    series = {f"linear probe on the {'CLS token' if pool == 'cls' else 'mean of image tokens'}":
              {kind: s["curve"].get(kind, {}).get(pool, {}) for kind in ("mae", "m3ae")} for pool in pools}
    return _plot_series(series, s["claim1"].get("chance"), path)


def plot_readouts(s: dict, path: Path) -> str:
    """Every readout against pre-training steps (MAE vs M3AE, one line per seed)."""
    series = {label: {kind: {step: v[kind] for step, v in c.items()} for kind in ("mae", "m3ae")}
              for label, c in s["readout_curve"].items()}
    return _plot_series(series, s["claim1"].get("chance"), path, columns=2)


def _plot_series(series: dict, chance, path: Path, columns: int = 0) -> str:
    """One panel per entry of ``series`` ({title: {kind: {step: [value per seed]}}})."""
    import matplotlib.pyplot as plt

    n = len(series)
    cols = columns or n
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, by_kind) in zip(axes.flat, series.items()):
        for kind, color, label in (("mae", "tab:gray", "MAE"), ("m3ae", "tab:blue", "M3AE")):
            pts = by_kind.get(kind, {})
            steps = sorted(pts, key=int)
            if not steps:
                continue
            runs = np.array([pts[k] for k in steps], dtype=float)  # (steps, seeds)
            x = [int(k) for k in steps]
            for j in range(runs.shape[1]):
                ax.plot(x, runs[:, j], "o-", color=color, alpha=0.35, lw=1, ms=3)
            ax.plot(x, runs.mean(1), "-", color=color, lw=2.2, label=f"{label} (mean of {runs.shape[1]} seeds)")
        if chance:
            ax.axhline(chance, ls=":", color="r", lw=1, label="chance")
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("Tiny-ImageNet val top-1 (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
