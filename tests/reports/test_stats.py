"""m3ae.reports.stats: the one seed-comparison rule and the number formats of every report."""
import math

from m3ae.reports import stats


def test_direction_needs_every_seed_on_one_side():
    assert stats.direction([60, 61], [50, 52]) == 1
    assert stats.direction([40, 41], [50, 52]) == -1
    assert stats.direction([50, 53], [51, 52]) == 0
    assert stats.direction([52], [52]) == 0  # a tie is not a win
    assert stats.direction([], [1]) is None


def test_compare_words_follow_direction():
    assert stats.compare([60, 61], [50, 52]) == stats.REPRODUCED
    assert stats.compare([40, 41], [50, 52]) == stats.OPPOSITE
    assert stats.compare([50, 53], [51, 52]) == stats.OVERLAP
    assert stats.compare([], [1]) == stats.NOT_RUN


def test_gap_stats_and_the_strict_bar():
    g = stats.gap_stats([10, 12], [4, 6])
    assert g["gap"] == 6.0 and math.isclose(g["max_std"], math.sqrt(2)) and math.isclose(g["gap_over_std"], 6 / math.sqrt(2))
    assert stats.compare_strict([10, 12], [4, 6]).startswith("reproduced (every seed above; gap 6.00 = 4.2x")
    # every seed above but the gap is under 3 seed stds
    assert stats.compare_strict([10, 14], [8, 9.5]).startswith("in direction, but not clearly")
    assert math.isnan(stats.gap_stats([1], [0])["max_std"])


def test_compare_noise():
    assert stats.compare_noise(2.0, 1.0) == stats.REPRODUCED
    assert stats.compare_noise(-2.0, 1.0) == stats.OPPOSITE
    assert stats.compare_noise(0.5, 1.0) == stats.WITHIN_NOISE
    assert stats.compare_noise(float("nan"), 1.0) == stats.NOT_RUN


def test_words_and_cells():
    assert stats.pct(0.6134) == "61.3 %"
    assert stats.seeds_cell([13.71, 12.0]) == "12.9 (13.7, 12.0)"
    assert stats.seeds_cell([float("nan")]) == "–" and stats.seeds_cell([5.0]) == "5.0"
    assert stats.describe_gap(0.8, 0.6) == "20.0 points above"
    assert stats.describe_gap(0.65, 0.6) == "only 5.0 points above"
    assert stats.describe_gap(0.6, 0.61) == "level with"
    assert stats.describe_gap(0.5, 0.6) == "10.0 points below"
    assert stats.versus_chance(0.9, 0.25) == "far above chance"
    assert stats.versus_chance(0.4, 0.25) == "above chance"
    assert stats.versus_chance(0.3, 0.25) == "near chance"
    assert stats.versus_chance(0.1, 0.25) == "below chance"
    assert stats.ordinal(1) == "" and stats.ordinal(3) == "third" and stats.ordinal(7) == "7th"
