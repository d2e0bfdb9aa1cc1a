"""m3ae.demo.measure: the demo's hidden-patch counts follow the model's masking, and its
probe baselines are evaluation's own."""
import numpy as np
import torch

from m3ae.config import build_config
from m3ae.demo import demo_config, measure
from m3ae.evaluation.features import pixel_features, random_init_model
from m3ae.model import M3AE
from m3ae.ops import num_kept, random_masking


def test_hidden_patches_are_the_ones_the_model_hides():
    # The pixels the demo scores as hidden are those of the patches the model itself hides.
    cfg = build_config("tiny", overrides=["model.image_size=20", "model.patch_size=2", "model.image_mask_ratio=0.9"]).model
    noise = torch.rand(3, cfg.num_patches, generator=torch.Generator().manual_seed(0))
    assert cfg.num_patches == 100 and num_kept(cfg.num_patches, 0.9) == 10
    hidden = measure._patch_hidden(noise, cfg)  # (B, H, W) pixels
    per_patch = hidden.reshape(3, cfg.grid_size, cfg.patch_size, cfg.grid_size, cfg.patch_size)[:, :, 0, :, 0]
    m = random_masking(torch.ones(3, cfg.num_patches, dtype=torch.bool), 0.9, noise=noise, all_valid=True)
    assert torch.equal(per_patch.reshape(3, -1), m.mask.bool())


def test_rounding_matches_num_kept_where_int_truncates():
    cfg = build_config("tiny", overrides=["model.image_size=40", "model.patch_size=4", "model.image_mask_ratio=0.9"]).model
    assert cfg.num_patches == 100
    noise = torch.rand(1, cfg.num_patches, generator=torch.Generator().manual_seed(1))
    kept_patches = (~measure._patch_hidden(noise, cfg)).sum().item() // cfg.patch_size ** 2
    assert int(cfg.num_patches * (1 - 0.9)) == 9  # what the old rounding kept
    assert kept_patches == num_kept(cfg.num_patches, 0.9) == 10


def test_probe_baselines_are_evaluations(monkeypatch):
    cfg = demo_config(["model.emb_dim=32", "model.depth=1", "model.dec_emb_dim=32", "model.dec_depth=1"])
    seen = {}

    def fake_probe(train, test, epochs):
        seen.setdefault(len(seen), train.features)
        return type("R", (), {"top1": 0.5})()

    monkeypatch.setattr(measure, "linear_probe", fake_probe)
    model = random_init_model(cfg.model, 123)
    out = measure.probe_comparison(model, cfg, n_train=8, n_test=4, epochs=1)
    x_tr, _ = measure.probe_images(measure.PROBE_SEEDS[0], 8, cfg.model.image_size)
    # order of the probes: trained, random_init, pixels for each task
    assert np.allclose(seen[2], pixel_features(x_tr, 8).numpy()) and seen[2].shape == (8, 192)
    torch.manual_seed(cfg.train.seed)
    same_start = M3AE(cfg.model).eval()
    assert np.allclose(seen[1], measure._mean_pooled(same_start, x_tr))
    assert set(out) == {"colour", "shape", "n_train", "n_test"}
