"""The digits data and the yardsticks of generated samples (pqjax.eval.digits)."""

from __future__ import annotations

import numpy as np
import pytest

from pqjax.eval import digits


def test_data_shape_range_and_determinism():
    images, labels = digits.load_digits16()
    assert images.shape == (1797, 16, 16) and images.dtype == np.float32
    assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))
    assert images.min() == 0.0 and images.max() == 1.0
    again, labels2 = digits.load_digits16()
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels2)
    images[0] = -1  # callers get a copy: the cached data is not theirs to change
    assert digits.load_digits16()[0].min() == 0.0


def test_upscale_is_bilinear_half_pixel():
    """The documented upscaling: what torch's bilinear (align_corners=False) computes."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.tensor(x)[:, None], scale_factor=2, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(digits.upscale(x), ref, atol=1e-6)
    np.testing.assert_allclose(digits.upscale_matrix().sum(1), 1.0)


@pytest.fixture(scope="module")
def split():
    from sklearn.model_selection import train_test_split

    images, labels = digits.load_digits16()
    return train_test_split(images, labels, test_size=0.3, random_state=0, stratify=labels)


def test_classifier_accuracy_on_held_out_real_digits(split):
    train_x, test_x, train_y, test_y = split
    clf = digits.fit_classifier(seed=0, images=train_x, labels=train_y)
    acc = digits.classifier_accuracy(test_x, test_y, clf)
    assert acc >= 0.95, acc
    feats = clf.features(test_x)
    assert feats.shape == (len(test_x), 64) and np.isfinite(feats).all()
    # deterministic: a second fit gives the same model
    again = digits.fit_classifier(seed=0, images=train_x, labels=train_y)
    np.testing.assert_array_equal(clf.predict(test_x), again.predict(test_x))
    np.testing.assert_allclose(clf.features(test_x[:5]), again.features(test_x[:5]))


def test_classifier_input_checks(split):
    train_x, _, train_y, _ = split
    with pytest.raises(ValueError, match="both"):
        digits.fit_classifier(images=train_x)
    clf = digits.fit_classifier(seed=0, images=train_x[:300], labels=train_y[:300])
    with pytest.raises(ValueError, match="labels"):
        digits.classifier_accuracy(train_x[:3], train_y[:2], clf)
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros((2, 8, 8)))
    assert clf.predict(train_x[:4, None]).shape == (4,)  # (n, 1, 16, 16) is accepted


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (pytorch-fid's computation)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3
    assert digits.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    d_ab = digits.frechet_distance(a, b)
    assert d_ab == pytest.approx(digits.frechet_distance(b, a), rel=1e-9)
    assert d_ab == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    near = digits.frechet_distance(a, a + 0.1)
    far = digits.frechet_distance(a, a + 1.0)
    assert 0 < near < far
    assert far == pytest.approx(8 * 1.0**2, rel=1e-6)  # a pure shift adds |shift|^2


def test_frechet_distance_is_safe_on_singular_covariances():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(size=(20, 3)), np.zeros((20, 5))], axis=1)  # dead features
    b = rng.normal(size=(10, 8))  # fewer samples than dimensions: rank-deficient
    d = digits.frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert digits.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="same d"):
        digits.frechet_distance(a, b[:, :4])
    with pytest.raises(ValueError, match="two samples"):
        digits.frechet_distance(a[:1], b)


def test_frechet_on_digit_features_separates_real_from_shifted(split):
    train_x, test_x, train_y, _ = split
    clf = digits.fit_classifier(seed=0, images=train_x, labels=train_y)
    real = clf.features(train_x)
    same = digits.frechet_distance(clf.features(test_x), real)
    blurred = digits.frechet_distance(clf.features(np.clip(test_x * 0.5 + 0.25, 0, 1)), real)
    assert same < blurred
