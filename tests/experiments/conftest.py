"""experiments/ on sys.path, as it is for a script run from there: reproduce.py imports its
modes from the reproduction/ package beside it."""
from __future__ import annotations

import sys
from pathlib import Path

EXPERIMENTS = str(Path(__file__).resolve().parents[2] / "experiments")
if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)
