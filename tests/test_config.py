import pytest

from m3ae.config import Config, build_config, model_config


def test_preset_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nmodel:\n  emb_dim: 64\ntrain:\n  steps: 7\n")
    cfg = build_config(None, str(f), ["train.lr=1e-3", "model.depth=2", "data.crop_scale=[0.5,1.0]"])
    assert cfg.preset == "tiny" and cfg.model.emb_dim == 64 and cfg.model.depth == 2
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.model.image_size == 32  # from the preset


def test_round_trip_yaml_and_json(tmp_path):
    cfg = build_config("tiny", None, ["train.batch_size=8"])
    for name in ("a.yaml", "a.json"):
        cfg.save(tmp_path / name)
        assert Config.load(tmp_path / name) == cfg


def test_effective_lr_scales_with_batch():
    cfg = build_config("tiny", None, ["train.batch_size=512"])
    assert cfg.train.effective_lr == pytest.approx(1.5e-4 * 2)


@pytest.mark.parametrize("bad", ["train.nope=1", "nosection=1", "model.emb_dim"])
def test_bad_overrides_are_clear(bad):
    with pytest.raises(ValueError):
        build_config("tiny", None, [bad])


def test_invalid_model_numbers():
    with pytest.raises(ValueError, match="divisible"):
        model_config("tiny", emb_dim=130)
    with pytest.raises(ValueError, match="multiple"):
        model_config("tiny", image_size=30)
    with pytest.raises(KeyError):
        model_config("gigantic")


def test_quarter_mask_fraction_is_a_fraction():
    assert build_config("tiny", None, ["train.quarter_mask_fraction=0.5"]).train.quarter_mask_fraction == 0.5
    with pytest.raises(ValueError, match="quarter_mask_fraction must be in"):
        build_config("tiny", None, ["train.quarter_mask_fraction=1.5"])
