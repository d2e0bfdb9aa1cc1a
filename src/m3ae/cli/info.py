"""m3ae info: what a model folder, run or checkpoint file holds, without building the model."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .common import add_debug_arg

# Parameter name prefixes -> the part of the model they belong to.
_PARTS = (("embeddings", ("patch_embed.", "text_embed.", "cls_token", "encoder_image_type", "encoder_text_type")),
          ("encoder", ("encoder.",)),
          ("decoder", ("decoder_embed.", "decoder.", "decoder_image_type", "decoder_text_type",
                       "image_mask_token", "text_mask_token")),
          ("heads", ("image_head.", "text_head.")))


def register(sub) -> None:
    p = sub.add_parser("info", help="show what a model folder, run or checkpoint holds",
                       description="Print the architecture, parameter counts per part, image size and "
                                   "patch, vocabulary, training provenance (steps, samples seen, config "
                                   "differences from the preset) and whether the model is encoder-only, "
                                   "for a pretrained folder (RUN/final, a checkpoint step folder, a "
                                   "converted official model), a run folder, or an official .pkl / .pth.")
    p.add_argument("path", help="pretrained folder, run folder, or official checkpoint file")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    add_debug_arg(p)
    p.set_defaults(func=run)


def part_counts(shapes: dict[str, tuple]) -> dict[str, int]:
    """Parameter counts per part (embeddings, encoder, decoder, heads) from name -> shape."""
    counts = dict.fromkeys([name for name, _ in _PARTS] + ["other"], 0)
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= int(s)
        part = next((p for p, prefixes in _PARTS if name.startswith(prefixes)), "other")
        counts[part] += n
    return {k: v for k, v in counts.items() if v}  # an encoder-only model lists no decoder


def _folder_facts(folder: Path) -> dict:
    from safetensors import safe_open

    from ..pretrained import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, read_model_config

    cfg = read_model_config(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    facts = {"path": str(folder), "kind": "pretrained folder", "config": asdict(cfg), "params": part_counts(shapes),
             "m3ae_version": raw.get("m3ae_version"), "image_only": bool(raw.get("image_only", False)),
             "converted_from": raw.get("converted_from")}
    if (folder / TOKENIZER_NAME).is_file():
        from ..tokenizer import load_tokenizer

        facts["tokenizer_vocab"] = load_tokenizer(folder / TOKENIZER_NAME).get_vocab_size()
    facts.update(_provenance(folder))
    return facts


def _provenance(folder: Path) -> dict:
    """Steps, samples seen and the preset, from the checkpoint's trainer state or the run's
    config.yaml / metrics.jsonl beside it."""
    import torch

    from ..config import read_config_file
    from ..io import read_jsonl

    out: dict = {}
    state_file = folder / "trainer_state.pt"
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    if state_file.is_file():
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            out["step"] = int(state["step"])
            out["samples_seen"] = sum(int(r.get("position", 0)) for r in state.get("data_per_rank", []))
            out["preset"] = (state.get("config") or {}).get("preset")
        except Exception:  # noqa: BLE001 - an unreadable state only loses the provenance
            pass
    elif (run / "metrics.jsonl").is_file():
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "step" in r]
        if rows:
            out["step"] = int(rows[-1]["step"])
            if "data/seen" in rows[-1]:
                out["samples_seen"] = int(rows[-1]["data/seen"])
    if (run / "config.yaml").is_file():
        out.setdefault("preset", read_config_file(run / "config.yaml").get("preset"))
        out["run"] = str(run)
    return {k: v for k, v in out.items() if v is not None}


def _file_facts(path: Path) -> dict:
    from ..interop.official import is_torch_file, load_official_checkpoint

    if is_torch_file(path):
        from ..interop.official_pth import load_official_pth

        cfg, state, meta = load_official_pth(path)
        kind = "official Colab .pth (encoder only; not converted)"
    else:
        cfg, state, meta = load_official_checkpoint(path)
        kind = f"official JAX checkpoint ({meta['kind']}; not converted)"
    facts = {"path": str(path), "kind": kind, "config": asdict(cfg),
             "params": part_counts({k: tuple(v.shape) for k, v in state.items()}),
             "image_only": meta["image_only"], "converted_from": None,
             "step": meta.get("step"), "notes": {k: meta[k] for k in ("image_size_from", "heads_from") if k in meta}}
    return {k: v for k, v in facts.items() if v is not None}


def describe(path: str | Path) -> dict:
    """The facts ``m3ae info`` prints, as a dict."""
    from ..pretrained import CONFIG_NAME

    path = Path(path)
    if path.is_file():
        return _file_facts(path)
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        from ..training.checkpoint import list_checkpoints

        if (path / "final" / CONFIG_NAME).is_file():
            return _folder_facts(path / "final")
        ckpts = list_checkpoints(path)
        if ckpts:
            return {**_folder_facts(ckpts[-1]), "note": "no final/ yet: the latest checkpoint"}
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is neither a pretrained folder (config.json + model.safetensors), "
                                "a run folder, nor an official checkpoint file")
    return _folder_facts(path)


def preset_differences(config: dict, preset: str | None) -> list[str]:
    from ..config import PRESETS, model_config

    if not preset or preset not in PRESETS:
        return []
    base = asdict(model_config(preset))
    return [f"{k}={config[k]!r} (preset {base[k]!r})" for k in base if k in config and config[k] != base[k]]


def run(args) -> int:
    facts = describe(args.path)
    c = facts["config"]
    diffs = preset_differences(c, facts.get("preset"))
    if args.json:
        print(json.dumps({**facts, "preset_differences": diffs}, indent=2))
        return 0
    p = facts["params"]
    total = sum(p.values())
    arch = ("MAE (image only)" if facts.get("image_only") else
            "M3AE, encoder only (no decoder: features and fine-tuning, no reconstruction)" if c["encoder_only"]
            else "M3AE (encoder + decoder)")
    print(f"{facts['path']}: {facts['kind']}" + (f" ({facts['note']})" if facts.get("note") else ""))
    print(f"  model:      {arch}")
    print(f"  encoder:    {c['depth']} blocks x {c['emb_dim']} wide, {c['num_heads']} heads, "
          f"mlp ratio {c['mlp_ratio']:g}")
    if not c["encoder_only"]:
        print(f"  decoder:    {c['dec_depth']} blocks x {c['dec_emb_dim']} wide, {c['dec_num_heads']} heads")
    grid = c["image_size"] // c["patch_size"]
    print(f"  image:      {c['image_size']} px, patch {c['patch_size']} ({grid}x{grid} = {grid * grid} patches)")
    tok = f"; tokenizer.json has {facts['tokenizer_vocab']} tokens" if "tokenizer_vocab" in facts else "; no tokenizer"
    print(f"  text:       vocabulary {c['vocab_size']}, up to {c['max_text_len']} tokens{tok}")
    print(f"  parameters: {total:,} (" + ", ".join(f"{k} {v:,}" for k, v in p.items()) + ")")
    if "step" in facts or "samples_seen" in facts:
        seen = f", {facts['samples_seen']:,} samples seen" if "samples_seen" in facts else ""
        print(f"  training:   step {facts.get('step')}{seen}" + (f" (run {facts['run']})" if "run" in facts else ""))
    if facts.get("preset"):
        print(f"  preset:     {facts['preset']}" + (f"; differs in {', '.join(diffs)}" if diffs else "; as is"))
    if facts.get("converted_from"):
        src = facts["converted_from"]
        print(f"  converted:  from {src.get('file')} ({src.get('format')})")
    for k, v in (facts.get("notes") or {}).items():
        print(f"  note:       {k.replace('_', ' ')}: {v}")
    return 0
