import torch
import torch.nn.functional as F

from m3ae.losses import M3AELoss, normalize_patches
from m3ae.model import M3AEOutput


def _out(pred, target, imask, logits, text, tmask):
    return M3AEOutput(pred, target, imask, logits, text, tmask, torch.zeros(1, 1, 1))


def test_image_loss_is_mse_over_masked_patches_per_sample():
    pred = torch.zeros(2, 3, 4)
    target = torch.tensor([[[1.0] * 4, [2.0] * 4, [3.0] * 4], [[1.0] * 4, [1.0] * 4, [5.0] * 4]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    loss = M3AELoss(text_weight=0.0)(_out(pred, target, mask, None, None, None))
    # sample 0: mean(1, 4) = 2.5; sample 1: 25 -> mean over samples 13.75
    assert torch.isclose(loss.image_loss, torch.tensor(13.75))
    assert torch.isclose(loss.total, torch.tensor(13.75))


def test_norm_pix_target():
    t = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    n = normalize_patches(t)
    assert torch.allclose(n.mean(-1), torch.zeros(1, 1), atol=1e-6)
    assert torch.allclose(n.var(-1), torch.ones(1, 1), atol=1e-4)


def test_text_loss_only_on_masked_real_tokens_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10, requires_grad=True)
    text = torch.randint(0, 10, (2, 4))
    tmask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    out = _out(torch.zeros(2, 1, 1), torch.ones(2, 1, 1), torch.ones(2, 1, dtype=torch.bool), logits, text, tmask)
    loss = M3AELoss(1.0, 0.5, text_norm="text")(out)
    expected = F.cross_entropy(logits[0, [0, 2]], text[0, [0, 2]])  # sample 1 has no loss positions
    # The default (official) normalisation divides by the batch size: sample 1 adds 0.
    assert torch.isclose(M3AELoss(1.0, 0.5)(out).text_loss, expected / 2)
    assert torch.isclose(loss.text_loss, expected)
    assert torch.isclose(loss.total, 1.0 * 1.0 + 0.5 * expected)
    loss.text_loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[1].abs().sum() == 0
    acc = (logits[0, [0, 2]].argmax(-1) == text[0, [0, 2]]).float().mean()
    assert torch.isclose(loss.text_accuracy, acc)


def test_losses_are_zero_not_nan_without_positions():
    out = _out(torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool),
               torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool))
    loss = M3AELoss()(out)
    assert loss.total == 0 and loss.text_accuracy == 0


def test_matches_official_jax_losses(official_fixtures):
    import numpy as np

    z = np.load(official_fixtures / "reference.npz")
    pad = torch.tensor(z["text_padding_mask"]) > 0
    out = _out(torch.tensor(z["m3ae_masked075_image_output"]), torch.tensor(z["patches"]),
               torch.tensor(z["m3ae_masked075_image_mask"]) > 0, torch.tensor(z["m3ae_masked075_text_output"]),
               torch.tensor(z["text"]).long(), (torch.tensor(z["m3ae_masked075_text_mask"]) > 0) & ~pad)
    loss = M3AELoss(1.0, 0.5)(out)
    assert abs(loss.image_loss.item() - float(z["m3ae_masked075_image_loss"])) < 1e-5
    assert abs(loss.text_loss.item() - float(z["m3ae_masked075_text_loss"])) < 1e-4
    assert abs(loss.text_accuracy.item() - float(z["m3ae_masked075_text_accuracy"])) < 1e-6
    assert abs(loss.total.item() - float(z["m3ae_masked075_total_loss_w1_0.5"])) < 1e-4


def _official_out(z, extra_captionless: bool = False):
    pad = torch.tensor(z["text_padding_mask"]) > 0
    tmask = (torch.tensor(z["m3ae_masked075_text_mask"]) > 0) & ~pad
    parts = [torch.tensor(z["m3ae_masked075_image_output"]), torch.tensor(z["patches"]),
             torch.tensor(z["m3ae_masked075_image_mask"]) > 0, torch.tensor(z["m3ae_masked075_text_output"]),
             torch.tensor(z["text"]).long(), tmask]
    if extra_captionless:  # a 4th sample whose caption was dropped: all padding, nothing to predict
        parts = [torch.cat([t, t[:1]]) for t in parts]
        parts[5][-1] = False
    return _out(*parts)


def test_text_loss_with_a_captionless_sample_follows_the_official_normalisation(official_fixtures):
    """The official loss averages per-sample means over the whole batch B; a sample without a
    caption adds 0. So one caption-less sample added to the fixture's 3 scales the official
    value by 3/4, while the accuracy (a metric over captioned samples) stays the same."""
    import numpy as np

    z = np.load(official_fixtures / "reference.npz")
    official = float(z["m3ae_masked075_text_loss"])
    loss = M3AELoss(1.0, 0.5)(_official_out(z, extra_captionless=True))
    assert abs(loss.text_loss.item() - official * 3 / 4) < 1e-4
    assert abs(loss.text_accuracy.item() - float(z["m3ae_masked075_text_accuracy"])) < 1e-6
    # text_norm="text" ignores the caption-less sample: the fixture's own value.
    other = M3AELoss(1.0, 0.5, text_norm="text")(_official_out(z, extra_captionless=True))
    assert abs(other.text_loss.item() - official) < 1e-4


def test_unknown_text_norm_is_refused():
    import pytest

    with pytest.raises(ValueError, match="text_norm"):
        M3AELoss(text_norm="tokens")
