"""Image metrics: PSNR and SSIM per image against closed forms of their definitions, and the
confidence interval against scipy's Student-t interval."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from skimage.metrics import structural_similarity

from pqjax.eval.metrics import mean_ci, psnr, psnr_per_image, ssim_per_image

RNG = np.random.default_rng(0)


def test_psnr_of_a_known_error():
    ref = RNG.uniform(0.2, 0.8, (3, 16, 16))
    # each image off by a constant 0.1, 0.01, 0.001 everywhere: MSE 1e-2, 1e-4, 1e-6
    imgs = ref + np.array([0.1, 0.01, 0.001])[:, None, None]
    np.testing.assert_allclose(psnr_per_image(imgs, ref), [20.0, 40.0, 60.0], rtol=1e-9)
    assert psnr(imgs, ref) == pytest.approx(40.0, rel=1e-9)


def test_ssim_of_constant_images_is_the_luminance_term():
    """Constant images have zero variance, so SSIM's contrast-structure factor is
    C2 / C2 = 1 and it equals the luminance term (2 mx my + C1) / (mx^2 + my^2 + C1),
    C1 = (0.01 L)^2 (Wang et al. 2004, eq. 13)."""
    a = np.full((2, 16, 16), 0.3)
    b = np.stack([np.full((16, 16), 0.5), np.full((16, 16), 0.3)])
    c1 = 0.01**2
    want = [(2 * 0.3 * 0.5 + c1) / (0.3**2 + 0.5**2 + c1), 1.0]
    np.testing.assert_allclose(ssim_per_image(a, b), want, rtol=1e-9)


@pytest.mark.parametrize("shape", [(4, 16, 16), (3, 16, 24, 3)])
def test_ssim_per_image_is_scikit_images_gaussian_ssim(shape):
    """Batched and channelled input: each entry is one call of scikit-image's SSIM with the
    paper's parameters; noise lowers it and identity gives 1."""
    ref = RNG.uniform(0, 1, shape)
    noisy = np.clip(ref + RNG.normal(0, 0.05, shape), 0, 1)
    got = ssim_per_image(noisy, ref)
    assert got.shape == (shape[0],)
    axis = -1 if len(shape) == 4 else None
    for g, x, y in zip(got, noisy, ref):
        assert g == structural_similarity(x, y, data_range=1.0, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False,
                                          channel_axis=axis)
    np.testing.assert_allclose(ssim_per_image(ref, ref), 1.0, rtol=1e-12)
    noisier = np.clip(ref + RNG.normal(0, 0.2, shape), 0, 1)
    assert np.all(ssim_per_image(noisier, ref) < got)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim_per_image(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="one shape"):
        ssim_per_image(np.zeros((2, 16, 16)), np.zeros((3, 16, 16)))


def test_mean_ci_is_the_student_t_interval():
    v = RNG.normal(30.0, 2.0, 50)
    mean, half = mean_ci(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert mean == pytest.approx(np.mean(v), rel=1e-12)
    assert half == pytest.approx((hi - lo) / 2, rel=1e-9)
    assert mean_ci([3.0, 3.0, 3.0]) == (3.0, 0.0)
    assert mean_ci([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
