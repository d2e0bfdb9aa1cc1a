"""Features at every layer (m3ae.evaluation.features): one pass gives what one call per block
gives, bit for bit, through the library, the model's API, the cache and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m3ae.evaluation.data import load_labelled, make_loader
from m3ae.evaluation.features import cached_features, encode_batch, extract_features, layer_name
from m3ae.ops import resolve_blocks


def test_resolve_blocks_names_every_layer_once():
    assert resolve_blocks("all", 4) == (0, 1, 2, 3, None)
    assert resolve_blocks("-1, final ,0,3", 4) == (3, None, 0)  # -1 is block 3: one layer, kept once
    assert resolve_blocks([None, -2], 4) == (None, 2)
    for bad, msg in (("4", "out of range"), ([-5], "out of range"), ("x", "integers"), ("", "no blocks")):
        with pytest.raises(ValueError, match=msg):
            resolve_blocks(bad, 4)
    assert [layer_name(b) for b in (0, None)] == ["block 0", "final"]


def test_sweep_equals_one_call_per_block(tiny_model):
    model, _ = tiny_model
    depth = model.config.depth
    loader = make_loader(load_labelled("shapes:24:2", model.config.image_size), batch_size=10)
    sweep = extract_features(model, loader, pool=("cls", "mean"), block=[*range(depth), None], progress=False)
    assert list(sweep) == [*range(depth), None]
    for b in [*range(depth), None]:
        single = extract_features(model, loader, pool=("cls", "mean"), block=b, progress=False)
        for p in ("cls", "mean"):
            assert np.array_equal(sweep[b][p].features, single[p].features), (b, p)
            assert np.array_equal(sweep[b][p].labels, single[p].labels)
    # The layers differ (a sweep that returned one layer K times would pass the loop above only
    # if every single call did the same), and the last block is not the normalised output.
    assert not np.allclose(sweep[0]["cls"].features, sweep[depth - 1]["cls"].features)
    assert not np.allclose(sweep[depth - 1]["cls"].features, sweep[None]["cls"].features)


def test_model_encode_image_blocks_match_the_feature_path(tiny_model):
    model, _ = tiny_model
    batch = next(iter(make_loader(load_labelled("shapes:6:3", model.config.image_size), batch_size=6)))
    with torch.no_grad():
        layers = model.encode_image(batch["image"], pool="mean", blocks="all")
        final = model.encode_image(batch["image"], pool="mean")
    ref = encode_batch(model, batch, "image", "mean", block=[*range(model.config.depth), None])
    assert len(layers) == model.config.depth + 1
    for got, b in zip(layers, ref):
        assert torch.equal(got, ref[b])
    assert torch.equal(layers[-1], final)
    with torch.no_grad():  # -1 is the last block: its residual stream, before the final LayerNorm
        assert torch.equal(model.encode_image(batch["image"], pool="mean", blocks=[-1])[0], layers[-2])


def test_a_sweep_fills_the_cache_a_single_block_call_reads(tiny_model_dir, tmp_path):
    data = load_labelled("shapes:20:4", 32)
    cache = tmp_path / "cache"
    sweep = cached_features(tiny_model_dir, data, pool=("cls", "mean"), block=[0, 1, None], cache_dir=cache,
                            progress=False)
    entries = sorted(cache.iterdir())
    assert len(entries) == 3 * 2  # one entry per (layer, pool)
    # -1 is block 1 of this depth-2 encoder: read from the sweep's entry, no new file.
    last = cached_features(tiny_model_dir, data, pool="mean", block=-1, cache_dir=cache, progress=False)
    assert sorted(cache.iterdir()) == entries
    assert np.array_equal(last.features, sweep[1]["mean"].features)


def test_linear_probe_blocks_all_matches_block_minus_one_and_the_default(tiny_model_dir, tmp_path):
    from m3ae.cli import main

    common = [str(tiny_model_dir), "--train", "shapes:120:0", "--val", "shapes:60:1", "--epochs", "3",
              "--no-progress", "--baselines", "none"]
    # Separate feature caches, so the sweep's numbers are not simply read back.
    assert main(["linear-probe", *common, "--blocks", "all", "--out", str(tmp_path / "sweep"),
                 "--cache-dir", str(tmp_path / "c1")]) == 0
    assert main(["linear-probe", *common, "--block", "-1", "--out", str(tmp_path / "last"),
                 "--cache-dir", str(tmp_path / "c2")]) == 0
    assert main(["linear-probe", *common, "--out", str(tmp_path / "final"), "--cache-dir", str(tmp_path / "c3")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert sweep["layers"] == ["block 0", "block 1", "final"]
    assert (tmp_path / "sweep" / "layers.png").is_file()
    for layer, single in (("block 1", "last"), ("final", "final")):
        ref = json.loads((tmp_path / single / "results.json").read_text())["by_pool"]
        for p in ("cls", "mean"):
            assert sweep["by_layer"][layer][p] == ref[p], (layer, p)


def test_linear_probe_refuses_block_with_blocks(tiny_model_dir, capsys):
    from m3ae.cli import main

    rc = main(["linear-probe", str(tiny_model_dir), "--train", "shapes:20", "--val", "shapes:10", "--block", "0",
               "--blocks", "all", "--no-progress"])
    assert rc != 0
    assert "--block and --blocks" in capsys.readouterr().err
