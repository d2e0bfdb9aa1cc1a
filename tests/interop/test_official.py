"""Official JAX checkpoints: parity with the official outputs, parameters, losses, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m3ae.interop.official import TEXT_KEYS, build_model, load_official_checkpoint

TOL = 1e-4


def _ref(official_fixtures: Path):
    return np.load(official_fixtures / "reference.npz")


def _inputs(z):
    image = torch.from_numpy(z["images"]).permute(0, 3, 1, 2)  # official NHWC -> NCHW
    return image, torch.from_numpy(z["text"]).long(), torch.from_numpy(z["text_padding_mask"]) > 0


def _maxabs(a, b) -> float:
    return (a.detach() - torch.as_tensor(b)).abs().max().item()


def test_reader_needs_no_jax(official_fixtures):
    before = set(sys.modules)
    cfg, state, meta = load_official_checkpoint(official_fixtures / "m3ae_small.pkl")
    new = {m.split(".")[0] for m in set(sys.modules) - before}
    assert not new & {"jax", "jaxlib", "flax", "optax", "cloudpickle", "ml_collections", "m3ae_public"}
    assert meta["step"] == 0 and meta["kind"] == "m3ae"
    assert (cfg.image_size, cfg.patch_size, cfg.vocab_size, cfg.max_text_len) == (32, 8, 1000, 12)
    assert (cfg.emb_dim, cfg.depth, cfg.num_heads) == (64, 2, 4)
    assert (cfg.dec_emb_dim, cfg.dec_depth, cfg.dec_num_heads) == (32, 2, 4)
    assert cfg.use_type_embedding and cfg.mlp_ratio == 4


def test_converted_params_equal_reference(official_fixtures):
    z = _ref(official_fixtures)
    _, state, _ = load_official_checkpoint(official_fixtures / "m3ae_small.pkl")
    np.testing.assert_array_equal(state["patch_embed.weight"].numpy(),
                                  z["param/params/image_embedding/kernel"].T)
    np.testing.assert_array_equal(state["encoder.blocks.1.attn.qkv.weight"].numpy(),
                                  z["param/params/encoder/Block_1/Attention_0/Dense_0/kernel"].T)
    np.testing.assert_array_equal(state["decoder.norm.weight"].numpy(),
                                  z["param/params/decoder/LayerNorm_0/scale"])
    np.testing.assert_array_equal(state["text_embed.weight"].numpy(),
                                  z["param/params/text_embedding/embedding"])
    # Every reference parameter arrives somewhere, and the total matches.
    ref_total = sum(z[k].size for k in z.files if k.startswith("param/"))
    assert sum(v.numel() for v in state.values()) == ref_total
    assert len(state) == sum(k.startswith("param/") for k in z.files)


def test_m3ae_parity(official_fixtures):
    z = _ref(official_fixtures)
    cfg, state, meta = load_official_checkpoint(official_fixtures / "m3ae_small.pkl")
    model = build_model(cfg, state)
    image, text, pad = _inputs(z)
    with torch.no_grad():
        rep = model.forward_features(image, text, pad)
        out = model(image, text, pad, image_mask_ratio=0.0, text_mask_ratio=0.0)
    assert _maxabs(rep, z["m3ae_representation"]) < TOL
    assert _maxabs(out.image_pred, z["m3ae_image_output"]) < TOL
    assert _maxabs(out.text_logits, z["m3ae_text_output"]) < TOL


def test_mae_parity_image_only(official_fixtures):
    z = _ref(official_fixtures)
    cfg, state, meta = load_official_checkpoint(official_fixtures / "mae_small.pkl")
    assert meta["image_only"] and meta["kind"] == "mae"
    assert cfg.image_size == 32  # from the variant's cc12m_data.image_size
    assert not set(TEXT_KEYS) & set(state)
    np.testing.assert_array_equal(state["encoder_image_type"].numpy(),
                                  z["mae_param/params/encoder_image_type_embedding"])
    model = build_model(cfg, state, image_only=True)
    image, _, _ = _inputs(z)
    with torch.no_grad():
        rep = model.forward_features(image)
        out = model(image, image_mask_ratio=0.0)
    assert _maxabs(rep, z["mae_representation"]) < TOL
    assert _maxabs(out.image_pred, z["mae_image_output"]) < TOL


def test_official_masked_losses(official_fixtures):
    """m3ae.losses on the official masked outputs gives the official loss values."""
    from m3ae.losses import image_loss, text_loss_and_accuracy
    from m3ae.model import M3AEOutput

    z = _ref(official_fixtures)
    pad = torch.from_numpy(z["text_padding_mask"]) > 0
    out = M3AEOutput(
        image_pred=torch.from_numpy(z["m3ae_masked075_image_output"]),
        image_target=torch.from_numpy(z["patches"]),
        image_mask=torch.from_numpy(z["m3ae_masked075_image_mask"]) > 0,
        text_logits=torch.from_numpy(z["m3ae_masked075_text_output"]),
        text_target=torch.from_numpy(z["text"]).long(),
        text_mask=(torch.from_numpy(z["m3ae_masked075_text_mask"]) > 0) & ~pad,
        latent=torch.zeros(3, 1, 64))
    img = image_loss(out)
    txt, _ = text_loss_and_accuracy(out)
    assert img.item() == pytest.approx(float(z["m3ae_masked075_image_loss"]), abs=1e-5)
    assert txt.item() == pytest.approx(float(z["m3ae_masked075_text_loss"]), abs=1e-4)
    assert img.item() == pytest.approx(1.291373, abs=1e-5)
    assert txt.item() == pytest.approx(7.02236, abs=1e-4)


def test_architecture_overrides_and_missing_heads(official_fixtures):
    from m3ae.interop.official import infer_config

    z = _ref(official_fixtures)
    flat = {k[len("param/params/"):]: z[k] for k in z.files if k.startswith("param/")}
    with pytest.raises(ValueError, match="heads"):
        infer_config(flat, {})  # no variant: heads cannot be read from shapes
    cfg, notes = infer_config(flat, {}, num_heads=8, dec_num_heads=2)
    assert (cfg.num_heads, cfg.dec_num_heads, cfg.image_size) == (8, 2, 256)
    assert notes["image_size_from"] == "default 256"
    cfg, _ = infer_config(flat, {"m3ae.model_type": None, "m3ae.num_heads": 4, "m3ae.dec_num_heads": 4},
                          image_size=64)
    assert cfg.image_size == 64 and cfg.grid_size == 8
    no_type = {k: v for k, v in flat.items() if "type_embedding" not in k}
    cfg, _ = infer_config(no_type, {}, num_heads=4, dec_num_heads=4)
    assert not cfg.use_type_embedding
    with pytest.raises(ValueError, match="emb_dim"):
        infer_config(flat, {"m3ae.emb_dim": 128, "m3ae.num_heads": 4, "m3ae.dec_num_heads": 4})


def test_no_type_embedding_model_loads_and_runs(official_fixtures):
    """use_type_embedding=False: the type keys are absent and the model must not expect them."""
    from m3ae.interop import filter_state_dict
    from m3ae.interop.official import infer_config

    z = _ref(official_fixtures)
    flat = {k[len("param/params/"):]: z[k] for k in z.files if k.startswith("param/")
            and "type_embedding" not in k}
    cfg, _ = infer_config(flat, {}, num_heads=4, dec_num_heads=4, image_size=32, max_text_len=12)
    model = build_model(cfg, filter_state_dict(flat, source="official"))
    image, text, pad = _inputs(z)
    with torch.no_grad():
        rep = model.forward_features(image, text, pad)
    assert rep.shape == (3, 29, 64) and torch.isfinite(rep).all()


def _run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "m3ae", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_cli_convert_official_then_from_pretrained(official_fixtures, tmp_path):
    from m3ae import M3AE

    z = _ref(official_fixtures)
    dst = tmp_path / "m3ae_small"
    res = _run_cli("convert-official", str(official_fixtures / "m3ae_small.pkl"), str(dst))
    assert res.returncode == 0, res.stderr
    assert "M3AE" in res.stdout and "243,656" in res.stdout and "step 0" in res.stdout
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    model = M3AE.from_pretrained(dst).eval()
    image, text, pad = _inputs(z)
    with torch.no_grad():
        rep = model.forward_features(image, text, pad)
        out = model(image, text, pad, image_mask_ratio=0.0, text_mask_ratio=0.0)
    assert _maxabs(rep, z["m3ae_representation"]) < TOL
    assert _maxabs(out.text_logits, z["m3ae_text_output"]) < TOL


def test_cli_convert_mae_marks_image_only(official_fixtures, tmp_path):
    import json

    from m3ae import M3AE

    z = _ref(official_fixtures)
    dst = tmp_path / "mae_small"
    res = _run_cli("convert-official", str(official_fixtures / "mae_small.pkl"), str(dst),
                   "--image-size", "32")
    assert res.returncode == 0, res.stderr
    assert "image only" in res.stdout
    config = json.loads((dst / "config.json").read_text())
    assert config["image_only"] is True and config["converted_from"]["format"] == "official-jax-mae"
    model = M3AE.from_pretrained(dst).eval()
    with torch.no_grad():
        out = model(_inputs(z)[0], image_mask_ratio=0.0)
    assert _maxabs(out.image_pred, z["mae_image_output"]) < TOL


def test_cli_missing_file_is_one_line_error(tmp_path, capsys):
    from m3ae.cli import main

    assert main(["convert-official", str(tmp_path / "nope.pkl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
