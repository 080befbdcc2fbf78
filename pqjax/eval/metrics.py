"""Image metrics for a quantized pipeline against its full-precision twin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def psnr(images: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> float:
    """Mean over images of 10 log10(peak^2 / MSE); images `(n, ...)` in [0, peak]."""
    a = np.asarray(images, np.float64).reshape(len(images), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = np.maximum(np.mean((a - b) ** 2, axis=1), 1e-12)
    return float(np.mean(10 * np.log10(peak**2 / mse)))


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
