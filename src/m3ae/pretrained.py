"""Pretrained directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

Reading and writing the files only: this module knows no model class (``M3AE.from_pretrained``
builds the model from :func:`read_model_config` and :func:`read_weights`), so the dependency
runs one way, ``model`` -> ``pretrained``.

The layout of a Hugging Face Hub model repository, so ``huggingface_hub`` can push and pull
it. Training checkpoints use the same layout plus a ``trainer_state.pt``.

Loading never downloads: a name that is not a folder on disk is looked up in the local
Hugging Face cache only (fill it once with ``huggingface-cli download REPO_ID``). Pushing
(:func:`push_to_hub`) needs the optional ``hub`` extra and network access.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from ._version import __version__
from .config import ModelConfig
from .io import save_safetensors, write_json_atomic  # noqa: F401 (also imported from here by users)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def save_pretrained(model, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the model (and optionally its tokenizer) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "m3ae_version": __version__})
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


def resolve_pretrained(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A pretrained folder on disk, or the snapshot of a Hub repo id in the local HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    # Only names shaped like a repo id ("name" or "owner/name") are looked up in the cache.
    if name.count("/") <= 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            config = try_to_load_from_cache(name, CONFIG_NAME, revision=revision)
            weights = try_to_load_from_cache(name, WEIGHTS_NAME, revision=revision)
            if isinstance(config, str) and isinstance(weights, str) and os.path.isfile(weights):
                return Path(config).parent
    raise FileNotFoundError(
        f"{name!r} is neither a pretrained folder on disk nor a model (config.json and "
        f"model.safetensors) in the local Hugging Face cache, and m3ae never downloads on its own. "
        f"Fetch it once with `huggingface-cli download {name}` (needs `pip install m3ae[hub]` and "
        "network), then load it again by the same name.")


def read_weights(directory: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in a pretrained folder's (or checkpoint's) ``model.safetensors``."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    return load_file(str(weights), device=map_location)


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


def push_to_hub(model, repo_id: str, tokenizer=None, *, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload M3AE",
                revision: str | None = None) -> str:
    """Upload ``model`` (config.json + model.safetensors [+ tokenizer.json]) to a Hub repo.

    Creates the repo if needed. Needs the optional ``hub`` extra and network access; returns
    the commit URL.
    """
    import tempfile

    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'm3ae[hub]'") from e
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, tokenizer)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 revision=revision, repo_type="model")
    return str(getattr(info, "commit_url", info))
