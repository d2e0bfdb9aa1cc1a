import torch
from PIL import Image

from m3ae.data.transforms import EvalTransform, PretrainTransform, denormalize, swap_left_right


def test_swap_left_right_whole_words_and_case():
    assert swap_left_right("a circle on the left and Right of a leftover") == \
        "a circle on the right and Left of a leftover"
    assert swap_left_right("LEFT") == "RIGHT"


def test_flip_swaps_caption_and_pixels():
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 16))  # white stripe on the left
    t = PretrainTransform(16, crop_scale=(1.0, 1.0), hflip=1.0)
    out = t(dict(image=img, caption="a stripe on the left"))
    assert out["caption"] == "a stripe on the right"
    px = denormalize(out["image"])
    assert px[:, :, -2:].mean() > 0.9 and px[:, :, :2].mean() < 0.1
    keep = PretrainTransform(16, crop_scale=(1.0, 1.0), hflip=0.0)(dict(image=img, caption="on the left"))
    assert keep["caption"] == "on the left"


def test_greyscale_and_eval_shapes():
    img = Image.new("L", (40, 30), 128)
    out = EvalTransform(32)(dict(image=img))
    assert out["image"].shape == (3, 32, 32)
    assert torch.allclose(denormalize(out["image"]), torch.full((3, 32, 32), 128 / 255), atol=0.02)
    out = PretrainTransform(24)(dict(image=img.convert("RGBA"), caption=None))
    assert out["image"].shape == (3, 24, 24) and out["caption"] is None
