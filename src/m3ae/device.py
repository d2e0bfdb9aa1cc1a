"""Device names: checked against this machine, and ``auto`` resolved. Training, evaluation and
the CLI all take a device this way."""
from __future__ import annotations

import torch


def check_device(name: str) -> str:
    """``name`` if this machine has that device (cpu, auto, cuda, cuda:N, mps), else a
    one-line ValueError saying what there is."""
    try:
        dev = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if name != "auto" and dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no usable CUDA GPU (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are only {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use cpu or auto")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; any other name is checked to exist."""
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
