import pytest
import torch

from m3ae.config import PRESETS, ModelConfig, model_config
from m3ae.losses import M3AELoss
from m3ae.model import M3AE
from m3ae.ops import num_kept


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "huge"])
def test_every_preset_forward_shapes(preset):
    # Shapes only, on the meta device: no memory or time is spent on the big presets.
    cfg = model_config(preset, image_size=32, patch_size=PRESETS[preset].get("patch_size", 16), max_text_len=8)
    with torch.device("meta"):
        m = M3AE(cfg)
        image = torch.randn(2, 3, 32, 32)
        text = torch.zeros(2, 8, dtype=torch.long)
        pad = torch.zeros(2, 8, dtype=torch.bool)
        out = m(image, text, pad)
        feats = m.forward_features(image, text, pad)
    n = cfg.num_patches
    assert out.image_pred.shape == (2, n, cfg.patch_dim)
    assert out.text_logits.shape == (2, 8, cfg.vocab_size)
    assert feats.shape == (2, 1 + n + 8, cfg.emb_dim)
    assert out.latent.shape == (2, 1 + num_kept(n, 0.75) + num_kept(8, 0.75), cfg.emb_dim)
    if preset in ("small", "base", "large", "huge"):
        assert (cfg.patch_size, cfg.dec_emb_dim, cfg.dec_depth, cfg.dec_num_heads) == (16, 512, 8, 16)


def test_paper_widths():
    assert [model_config(p).emb_dim for p in ("small", "base", "large", "huge")] == [384, 768, 1024, 1280]
    assert model_config("base").ln_eps == 1e-6 and model_config("base").gelu_approximate == "tanh"


def test_tiny_forward_backward_and_masks(tiny_cfg, batch_factory):
    m = M3AE(tiny_cfg)
    image, text, pad = batch_factory(tiny_cfg, b=4, t=12, lengths=[12, 8, 3, 0])
    out = m(image, text, pad)
    # text loss positions: real tokens that were not kept
    assert not (out.text_mask & pad).any()
    assert out.text_mask.sum(1).tolist() == [12 - 3, 8 - 2, 3 - 0, 0]
    assert out.image_mask.sum(1).tolist() == [64 - 16] * 4
    loss = M3AELoss()(out)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert m.patch_embed.weight.grad.abs().sum() > 0 and m.text_embed.weight.grad.abs().sum() > 0


def test_padding_never_influences_real_outputs(tiny_cfg, batch_factory):
    m = M3AE(tiny_cfg).eval()
    image, text, pad = batch_factory(tiny_cfg, b=2, t=12, lengths=[6, 4])
    other = text.clone()
    other[pad] = 7  # change what sits under the padding
    f1 = m.forward_features(image, text, pad)
    f2 = m.forward_features(image, other, pad)
    real = torch.cat([torch.ones(2, 1 + 64, dtype=torch.bool), ~pad], 1)
    assert torch.allclose(f1[real], f2[real], atol=1e-6)
    noise = torch.rand(2, 12)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    o1 = m(image, text, pad, generator=g(), text_noise=noise)
    o2 = m(image, other, pad, generator=g(), text_noise=noise)
    assert torch.allclose(o1.image_pred, o2.image_pred, atol=1e-6)
    assert torch.allclose(o1.text_logits[~pad], o2.text_logits[~pad], atol=1e-5)


def test_image_only_is_mae_and_text_only(tiny_cfg, batch_factory):
    m = M3AE(tiny_cfg)
    image, text, pad = batch_factory(tiny_cfg)
    out = m(image)
    assert out.text_logits is None and out.image_pred.shape[1] == 64
    loss = M3AELoss()(out)
    assert loss.text_loss == 0 and loss.image_loss > 0
    out = m(text=text, text_padding_mask=pad)
    assert out.image_pred is None
    loss = M3AELoss()(out)
    assert loss.image_loss == 0 and loss.text_loss > 0
    with pytest.raises(ValueError):
        m()


def test_mixed_batch_without_some_images_or_captions(tiny_cfg, batch_factory):
    m = M3AE(tiny_cfg).eval()
    image, text, pad = batch_factory(tiny_cfg, b=3, lengths=[10, 0, 7])  # sample 1 has no caption
    image_valid = torch.tensor([True, True, False])  # sample 2 has no image
    noise_i, noise_t = torch.rand(3, 64), torch.rand(3, 12)
    out = m(image, text, pad, image_valid, image_noise=noise_i, text_noise=noise_t)
    assert not out.image_mask[2].any() and not out.text_mask[1].any()
    # sample 2 (no image) must equal a text-only forward of that sample
    alone = m(text=text[2:], text_padding_mask=pad[2:], text_noise=noise_t[2:])
    real = ~pad[2]
    assert torch.allclose(out.text_logits[2][real], alone.text_logits[0][real], atol=1e-5)
    # sample 1 (no caption) must equal an image-only forward of that sample
    alone = m(image[1:2], image_noise=noise_i[1:2])
    assert torch.allclose(out.image_pred[1], alone.image_pred[0], atol=1e-5)


def test_determinism_under_seed(tiny_cfg, batch_factory):
    image, text, pad = batch_factory(tiny_cfg)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        m = M3AE(tiny_cfg)
        outs.append(m(image, text, pad, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(outs[0].image_pred, outs[1].image_pred)
    assert torch.equal(outs[0].text_mask, outs[1].text_mask)


def test_training_forward_returns_decoder_states_and_the_loss_scores_them(tiny_cfg, batch_factory):
    """text_logits=False skips the head; the loss applies it to the masked tokens' states."""
    m = M3AE(tiny_cfg)
    image, text, pad = batch_factory(tiny_cfg)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    full = m(image, text, pad, generator=g())
    states = m(image, text, pad, generator=g(), text_logits=False)
    assert states.text_logits is None and states.text_hidden.shape == (*text.shape, tiny_cfg.dec_emb_dim)
    torch.testing.assert_close(m.text_head(states.text_hidden), full.text_logits)
    a = M3AELoss()(full)
    for fused in (True, False):
        b = M3AELoss(fused_text_loss=fused)(states, text_head=m.text_head)
        torch.testing.assert_close(b.total, a.total)
        torch.testing.assert_close(b.text_accuracy, a.text_accuracy)


def test_type_embeddings_switch_off(tiny_cfg):
    m = M3AE(tiny_cfg, use_type_embedding=False)
    names = dict(m.named_parameters())
    assert "encoder_image_type" not in names and "decoder_text_type" not in names
    assert m(torch.randn(1, 3, 32, 32)).image_pred.shape == (1, 64, 48)


def test_no_weight_decay_and_groups(tiny_cfg):
    m = M3AE(tiny_cfg)
    nwd = m.no_weight_decay()
    assert {"cls_token", "encoder_image_type", "image_mask_token", "text_embed.weight",
            "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias"} <= nwd
    assert "encoder.blocks.0.attn.qkv.weight" not in nwd and "patch_embed.weight" not in nwd
    assert m.group_matcher("patch_embed.weight") == 0
    assert m.group_matcher("encoder.blocks.2.mlp.fc1.weight") == 3
    assert m.group_matcher("encoder.norm.weight") == tiny_cfg.depth + 1


def test_attention_maps_rows_sum_to_one(tiny_cfg, batch_factory):
    m = M3AE(tiny_cfg).eval()
    image, text, pad = batch_factory(tiny_cfg, b=2, lengths=[5, 12])
    maps = m.attention_maps(image, text, pad)
    assert len(maps) == tiny_cfg.depth
    assert maps[0].shape == (2, tiny_cfg.num_heads, 1 + 64 + 12, 1 + 64 + 12)
    assert torch.allclose(maps[-1].sum(-1), torch.ones(2, tiny_cfg.num_heads, 77), atol=1e-5)
    assert maps[0][0, :, :, 1 + 64 + 5:].abs().max() == 0  # padding gets no attention


def test_grad_checkpointing_same_gradients(tiny_cfg, batch_factory):
    image, text, pad = batch_factory(tiny_cfg)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = M3AE(tiny_cfg)
        m.set_grad_checkpointing(ckpt)
        M3AELoss()(m(image, text, pad, generator=torch.Generator().manual_seed(2))).total.backward()
        grads.append(m.encoder.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_and_load_pretrained(tmp_path, tiny_cfg, batch_factory):
    m = M3AE(tiny_cfg).eval()
    m.save_pretrained(tmp_path / "p")
    m2 = M3AE.from_pretrained(tmp_path / "p")
    image, text, pad = batch_factory(tiny_cfg)
    assert torch.equal(m.forward_features(image, text, pad), m2.forward_features(image, text, pad))
    assert m2.config == m.config


def test_text_embedding_init_is_official_by_default():
    """The official code initialises the caption embedding N(0, 1) (Flax nn.Embed); the
    patch projection is xavier-uniform, so at init a token is as visible as a patch."""
    from m3ae import create_model

    torch.manual_seed(0)
    w = create_model("tiny").text_embed.weight
    assert abs(w.std().item() - 1.0) < 0.01 and abs(w.mean().item()) < 0.01
    w = create_model("tiny", text_embed_init_std=0.02).text_embed.weight
    assert abs(w.std().item() - 0.02) < 0.001


def test_drop_path_acts_in_train_mode_only(tiny_cfg, batch_factory):
    from m3ae.model import M3AE

    image, text, pad = batch_factory(tiny_cfg)
    model = M3AE(tiny_cfg)
    assert all(b.drop_path.p == 0 for b in model.encoder.blocks)  # pre-training: none
    model.train()
    a, b = model.forward_features(image, text, pad), model.forward_features(image, text, pad)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.set_drop_path(0.3)
    rates = [blk.drop_path.p for blk in model.encoder.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    torch.manual_seed(1)
    dropped = model.forward_features(image, text, pad)
    assert not torch.allclose(dropped, a)
    model.eval()
    torch.testing.assert_close(model.forward_features(image, text, pad), a.detach(), rtol=0, atol=0)
    assert M3AE(ModelConfig(**{**tiny_cfg.__dict__, "drop_path": 0.2})).encoder.blocks[-1].drop_path.p == pytest.approx(0.2)


def test_encoder_only_model_has_no_decoder(tiny_cfg, batch_factory, tmp_path):
    from m3ae.model import M3AE

    image, text, pad = batch_factory(tiny_cfg)
    full = M3AE(tiny_cfg)
    enc = M3AE(ModelConfig(**{**tiny_cfg.__dict__, "encoder_only": True}))
    enc_keys = set(enc.state_dict())
    assert enc_keys < set(full.state_dict())
    assert not any(k.startswith(("decoder", "image_head", "text_head", "image_mask", "text_mask")) for k in enc_keys)
    enc.load_state_dict({k: v for k, v in full.state_dict().items() if k in enc_keys})
    torch.testing.assert_close(enc.forward_features(image, text, pad), full.forward_features(image, text, pad))
    with pytest.raises(ValueError, match="encoder-only .*cannot reconstruct"):
        enc(image, text, pad)
    enc.save_pretrained(tmp_path / "enc")
    assert M3AE.from_pretrained(tmp_path / "enc").config.encoder_only
