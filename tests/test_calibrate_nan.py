"""Calibration stops at NaN, Inf or overflow, naming the layer and the batch; the quantizer
refuses non-finite scales, biases and weights that overflow their format (issue 15).

Before: one NaN in one calibration batch made act_global_scale NaN, and the quantized model
then output NaN for every input; a NaN bias or a finite 3e38 weight did the same.

A three-Linear chain whose attribute names sort opposite to its execution order
(c_first -> b_second -> a_third), so "the first layer to see it" is checked against
execution order, not module-tree order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from pqjax import formats
from pqjax.calibrate import LayerStats, NonFiniteCalibration, calibrate, linears
from pqjax.layers import QuantLinear
from pqjax.models.layers import Linear


class Chain(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.c_first = Linear(8, 32, rngs=rngs)
        self.b_second = Linear(32, 32, rngs=rngs)
        self.a_third = Linear(32, 8, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.a_third(jax.nn.gelu(self.b_second(jax.nn.gelu(self.c_first(x)))))


def batches(n: int = 3, bad: int | None = None, value: float = np.nan) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = rng.normal(size=(4, 8)).astype(np.float32)
        if i == bad:
            x[1, 2] = value
        out.append({"x": jnp.asarray(x)})
    return out


@pytest.fixture
def chain():
    return Chain()


def observers_removed(model) -> bool:
    return all(lin.observer is None for _, lin in linears(model))


def test_tree_order_is_the_reverse_of_execution_order(chain):
    assert [p for p, _ in linears(chain)] == ["a_third", "b_second", "c_first"]


def test_clean_calibration_still_matches_numpy(chain):
    data = batches()
    calib = calibrate(chain, data, n_rows=4, progress=False)
    x = np.concatenate([np.asarray(b["x"]) for b in data])  # c_first reads the batch itself
    # float32 sums of 12 squares: a few ulps apart from numpy's float64
    np.testing.assert_allclose(calib["c_first"].mean_sq, (x.astype(np.float64) ** 2).mean(0),
                               rtol=1e-6)
    np.testing.assert_array_equal(calib["c_first"].absmax, np.abs(x).max(0))
    assert observers_removed(chain)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_bad_value_in_one_batch_names_the_input_and_the_batch(chain, value):
    with pytest.raises(NonFiniteCalibration, match=r"batch 2: input 'x' holds NaN or Inf"):
        calibrate(chain, batches(bad=2, value=value), n_rows=4, progress=False)
    assert observers_removed(chain)


def test_a_nan_bias_is_named_before_any_batch_runs(chain):
    chain.b_second.bias[...] = chain.b_second.bias[...].at[3].set(jnp.nan)
    traced = []

    def forward(m, **kw):
        traced.append(1)
        return m(**kw)

    with pytest.raises(NonFiniteCalibration, match=r"parameter b_second\.bias holds NaN or Inf"):
        calibrate(chain, batches(), n_rows=4, progress=False, forward=forward)
    assert traced == []  # refused before the forward was even traced
    assert observers_removed(chain)


def test_an_overflowing_weight_names_the_first_layer_to_see_it(chain):
    chain.c_first.kernel[...] = chain.c_first.kernel[...].at[0, 5].set(3e38)
    with pytest.raises(NonFiniteCalibration) as e:
        calibrate(chain, batches(), n_rows=4, progress=False)
    msg = str(e.value)
    # c_first's output channel 5 is ~3e38: finite, but its square overflows in b_second's
    # statistics; b_second's own output is then Inf for a_third
    assert msg.startswith("calibrate: batch 0: the input of b_second is so large that its sum "
                          "of x^2 overflows float32")
    assert "1 later layers saw it too" in msg and "a_third" not in msg


def test_a_batch_that_overflows_after_several_is_named(chain):
    data = batches(n=4)
    data[3] = {"x": data[3]["x"] * 2e19}  # |x| up to ~4e19: x^2 above the float32 max
    with pytest.raises(NonFiniteCalibration, match=r"batch 3: the input of c_first is so large"):
        calibrate(chain, data, n_rows=4, progress=False)


# ---- the quantizer ---------------------------------------------------------------------

RTN_INT4 = pqjax.QuantConfig(weights="int4", acts="int4", group=32, method="rtn", skip=())


def test_quantize_refuses_a_nan_bias_naming_the_layer(chain):
    chain.a_third.bias[...] = chain.a_third.bias[...].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"^a_third: the \(8,\) bias holds NaN or Inf"):
        pqjax.quantize(chain, {}, RTN_INT4)


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_quantize_refuses_a_weight_that_overflows_its_format(chain, weights):
    # an INT block scale is float16: 3e38 / qmax saturates at 65504 and the weight is clipped
    chain.b_second.kernel[...] = chain.b_second.kernel[...].at[1, 1].set(3e38)
    config = pqjax.QuantConfig(weights=weights, acts=None, group=32, method="rtn", skip=())
    with pytest.raises(ValueError, match=rf"^b_second: {weights}: the weight's largest "
                                         r"magnitude 3e\+38 overflows the format"):
        pqjax.quantize(chain, {}, config)


def test_quantize_refuses_a_nan_activation_scale(chain):
    calib = calibrate(chain, batches(), n_rows=4, progress=False)
    stats = calib["b_second"]
    calib["b_second"] = LayerStats(mean_sq=stats.mean_sq, absmax=stats.absmax.at[0].set(jnp.nan),
                                   count=stats.count, rows=stats.rows)
    config = pqjax.QuantConfig(weights="nvfp4", acts="nvfp4", method="rtn", skip=())
    with pytest.raises(ValueError, match=r"^b_second: act_global_scale is nan"):
        pqjax.quantize(chain, calib, config)


def test_a_quantized_layer_names_its_non_finite_state(chain):
    fmt = formats.get("nvfp4")
    q = QuantLinear.from_linear(chain.b_second, weights=fmt, acts=fmt, act_amax=2.0)
    assert q.nonfinite_state() == []
    q.block_scale[...] = q.block_scale[...].at[0, 0].set(jnp.nan)
    q.act_global_scale[...] = jnp.float32(jnp.inf)
    assert q.nonfinite_state() == ["block_scale", "act_global_scale"]


def test_the_clean_chain_quantizes_to_finite_outputs(chain):
    calib = calibrate(chain, batches(), n_rows=4, progress=False)
    config = pqjax.QuantConfig(weights="nvfp4", acts="nvfp4", method="rtn", skip=())
    qmodel, _ = pqjax.quantize(chain, calib, config)
    y = jax.jit(lambda m, x: m(x))(qmodel, batches()[0]["x"])
    assert np.isfinite(np.asarray(y)).all()


def test_a_nan_inside_a_tuple_input_is_named(chain):
    # streaming calibrates blocks on (cos, sin) rotary tuples: every float leaf is checked
    data = [dict(b, rope=(jnp.ones(3), jnp.array([0.0, np.nan]))) for b in batches(n=1)]
    with pytest.raises(NonFiniteCalibration, match=r"batch 0: input 'rope' holds NaN"):
        calibrate(chain, data, n_rows=4, progress=False, forward=lambda m, x, rope: m(x))
