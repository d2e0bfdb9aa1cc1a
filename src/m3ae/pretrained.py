"""Pretrained directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

Saving, loading and hub upload live here as functions; ``M3AE.save_pretrained`` /
``from_pretrained`` / ``push_to_hub`` are one-line delegations. This module knows no model
class (:func:`from_pretrained` is handed it), so the dependency runs one way, ``model`` ->
``pretrained``.

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
# Size and SHA-256 of every other file of the folder, written last: a file cut short or
# changed later (a bad disk, a copy that stopped half-way) is named instead of loaded.
MANIFEST_NAME = "manifest.json"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file in ``directory`` (see :data:`MANIFEST_NAME`)."""
    directory = Path(directory)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    write_json_atomic(directory / MANIFEST_NAME, {"files": files})
    return directory / MANIFEST_NAME


def check_files(directory: str | os.PathLike, names: tuple[str, ...] = (), digest: bool = True,
                only: tuple[str, ...] | None = None) -> str | None:
    """None when ``names`` exist in ``directory`` and every file its manifest lists (or those of
    them in ``only``) has the recorded size (and, with ``digest``, SHA-256); else one sentence
    naming the first bad file. A folder without a manifest (written by an earlier m3ae, or by
    hand) is checked for ``names`` only."""
    directory = Path(directory)
    for name in names:
        if not (directory / name).is_file():
            return f"{directory / name} is missing"
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is damaged (not the JSON m3ae writes)"
    for name, want in files.items():
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} is damaged: {size} bytes, {want['bytes']} when it was written"
        if digest and _sha256(path) != want["sha256"]:
            return f"{path} is damaged: its SHA-256 differs from the one recorded when it was written"
    return None


def save_pretrained(model, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                    manifest: bool = True) -> Path:
    """Write the model (and optionally its tokenizer) to ``directory``, then its manifest
    (``manifest=False``: the caller adds files and writes the manifest itself)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "m3ae_version": __version__})
    # norm_pix_loss: whether the image head predicts per-patch normalised pixels (the trainer
    # passes train.norm_pix_loss in ``extra``), so pictures un-normalise without being told.
    config = {"architecture": "M3AE", "m3ae_version": __version__, **asdict(model.config),
              "norm_pix_loss": bool(getattr(model, "norm_pix_loss", False)), **(extra or {})}
    write_json_atomic(directory / CONFIG_NAME, config)
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER_NAME))
    if manifest:
        write_manifest(directory)
    return directory


def read_config_json(directory: str | os.PathLike) -> dict:
    """A pretrained folder's ``config.json``: the model's config fields and what else was recorded."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretrained M3AE folder: {CONFIG_NAME} is missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged: not valid JSON ({e})") from None


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    raw = read_config_json(directory)
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in known})


def load_weights(model: torch.nn.Module, directory: str | os.PathLike, map_location: str = "cpu",
                 strict: bool = True) -> torch.nn.Module:
    """Load a pretrained folder's (or checkpoint's) weights into ``model``, and what it
    predicts (``norm_pix_loss``); mismatches are named."""
    load_state_dict_checked(model, read_weights(directory, map_location), strict=strict)
    model.norm_pix_loss = bool(read_config_json(directory).get("norm_pix_loss", False))
    return model


def from_pretrained(model_class, name_or_path: str | os.PathLike, map_location: str = "cpu",
                    revision: str | None = None, strict: bool = True):
    """``model_class`` (:class:`m3ae.M3AE`) built from a pretrained folder, or a Hub repo id
    already in the local HF cache (no downloads; see :func:`resolve_pretrained`)."""
    directory = resolve_pretrained(name_or_path, revision)
    return load_weights(model_class(read_model_config(directory)), directory, map_location, strict)


def resolve_pretrained(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A pretrained folder on disk, or the snapshot of a Hub repo id in the local HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    # Only names shaped like a repo id ("name" or "owner/name") are looked up in the cache.
    repo_shaped = name.count("/") <= 1 and not name.startswith((".", "/", "~"))
    if repo_shaped:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            config = try_to_load_from_cache(name, CONFIG_NAME, revision=revision)
            weights = try_to_load_from_cache(name, WEIGHTS_NAME, revision=revision)
            if isinstance(config, str) and isinstance(weights, str) and os.path.isfile(weights):
                return Path(config).parent
    hint = (f" Fetch it once with `huggingface-cli download {name}` (needs `pip install m3ae[hub]` and "
            "network), then load it again by the same name." if repo_shaped else "")
    raise FileNotFoundError(
        f"{name!r} does not exist: it is neither a pretrained folder on disk (config.json and "
        "model.safetensors, e.g. RUN/final) nor a model in the local Hugging Face cache, and m3ae "
        f"never downloads on its own.{hint}")


def read_weights(directory: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in a pretrained folder's (or checkpoint's) ``model.safetensors``."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    # Sizes only (cheap enough for every load), and only the model's own files: a checkpoint's
    # damaged trainer state does not stop its weights from loading.
    problem = check_files(directory, digest=False, only=(CONFIG_NAME, WEIGHTS_NAME))
    if problem:
        raise ValueError(problem)
    try:
        return load_file(str(weights), device=map_location)
    except Exception as e:  # safetensors' own error type; a cut file fails in its header check
        raise ValueError(f"{weights} is damaged or not a safetensors file ({type(e).__name__}: {e})") from None


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
        save_pretrained(model, tmp, tokenizer, manifest=False)  # the Hub keeps its own SHA-256s
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 revision=revision, repo_type="model")
    return str(getattr(info, "commit_url", info))
