"""timm export: same features as M3AE.forward_features on images; the inverse mapping."""
from __future__ import annotations

import pytest
import torch

from m3ae import M3AE
from m3ae.interop import detect_format, filter_state_dict, to_timm
from m3ae.pretrained import load_state_dict_checked

pytest.importorskip("timm")


@pytest.mark.parametrize("use_type", [True, False])
def test_timm_features_equal(tiny_cfg, use_type):
    model = M3AE(tiny_cfg, use_type_embedding=use_type, depth=2).eval()
    if use_type:  # make the type embedding large enough that forgetting it would show
        with torch.no_grad():
            model.encoder_image_type.normal_(std=1.0)
    vit, kwargs = to_timm(model, as_model=True)
    image = torch.randn(2, 3, tiny_cfg.image_size, tiny_cfg.image_size)
    with torch.no_grad():
        ours = model.forward_features(image)
        theirs = vit.forward_features(image)
        pooled = vit(image)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-5
    assert (pooled - ours[:, 0]).abs().max().item() < 1e-5  # global_pool='token' -> CLS
    assert kwargs["img_size"] == tiny_cfg.image_size and kwargs["ln_eps"] == 1e-6


def test_converted_official_to_timm(official_fixtures):
    """Official MAE -> ours -> timm reproduces the official representation."""
    import numpy as np

    from m3ae.interop.official import build_model, load_official_checkpoint

    z = np.load(official_fixtures / "reference.npz")
    cfg, state, meta = load_official_checkpoint(official_fixtures / "mae_small.pkl")
    vit, _ = to_timm(build_model(cfg, state, image_only=True), as_model=True)
    with torch.no_grad():
        rep = vit.forward_features(torch.from_numpy(z["images"]).permute(0, 3, 1, 2))
    assert (rep - torch.from_numpy(z["mae_representation"])).abs().max().item() < 1e-4


def test_timm_state_dict_back_to_ours(tiny_cfg):
    src = M3AE(tiny_cfg).eval()
    sd, _ = to_timm(src)
    sd["head.weight"] = torch.zeros(10, tiny_cfg.emb_dim)  # a classifier head is dropped
    assert detect_format(sd) == "timm"
    ours = filter_state_dict(sd)
    dst = M3AE(tiny_cfg).eval()
    load_state_dict_checked(dst, ours, strict=False)
    image = torch.randn(2, 3, tiny_cfg.image_size, tiny_cfg.image_size)
    with torch.no_grad():
        assert (dst.forward_features(image) - src.forward_features(image)).abs().max() < 1e-5


def test_learned_pos_embed_is_refused(tiny_cfg):
    sd, _ = to_timm(M3AE(tiny_cfg))
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    with pytest.raises(ValueError, match="learned table"):
        filter_state_dict(sd, source="timm")


def test_own_format_prefixes_and_unknown(tiny_cfg):
    state = {"module." + k: v for k, v in M3AE(tiny_cfg).state_dict().items()}
    assert detect_format(state) == "m3ae"
    assert "patch_embed.weight" in filter_state_dict(state)
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        filter_state_dict({"foo": torch.zeros(1)})


def test_export_timm_cli(tiny_cfg, tmp_path):
    import json

    from safetensors import safe_open
    from timm.models.vision_transformer import VisionTransformer

    from m3ae.cli import main
    from m3ae.interop.timm import build_timm_kwargs

    model = M3AE(tiny_cfg).eval()
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "vit.safetensors"
    assert main(["export-timm", str(tmp_path / "m"), str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    vit = VisionTransformer(**build_timm_kwargs(kwargs)).eval()
    vit.load_state_dict(sd)
    image = torch.randn(1, 3, tiny_cfg.image_size, tiny_cfg.image_size)
    with torch.no_grad():
        assert (vit.forward_features(image) - model.forward_features(image)).abs().max() < 1e-5
