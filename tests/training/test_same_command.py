"""The same command gives the same model (issue 32): two fresh processes running the same
`m3ae pretrain` (same seed, a tokenizer trained from the data at start-up) end bit-identical
on the CPU, for each kind of source: the tokenizer file, every logged loss, every weight."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    """Overrides for 24 captioned 16 px images as shards, a table, a cache, and the built-in data."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from helpers import image_bytes, varied_caption, write_tar

    from m3ae.data.cache import build_cache, source_config

    root = tmp_path_factory.mktemp("same-command")
    members, rows = [], ["image,caption"]
    (root / "images").mkdir()
    for i in range(24):
        jpg = image_bytes(seed=i, size=(16, 16))
        members += [(f"k{i:03d}.jpg", jpg), (f"k{i:03d}.txt", varied_caption(i).encode())]
        (root / "images" / f"{i}.jpg").write_bytes(jpg)
        rows.append(f"images/{i}.jpg,{varied_caption(i)}")
    shards = str(write_tar(root / "train-000000.tar", members))
    (root / "table.csv").write_text("\n".join(rows) + "\n")
    build_cache([source_config(shards)], root / "cache", 32, progress=False)
    return {"synthetic": ["data.synthetic_size=24"],
            "webdataset": ["data.source=webdataset", f"data.urls={shards}", "data.shuffle_buffer=8"],
            "table": ["data.source=table", f"data.urls={root / 'table.csv'}"],
            "cache": ["data.source=cache", f"data.urls={root / 'cache'}"]}


@pytest.mark.parametrize("source", ["synthetic", "webdataset", "table", "cache"])
def test_two_fresh_runs_of_one_command_are_bit_identical(h, tiny, sources, source, tmp_path):
    drop = ("data.synthetic_size", "data.tokenizer", "model.vocab_size")  # the tiny model's, with its own tokenizer
    overrides = [o for o in tiny if not o.startswith(drop)] + sources[source] + [
        "data.tokenizer=from-data", "data.tokenizer_vocab_size=120", "model.vocab_size=128",
        "train.steps=3", "train.batch_size=4", "train.seed=7"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        h.run_ok(h.pretrain_cmd(run, overrides))
    tokenizers = [(run / "final" / "tokenizer.json").read_bytes() for run in runs]
    assert tokenizers[0] == tokenizers[1]
    if source != "synthetic":  # `m3ae tokenizer train` reads the source as from-data does
        from m3ae.cli import main

        urls = next(o for o in sources[source] if o.startswith("data.urls=")).split("=", 1)[1]
        assert main(["tokenizer", "train", urls, "--source", source, "--vocab-size", "120",
                     "--min-frequency", "1", "-o", str(tmp_path / "cli.json")]) == 0
        assert (tmp_path / "cli.json").read_bytes() == tokenizers[0]
    assert len(h.losses(runs[0])) == 3 and h.losses(runs[0]) == h.losses(runs[1])
    a, b = (h.weights(run) for run in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].view(-1).view(torch.int32).equal(b[k].view(-1).view(torch.int32)), k
