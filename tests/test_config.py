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


def test_peak_lr_scales_with_batch():
    cfg = build_config("tiny", None, ["train.batch_size=512"])
    assert cfg.train.lr_for(1) == pytest.approx(1.5e-4 * 2)


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


@pytest.mark.parametrize("override,message", [
    # Enumerated fields (typing.Literal): the allowed values and the closest one.
    ("data.source=webdatset", "data.source must be 'synthetic', 'webdataset', 'hdf5', 'table', 'imagefolder', "
                              "'text', 'cache' or 'mixture', got 'webdatset'; did you mean 'webdataset'?"),
    ("data.image_backend=tensr", "data.image_backend must be 'tensor' or 'pil', got 'tensr'; did you mean 'tensor'?"),
    ("data.mixture_mode=sampel", "data.mixture_mode must be 'batch' or 'sample', got 'sampel'; did you mean 'sample'?"),
    ("data.cache_placement=gpu", "data.cache_placement must be 'auto' or 'cpu', got 'gpu'; did you mean 'cpu'?"),
    ("data.cache_interpolation=bicubc", "data.cache_interpolation must be 'bilinear' or 'bicubic', got 'bicubc'; "
                                        "did you mean 'bicubic'?"),
    ("model.gelu_approximate=tahn", "model.gelu_approximate must be 'tanh' or 'none', got 'tahn'; did you mean 'tanh'?"),
    ("train.precision=bf61", "train.precision must be 'fp32', 'bf16' or 'fp16', got 'bf61'; did you mean 'bf16'?"),
    ("train.strategy=deepspeed", "train.strategy must be 'ddp' or 'fsdp', got 'deepspeed'"),
    ("train.text_loss_norm=txt", "train.text_loss_norm must be 'batch' or 'text', got 'txt'; did you mean 'text'?"),
    ("train.precision=16", "train.precision must be 'fp32', 'bf16' or 'fp16', got 16; did you mean 'fp16'?"),
    # Fields of other types: the type they take.
    ("train.batch_size=four", "train.batch_size must be a whole number, got 'four'"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.compile=maybe", "train.compile must be true or false, got 'maybe'"),
    ("data.crop_scale=[0.5]", "data.crop_scale must be a list of 2 numbers such as [0.2,1.0], got [0.5]"),
    ("data.mixture=3", "data.mixture must be a list, got 3"),
    ("train.steps=", "train.steps must be a value of type int, got None"),
    ("data.text_len=Ture", "data.text_len must be a whole number, got 'Ture'"),
])
def test_a_wrong_value_is_a_one_line_error_naming_what_the_field_takes(override, message):
    with pytest.raises(ValueError) as e:
        build_config("tiny", None, [override])
    assert str(e.value) == message


def test_enumerated_fields_are_checked_however_the_config_is_built(tmp_path):
    import dataclasses

    from m3ae.config import DataConfig, ModelConfig, TrainConfig
    from m3ae.pretrained import read_model_config

    with pytest.raises(ValueError, match="did you mean 'hdf5'"):
        DataConfig(source="hdf")
    with pytest.raises(ValueError, match="train.precision must be"):
        dataclasses.replace(TrainConfig(), precision="fp8")
    (tmp_path / "config.json").write_text('{"gelu_approximate": "exact"}')
    with pytest.raises(ValueError, match="model.gelu_approximate must be 'tanh' or 'none', got 'exact'"):
        read_model_config(tmp_path)
    assert ModelConfig(gelu_approximate="none").gelu_approximate == "none"
    assert DataConfig(source="cache").source == "cache"


def test_looser_spellings_become_the_declared_type():
    cfg = build_config("tiny", None, ["train.steps=1e3", "train.lr=1", "data.tokenizer=", "train.lr=",
                                      "data.crop_scale=[1,1]", "data.urls=7"])
    assert cfg.train.steps == 1000 and type(cfg.train.steps) is int
    assert cfg.train.lr is None and cfg.data.tokenizer == "" and cfg.data.urls == "7"
    assert cfg.data.crop_scale == (1.0, 1.0) and type(cfg.data.crop_scale[0]) is float
    assert type(build_config("tiny", None, ["train.lr=1"]).train.lr) is float
