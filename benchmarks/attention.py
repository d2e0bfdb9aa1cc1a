"""Fused ``scaled_dot_product_attention`` against plain matmul + softmax, forward and backward,
over sequence lengths: where ``m3ae.model.EXPLICIT_CPU_ATTENTION_MAX_LEN`` comes from.

    python benchmarks/attention.py --threads 2 --rounds 3

Both paths are called through ``m3ae.model.attention`` (the limit switched per call), with a
key-padding mask as training uses; the variants are interleaved round by round so a shared
machine's load falls on both alike. Prints median milliseconds per fwd+bwd and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import m3ae.model


def fwd_bwd_ms(q, k, v, mask, grad, limit: int, repeats: int) -> float:
    m3ae.model.EXPLICIT_CPU_ATTENTION_MAX_LEN = limit
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, _ = m3ae.model.attention(q, k, v, mask)
        out.backward(grad)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["32,3,23,64", "32,4,90,32", "8,12,128,64",
                                                   "8,12,192,64", "8,12,321,64"],
                   help="batch,heads,length,head_dim (bench-cpu's encoder and decoder; ViT-B sizes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant and round")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    default = m3ae.model.EXPLICIT_CPU_ATTENTION_MAX_LEN
    print(f"threads {a.threads}; {a.rounds} interleaved rounds of {a.repeats} calls; "
          f"library limit: explicit up to {default} tokens on CPU\n")
    print("| B, H, L, d | fused ms | explicit ms | fused / explicit |")
    print("|---|---|---|---|")
    for shape in a.shapes:
        b, h, n, d = map(int, shape.split(","))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g, requires_grad=True) for _ in range(3))
        mask = torch.rand(b, 1, 1, n, generator=g) > 0.1
        mask[..., 0] = True
        grad = torch.randn(b, h, n, d, generator=g)
        for limit in (0, n):  # warm-up both
            fwd_bwd_ms(q, k, v, mask, grad, limit, 2)
        fused, explicit = [], []
        for _ in range(a.rounds):
            fused.append(fwd_bwd_ms(q, k, v, mask, grad, 0, a.repeats))
            explicit.append(fwd_bwd_ms(q, k, v, mask, grad, n, a.repeats))
        f, e = statistics.median(fused), statistics.median(explicit)
        print(f"| {b}, {h}, {n}, {d} | {f:.2f} | {e:.2f} | {f / e:.2f} |")
    m3ae.model.EXPLICIT_CPU_ATTENTION_MAX_LEN = default


if __name__ == "__main__":
    sys.exit(main())
