"""m3ae.tasks: fill-in-the-blank, reconstruction and zero-shot helpers over the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import m3ae
from m3ae import tasks
from m3ae.data.synthetic import render_sample
from m3ae.evaluation.zero_shot import build_prompt, prompt_log_likelihood


@pytest.fixture(scope="module")
def loaded(api_model_dir):
    return m3ae.load_pretrained(api_model_dir, device="cpu")


@pytest.fixture(scope="module")
def image():
    return render_sample(0, 0, 32)[0]


def test_fill_mask_matches_a_direct_masked_forward(loaded, image):
    model, tokenizer, transform = loaded
    got = tasks.fill_mask(model, tokenizer, image, "a picture of a [MASK] [MASK] circle", top_k=3)
    assert len(got) == 2 and all(len(words) == 3 for words in got)
    # The same forward by hand: positions 4 and 5 of 6 hidden (noise above 0.5 sorts last).
    ids, pad = tokenizer("a picture of a big red circle")
    noise = torch.full(ids.shape, 0.25)
    noise[0, 4:6] = 0.75
    with torch.no_grad():
        out = model(transform(image)[None], ids, pad, image_mask_ratio=0.0, text_mask_ratio=2 / 7,
                    text_noise=noise)
    assert out.text_mask[0].nonzero()[:, 0].tolist() == [4, 5]
    words = tokenizer.word_mask(out.text_logits.shape[-1])  # fill_mask ranks words, never special tokens
    for k, pos in enumerate((4, 5)):
        p, top = out.text_logits[0, pos].masked_fill(~words, float("-inf")).softmax(-1).topk(3)
        assert [w for w, _ in got[k]] == tokenizer.decode_tokens(top.tolist())
        np.testing.assert_allclose([q for _, q in got[k]], p.numpy(), rtol=1e-5)
        assert got[k][0][1] >= got[k][1][1] >= got[k][2][1]


def test_fill_mask_without_image_is_the_caption_alone(loaded, image):
    model, tokenizer, _ = loaded
    prompt = "a picture of a [MASK] circle"
    text_only = tasks.fill_mask(model, tokenizer, None, prompt, top_k=40)
    with_image = tasks.fill_mask(model, tokenizer, image, prompt, top_k=40)
    assert sum(q for _, q in text_only[0]) == pytest.approx(1.0, abs=1e-5)  # the whole vocabulary
    assert dict(text_only[0]) != pytest.approx(dict(with_image[0]), abs=1e-4)


def test_fill_mask_ranks_only_words_the_tokenizer_produces(api_model_dir, image):
    from m3ae.tokenizer import SPECIAL_TOKENS

    tokenizer = m3ae.get_tokenizer(api_model_dir)
    # A fresh tiny model: 1024 token ids against the tokenizer's 31, so almost every id is one
    # the tokenizer never produces (decoded as [UNK]).
    model = m3ae.create_model("tiny", max_text_len=24).eval()
    for img in (image, None):
        got = tasks.fill_mask(model, tokenizer, img, "a picture of a [MASK] circle", top_k=5)
        words = [w for w, _ in got[0]]
        assert len(words) == 5 and not set(words) & set(SPECIAL_TOKENS), words
        assert set(words) <= set(tokenizer.tokenizer.get_vocab())
    everything = tasks.fill_mask(model, tokenizer, image, "a picture of a [MASK] circle", top_k=1000)[0]
    assert len(everything) == tokenizer.vocab_size - len(SPECIAL_TOKENS)
    assert sum(q for _, q in everything) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("call", ["fill_mask", "zero_shot", "reconstruct"])
def test_tasks_without_a_tokenizer_say_so_in_one_line(loaded, image, call):
    model = loaded[0]
    run = {"fill_mask": lambda: tasks.fill_mask(model, None, image, "a [MASK] circle"),
           "zero_shot": lambda: tasks.zero_shot(model, None, image, ["circle", "square"]),
           "reconstruct": lambda: tasks.reconstruct(model, None, image, "a red circle")}[call]
    with pytest.raises(ValueError, match="needs the model's tokenizer.*get_tokenizer") as e:
        run()
    assert "\n" not in str(e.value)
    assert tasks.reconstruct(model, None, image).with_caption is None  # no caption: no tokenizer needed


def test_reconstruct_reads_norm_pix_loss_from_the_model_folder(api_model_dir, image, tmp_path):
    model = m3ae.M3AE.from_pretrained(api_model_dir)
    assert model.norm_pix_loss is False
    model.save_pretrained(tmp_path / "np", extra={"norm_pix_loss": True})
    normed, tokenizer, _ = m3ae.load_pretrained(tmp_path / "np", device="cpu", need_tokenizer=False)
    assert normed.norm_pix_loss is True
    plain = m3ae.load_pretrained(api_model_dir, device="cpu")[0]
    as_recorded = np.asarray(tasks.reconstruct(normed, None, image, seed=1).without_caption)
    told = np.asarray(tasks.reconstruct(plain, None, image, seed=1, norm_pix_loss=True).without_caption)
    untold = np.asarray(tasks.reconstruct(plain, None, image, seed=1).without_caption)
    assert np.array_equal(as_recorded, told) and not np.array_equal(as_recorded, untold)


@pytest.mark.parametrize("prompt, match", [("a picture of a red circle", r"needs at least one \[MASK\]"),
                                           ("[MASK]", "leaves no caption token visible"),
                                           (" ".join(["red"] * 30) + " [MASK]", "more than the model's caption length")])
def test_fill_mask_bad_prompts(loaded, prompt, match):
    model, tokenizer, _ = loaded
    with pytest.raises(ValueError, match=match):
        tasks.fill_mask(model, tokenizer, None, prompt)


def test_reconstruct_keeps_visible_patches_and_hides_the_same_ones(loaded, image):
    model, tokenizer, transform = loaded
    r = tasks.reconstruct(model, tokenizer, image, "a picture of a red circle", mask_ratio=0.75, seed=3)
    orig, masked, without, with_cap = (np.asarray(x).astype(int) for x in r)
    assert orig.shape == (32, 32, 3)
    p = model.config.patch_size
    grid = lambda a: a.reshape(8, p, 8, p, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)  # noqa: E731
    hidden = (grid(masked) != grid(orig)).any(1)
    assert hidden.sum() == 48  # 0.75 of the 64 patches
    for rec in (without, with_cap):
        assert np.abs(grid(rec)[~hidden] - grid(orig)[~hidden]).max() <= 1  # visible: the input
    assert (grid(without)[hidden] != grid(with_cap)[hidden]).any()  # the caption changes the guess
    again = tasks.reconstruct(model, tokenizer, image, seed=3)
    assert np.array_equal(np.asarray(again.masked), np.asarray(r.masked)) and again.with_caption is None
    other = tasks.reconstruct(model, tokenizer, image, seed=4)
    assert not np.array_equal(np.asarray(other.masked), np.asarray(r.masked))


def test_reconstruct_errors(loaded, image):
    model, _, _ = loaded
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        tasks.reconstruct(model, None, image, "a red circle")
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        tasks.reconstruct(model, None, image, mask_ratio=1.0)


def test_encoder_only_model_cannot_reconstruct(image):
    model = m3ae.create_model("tiny", encoder_only=True).eval()
    assert not any(k.startswith(("decoder", "image_head", "text_head")) for k in model.state_dict())
    with pytest.raises(ValueError, match="encoder-only .* cannot reconstruct") as e:
        tasks.reconstruct(model, None, image)
    assert "\n" not in str(e.value)


def test_zero_shot_ranks_by_the_cli_score(loaded, image):
    model, tokenizer, transform = loaded
    classes = ["circle", "square", "triangle", "cross"]
    template = "a picture of a [MASK] [MASK] {}"
    ranked = tasks.zero_shot(model, tokenizer, image, classes, template=template)
    x = transform(image)[None]
    want = {c: prompt_log_likelihood(model, x, build_prompt(tokenizer, template, c), 1)[0].item() for c in classes}
    assert [c for c, _ in ranked] == sorted(classes, key=lambda c: -want[c])
    for c, s in ranked:
        assert s == pytest.approx(want[c], abs=1e-5)
    cal = dict(tasks.zero_shot(model, tokenizer, image, classes, template=template, calibrate=True))
    prior = {c: prompt_log_likelihood(model, None, build_prompt(tokenizer, template, c), 1)[0].item() for c in classes}
    for c in classes:
        assert cal[c] == pytest.approx(want[c] - prior[c], abs=1e-5)
    batch = tasks.zero_shot(model, tokenizer, [image, render_sample(0, 1, 32)[0]], classes, template=template)
    assert len(batch) == 2 and [c for c, _ in batch[0]] == [c for c, _ in ranked]
    np.testing.assert_allclose([s for _, s in batch[0]], [s for _, s in ranked], atol=1e-5)
