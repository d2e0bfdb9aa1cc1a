"""Importing m3ae's modules changes no global state of the process: a notebook user's
matplotlib backend and warning filters stay as they were."""
import subprocess
import sys

CHECK = """
import sys, warnings
import matplotlib
matplotlib.use("svg")  # a backend other than Agg, as a notebook's own would be
# Third-party libraries may set filters of their own when imported: import them first.
import matplotlib.figure, numpy, PIL.Image, tokenizers, torch, torchvision.transforms, webdataset
import m3ae
assert "m3ae.visualize" not in sys.modules and "m3ae.data.decode" not in sys.modules
backend, filters = matplotlib.get_backend(), list(warnings.filters)
import m3ae.data.decode
import m3ae.visualize
assert matplotlib.get_backend() == backend, f"backend switched to {matplotlib.get_backend()}"
assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]
"""


def test_importing_visualize_and_decode_changes_no_global_state():
    # A fresh interpreter: in this one the modules are imported already.
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
