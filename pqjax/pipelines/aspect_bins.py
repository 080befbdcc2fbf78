"""SANA's resolution binning: generate at the trained aspect-ratio bin, then resize and crop.

    h, w = bin_size(1000, 700, sample_size=32)      # (1216, 832): the closest trained ratio
    images = resize_and_crop(images, 1000, 700)     # (b, 3, 1216, 832) -> (b, 3, 1000, 700)

As diffusers' `SanaPipeline(use_resolution_binning=True)`, its default: the transformer's
`sample_size` (latent pixels at the native resolution) picks the table, 16 / 32 / 64 / 128 for
512 / 1024 / 2048 / 4096 px. The requested height / width ratio picks the bin whose key is
closest (the first one on a tie); after decoding, the image is scaled by the larger of the two
ratios with bilinear interpolation (half-pixel centres, no antialiasing) and centre-cropped.

Every table is one list of (key, height, width) in units of 2 x sample_size pixels, the larger
two with seven more extreme ratios than the 512 / 1024 px ones.
"""

from __future__ import annotations

import jax

# (ratio key, height units, width units); the last field: also in the 512 / 1024 px tables.
_BINS: tuple[tuple[str, int, int, bool], ...] = (
    ("0.25", 8, 32, True), ("0.26", 8, 31, False), ("0.27", 8, 30, False),
    ("0.28", 8, 29, True), ("0.32", 9, 28, True), ("0.33", 9, 27, True),
    ("0.35", 9, 26, True), ("0.4", 10, 25, True), ("0.42", 10, 24, True),
    ("0.48", 11, 23, True), ("0.5", 11, 22, True), ("0.52", 11, 21, True),
    ("0.57", 12, 21, True), ("0.6", 12, 20, True), ("0.68", 13, 19, True),
    ("0.72", 13, 18, True), ("0.78", 14, 18, True), ("0.82", 14, 17, True),
    ("0.88", 15, 17, True), ("0.94", 15, 16, True), ("1.0", 16, 16, True),
    ("1.07", 16, 15, True), ("1.13", 17, 15, True), ("1.21", 17, 14, True),
    ("1.29", 18, 14, True), ("1.38", 18, 13, True), ("1.46", 19, 13, True),
    ("1.67", 20, 12, True), ("1.75", 21, 12, True), ("2.0", 22, 11, True),
    ("2.09", 23, 11, True), ("2.4", 24, 10, True), ("2.5", 25, 10, True),
    ("2.89", 26, 9, False), ("3.0", 27, 9, True), ("3.11", 28, 9, False),
    ("3.62", 29, 8, False), ("3.75", 30, 8, False), ("3.88", 31, 8, False),
    ("4.0", 32, 8, True),
)
SAMPLE_SIZES = (16, 32, 64, 128)  # the transformer sample sizes that have a table


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]]:
    """The table of a transformer `sample_size`: ratio key -> (height, width) in pixels.
    ValueError for a sample size without one."""
    if sample_size not in SAMPLE_SIZES:
        raise ValueError(f"resolution binning has tables for transformer sample sizes "
                         f"{SAMPLE_SIZES}, not {sample_size!r}; pass resolution_binning=False")
    unit = 2 * sample_size
    return {key: (h * unit, w * unit) for key, h, w, small in _BINS if small or sample_size >= 64}


def bin_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """The (height, width) bin whose ratio key is closest to height / width."""
    bins = aspect_ratio_bins(sample_size)
    ratio = height / width
    key = min(bins, key=lambda k: abs(float(k) - ratio))
    return bins[key]


def resize_and_crop(images: jax.Array, height: int, width: int) -> jax.Array:
    """`(b, c, H, W)` -> `(b, c, height, width)`: scaled by max(height / H, width / W)
    (bilinear, half-pixel centres, no antialiasing), then the centre crop."""
    b, c, h0, w0 = images.shape
    if (h0, w0) == (height, width):
        return images
    ratio = max(height / h0, width / w0)
    rh, rw = int(h0 * ratio), int(w0 * ratio)
    resized = jax.image.resize(images, (b, c, rh, rw), method="linear", antialias=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return resized[:, :, top:top + height, left:left + width]


def check_size(what: str, value: object) -> int:
    """A requested image side: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)

