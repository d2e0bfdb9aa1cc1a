"""The official Colab's PyTorch .pth layout (encoder only), made here from the official
fixtures' parameters: the Flax names mapped to the Colab's and each Dense kernel transposed
to a torch Linear weight. Converting it gives the encoder of the converted official pickle."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import m3ae
from m3ae.cli import main
from m3ae.interop import detect_format, filter_state_dict
from m3ae.interop.official import build_model, load_official_checkpoint

_PARTS = {"LayerNorm_0": "layer_norm1", "LayerNorm_1": "layer_norm2",
          "Attention_0/Dense_0": "attention.qkv_linear", "Attention_0/Dense_1": "attention.fc",
          "TransformerMLP_0/fc1": "transformer_mlp.fc1", "TransformerMLP_0/fc2": "transformer_mlp.fc2"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _pth_name(path: str) -> str | None:
    """Flax path -> the Colab's name; None for the decoder side, which the .pth lacks."""
    top = {"cls_token": "cls_token", "text_embedding/embedding": "text_embedding.weight",
           "encoder_image_type_embedding": "encoder_image_type_embedding",
           "encoder_text_type_embedding": "encoder_text_type_embedding"}
    if path in top:
        return top[path]
    if m := re.match(r"^image_embedding/(kernel|bias)$", path):
        return f"image_embedding.{_LEAF[m.group(1)]}"
    if m := re.match(r"^encoder/Block_(\d+)/(.+)/(kernel|scale|bias)$", path):
        return f"encoder.blocks.{m.group(1)}.{_PARTS[m.group(2)]}.{_LEAF[m.group(3)]}"
    if m := re.match(r"^encoder/LayerNorm_0/(scale|bias)$", path):
        return f"encoder.layer_norm.{_LEAF[m.group(1)]}"
    return None


def _colab_state(official_fixtures) -> dict[str, torch.Tensor]:
    z = np.load(official_fixtures / "reference.npz")
    out = {}
    for key in z.files:
        if not key.startswith("param/params/"):
            continue
        path = key[len("param/params/"):]
        name = _pth_name(path)
        if name is not None:
            a = z[key].T if path.endswith("/kernel") else z[key]
            out[name] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def _inputs(official_fixtures):
    z = np.load(official_fixtures / "reference.npz")
    return (torch.from_numpy(z["images"]).permute(0, 3, 1, 2), torch.from_numpy(z["text"]).long(),
            torch.from_numpy(z["text_padding_mask"]) > 0, z["m3ae_representation"])


def test_convert_official_pth_matches_the_official_encoder(official_fixtures, tmp_path, capsys):
    state = _colab_state(official_fixtures)
    assert "encoder.blocks.1.attention.qkv_linear.weight" in state and len(state) == 6 + 2 * 12 + 2
    torch.save(state, tmp_path / "m3ae_small.pth")
    dst = tmp_path / "converted"
    assert main(["convert-official", str(tmp_path / "m3ae_small.pth"), str(dst), "--num-heads", "4",
                 "--image-size", "32", "--max-text-len", "12"]) == 0
    assert "encoder only" in capsys.readouterr().out
    model, tokenizer, _ = m3ae.load_pretrained(dst, device="cpu")
    assert model.config.encoder_only and tokenizer is None
    cfg, full_state, _ = load_official_checkpoint(official_fixtures / "m3ae_small.pkl")
    full = build_model(cfg, full_state)
    image, text, pad, official = _inputs(official_fixtures)
    with torch.no_grad():
        got = model.forward_features(image, text, pad)
        want = full.forward_features(image, text, pad)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - torch.from_numpy(official)).abs().max().item() <= 1e-4  # and the JAX outputs
    with pytest.raises(ValueError, match="encoder-only"):
        model(image, text, pad)
    import json

    saved = json.loads((dst / "config.json").read_text())
    assert saved["encoder_only"] is True and saved["converted_from"]["format"] == "official-colab-pth"


def test_filter_state_dict_recognises_the_pth_layout(official_fixtures):
    state = _colab_state(official_fixtures)
    assert detect_format(state) == "official_pth"
    ours = filter_state_dict(state)
    cfg, full_state, _ = load_official_checkpoint(official_fixtures / "m3ae_small.pkl")
    for k, v in ours.items():
        torch.testing.assert_close(v, full_state[k], rtol=0, atol=0)
    model = m3ae.M3AE(m3ae.ModelConfig(**{**cfg.__dict__, "encoder_only": True}))
    model.load_state_dict(ours, strict=True)  # every encoder tensor, nothing else


@pytest.mark.parametrize("drop, match", [
    ("encoder_text_type_embedding", "built on CPU"),
    ("encoder.blocks.1.attention.fc.bias", "lacks encoder.blocks.1.attention.fc.bias")])
def test_missing_tensors_are_refused(official_fixtures, tmp_path, drop, match):
    state = _colab_state(official_fixtures)
    del state[drop]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=match):
        filter_state_dict(state)
    assert main(["convert-official", str(tmp_path / "bad.pth"), str(tmp_path / "out"), "--num-heads", "4"]) == 2
    assert not (tmp_path / "out" / "config.json").exists()


def test_heads_come_from_the_official_sizes_or_the_user(official_fixtures):
    from m3ae.interop.official_pth import infer_pth_config

    state = _colab_state(official_fixtures)
    with pytest.raises(ValueError, match="--num-heads"):
        infer_pth_config(state)  # width 64 is not an official size
    cfg, notes = infer_pth_config(state, num_heads=4)
    assert (cfg.emb_dim, cfg.depth, cfg.patch_size, cfg.vocab_size, cfg.image_size) == (64, 2, 8, 1000, 256)
    base = {**state, "cls_token": torch.zeros(1, 1, 768)}
    assert infer_pth_config(base)[0].num_heads == 12
