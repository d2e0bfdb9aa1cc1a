"""Attention maps: shapes, rollout by hand, normalisation over patches / words."""
import pytest
import torch

from m3ae.evaluation.attention import attention_rollout, patch_to_text, token_attention, word_to_image
from m3ae.model import create_model


def test_rollout_by_hand():
    a = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    one = attention_rollout([a[None, None]])
    torch.testing.assert_close(one[0], 0.5 * a + 0.5 * torch.eye(2))
    two = attention_rollout([a[None, None], a[None, None]])
    m = 0.5 * a + 0.5 * torch.eye(2)
    torch.testing.assert_close(two[0], m @ m)


@pytest.mark.parametrize("layer", ["rollout", 0, -1])
def test_cross_modal_maps_normalised(layer, batch_factory):
    model = create_model("tiny", emb_dim=32, depth=2, num_heads=2, dec_emb_dim=32, dec_depth=1,
                         dec_num_heads=2, vocab_size=100, max_text_len=12).eval()
    image, text, pad = batch_factory(model.config, b=3, t=10, lengths=[10, 6, 3])
    text = text % 100
    n_img = model.config.num_patches
    maps = model.attention_maps(image, text, pad)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 1 + n_img + 10, 1 + n_img + 10)
    attn = token_attention(model, image, text, pad, layer)
    assert attn.shape == (3, 1 + n_img + 10, 1 + n_img + 10)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 1 + n_img + 10))
    # Real tokens never draw on caption padding (padding rows keep their own residual path).
    real_rows = torch.cat([torch.ones(3, 1 + n_img, dtype=torch.bool), ~pad], 1)
    seen_pad = attn[..., 1 + n_img:].masked_fill(~pad[:, None, :], 0)[real_rows]
    assert seen_pad.abs().max() == 0
    w2i = word_to_image(attn, n_img, word_index=2)
    assert w2i.shape == (3, n_img)
    torch.testing.assert_close(w2i.sum(-1), torch.ones(3))
    p2t = patch_to_text(attn, n_img, patch_index=5, text_padding_mask=pad)
    torch.testing.assert_close(p2t.sum(-1), torch.ones(3))
    assert (p2t[pad] == 0).all()
    # Single-layer maps are the model's own weights averaged over heads.
    if layer != "rollout":
        torch.testing.assert_close(attn, maps[layer].mean(1))
