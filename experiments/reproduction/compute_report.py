"""The report of experiments/compute_curve.py: tables, verdicts and a plot from its readout JSON.

Every number comes from ``readouts/<run>/step_<N>.json``; a budget that not every seed has
reached yet is shown with the seeds it has and no verdict. The verdict rule is the
reproduction's (:func:`m3ae.reports.stats.compare_strict`: every M3AE seed above every MAE seed
and a mean gap of at least 3x the larger seed standard deviation), applied at every budget,
readout and layer; the page says how many comparisons that makes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from m3ae.io import atomic_write
from m3ae.reports.stats import compare_strict, gap_stats, seeds_cell

# (label, probe key, field): the six readouts of every checkpoint.
READOUTS = (("linear, CLS", "cls", "top1"), ("linear, mean", "mean", "top1"), ("kNN, CLS", "cls", "knn_top1"),
            ("kNN, mean", "mean", "knn_top1"), ("10-shot, CLS", "cls/fewshot", "top1"),
            ("10-shot, mean", "mean/fewshot", "top1"))
KINDS = ("mae", "m3ae", "supervised")
SECTION = ("<!-- compute-curve:start -->", "<!-- compute-curve:end -->")
# One line near the top of results.md, so that a reader of the 650-step page learns the scaled result.
POINTER = "<!-- compute-curve:pointer -->"
MILESTONES = (650, 1300, 2600, 5200, 10400)  # the study's read-out steps (compute_curve.Study)


def load(published: Path) -> dict:
    """-> ``{kind: {step: {seed: readout}}}``."""
    out: dict = {k: {} for k in KINDS}
    for path in sorted((published / "readouts").glob("*/step_*.json")):
        r = json.loads(path.read_text())
        out[r["kind"]].setdefault(r["step"], {})[r["seed"]] = r
    return out


def values(runs: dict, kind: str, step: int, get) -> list[float]:
    """One number per seed (in seed order), in percent; seeds without it are left out."""
    found = [get(r) for _, r in sorted(runs[kind].get(step, {}).items())]
    return [100 * v for v in found if v is not None]


def probe_value(key: str, field: str):
    return lambda r: r["probes"].get(key, {}).get(field)


def layer_value(layer: str, pool: str, field: str = "top1"):
    return lambda r: r.get("layers", {}).get(layer, {}).get(pool, {}).get(field)


def verdict(m3ae: list[float], mae: list[float], seeds: int = 3) -> str:
    if len(m3ae) < seeds or len(mae) < seeds:
        return f"(partial: {len(mae)} MAE / {len(m3ae)} M3AE seeds)"
    return compare_strict(m3ae, mae)


def _gap(m3ae: list[float], mae: list[float]) -> str:
    if not m3ae or not mae:
        return "–"
    g = gap_stats(m3ae, mae)
    return f"{g['gap']:+.2f}"


def budget_table(runs: dict) -> tuple[list[str], list[tuple]]:
    """Markdown lines of the per-budget table, and every (budget, readout, verdict) made."""
    steps = sorted({s for k in ("mae", "m3ae") for s in runs[k]})
    lines = ["| steps | readout | MAE | M3AE | gap | supervised | verdict (M3AE > MAE) |",
             "|---|---|---|---|---|---|---|"]
    made = []
    for step in steps:
        for label, key, field in READOUTS:
            mae, m3ae = (values(runs, k, step, probe_value(key, field)) for k in ("mae", "m3ae"))
            sup = values(runs, "supervised", step, probe_value(key, field))
            v = verdict(m3ae, mae)
            made.append((step, label, v))
            lines.append(f"| {step:,} | {label} | {seeds_cell(mae, 2)} | {seeds_cell(m3ae, 2)} | {_gap(m3ae, mae)} | "
                         f"{seeds_cell(sup, 2)} | {v} |")
    return lines, made


def layer_table(runs: dict) -> tuple[list[str], list[tuple]]:
    steps = sorted({s for k in ("mae", "m3ae") for s, by_seed in runs[k].items()
                    if any("layers" in r for r in by_seed.values())})
    lines, made = [], []
    for step in steps:
        layers = next(r["layers"] for k in ("mae", "m3ae") for r in runs[k].get(step, {}).values() if "layers" in r)
        lines += [f"**Step {step:,}** (linear probe top-1 %, kNN in brackets for the seed means)", "",
                  "| layer | pool | MAE | M3AE | gap | supervised | verdict |", "|---|---|---|---|---|---|---|"]
        for layer in layers:
            for pool in ("cls", "mean"):
                mae, m3ae = (values(runs, k, step, layer_value(layer, pool)) for k in ("mae", "m3ae"))
                sup = values(runs, "supervised", step, layer_value(layer, pool))
                knn = [values(runs, k, step, layer_value(layer, pool, "knn_top1")) for k in ("mae", "m3ae")]
                v = verdict(m3ae, mae)
                if layer != "final":  # the final output is the budget table's linear row: not counted twice
                    made.append((step, f"{layer}/{pool}", v))
                k_mae, k_m3ae = (f" [{sum(k) / len(k):.2f}]" if k else "" for k in knn)
                lines.append(f"| {layer} | {pool} | {seeds_cell(mae, 2)}{k_mae} | {seeds_cell(m3ae, 2)}{k_m3ae} | "
                             f"{_gap(m3ae, mae)} | {seeds_cell(sup, 2)} | {v} |")
        lines.append("")
    return lines, made


def caption_lines(runs: dict) -> list[str]:
    lines = ["| steps | hidden caption words right, with the image | image removed | difference |",
             "|---|---|---|---|"]
    for step, by_seed in sorted(runs["m3ae"].items()):
        w = [100 * r["caption_diag"]["with_image"]["accuracy"] for _, r in sorted(by_seed.items())]
        wo = [100 * r["caption_diag"]["without_image"]["accuracy"] for _, r in sorted(by_seed.items())]
        lines.append(f"| {step:,} | {seeds_cell(w)} | {seeds_cell(wo)} | {seeds_cell([a - b for a, b in zip(w, wo)])} |")
    return lines


def own_head_lines(runs: dict) -> list[str]:
    lines = ["| steps | its own head, val top-1 % | linear probe of its CLS | seeds |", "|---|---|---|---|"]
    for step, by_seed in sorted(runs["supervised"].items()):
        own = [100 * r["own_head"]["top1"] for _, r in sorted(by_seed.items()) if r.get("own_head")]
        probe = values(runs, "supervised", step, probe_value("cls", "top1"))
        lines.append(f"| {step:,} | {seeds_cell(own, 2)} | {seeds_cell(probe, 2)} | {len(by_seed)} |")
    return lines


def ood_lines(runs: dict) -> list[str]:
    final = max((s for k in ("mae", "m3ae") for s, by in runs[k].items() if any("ood_far" in r for r in by.values())),
                default=None)
    if final is None:
        return ["Not measured yet (at the last step only)."]
    lines = ["| set | score | MAE AUROC | M3AE AUROC | verdict |", "|---|---|---|---|---|"]
    for where in ("ood_far", "ood_near"):
        for score in ("mahalanobis", "msp"):
            get = lambda r: r.get(where, {}).get("metrics", {}).get(score, {}).get("auroc")  # noqa: E731
            mae, m3ae = (values(runs, k, final, get) for k in ("mae", "m3ae"))
            v = verdict(m3ae, mae)
            if mae and m3ae and max(mae + m3ae) < 50:  # a "win" between two detectors worse than a coin
                v += "; both below chance (AUROC 50)"
            lines.append(f"| {where[4:]} | {score} | {seeds_cell(mae, 1)} | {seeds_cell(m3ae, 1)} | {v} |")
    return lines


def plot(runs: dict, path: Path) -> Path:
    """Top-1 against steps (log scale) for MAE, M3AE and the supervised ceiling, seed
    ranges as bands, one panel per readout."""
    from m3ae.visualize import new_figure, save_figure

    fig, axes = new_figure(2, 3, figsize=(13, 7))
    colours = {"mae": "tab:blue", "m3ae": "tab:red", "supervised": "tab:gray"}
    for ax, (label, key, field) in zip(axes.flat, READOUTS):
        for kind in KINDS:
            steps = sorted(runs[kind])
            per = [values(runs, kind, s, probe_value(key, field)) for s in steps]
            xs = [s for s, v in zip(steps, per) if v]
            if not xs:
                continue
            means = [sum(v) / len(v) for v in per if v]
            ax.plot(xs, means, "o-", color=colours[kind], label=kind.upper() if kind != "supervised" else
                    "supervised (probe of its features)")
            ax.fill_between(xs, [min(v) for v in per if v], [max(v) for v in per if v], color=colours[kind],
                            alpha=0.2)
        if key == "cls" and field == "top1" and runs["supervised"]:
            steps = sorted(runs["supervised"])
            own = [[100 * r["own_head"]["top1"] for r in runs["supervised"][s].values() if r.get("own_head")]
                   for s in steps]
            xs = [s for s, v in zip(steps, own) if v]
            ax.plot(xs, [sum(v) / len(v) for v in own if v], "s--", color="black", label="supervised, own head")
        ax.set_xscale("log")
        ax.set_xticks(MILESTONES, [f"{m:,}" for m in MILESTONES])
        ax.minorticks_off()
        ax.set_xlim(MILESTONES[0] / 1.3, MILESTONES[-1] * 1.3)  # the planned range, reached or not
        ax.set_title(label)
        ax.set_xlabel("pre-training steps (batch 128)")
        ax.set_ylabel("top-1 %")
    axes.flat[0].legend(fontsize=8)
    return save_figure(fig, path)


def page(runs: dict, png: str, readouts: str) -> str:
    """The section's Markdown; ``png`` and ``readouts`` are links relative to where it is written."""
    table, made = budget_table(runs)
    layers, made_layers = layer_table(runs)
    every = made + made_layers
    wins = [f"{label} at {step:,}" for step, label, v in every if v.startswith("reproduced (")]
    done = [v for _, _, v in every if not v.startswith("(partial")]
    last = max((s for s in runs["m3ae"]), default=None)
    return "\n".join([
        "## Claim 1 across compute", "",
        "MAE and M3AE (the standard mode's tiny ViT, 64 px, 20,000 Tiny-ImageNet-100 caption pairs, batch 128, "
        "paper defaults: mask 0.75 for both, text loss weight 0.5), three seeds each, every run one cosine "
        "schedule to 10,400 steps read out on the way; a supervised ceiling (the same encoder trained on the "
        "labels of the same images, same augmentation, optimiser and schedule) beside them: seed 0 to "
        "10,400 steps, seeds 1 and 2 on the same schedule to 2,600 for its spread. A readout before "
        "step 10,400 is taken mid-schedule (warm-up ends at step 693; the LR is annealed only at the end), "
        "as a user stopping early would have it. "
        "Made by `python experiments/compute_curve.py --report` from the JSON in "
        f"[docs/results/compute_curve/]({readouts}).", "",
        f"![top-1 against steps]({png})", "",
        f"Comparisons made: {len(every)} ({len(made)} budget x readout, {len(made_layers)} block x pool; the "
        "`final` layer rows repeat the linear rows and are not counted again); "
        f"{len(done)} with all seeds in, {len(wins)} of them clear wins for M3AE (every seed above every MAE "
        f"seed and a gap of at least 3x the larger seed std){': ' + ', '.join(wins) if wins else ''}. Under "
        "no difference at all, each comparison has a 1 in 20 chance of every M3AE seed landing above every "
        "MAE seed (3 against 3), and neighbouring layers and readouts are correlated: read a single win "
        "with that in mind. Latest budget with M3AE readouts: "
        f"{last if last is None else f'{last:,}'} steps.", "",
        "### The gap at each budget", "", *table, "",
        "### The probe at every layer", "",
        "Each block's output (its residual stream) and the final normalised output (`final`, what the rows "
        "above probe), CLS and mean of the image tokens.", "", *layers,
        "### Caption diagnostic (M3AE)", "",
        "Hidden caption words predicted with the image and with it removed (same captions, same masks): how "
        "much of what the text head knows comes through the image.", "", *caption_lines(runs), "",
        "### The supervised ceiling", "", *own_head_lines(runs), "",
        "### OOD at the last step (claim 4)", "", *ood_lines(runs), ""])


def report(published: Path, docs: Path) -> Path:
    """Write ``docs/results/compute_curve.md`` and its plot, and the same section at the end of
    ``docs/results.md`` between :data:`SECTION`'s markers (replacing an older one) -> the page."""
    runs = load(published)
    png = plot(runs, docs / "results" / "compute_curve.png")
    out = atomic_write(docs / "results" / "compute_curve.md", page(runs, "compute_curve.png", "compute_curve/"))
    results = docs / "results.md"
    if results.is_file():
        section = f"{SECTION[0]}\n{page(runs, 'results/' + png.name, 'results/compute_curve/')}{SECTION[1]}\n"
        line = headline(runs)
        pointer = line and (f"{POINTER} **Claim 1 with more compute** ([below](#claim-1-across-compute)): "
                            f"{line}.")
        atomic_write(results, with_section(drop_section(results.read_text()), section, pointer))
    return out


def drop_section(text: str) -> str:
    """``text`` without the compute-curve section and its pointer line."""
    # The pointer line and the blank line after it.
    text = re.sub(rf"^{re.escape(POINTER)}.*(?:\n|$)(?:[ \t\r]*\n)?", "", text, count=1, flags=re.M)
    if SECTION[0] not in text:
        return text
    head, rest = text.split(SECTION[0], 1)
    return head.rstrip("\n") + "\n" + rest.split(SECTION[1], 1)[1].lstrip("\n")


def with_section(text: str, section: str, pointer: str | None = None) -> str:
    """``text`` with ``section`` at its end and ``pointer`` (one line) before its first ``## `` heading."""
    if pointer:
        at = text.find("\n## ")
        text = (text[:at + 1] + pointer + "\n\n" + text[at + 1:] if at >= 0
                else text.rstrip("\n") + "\n\n" + pointer + "\n")
    return text.rstrip("\n") + "\n\n" + section


def carry_section(old: str, new: str) -> str:
    """The reproduction's page ``new`` with the compute-curve section and pointer of the page it
    replaces (``old``), so that ``reproduce.py --report`` keeps them."""
    if SECTION[0] not in old:
        return new
    section = SECTION[0] + old.split(SECTION[0], 1)[1].split(SECTION[1], 1)[0] + SECTION[1] + "\n"
    pointer = next((ln.rstrip("\n") for ln in old.splitlines() if ln.startswith(POINTER)), None)
    return with_section(new, section, pointer)


def headline(runs: dict) -> str | None:
    """One sentence on the largest budget every seed has reached (for README)."""
    full = [s for s in sorted(runs["m3ae"]) if len(runs["m3ae"][s]) == 3 and len(runs["mae"].get(s, {})) == 3]
    if not full:
        return None
    s = full[-1]
    mae, m3ae = (values(runs, k, s, probe_value("cls", "top1")) for k in ("mae", "m3ae"))
    return (f"after {s:,} steps, linear probe of the CLS feature: M3AE {sum(m3ae) / 3:.2f} % vs MAE "
            f"{sum(mae) / 3:.2f} % (3 seeds each; {compare_strict(m3ae, mae)})")
