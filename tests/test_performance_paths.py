"""The optimised training paths compute the same losses and gradients as the plain ones.

Every speed-up measured in benchmarks/RESULTS.md must be a pure re-arrangement of the
same computation: masked-only text logits, the fused text head + cross-entropy, trimming
caption padding, the one-pass cross-entropy, fused AdamW, float32 attention under CPU
autocast. Each is compared here against the plain path, number by number.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from m3ae import losses as losses_mod
from m3ae.config import model_config
from m3ae.losses import M3AELoss
from m3ae.model import M3AE
from m3ae.ops import trim_text_padding
from m3ae.training.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = mod
    spec.loader.exec_module(mod)
    return mod


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


def _loss_and_grads(model, image, text, pad, img_noise, txt_noise, text_logits):
    model.zero_grad(set_to_none=True)
    out = model(image, text, pad, image_noise=img_noise, text_noise=txt_noise, text_logits=text_logits)
    loss = M3AELoss()(out)
    loss.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def _assert_same(a, b, ga, gb, atol=1e-5, rtol=1e-4):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


def test_masked_text_logits_give_the_same_loss_and_gradients(cfg):
    model = M3AE(cfg)
    data = _batch(cfg, [16, 11, 7, 3, 1])
    la, ga = _loss_and_grads(model, *data, text_logits="all")
    lm, gm = _loss_and_grads(model, *data, text_logits="masked")
    assert la.text_loss > 1.0  # a real cross-entropy over 300 tokens, not a degenerate zero
    _assert_same(la, lm, ga, gm)


@pytest.mark.parametrize("block_elements", [None, 4 * 300])  # one block; blocks of 4 rows
def test_fused_text_head_gives_the_same_loss_and_gradients(cfg, monkeypatch, block_elements):
    import functools

    import m3ae.model

    if block_elements:
        monkeypatch.setattr(m3ae.model, "linear_cross_entropy", functools.partial(
            m3ae.ops.linear_cross_entropy, block_elements=block_elements))
    model = M3AE(cfg)
    data = _batch(cfg, [16, 11, 7, 3, 1])
    la, ga = _loss_and_grads(model, *data, text_logits="all")
    lf, gf = _loss_and_grads(model, *data, text_logits="fused")
    assert la.text_loss > 1.0
    _assert_same(la, lf, ga, gf)
    # the data-parallel denominators (global counts) are honoured the same way
    out_a = model(*data[:3], image_noise=data[3], text_noise=data[4], text_logits="all")
    out_f = model(*data[:3], image_noise=data[3], text_noise=data[4], text_logits="fused")
    for denom in (2.0, 7.0):
        a, f = M3AELoss()(out_a, 3.0, denom), M3AELoss()(out_f, 3.0, denom)
        torch.testing.assert_close(f.text_loss, a.text_loss)
        torch.testing.assert_close(f.text_accuracy, a.text_accuracy)


def test_fused_text_head_counts_top1_hits_like_argmax(cfg):
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12, 9])
    with torch.no_grad():
        model.text_head.bias[7] = 100.0  # every prediction is token 7 ...
        text = data[1].masked_fill(torch.rand(data[1].shape, generator=torch.Generator().manual_seed(0)) < 0.5, 7)
        text = text.masked_fill(data[2], 0)  # ... and about half the caption tokens are 7
        args = (data[0], text, data[2])
        kw = dict(image_noise=data[3], text_noise=data[4])
        ref = M3AELoss()(model(*args, **kw, text_logits="all"))
        fused = M3AELoss()(model(*args, **kw, text_logits="fused"))
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


@pytest.mark.parametrize("text_logits", ["all", "masked", "fused"])
def test_trimming_caption_padding_gives_the_same_loss_and_gradients(cfg, text_logits):
    model = M3AE(cfg)
    image, text, pad, img_noise, txt_noise = _batch(cfg, [10, 9, 6, 4])
    full = _loss_and_grads(model, image, text, pad, img_noise, txt_noise, text_logits)
    t, p = trim_text_padding(text, pad)
    assert t.shape[1] == 10  # fewer encoder slots (floor(10 * .25) = 2 < 4) and decoder positions
    trimmed = _loss_and_grads(model, image, t, p, img_noise, txt_noise[:, :10], text_logits)
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
    # the (B, T, V) layout of the plain path agrees too
    ce3, correct3 = losses_mod._ce_and_correct(logits.view(1, 37, 1000), targets.view(1, 37))
    torch.testing.assert_close(ce3.view(-1), ce)
    # gradients: same as cross_entropy's
    a = logits.clone().requires_grad_()
    losses_mod._ce_and_correct(a, targets)[0].sum().backward()
    b = logits.clone().requires_grad_()
    F.cross_entropy(b, targets, reduction="sum").backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_optimised_loss_equals_the_reference_loss(cfg, monkeypatch):
    bench = _load_bench()
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12, 5, 2], seed=3)
    fast = _loss_and_grads(model, *data, text_logits="masked")
    monkeypatch.setattr(losses_mod, "_ce_and_correct", bench.reference_ce_and_correct)
    ref = _loss_and_grads(model, *data, text_logits="all")
    _assert_same(fast[0], ref[0], fast[1], ref[1])


@pytest.mark.parametrize("kind", ["foreach", "fused"])
def test_fused_and_foreach_adamw_follow_the_per_parameter_loop(cfg, kind):
    # The same gradients each step (from the model's first backward, scaled), so that only
    # the optimizers' arithmetic is compared, not the chaos of re-running the model.
    torch.manual_seed(0)
    _, grads = _loss_and_grads(M3AE(cfg), *_batch(cfg, [16, 8, 3]), text_logits="masked")
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


@pytest.mark.parametrize("text_logits", ["masked", "fused"])
def test_bf16_autocast_stays_close_to_fp32(cfg, text_logits):
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12, 9, 4])
    l32, g32 = _loss_and_grads(model, *data, text_logits=text_logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16, g16 = _loss_and_grads(model, *data, text_logits=text_logits)
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
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(m3ae.model.F, "scaled_dot_product_attention", spy)
    model = M3AE(cfg)
    data = _batch(cfg, [16, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*data[:3], image_noise=data[3], text_noise=data[4], text_logits="fused")
    assert seen and all(s == (torch.float32, False) for s in seen)
    assert out.image_pred.dtype == torch.bfloat16  # the rest of the model stays in bf16


def test_counted_flops_match_the_formula(cfg):
    """FlopCounterMode on a plain forward = the analytic count the benchmark states."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _load_bench()
    model = M3AE(cfg)
    image, text, pad, *_ = _batch(cfg, [16, 16, 16], seed=2)
    with FlopCounterMode(display=False, custom_mapping=bench._cpu_flash_attention_flops()) as fc:
        model(image, text, pad, text_logits="all")
    assert fc.get_total_flops() == bench.analytic_forward_flops(cfg, 3, 16)
    # bench-cpu: the text head over 32 positions is the largest single term (as the issue says)
    big = model_config("bench-cpu")
    head = 2 * 32 * big.dec_emb_dim * big.vocab_size
    assert head > 0.5 * bench.analytic_forward_flops(big, 1, 32)


def test_benchmark_script_runs_and_reports_consistent_numbers(tmp_path):
    bench = _load_bench()
    out = tmp_path / "r.json"
    r = bench.main(["--config", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                    "--threads", "1", "--distinct-batches", "2", "--no-malloc-keep", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["samples_per_s"] == pytest.approx(4 / saved["step_time_median_s"])
    assert saved["achieved_flops"] == pytest.approx(saved["flops_per_sample"] * saved["samples_per_s"])
    assert saved["mfu_vs_best_peak"] == pytest.approx(saved["achieved_flops"] / saved["peak_matmul_flops"])
    assert 0 < saved["mfu"] < 1.5 and len(saved["peak_detail"]["between_steps"]) == 2
    # masked logits + trimming execute fewer FLOPs than the plain path
    assert 0 < r["flops_per_sample"] < r["plain_flops_per_sample"]
    assert all(torch.isfinite(torch.tensor(v)) for v in saved["last_losses"].values())


def test_clip_in_optimizer_without_fused_adamw_is_a_usage_error(capsys):
    bench = _load_bench()
    for extra in (["--optimizer", "foreach"], ["--plain"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--clip-in-optimizer", *extra])
        assert "needs the fused AdamW" in capsys.readouterr().err
    assert bench.parse_args(["--clip-in-optimizer"]).clip_in_optimizer


def test_clipping_through_fused_adamw_grad_scale_matches_clip_grad_norm():
    """The benchmark's --clip-in-optimizer (measured in RESULTS.md, not used by the trainer)."""
    bench = _load_bench()
    cfg = model_config("tiny", vocab_size=2000, max_text_len=16)
    batch = bench.synthetic_batches(cfg, 4, 1, 16, 3, 16, torch.device("cpu"))[0]
    runs = []
    for clip_in_opt in (False, True):
        torch.manual_seed(0)
        sw = bench.Switches(clip_in_optimizer=clip_in_opt, malloc_keep=False)
        model, crit, opt = bench.build(cfg, sw, torch.device("cpu"), lr=1e-3)
        if not clip_in_opt:  # the raw gradient norm is above the clip threshold of 1
            rng = torch.get_rng_state()
            inputs = {k: v for k, v in batch.items() if k != "longest"}
            crit(model(**inputs, text_logits="fused")).total.backward()
            assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 2.0
            torch.set_rng_state(rng)  # the step below draws the same masks in both runs
        bench.make_step(model, crit, opt, sw, torch.device("cpu"))(batch)
        # fused AdamW writes the divided gradients back, so both runs hold clipped gradients
        runs.append({n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()})
    clipped = torch.nn.utils.get_total_norm([g for _, g in runs[0].values()])
    torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=1e-5, atol=0)
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n][1], runs[0][n][1], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(runs[1][n][0], runs[0][n][0], rtol=1e-5, atol=1e-6)
