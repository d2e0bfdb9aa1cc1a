"""Reading the real shards in ../shared/data (skipped with a reason when absent)."""
import torch

from m3ae.config import DataConfig
from m3ae.data import Collator, build_dataset
from m3ae.data.webdataset import expand_urls, webdataset_source


def test_read_tiny_imagenet_pairs(shared_data):
    urls = str(shared_data / "tiny-imagenet-captions" / "train-{000000..000007}.tar.gz")
    assert len(expand_urls(urls)) == 8
    it = iter(webdataset_source(urls))
    samples = [next(it) for _ in range(20)]
    for s in samples:
        assert s["image"].mode == "RGB" and s["image"].size == (64, 64)
        assert isinstance(s["caption"], str) and s["caption"]
        assert 0 <= s["label"] < 200


def test_cifar_labels_and_eval_batches(shared_data):
    cfg = DataConfig(source="webdataset", urls=str(shared_data / "cifar10" / "test-000000.tar.gz"))
    ds = build_dataset(cfg, image_size=32, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=Collator(None))
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["text"] is None
    assert batch["label"].min() >= 0 and batch["label"].max() < 10


def test_missing_shards_fail_clearly(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="do not exist"):
        webdataset_source(str(tmp_path / "nope-{000..001}.tar"))
