"""Image metrics for a quantized pipeline against its full-precision twin.

Per image: PSNR, and SSIM (Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 0.01,
K2 0.03, population statistics; scikit-image's `structural_similarity` computes it, the
implementation the field checks against). `mean_ci` turns the per-image values into a mean with
a Student-t 95% interval, so that two methods' tables can be told apart from seed noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SSIM_WINDOW = 11  # the Gaussian window's side (sigma 1.5): the smallest image SSIM scores


def _pairs(images: np.ndarray, reference: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"{who}: images and reference must be (n, H, W[, C]) of one shape; "
                         f"got {a.shape} vs {b.shape}")
    return a, b


def psnr_per_image(images: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """`(n,)` 10 log10(peak^2 / MSE) of each image; images `(n, ...)` in [0, peak] (an MSE
    under 1e-12, identical images, counts as 1e-12: 120 dB at peak 1)."""
    a = np.asarray(images, np.float64).reshape(len(images), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = np.maximum(np.mean((a - b) ** 2, axis=1), 1e-12)
    return 10 * np.log10(peak**2 / mse)


def psnr(images: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> float:
    """Mean over images of `psnr_per_image`."""
    return float(np.mean(psnr_per_image(images, reference, peak)))


def ssim_per_image(images: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """`(n,)` SSIM of each image against its reference; images `(n, H, W)` or `(n, H, W, C)`
    (channels averaged) in [0, peak], H and W at least 11 (the Gaussian window)."""
    from skimage.metrics import structural_similarity

    a, b = _pairs(images, reference, "ssim")
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images of {a.shape[1:3]} are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    channel_axis = -1 if a.ndim == 4 else None
    return np.array([
        structural_similarity(x, y, data_range=peak, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, channel_axis=channel_axis)
        for x, y in zip(a, b)
    ])


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of its Student-t `level` interval) of independent per-image values;
    half-width 0 for fewer than two values or values that are all equal."""
    from scipy import stats

    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci: no values")
    sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    if sd == 0.0:
        return float(np.mean(v)), 0.0
    return float(np.mean(v)), float(stats.t.ppf(0.5 + level / 2, v.size - 1) * sd / np.sqrt(v.size))


class DigitMetrics:
    """Classifier accuracy and Fréchet distance of generated digits, for the embedded model."""

    def __init__(self, seed: int = 0):
        from pqjax.eval import digits

        self._digits = digits
        self.classifier = digits.fit_classifier(seed=seed)
        real, _ = digits.load_digits16()
        self.real_features = self.classifier.features(real)

    def __call__(self, images: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
        labels = np.asarray(labels)
        pred = self.classifier.predict(images)
        return {
            "accuracy": float(np.mean(pred == labels)),
            "frechet": float(
                self._digits.frechet_distance(self.classifier.features(images), self.real_features)
            ),
        }
