import math

import numpy as np
import pytest
import torch

from m3ae.ops import (gather_tokens, hide_a_quarter_first, linear_cross_entropy, no_masking, num_kept, patchify, random_masking, sincos_1d,
                     sincos_2d, unpatchify)


def test_patchify_order_is_rows_then_y_x_channel():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(img, 4)
    assert p.shape == (2, 4, 48)
    # patch 1 = first row of patches, second column; inside: (y, x, c)
    for y in range(4):
        for x in range(4):
            for c in range(3):
                assert p[1, 1, (y * 4 + x) * 3 + c] == img[1, c, y, 4 + x]
    assert p[0, 2, 0] == img[0, 0, 4, 0]  # patch 2 starts the second row of patches


def test_unpatchify_inverts_patchify():
    img = torch.randn(3, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(img, 8), 8), img)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 30, 30), 8)


def test_sincos_1d_matches_formula():
    d, pos = 16, 7
    t = sincos_1d(d, 10)
    i = np.arange(d // 2)
    omega = 1.0 / 10000 ** (i / (d / 2))
    expected = np.concatenate([np.sin(pos * omega), np.cos(pos * omega)])
    np.testing.assert_allclose(t[pos].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(t[0], torch.cat([torch.zeros(8), torch.ones(8)]))


def test_sincos_2d_first_half_is_column_second_half_row():
    d, g = 16, 4
    t = sincos_2d(d, g)
    assert t.shape == (16, d)
    row, col = 2, 3
    idx = row * g + col
    assert torch.allclose(t[idx, : d // 2], sincos_1d(d // 2, 10)[col])
    assert torch.allclose(t[idx, d // 2:], sincos_1d(d // 2, 10)[row])


def test_num_kept_rounding():
    assert num_kept(16, 0.75) == 4
    assert num_kept(10, 0.75) == 2  # floor(2.5)
    assert num_kept(3, 0.75) == 0
    assert num_kept(7, 0.0) == 7
    assert num_kept(torch.tensor([10, 1, 0]), 0.5).tolist() == [5, 0, 0]


def test_random_masking_invariants():
    torch.manual_seed(0)
    b, length = 64, 12
    lengths = torch.randint(0, length + 1, (b,))
    valid = torch.arange(length)[None] < lengths[:, None]
    m = random_masking(valid, 0.75)
    keep = num_kept(lengths, 0.75)
    assert m.num_slots == num_kept(length, 0.75) == 3
    # each sample keeps floor(n_real * 0.25) real tokens and no padding
    assert torch.equal(m.slot_valid.sum(1), keep)
    kept_ids = m.ids_keep
    for i in range(b):
        real_kept = kept_ids[i][m.slot_valid[i]]
        assert valid[i, real_kept].all()
        # loss positions = real and not kept
        expected = valid[i].clone()
        expected[real_kept] = False
        assert torch.equal(m.mask[i], expected)
    # restore undoes the shuffle
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(length).expand(b, -1))


def test_random_masking_is_independent_per_sample_and_uniform():
    torch.manual_seed(1)
    valid = torch.ones(4000, 8, dtype=torch.bool)
    m = random_masking(valid, 0.5, all_valid=True)
    rows = {tuple(sorted(r.tolist())) for r in m.ids_keep[:50]}
    assert len(rows) > 20  # different samples, different masks
    freq = torch.bincount(m.ids_keep.flatten(), minlength=8).float() / m.ids_keep.numel()
    assert torch.allclose(freq, torch.full((8,), 1 / 8), atol=0.02)


def test_masking_noise_is_reproducible():
    valid = torch.ones(2, 10, dtype=torch.bool)
    noise = torch.rand(2, 10)
    a, b = random_masking(valid, 0.6, noise=noise), random_masking(valid, 0.6, noise=noise)
    assert torch.equal(a.ids_shuffle, b.ids_shuffle)
    assert torch.equal(a.ids_keep, noise.argsort(1)[:, :4])


def test_hide_a_quarter_first_hides_one_whole_quarter_in_the_chosen_rows():
    torch.manual_seed(0)
    noise = torch.rand(400, 64)  # an 8 x 8 grid
    out = hide_a_quarter_first(noise, 300)
    assert torch.equal(out[300:], noise[300:])  # rows past the first 300 keep uniform masking
    quarter = torch.tensor([[r // 4 * 2 + c // 4 for c in range(8)] for r in range(8)]).reshape(-1)
    hidden = random_masking(torch.ones(400, 64, dtype=torch.bool), 0.5, noise=out, all_valid=True).mask[:300]
    chosen = []
    for row, h in enumerate(hidden):
        whole = [q for q in range(4) if h[quarter == q].all()]
        assert len(whole) >= 1 and h.sum() == 32
        chosen.append(quarter[noise[row].argmax()].item())
        assert chosen[-1] in whole
    assert torch.bincount(torch.tensor(chosen), minlength=4).min() > 50  # every quarter, about equally
    with pytest.raises(ValueError, match="square"):
        hide_a_quarter_first(torch.rand(2, 10), 1)


def test_no_masking_and_gather():
    valid = torch.tensor([[True, True, False]])
    m = no_masking(valid)
    assert m.complete and not m.mask.any() and torch.equal(m.slot_valid, valid)
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(gather_tokens(x, torch.tensor([[2, 0]])), x[:, [2, 0]])
    assert math.isclose(float(sincos_1d(4, 1)[0, 2]), 1.0)


@pytest.mark.parametrize("block_elements", [2 ** 24, 7 * 50])  # one block; blocks of 7 rows
def test_linear_cross_entropy_matches_linear_and_cross_entropy(block_elements):
    g = torch.Generator().manual_seed(0)
    n, d, v = 23, 16, 50
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():  # make a few rows hits so the top-1 flag is tested both ways
        t[:4] = torch.nn.functional.linear(h[:4], w, b).argmax(-1)
    rw = torch.rand(n, generator=g, dtype=torch.float64)
    total, nll, hit = linear_cross_entropy(h, w, b, t, rw, block_elements=block_elements)
    (total * 3.0).backward()  # a non-unit incoming gradient
    fused_grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    logits = torch.nn.functional.linear(h, w, b)
    ref_nll = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    ((ref_nll * rw).sum() * 3.0).backward()
    torch.testing.assert_close(nll, ref_nll.detach())
    torch.testing.assert_close(total, (ref_nll * rw).sum(), rtol=1e-6, atol=1e-6)
    assert torch.equal(hit, (logits.argmax(-1) == t).float()) and hit[:4].all() and hit.sum() < n
    assert not nll.requires_grad and not hit.requires_grad
    for got, x in zip(fused_grads, (h, w, b)):
        torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_without_rows_gives_zero():
    h = torch.zeros(0, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 30)
    total, nll, hit = linear_cross_entropy(h, lin.weight, lin.bias, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    total.backward()
    assert total.item() == 0 and nll.shape == hit.shape == (0,)
    assert lin.weight.grad.abs().sum() == 0 and lin.bias.grad.abs().sum() == 0
