"""m3ae.load_pretrained / get_tokenizer / list_models / create_model(pretrained=) and the
model's pooled features, checked against the layers evaluation uses (``m3ae embed``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import m3ae
from m3ae.cli import main
from m3ae.data import EvalTransform
from m3ae.data.synthetic import render_sample
from m3ae.evaluation.features import Features, load_model


def test_load_pretrained_three_lines(api_model_dir):
    model, tokenizer, transform = m3ae.load_pretrained(api_model_dir, device="cpu")
    assert not model.training
    ref_model, ref_te = load_model(api_model_dir, "cpu", need_tokenizer=True)
    for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), k
    ids, pad = tokenizer("a picture of a red circle")
    ref_ids, ref_pad = ref_te(["a picture of a red circle"])
    assert torch.equal(ids, ref_ids) and torch.equal(pad, ref_pad)
    assert ids.shape == (1, model.config.max_text_len) and int((~pad).sum()) == 6
    ids2, _ = tokenizer(["a red circle", "a blue square"])
    assert ids2.shape == (2, model.config.max_text_len)
    assert tokenizer.decode(ids[0]) == "a picture of a red circle"


def test_load_pretrained_accepts_the_run_folder(api_model_dir):
    model, tokenizer, _ = m3ae.load_pretrained(api_model_dir.parent, device="cpu")  # RUN, not RUN/final
    assert tokenizer is not None and model.config.emb_dim == 32


def test_transform_gives_the_evaluation_pixels(api_model_dir):
    _, _, transform = m3ae.load_pretrained(api_model_dir, device="cpu")
    img, *_ = render_sample(0, 3, 48)  # a 48 px image: resized and cropped to the model's 32
    want = EvalTransform(32)({"image": img})["image"]
    arr = np.asarray(img)
    for x in (img, arr, torch.from_numpy(arr.copy()).permute(2, 0, 1)):
        got = transform(x)
        assert got.shape == (3, 32, 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    ("cat.jpg", "PIL image"), (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 5), np.uint8), r"\(H, W, 3\)"), (torch.zeros(3, 8, 8), "uint8"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), r"\(3, H, W\)")])
def test_transform_rejects_bad_images_in_one_line(api_model_dir, bad, match):
    _, _, transform = m3ae.load_pretrained(api_model_dir, device="cpu")
    with pytest.raises((TypeError, ValueError), match=match) as e:
        transform(bad)
    assert "\n" not in str(e.value)


def test_tokenizer_truncates_with_a_note_and_rejects_non_text(api_model_dir):
    tokenizer = m3ae.get_tokenizer(api_model_dir)
    assert tokenizer.text_len == 24
    with pytest.warns(UserWarning, match="truncated to the model's 24 tokens"):
        ids, pad = tokenizer(" ".join(["red"] * 30))
    assert not pad.any()
    with pytest.raises(TypeError, match="str or a list of str"):
        tokenizer(3)


def test_missing_model_is_one_line_and_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        m3ae.load_pretrained(tmp_path / "nope")


def test_list_models_counts_parameters():
    models = {name: m3ae.model_info(name) for name in m3ae.list_models()}
    tiny = m3ae.create_model("tiny")
    assert models["tiny"].params == sum(p.numel() for p in tiny.parameters())
    assert models["tiny"].encoder_params == sum(
        p.numel() for n, p in tiny.named_parameters()
        if n.startswith(("patch_embed", "text_embed", "cls_token", "encoder.", "encoder_")))
    aliases = {f"m3ae_{size}_patch16" for size in ("small", "base", "large", "huge")}
    assert set(models) | aliases == set(m3ae.PRESETS)
    assert models["base"].emb_dim == 768 and 1.4e8 < models["base"].params < 1.6e8


def test_list_models_gives_names_once_as_timm_and_open_clip_do():
    names = m3ae.list_models()
    assert names == ["tiny", "small", "base", "large", "huge"]  # names (str), each architecture once
    assert "tiny" in names and all(isinstance(n, str) for n in names)
    alias = m3ae.model_info("m3ae_base_patch16")  # an alias is not listed, but every name works
    assert alias._replace(name="base") == m3ae.model_info("base")
    assert m3ae.create_model("m3ae_small_patch16").config.emb_dim == 384


def test_one_tokenizer_class_and_deprecated_names(api_model_dir):
    from m3ae.data import Collator
    from m3ae.tokenizer import TextTokenizer

    model, tokenizer, _ = m3ae.load_pretrained(api_model_dir, device="cpu")
    assert type(tokenizer) is TextTokenizer and type(m3ae.get_tokenizer(api_model_dir)) is TextTokenizer
    with pytest.warns(DeprecationWarning, match="CaptionTokenizer is now m3ae.TextTokenizer"):
        assert m3ae.CaptionTokenizer is TextTokenizer
    with pytest.warns(DeprecationWarning, match="load_model is deprecated"):
        old_model, old_tokenizer = load_model(api_model_dir, "cpu")
    assert type(old_tokenizer) is TextTokenizer
    # The data path takes the same object and cuts long captions silently, as documented.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = Collator(tokenizer)([{"caption": " ".join(["red"] * 30), "key": "k"}])
    assert batch["text"].shape == (1, 24) and not batch["text_padding_mask"].any()
    # What load_pretrained returns can be saved beside the model again.
    out = model.save_pretrained(api_model_dir.parent / "again", tokenizer)
    assert m3ae.get_tokenizer(out)("a red circle")[0].tolist() == tokenizer("a red circle")[0].tolist()


def test_a_folder_without_tokenizer_says_so_at_load(api_model_dir, tmp_path):
    folder = tmp_path / "converted"
    m3ae.M3AE.from_pretrained(api_model_dir).save_pretrained(folder)  # as convert-official without --tokenizer
    with pytest.warns(UserWarning, match=r"holds no tokenizer.json.*convert-official.*--tokenizer.*get_tokenizer"):
        model, tokenizer, _ = m3ae.load_pretrained(folder, device="cpu")
    assert tokenizer is None
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        m3ae.load_pretrained(folder, device="cpu", need_tokenizer=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # image-only work: no warning
        m3ae.load_pretrained(folder, device="cpu", need_tokenizer=False)


def test_create_model_pretrained(api_model_dir):
    cfg = m3ae.load_pretrained(api_model_dir, device="cpu")[0].config
    arch = dict(emb_dim=32, depth=2, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
                vocab_size=cfg.vocab_size, max_text_len=24)
    model = m3ae.create_model("tiny", pretrained=api_model_dir, **arch)
    ref = m3ae.M3AE.from_pretrained(api_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError, match=r"not a .tiny. model: it has .*emb_dim=32 \(preset: 128\)"):
        m3ae.create_model("tiny", pretrained=api_model_dir)


@pytest.mark.parametrize("modality", ["image", "text", "both"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_encode_equals_m3ae_embed(api_model_dir, tmp_path, modality, pool):
    out = tmp_path / "f.safetensors"
    assert main(["embed", str(api_model_dir), "--data", "shapes:5", "-o", str(out), "--modality", modality,
                 "--pool", pool, "--no-progress", "--device", "cpu"]) == 0
    want = Features.load(out).features
    model, tokenizer, transform = m3ae.load_pretrained(api_model_dir, device="cpu")
    samples = [render_sample(0, i, 32) for i in range(5)]
    images = torch.stack([transform(img) for img, *_ in samples])
    ids, pad = tokenizer([caption for _, caption, *_ in samples])
    with torch.no_grad():
        got = {"image": lambda: model.encode_image(images, pool=pool),
               "text": lambda: model.encode_text(ids, pad, pool=pool),
               "both": lambda: model.encode(images, ids, pad, pool=pool)}[modality]()
    assert got.shape == (5, 32)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_mean_pool_leaves_padding_out(api_model_dir):
    model, tokenizer, _ = m3ae.load_pretrained(api_model_dir, device="cpu")
    ids, pad = tokenizer(["a red circle"])
    with torch.no_grad():
        tokens = model.forward_features(text=ids, text_padding_mask=pad)
        got = model.encode_text(ids, pad, pool="mean")
        one = model.encode_text(ids[0], pad[0], pool="cls")  # an unbatched caption is a batch of one
    torch.testing.assert_close(got[0], tokens[0, 1:4].mean(0))
    torch.testing.assert_close(one, tokens[:, 0])


def test_encode_rejects_raw_pixels_and_bad_pools(api_model_dir):
    model, _, _ = m3ae.load_pretrained(api_model_dir, device="cpu")
    with pytest.raises(ValueError, match="normalised float tensors .* got a torch.uint8 tensor"):
        model.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 32x32 images"):
        model.encode_image(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pool must be one of"):
        model.encode_image(torch.zeros(1, 3, 32, 32), pool="max")


def test_public_names_are_documented():
    from pathlib import Path

    from m3ae import tasks

    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    for mod in (m3ae, tasks):
        for name in mod.__all__:
            obj = getattr(mod, name)  # __all__ lists only names that exist
            if name.startswith("__") or not callable(obj):
                continue
            assert (obj.__doc__ or "").strip(), f"{mod.__name__}.{name} has no docstring"
            assert f"`{name}" in api, f"docs/api.md does not list {name}"
