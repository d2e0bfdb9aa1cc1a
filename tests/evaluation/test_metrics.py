"""OOD metrics (scikit-learn's, called with our conventions) and Mahalanobis against
hand-computed values, pair counts and scikit-learn."""
import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance

from m3ae.evaluation.ood import Mahalanobis, auroc, fpr_at_tpr, max_softmax, roc_curve


def test_auroc_by_hand():
    # Pairs (id, ood): 0.9 and 0.8 beat both OOD scores, 0.4 beats only 0.3 -> 5/6.
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    # A tie counts one half: (1,2) lose, (1,0) win, (2,2) tie, (2,0) win -> 2.5/4.
    assert auroc([1, 2], [2, 0]) == pytest.approx(0.625)


def test_roc_curve_by_hand_with_ties():
    # id [1, 2], ood [2, 0]. Thresholds: inf (nothing accepted), 2 (id 2 and the tied ood 2
    # together), 1 (both id), 0 (everything).
    fpr, tpr, thr = roc_curve([1, 2], [2, 0])
    np.testing.assert_array_equal(thr, [np.inf, 2, 1, 0])
    np.testing.assert_array_equal(fpr, [0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    assert fpr_at_tpr([1, 2], [2, 0]) == 0.5
    with pytest.raises(ValueError, match="needs in-distribution and OOD scores"):
        auroc([1.0], [])


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_counts_pairs(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 30, 200) / 10 + 0.5  # rounded scores: many ties
    b = rng.integers(0, 30, 150) / 10
    pairs = (a[:, None] > b[None]).mean() + 0.5 * (a[:, None] == b[None]).mean()
    assert auroc(a, b) == pytest.approx(pairs, abs=1e-12)
    # FPR@95: the lowest FPR among operating points with TPR >= 0.95.
    fpr, tpr, _ = roc_curve(a, b)
    assert fpr_at_tpr(a, b) == pytest.approx(fpr[tpr >= 0.95].min())


def test_fpr_at_95_by_hand():
    id_scores = np.arange(1, 21) / 20  # 0.05 .. 1.0; accepting 19 of 20 needs threshold 0.10
    ood = [0.05, 0.12, 0.5, 0.99]      # three of these are >= 0.10
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(0.75)
    assert fpr_at_tpr(id_scores, ood, tpr=1.0) == pytest.approx(1.0)


def test_mahalanobis_by_hand():
    x = np.array([[0, 0], [2, 0], [0, 2], [0, 4]], float)
    y = np.array([0, 0, 1, 1])
    m = Mahalanobis.fit(x, y)
    # Means (1,0) and (0,3); centred points (+-1,0), (0,+-1) -> covariance 0.5 I, precision 2 I.
    np.testing.assert_allclose(m.means, [[1, 0], [0, 3]])
    np.testing.assert_allclose(m.precision, 2 * np.eye(2), atol=1e-12)
    # (1,1): d^2 = 2*(0+1) = 2 to class 0, 2*(1+4) = 10 to class 1. (3,3): 26 and 18.
    np.testing.assert_allclose(m.distances(np.array([[1.0, 1.0], [3.0, 3.0]])), [[2, 10], [26, 18]])
    np.testing.assert_allclose(m.score(np.array([[1.0, 1.0], [3.0, 3.0]])), [-2, -18])


def test_mahalanobis_matches_sklearn_covariance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + y[:, None] * 2.0
    m = Mahalanobis.fit(x, y)
    centred = x - m.means[y]
    ref = EmpiricalCovariance(assume_centered=True).fit(centred)
    np.testing.assert_allclose(m.precision, ref.precision_, rtol=1e-6)
    q = rng.normal(size=(7, 5))
    expect = np.stack([ref.mahalanobis(q - mu) for mu in m.means], 1)
    np.testing.assert_allclose(m.distances(q), expect, rtol=1e-6)


def test_max_softmax():
    p = max_softmax(np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])))
    np.testing.assert_allclose(p, [0.7, 0.5], rtol=1e-6)
