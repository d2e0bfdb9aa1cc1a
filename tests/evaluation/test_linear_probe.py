"""Linear probe and kNN on features whose classes are (or are not) separable."""
import numpy as np
import pytest
import torch

from m3ae.evaluation import Features, knn_classify, linear_probe, topk_accuracy


def _clusters(n, num_classes=4, dim=16, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(num_classes, dim)) * 3
    y = rng.integers(0, num_classes, n)
    x = centres[y] + spread * rng.normal(size=(n, dim)) + 50.0  # offset: the probe's BatchNorm handles it
    return Features(x.astype(np.float32), y.astype(np.int64), [str(i) for i in range(n)])


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
    acc = topk_accuracy(logits, [0, 0, 0], ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(1 / 3)
    assert acc["top2"] == pytest.approx(2 / 3)
    assert "top5" not in acc  # k >= the number of classes: 100% by construction, left out


def test_probe_separable_features_reach_high_accuracy():
    res = linear_probe(_clusters(400), _clusters(200, seed=1), epochs=30, batch_size=64)
    assert res.top1 > 0.97 and res.knn_top1 > 0.97
    assert res.top5 is None and res.num_classes == 4 and res.chance == 0.25  # top-5 of 4 classes: left out


def test_probe_random_labels_stay_near_chance():
    train, test = _clusters(400), _clusters(200, seed=1)
    rng = np.random.default_rng(5)
    train.labels = rng.integers(0, 4, len(train))
    test.labels = rng.integers(0, 4, len(test))
    res = linear_probe(train, test, epochs=30, batch_size=64)
    assert 0.1 < res.top1 < 0.45


def test_knn_votes_by_hand():
    train = Features(np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32), np.array([0, 0, 1]), ["a", "b", "c"])
    test = Features(np.array([[0.1, 1]], np.float32), np.array([1]), ["q"])
    scores = knn_classify(train, test, k=1)
    assert scores.argmax(1).tolist() == [1]
    # With k = 3 every training sample votes with weight exp(cos / 0.07).
    s3 = knn_classify(train, test, k=3, temperature=1.0)
    cos = torch.nn.functional.normalize(torch.tensor(train.features), dim=1) @ \
        torch.nn.functional.normalize(torch.tensor(test.features[0]), dim=0)
    torch.testing.assert_close(s3[0], torch.stack([cos[:2].exp().sum(), cos[2].exp()]))


def test_probe_rejects_unlabelled():
    f = _clusters(20)
    f.labels[:3] = -1
    with pytest.raises(ValueError, match="no label"):
        linear_probe(f, f, epochs=1)
