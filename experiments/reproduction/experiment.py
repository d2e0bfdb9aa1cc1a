"""What the reproduction's report needs to know of the experiment besides its results (kept
apart so that the page and plot modules need not import the summary module that calls them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    """What the report needs of the experiment's definition besides the results."""
    paper: dict  # the paper's numbers: claim1 {mae, m3ae}, claim2 {fraction: top-1}, claim3 (words), claim4
    modes: tuple[str, ...]  # every mode that has a page (the pages link to each other)
    full: dict  # the full mode's settings (steps, batch_size, seeds, evaluation sizes): its cost estimate
    full_runs: int  # how many runs the full mode has
