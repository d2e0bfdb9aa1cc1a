"""The optimised training paths compute the same losses and gradients as the plain ones.

Every speed-up the trainer uses must be a pure re-arrangement of the same computation: the
text head scored only at masked tokens, fused with its cross-entropy; trimming caption
padding; the one-pass cross-entropy; fused AdamW; float32 attention under CPU autocast.
Each is compared here against the plain path, number by number.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m3ae import losses as losses_mod
from m3ae.config import model_config
from m3ae.losses import M3AELoss
from m3ae.model import M3AE
from m3ae.ops import linear_cross_entropy, trim_text_padding
from m3ae.optim import param_groups


@pytest.fixture
def cfg():
    return model_config("tiny", vocab_size=300, max_text_len=16)


def _batch(cfg, lengths, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(5, cfg.vocab_size, (b, t), generator=g)
    pad = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    text = text.masked_fill(pad, 0)
    img_noise = torch.rand(b, cfg.num_patches, generator=g)
    txt_noise = torch.rand(b, t, generator=g)
    return image, text, pad, img_noise, txt_noise


def _loss_and_grads(model, image, text, pad, img_noise, txt_noise, path):
    """path: "logits" (the head at every position, the plain path), "fused" or "unfused"
    (the training forward: the loss scores the masked tokens' decoder states)."""
    model.zero_grad(set_to_none=True)
    out = model(image, text, pad, image_noise=img_noise, text_noise=txt_noise, text_logits=path == "logits")
    if path == "logits":
        loss = M3AELoss()(out)
    else:
        loss = M3AELoss(fused_text_loss=path == "fused")(out, text_head=model.text_head)
    loss.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def _assert_same(a, b, ga, gb, atol=1e-5, rtol=1e-4):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("path", ["unfused", "fused"])
def test_masked_token_text_loss_gives_the_same_loss_and_gradients(cfg, path):
    model = M3AE(cfg)
    data = _batch(cfg, [16, 11, 7, 3, 1])
    la, ga = _loss_and_grads(model, *data, path="logits")
    lf, gf = _loss_and_grads(model, *data, path=path)
    assert la.text_loss > 1.0  # a real cross-entropy over 300 tokens, not a degenerate zero
    _assert_same(la, lf, ga, gf)
    # the data-parallel denominators (global counts) are honoured the same way, and the
    # host-known number of masked tokens (the trainer's static size) changes nothing
    out_a = model(*data[:3], image_noise=data[3], text_noise=data[4])
    out_f = model(*data[:3], image_noise=data[3], text_noise=data[4], text_logits=False)
    n_tok = int(out_f.text_mask.sum())
    for denom in (2.0, 7.0):
        a = M3AELoss()(out_a, 3.0, denom)
        f = M3AELoss(fused_text_loss=path == "fused")(out_f, 3.0, denom, text_head=model.text_head,
                                                      masked_tokens=n_tok)
        torch.testing.assert_close(f.text_loss, a.text_loss)
        torch.testing.assert_close(f.text_accuracy, a.text_accuracy)


@pytest.mark.parametrize("block_elements", [None, 4 * 300])  # one block; blocks of 4 rows
def test_linear_cross_entropy_matches_linear_then_cross_entropy(block_elements):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 24, generator=g, requires_grad=True)
    w = (torch.randn(300, 24, generator=g) * 0.3).requires_grad_()
    b = torch.randn(300, generator=g).requires_grad_()
    target = torch.randint(0, 300, (13,), generator=g)
    rw = torch.rand(13, generator=g)
    total, nll, hit = linear_cross_entropy(h, w, b, target, rw, block_elements=block_elements)
    total.backward()
    fused_grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    ref_nll = F.cross_entropy(F.linear(h, w, b), target, reduction="none")
    (ref_nll * rw).sum().backward()
    torch.testing.assert_close(nll, ref_nll.detach())
    torch.testing.assert_close(total, (ref_nll * rw).sum().detach())
    for got, t in zip(fused_grads, (h, w, b)):
        torch.testing.assert_close(got, t.grad)
    # without gradients (evaluation) only the loss is computed, and it is the same
    with torch.no_grad():
        again = linear_cross_entropy(h, w, b, target, rw, block_elements=block_elements)
    assert not again[0].requires_grad
    torch.testing.assert_close(again[0], total.detach())
    assert torch.equal(again[2], hit)


def test_fused_text_head_counts_top1_hits_like_argmax(cfg):
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12, 9])
    with torch.no_grad():
        model.text_head.bias[7] = 100.0  # every prediction is token 7 ...
        text = data[1].masked_fill(torch.rand(data[1].shape, generator=torch.Generator().manual_seed(0)) < 0.5, 7)
        text = text.masked_fill(data[2], 0)  # ... and about half the caption tokens are 7
        args = (data[0], text, data[2])
        kw = dict(image_noise=data[3], text_noise=data[4])
        ref = M3AELoss()(model(*args, **kw))
        fused = M3AELoss()(model(*args, **kw, text_logits=False), text_head=model.text_head)
    assert 0.2 < float(ref.text_accuracy) < 0.8
    torch.testing.assert_close(fused.text_accuracy, ref.text_accuracy)


def test_trim_text_padding_cuts_to_the_longest_caption():
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])
    pad = text == 0
    t, p = trim_text_padding(text, pad)
    assert t.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert p.tolist() == [[False, False, False], [False, True, True]]
    # all padding keeps one position so shapes stay valid; None passes through
    t, p = trim_text_padding(text[:, 3:], pad[:, 3:])
    assert t.shape == (2, 1) and p.all()
    assert trim_text_padding(None, None) == (None, None)
    # a length the collate function already knows gives the same cut without reading the mask
    assert torch.equal(trim_text_padding(text, pad, 3)[0], trim_text_padding(text, pad)[0])


@pytest.mark.parametrize("path", ["logits", "unfused", "fused"])
def test_trimming_caption_padding_gives_the_same_loss_and_gradients(cfg, path):
    model = M3AE(cfg)
    image, text, pad, img_noise, txt_noise = _batch(cfg, [10, 9, 6, 4])
    full = _loss_and_grads(model, image, text, pad, img_noise, txt_noise, path)
    t, p = trim_text_padding(text, pad)
    assert t.shape[1] == 10  # fewer encoder slots (floor(10 * .25) = 2 < 4) and decoder positions
    trimmed = _loss_and_grads(model, image, t, p, img_noise, txt_noise[:, :10], path)
    _assert_same(full[0], trimmed[0], full[1], trimmed[1])


def test_one_pass_cross_entropy_matches_cross_entropy_and_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 1000, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 1000, (37,), generator=g)
    targets[:5] = logits[:5].argmax(-1)  # some hits, so accuracy is not trivially 0
    ce, correct = losses_mod._ce_and_correct(logits, targets)
    torch.testing.assert_close(ce, F.cross_entropy(logits, targets, reduction="none"))
    assert torch.equal(correct, (logits.argmax(-1) == targets).to(correct.dtype))
    assert correct.sum() == 5
    # gradients: same as cross_entropy's
    a = logits.clone().requires_grad_()
    losses_mod._ce_and_correct(a, targets)[0].sum().backward()
    b = logits.clone().requires_grad_()
    F.cross_entropy(b, targets, reduction="sum").backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kind", ["foreach", "fused"])
def test_fused_and_foreach_adamw_follow_the_per_parameter_loop(cfg, kind):
    # The same gradients each step (from the model's first backward, scaled), so that only
    # the optimizers' arithmetic is compared, not the chaos of re-running the model.
    torch.manual_seed(0)
    _, grads = _loss_and_grads(M3AE(cfg), *_batch(cfg, [16, 8, 3]), path="fused")
    params = {}
    for variant in ("plain", kind):
        torch.manual_seed(0)
        model = M3AE(cfg)
        kw = dict(foreach=False) if variant == "plain" else {kind: True}
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), **kw)
        for i in range(3):
            for n, p in model.named_parameters():
                p.grad = grads[n] * (1.0 + i) if n in grads else None
            opt.step()
        params[variant] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    init = M3AE(cfg).text_head.weight
    assert (params["plain"]["text_head.weight"] - init).abs().max() > 1e-3  # the steps moved it
    for n in params["plain"]:
        torch.testing.assert_close(params[kind][n], params["plain"][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["unfused", "fused"])
def test_bf16_autocast_stays_close_to_fp32(cfg, path):
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12, 9, 4])
    l32, g32 = _loss_and_grads(model, *data, path=path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16, g16 = _loss_and_grads(model, *data, path=path)
    torch.testing.assert_close(l16.image_loss, l32.image_loss, rtol=3e-2, atol=0)
    torch.testing.assert_close(l16.text_loss, l32.text_loss, rtol=3e-2, atol=0)
    for n in ("text_head.weight", "text_head.bias", "decoder.blocks.0.attn.qkv.weight"):
        cos = F.cosine_similarity(g16[n].flatten().float(), g32[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos)
        assert g16[n].dtype == torch.float32


def test_cpu_autocast_runs_attention_in_float32(cfg, monkeypatch):
    """CPU bf16 attention kernels are several times slower than float32 ones (RESULTS.md)."""
    import m3ae.model

    seen = []
    real = m3ae.model.attention

    def spy(q, k, v, *args):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *args)

    monkeypatch.setattr(m3ae.model, "attention", spy)
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*data[:3], image_noise=data[3], text_noise=data[4], text_logits=False)
    assert seen and all(s == (torch.float32, False) for s in seen)
    assert out.image_pred.dtype == torch.bfloat16  # the rest of the model stays in bf16


@pytest.mark.parametrize("length", [23, 200])
def test_explicit_attention_matches_the_fused_kernel(length, monkeypatch):
    """Short CPU sequences take plain matmul + softmax (faster there); both paths must give
    the same outputs and gradients, padding keys included."""
    import m3ae.model

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, length, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = (torch.rand(3, 1, 1, length, generator=g) > 0.3)
    mask[..., 0] = True
    grad_out = torch.randn(3, 2, length, 16, generator=g)
    results = {}
    for limit in (0, 10_000):  # 0: always the fused kernel; 10_000: always explicit
        monkeypatch.setattr(m3ae.model, "EXPLICIT_CPU_ATTENTION_MAX_LEN", limit)
        out, weights = m3ae.model.attention(q, k, v, mask)
        assert weights is None
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[limit] = (out, *grads)
    for fused, explicit in zip(results[0], results[10_000]):
        torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)


def test_short_cpu_sequences_skip_the_fused_attention_kernel(monkeypatch):
    import m3ae.model

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(m3ae.model.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[-2]) or real(*a, **kw))
    limit = m3ae.model.EXPLICIT_CPU_ATTENTION_MAX_LEN
    for length in (limit, limit + 1):
        q = torch.randn(1, 1, length, 8)
        m3ae.model.attention(q, q, q)
    assert calls == [limit + 1]
