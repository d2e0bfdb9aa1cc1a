"""Zero-shot by reconstruction: exactly the class tokens are masked and scored."""
import pytest
import torch

from m3ae.evaluation.zero_shot import build_prompt, prompt_log_likelihood


def test_prompt_marks_class_tokens(tiny_model):
    _, te = tiny_model
    p = build_prompt(te, "a picture of a [MASK] {} .", "triangle")
    n = int((~p.pad).sum())
    tokens = te.decode_tokens(p.ids[:n])
    assert tokens[:4] == ["a", "picture", "of", "a"] and tokens[-1] == "."
    assert [t for t, s in zip(tokens, p.scored[:n]) if s] == te.decode_tokens(te.ids("triangle"))
    assert p.hidden[4] and not p.scored[4]  # the [MASK] slot: hidden, not scored
    assert p.hidden.sum() == p.scored.sum() + 1
    # Piecewise tokenisation equals tokenising the whole caption.
    whole = te.ids("a picture of a small triangle .")
    assert p.ids[:n].tolist()[:4] == whole[:4] and p.ids[5:n].tolist() == whole[5:]


def test_score_is_log_likelihood_of_class_tokens(tiny_model, batch_factory):
    model, te = tiny_model
    p = build_prompt(te, "a picture of a {}", "circle")
    image = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    mean = prompt_log_likelihood(model, image, p, 2, "mean")
    total = prompt_log_likelihood(model, image, p, 2, "sum")
    torch.testing.assert_close(total, mean * p.scored.sum())
    # Reference: a forward whose text mask is the class tokens, read at those positions.
    n_valid = int((~p.pad).sum())
    noise = torch.where(p.hidden, 0.9, 0.1).expand(2, -1)
    out = model.reconstruct(image, p.ids.expand(2, -1), p.pad.expand(2, -1), image_mask_ratio=0.0,
                            text_mask_ratio=int(p.hidden.sum()) / n_valid, text_noise=noise)
    assert torch.equal(out.text_mask[0], p.hidden)
    ref = out.text_logits.log_softmax(-1)[:, p.scored, :].gather(-1, p.ids[p.scored].expand(2, -1)[..., None])
    torch.testing.assert_close(total, ref.sum((1, 2)))
    assert (mean < 0).all()


def test_template_needs_placeholder(tiny_model):
    with pytest.raises(ValueError, match="exactly one"):
        build_prompt(tiny_model[1], "a photo", "cat")
