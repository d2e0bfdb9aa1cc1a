"""Each evaluation command runs on a tiny model and tiny data and writes its outputs."""
import json

import numpy as np
import pytest
import torch

from m3ae.cli import main
from m3ae.data import ShapesDataset
from m3ae.evaluation import Classifier, Features, load_labelled, make_loader

Q = ["--no-progress", "--device", "cpu"]
EVAL_COMMANDS = ("embed", "linear-probe", "finetune", "ood", "zero-shot", "visualize")


def _settings(path, **expected):
    """The settings a command wrote: every argument, defaults included."""
    settings = json.loads(path.read_text())
    assert {"model", "device", "batch_size", "no_progress", "debug"} <= set(settings)
    assert {k: settings[k] for k in expected} == expected
    return settings


def _leaf_parsers(parser, name="m3ae"):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, parser
    for sub in subs:
        for child, p in sub.choices.items():
            yield from _leaf_parsers(p, f"{name} {child}")


def test_one_argument_set_and_debug_everywhere():
    from m3ae.cli import build_parser

    leaves = dict(_leaf_parsers(build_parser()))
    for name, p in leaves.items():  # every command takes --debug (declared by one helper)
        assert "--debug" in p._option_string_actions, name
    shared = {"--device", "--batch-size", "--no-progress", "--debug"}
    for name in EVAL_COMMANDS:
        p = leaves[f"m3ae {name}"]
        assert shared <= set(p._option_string_actions), name
        assert p._actions[1].dest == "model"  # after -h: the pretrained folder comes first


def test_embed_npy_and_safetensors(tiny_model_dir, tmp_path):
    assert main(["embed", str(tiny_model_dir), "--data", "shapes:40:3", "-o", str(tmp_path / "f.npy"),
                 "--batch-size", "16", *Q]) == 0
    f = Features.load(tmp_path / "f.npy")
    assert f.features.shape == (40, 32)
    np.testing.assert_array_equal(f.labels, [ShapesDataset(40, seed=3)[i]["label"] for i in range(40)])
    assert f.keys[0] == "shapes-3-00000000" and f.class_names == ShapesDataset.class_names
    # Text+image, mean pooled, block 0, safetensors; differs from the image-only CLS feature.
    assert main(["embed", str(tiny_model_dir), "--data", "shapes:40:3", "-o", str(tmp_path / "g.safetensors"),
                 "--modality", "both", "--pool", "mean", "--block", "0", *Q]) == 0
    g = Features.load(tmp_path / "g.safetensors")
    assert g.features.shape == (40, 32) and g.keys == f.keys
    assert not np.allclose(g.features, f.features)
    _settings(tmp_path / "g.settings.json", modality="both", pool="mean", block=0, data="shapes:40:3")


def test_embed_image_folder(tiny_model_dir, tmp_path):
    root = tmp_path / "folder"
    ds = ShapesDataset(6, seed=0)
    for i in range(6):
        s = ds[i]
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        s["image"].save(root / f"c{i % 2}" / f"{i}.png")
    assert main(["embed", str(tiny_model_dir), "--data", str(root), "-o", str(tmp_path / "f.npy"), *Q]) == 0
    f = Features.load(tmp_path / "f.npy")
    assert f.labels.tolist() == [0, 0, 0, 1, 1, 1] and f.class_names == ["c0", "c1"]


def test_embed_bad_input(tiny_model_dir, tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope"), "--data", "shapes", "-o", str(tmp_path / "f.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", str(tiny_model_dir), "--data", str(tmp_path / "x-*.tar"), "-o",
                 str(tmp_path / "f.npy")]) == 2
    assert "neither" in capsys.readouterr().err


def test_linear_probe_command_caches_features(tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["linear-probe", str(tiny_model_dir), "--train", "shapes:120:0", "--val", "shapes:60:1",
            "--epochs", "10", "--cache-dir", str(cache), "--out", str(tmp_path / "probe"), *Q]
    assert main(args) == 0
    res = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert res["num_train"] == 120 and res["num_eval"] == 60 and res["num_classes"] == len(ShapesDataset.class_names)
    assert 0 <= res["top1"] <= 1 and res["top5"] is None and 0 <= res["knn_top1"] <= 1  # 4 classes: no top-5
    assert len(list(cache.glob("*.safetensors"))) == 4  # cls and mean pooling of both splits
    # the resolved settings (defaults included) sit beside the results
    _settings(tmp_path / "probe" / "settings.json", epochs=10, train="shapes:120:0", lr=None, knn_k=20)
    # A second run reads the cache and reproduces the numbers.
    stamp = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["top1"] == res["top1"]


def test_finetune_command(tiny_model_dir, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_model_dir), "--train", "shapes:64:0", "--val", "shapes:32:1", "--out",
                 str(out), "--epochs", "1", "--last-blocks", "1", "--batch-size", "16", *Q]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["history"]) == 1 and 0 <= res["top1"] <= 1
    _settings(out / "settings.json", epochs=1, last_blocks=1, batch_size=16, layer_decay=0.75)
    clf = Classifier.load(out)
    # Partial fine-tuning left block 0 as it was pre-trained.
    from m3ae import M3AE
    pre = M3AE.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(clf.model.encoder.blocks[0].attn.qkv.weight, pre.encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(clf.model.encoder.blocks[1].attn.qkv.weight, pre.encoder.blocks[1].attn.qkv.weight)
    logits, labels = clf.predict_logits_loader(make_loader(load_labelled("shapes:32:1", 32), batch_size=16))
    assert logits.shape == (32, ShapesDataset.num_classes)
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(res["top1"])


def test_ood_command(tiny_model_dir, tmp_path):
    out = tmp_path / "ood"
    assert main(["ood", str(tiny_model_dir), "--id-train", "shapes:100:0", "--id-test", "shapes:50:1",
                 "--ood", "shapes:50:2", "--out", str(out), "--probe-epochs", "5", "--cache-dir",
                 str(tmp_path / "c"), *Q]) == 0
    res = json.loads((out / "results.json").read_text())
    # In- and out-of-distribution are the same distribution here: AUROC is near one half.
    for name in ("mahalanobis", "msp"):
        assert 0.3 < res["metrics"][name]["auroc"] < 0.7
        assert 0 <= res["metrics"][name]["fpr95"] <= 1
    assert (out / "roc.png").stat().st_size > 1000
    _settings(out / "settings.json", ood="shapes:50:2", probe_epochs=5, classifier=None)


def test_zero_shot_command(tiny_model_dir, tmp_path, capsys):
    assert main(["zero-shot", str(tiny_model_dir), "--data", "shapes:20:1", "--template",
                 "a picture of a [MASK] [MASK] {}", "--out", str(tmp_path), *Q]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_samples"] == 20 and res["chance"] == 1 / ShapesDataset.num_classes
    assert sum(res["per_class_predictions"].values()) == 20
    assert "zero-shot accuracy" in capsys.readouterr().out
    _settings(tmp_path / "settings.json", template="a picture of a [MASK] [MASK] {}", normalize="mean")


def test_visualize_command(tiny_model_dir, tmp_path):
    out = tmp_path / "pics"
    assert main(["visualize", str(tiny_model_dir), "--data", "shapes:40:1", "--out", str(out), "-n", "2",
                 "--word", "a", "--tsne-samples", "40", "--compare", str(tiny_model_dir), *Q]) == 0
    for name in ("reconstruction_with_caption", "reconstruction_image_only", "attention", "tsne"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    _settings(out / "settings.json", num_images=2, word="a", compare=str(tiny_model_dir), layer="rollout")
    assert main(["visualize", str(tiny_model_dir), "--data", "shapes:4", "--out", str(out), "--what", "nope"]) == 2
