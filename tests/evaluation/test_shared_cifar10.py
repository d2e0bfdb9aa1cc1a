"""Probe and OOD commands on a few hundred CIFAR-10 samples of ../shared/data (skips when absent)."""
import json

from m3ae.cli import main

Q = ["--no-progress", "--device", "cpu", "--batch-size", "100"]


def test_probe_and_ood_on_cifar10(shared_data, tiny_model_dir, tmp_path):
    c10, tin = shared_data / "cifar10", shared_data / "tiny-imagenet-captions"
    cache = str(tmp_path / "cache")
    assert main(["linear-probe", str(tiny_model_dir), "--train", str(c10 / "train-000000.tar.gz"),
                 "--val", str(c10 / "test-000000.tar.gz"), "--limit-train", "300", "--limit-val", "200",
                 "--epochs", "30", "--cache-dir", cache, "--out", str(tmp_path / "probe"), *Q]) == 0
    res = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert res["num_train"] == 300 and res["num_eval"] == 200 and res["num_classes"] == 10
    # Even an 8-step encoder's features carry colour/layout: well above 10% chance.
    assert res["top1"] > 0.15 and res["top5"] > 0.5
    # The same cached CIFAR-10 features are in-distribution; Tiny-ImageNet val (64 px, resized) is OOD.
    assert main(["ood", str(tiny_model_dir), "--id-train", str(c10 / "train-000000.tar.gz"),
                 "--id-test", str(c10 / "test-000000.tar.gz"), "--ood", str(tin / "val-000000.tar.gz"),
                 "--limit-train", "300", "--limit-test", "200", "--probe-epochs", "30", "--cache-dir", cache,
                 "--out", str(tmp_path / "ood"), *Q]) == 0
    ood = json.loads((tmp_path / "ood" / "results.json").read_text())
    assert ood["num_id"] == 200 and ood["num_ood"] == 200
    for m in ood["metrics"].values():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr95"] <= 1
    assert (tmp_path / "ood" / "roc.png").is_file()
