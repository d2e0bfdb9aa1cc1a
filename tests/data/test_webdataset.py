"""WebDataset shards (m3ae.data.webdataset): the seeded shuffle buffer."""
from __future__ import annotations

import random

from helpers import pair_shards
from m3ae.data.webdataset import ShardSource, buffer_shuffle

# The orders webdataset 1.0's private shuffle gave for these seeds, which the loader used before
# its own buffer_shuffle: a run with the same seed reads its samples in the same order as then.
EPOCH0 = ["s1_003", "s1_001", "s0_000", "s1_000", "s1_004", "s0_003", "s0_004", "s0_002", "s2_003", "s2_000",
          "s2_004", "s1_002", "s0_001", "s2_001", "s2_002"]
EPOCH1 = ["s2_003", "s2_004", "s2_002", "s1_003", "s1_000", "s1_004", "s0_000", "s2_000", "s1_002", "s0_002",
          "s2_001", "s0_004", "s0_003", "s1_001", "s0_001"]


def test_buffer_shuffle_is_a_seeded_permutation_within_the_buffer():
    out = list(buffer_shuffle(range(20), 5, 5, random.Random("0/0/0/buffer")))
    assert out == [3, 1, 4, 0, 8, 7, 10, 6, 9, 12, 2, 14, 5, 11, 18, 16, 17, 19, 15, 13]
    assert out == list(buffer_shuffle(iter(range(20)), 5, 5, random.Random("0/0/0/buffer")))
    assert out != list(buffer_shuffle(range(20), 5, 5, random.Random("0/1/0/buffer")))
    for n, size, initial in [(0, 4, 4), (3, 10, 10), (50, 7, 2), (200, 2000, 100)]:
        order = list(buffer_shuffle(range(n), size, initial, random.Random(n)))
        assert sorted(order) == list(range(n))
        # The buffer holds back at most `size` items: the p-th out is one of the first p + size read.
        assert all(i < pos + size for pos, i in enumerate(order))
    assert list(buffer_shuffle(range(9), 1, 1, random.Random(0))) == list(range(9))  # a buffer of one


def test_shard_source_order_is_a_function_of_seed_epoch_and_slot(tmp_path):
    src = ShardSource(pair_shards(tmp_path, 3, 5), shuffle_buffer=6)
    keys = lambda epoch, slot=0, nslots=1, seed=0: [r["__key__"] for r in src.items(epoch, slot, nslots, seed)]
    assert keys(0) == EPOCH0 and keys(0) == keys(0)
    assert keys(1) == EPOCH1
    assert keys(0, 1, 2, 7) == ["s2_002", "s2_000", "s2_004", "s2_001", "s2_003"]
