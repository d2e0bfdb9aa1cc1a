"""How two sets of seeds are compared, and how numbers are written, in every report.

One rule serves the demo, the demo-vs-MAE table and the reproduction: "a beats b" only when
every seed of ``a`` is above every seed of ``b`` (:func:`direction`); overlapping seed ranges
are inconclusive, whatever the means say.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# compare()'s verdicts; match on these names, not on the wording.
REPRODUCED = "reproduced in direction"
OPPOSITE = "not reproduced (opposite direction)"
OVERLAP = "inconclusive (seed ranges overlap)"
WITHIN_NOISE = "inconclusive (difference within seed spread)"
NOT_RUN = "not run"


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1); nan below two values."""
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else float("nan")


def direction(a: Sequence[float], b: Sequence[float]) -> int | None:
    """+1 when every a is above every b, -1 when every a is below every b, 0 when the ranges
    overlap, None when either side has no value."""
    if not len(a) or not len(b):
        return None
    if min(a) > max(b):
        return 1
    if max(a) < min(b):
        return -1
    return 0


def compare(a: Sequence[float], b: Sequence[float]) -> str:
    """Verdict for "a beats b" across seeds, in words (see :func:`direction`)."""
    return {None: NOT_RUN, 1: REPRODUCED, -1: OPPOSITE, 0: OVERLAP}[direction(a, b)]


def gap_stats(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean gap a - b, the larger sample standard deviation of the two, and their ratio."""
    gap = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return {"gap": gap, "max_std": float("nan"), "gap_over_std": float("nan")}
    sd = max(std(a), std(b))
    return {"gap": gap, "max_std": sd, "gap_over_std": gap / sd if sd > 0 else float("inf")}


def compare_strict(a: Sequence[float], b: Sequence[float], factor: float = 3.0) -> str:
    """A clear win: every seed of ``a`` above every seed of ``b`` AND a mean gap of at least
    ``factor`` times the larger seed standard deviation."""
    verdict = compare(a, b)
    if verdict != REPRODUCED or len(a) < 2 or len(b) < 2:
        return verdict
    g = gap_stats(a, b)
    if g["gap"] >= factor * g["max_std"]:
        return f"reproduced (every seed above; gap {g['gap']:.2f} = {g['gap_over_std']:.1f}x seed std)"
    return (f"in direction, but not clearly (gap {g['gap']:.2f} is only {g['gap_over_std']:.1f}x the seed "
            f"std; {factor:.0f}x needed)")


def compare_noise(diff: float, noise: float) -> str:
    """Verdict for a single-seed difference, against the seed-to-seed spread as noise."""
    if diff != diff:
        return NOT_RUN
    if diff > noise:
        return REPRODUCED
    if diff < -noise:
        return OPPOSITE
    return WITHIN_NOISE


# ------------------------------------------------------------------------------ words
def pct(x: float) -> str:
    """A fraction as a percentage with one decimal: 0.613 -> '61.3 %'."""
    return f"{100 * x:.1f} %"


def seeds_cell(xs: Sequence[float], digits: int = 1) -> str:
    """A table cell for per-seed values: their mean, then every seed in brackets."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{mean(xs):.{digits}f} (" + ", ".join(f"{x:.{digits}f}" for x in xs) + ")"


def versus_chance(acc: float, chance: float) -> str:
    """Words for an accuracy against chance, from the numbers alone."""
    if acc >= chance + 0.5 * (1 - chance):
        return "far above chance"
    if acc > chance + 0.1:
        return "above chance"
    if acc >= chance - 0.1:
        return "near chance"
    return "below chance"


def describe_gap(a: float, b: float) -> str:
    """Words for the gap between two accuracies (a - b), e.g. '16.7 points above'."""
    d = a - b
    if d >= 0.1:
        return f"{100 * d:.1f} points above"
    if d > 0.02:
        return f"only {100 * d:.1f} points above"
    if d >= -0.02:
        return "level with"
    return f"{100 * -d:.1f} points below"


def ordinal(k: int) -> str:
    """'' for the first, then 'second', 'third', ... (as in "the second seed")."""
    return {1: "", 2: "second", 3: "third", 4: "fourth"}.get(k, f"{k}th")
