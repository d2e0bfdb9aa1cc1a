"""Pretrained directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

The layout of a Hugging Face Hub model repository, so ``huggingface_hub`` can push and pull
it. Training checkpoints use the same layout plus a ``trainer_state.pt``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the model (and optionally its tokenizer) to ``directory``."""
    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "m3ae_version": __version__})
    os.replace(tmp, directory / WEIGHTS_NAME)
    config = {"architecture": "M3AE", "m3ae_version": __version__, **asdict(model.config), **(extra or {})}
    write_json_atomic(directory / CONFIG_NAME, config)
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER_NAME))
    return directory


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretrained M3AE folder: {CONFIG_NAME} is missing")
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in known})


def load_pretrained(directory: str | os.PathLike, map_location: str = "cpu", strict: bool = True):
    """Build the model described by ``config.json`` and load ``model.safetensors`` into it."""
    from .model import M3AE

    directory = Path(directory)
    model = M3AE(read_model_config(directory))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    state = load_file(str(weights), device=map_location)
    load_state_dict_checked(model, state, strict=strict)
    return model


def load_state_dict_checked(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Load with a message that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if shapes or (strict and (missing or unexpected)):
        lines = []
        if missing:
            lines.append(f"missing keys: {missing}")
        if unexpected:
            lines.append(f"unexpected keys: {unexpected}")
        if shapes:
            lines.append("shape mismatches: " + "; ".join(shapes))
        raise ValueError("checkpoint does not fit the model:\n  " + "\n  ".join(lines))
    model.load_state_dict(state, strict=False)
