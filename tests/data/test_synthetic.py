import numpy as np
import torch

from m3ae.data import Collator, EpochSampler, ShapesDataset, keeps_caption
from m3ae.data.synthetic import COLOURS, SHAPES, position_phrase, render_sample
from m3ae.tokenizer import TextTokenizer, train_wordpiece


def test_deterministic_and_independent_of_image_size():
    a = render_sample(3, 17, 32)
    b = render_sample(3, 17, 32)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1]
    assert render_sample(3, 17, 64)[1] == a[1]  # the caption does not depend on resolution
    assert render_sample(4, 17, 32)[1] != a[1] or render_sample(4, 18, 32)[1] != render_sample(3, 18, 32)[1]


def test_caption_describes_the_pixels():
    # Each named shape's colour is the colour found at its centre, and the shapes are named
    # in reading order (so "the first-named shape", the label, is well defined).
    checked = hits = 0
    for i in range(60):
        img, caption, label, objects = render_sample(0, i, 64)
        assert caption.startswith(("a ", "there", "this")) and SHAPES[label] in caption
        assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
        arr = np.asarray(img).astype(float)
        for o in objects:
            assert f"{o['colour']} {o['shape']} {position_phrase(o['row'], o['col'])}" in caption
            cx, cy = (int(c * 64) for c in o["centre"])
            centre = arr[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
            checked += 1
            hits += nearest == o["colour"]
    assert checked > 60 and hits >= 0.95 * checked


def test_labels_are_balanced_enough():
    labels = [ShapesDataset(500)[i]["label"] for i in range(500)]
    counts = np.bincount(labels, minlength=len(SHAPES))
    assert counts.min() > 0.6 * 500 / len(SHAPES)


def test_epoch_sampler_covers_once_and_resumes():
    s = EpochSampler(10, seed=1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10))
    s.set_position(0, 4)
    assert list(s) == first[4:]  # resuming mid-epoch continues the same order
    s.set_position(1, 0)
    assert [i for i, _ in s] != [i for i, _ in first]


def test_paired_fraction_is_deterministic_and_accurate():
    keys = [f"k{i}" for i in range(20000)]
    kept = [keeps_caption(k, 0.3) for k in keys]
    assert abs(sum(kept) / len(keys) - 0.3) < 0.01
    assert kept == [keeps_caption(k, 0.3) for k in keys]
    assert all(keeps_caption(k, 1.0) for k in keys[:10])


def test_collator_marks_missing_modalities():
    tok = TextTokenizer(train_wordpiece(["a red circle"] * 5, vocab_size=50), text_len=5)
    img = torch.zeros(3, 8, 8)
    batch = Collator(tok)([dict(key="a", image=img, caption="a red circle", label=1),
                           dict(key="b", image=None, caption="a circle", label=2),
                           dict(key="c", image=img, caption=None)])
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image_valid"].tolist() == [True, False, True]
    assert batch["text_padding_mask"][2].all() and not batch["text_padding_mask"][0, :3].any()
    assert batch["label"].tolist() == [1, 2, -1]
    only_images = Collator(tok)([dict(key="a", image=img), dict(key="b", image=img)])
    assert only_images["text"] is None and only_images["image_valid"] is None
