"""Calibration statistics: exact against numpy, bounded memory, reproducible sampling."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pqjax import calibrate
from pqjax.calibrate import linears
from pqjax.models.layers import Linear


class TwoLayer(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.a = Linear(6, 5, rngs=rngs)
        self.b = Linear(5, 3, rngs=rngs)
        self.unused = Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def batches(n, seed=0, shape=(2, 7, 6)):
    rng = np.random.default_rng(seed)
    return [
        {"x": jnp.asarray(rng.standard_normal(shape) * np.arange(1, 7), jnp.float32)}
        for _ in range(n)
    ]


def test_statistics_match_numpy_over_all_inputs():
    model = TwoLayer()
    data = batches(5)
    calib = calibrate(model, data, n_rows=16, progress=False)
    rows = np.concatenate([np.asarray(b["x"]).reshape(-1, 6) for b in data])
    st = calib["a"]
    np.testing.assert_allclose(st.mean_sq, (rows**2).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(st.absmax, np.abs(rows).max(0))
    assert st.count == len(rows) == 70
    hidden = np.tanh(rows @ np.asarray(model.a.kernel[...]) + np.asarray(model.a.bias[...]))
    np.testing.assert_allclose(calib["b"].mean_sq, (hidden**2).mean(0), rtol=1e-5)
    assert "unused" not in calib  # never reached by the forward


def test_sampled_rows_are_real_rows_and_reproducible():
    model = TwoLayer()
    data = batches(5)
    first = calibrate(model, data, n_rows=16, seed=3, progress=False)["a"].rows
    again = calibrate(model, data, n_rows=16, seed=3, progress=False)["a"].rows
    other = calibrate(model, data, n_rows=16, seed=4, progress=False)["a"].rows
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    rows = np.concatenate([np.asarray(b["x"]).reshape(-1, 6) for b in data])
    for r in np.asarray(first):
        assert np.any(np.all(rows == r, axis=1))
    assert len({tuple(r) for r in np.asarray(first)}) == 16  # without replacement


def test_sample_covers_all_batches_uniformly():
    """Bottom-k sampling: each of 10 batches contributes ~1/10 of the kept rows."""
    model = TwoLayer()
    data = [{"x": jnp.full((1, 100, 6), float(i + 1))} for i in range(10)]
    rows = np.asarray(calibrate(model, data, n_rows=200, progress=False)["a"].rows)
    counts = np.bincount(rows[:, 0].astype(int), minlength=11)[1:]
    assert counts.sum() == 200 and counts.min() >= 8 and counts.max() <= 35


def test_memory_does_not_grow_with_samples_and_observers_are_removed():
    model = TwoLayer()
    few = calibrate(model, batches(2), n_rows=8, progress=False)
    many = calibrate(model, batches(20), n_rows=8, progress=False)
    assert few["a"].rows.shape == many["a"].rows.shape == (8, 6)
    assert all(lin.observer is None for _, lin in linears(model))
    small = calibrate(model, batches(1, shape=(1, 3, 6)), n_rows=8, progress=False)
    assert small["a"].rows.shape == (3, 6)  # fewer rows than the buffer: only real ones


def test_errors():
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(TwoLayer(), [], progress=False)
    with pytest.raises(ValueError, match="no Linear"):
        calibrate(nnx.Module(), batches(1), progress=False)


def test_per_batch_absmax():
    model = TwoLayer()
    data = batches(4)
    st = calibrate(model, data, n_rows=8, track_batches=6, progress=False)["a"]
    assert st.batch_absmax.shape == (4, 6)
    for i, b in enumerate(data):
        np.testing.assert_array_equal(
            st.batch_absmax[i], np.abs(np.asarray(b["x"])).reshape(-1, 6).max(0)
        )
    few = calibrate(model, data, n_rows=8, track_batches=2, progress=False)["a"]
    assert few.batch_absmax.shape == (2, 6)
    assert calibrate(model, data, n_rows=8, progress=False)["a"].batch_absmax is None
