"""quartz: the QuaRTZ format through the pipeline, and method "quartz" (RTN with it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pqjax
from pqjax import formats, permute
from pqjax.baselines.quartz import quartz_config
from pqjax.formats.quartz import QuartzFormat
from pqjax.quantize import quantizable
from tests.baselines.rotation_helpers import forward, tiny_flux
from tests.permute.synthetic import outlier_layer


def _errors(x, w, fmt, perm=None) -> float:
    perm = np.arange(x.shape[1]) if perm is None else perm
    return permute.layer_errors(x, [w], perm, fmt, fmt)[0]


def test_quartz_w4a4_on_outlier_channels_and_with_permutation():
    """Loud channels (5%, 10x) set the INT4 g64 step of nearly every group; QuaRTZ's per-row
    INT8 keeps the quiet channels and only the 16-channel subgroups holding a loud one lose
    low bits. Sorting the loud channels into few subgroups (PermuQuant) helps it further."""
    x, w, _ = outlier_layer(0, tokens=128, d_in=256, d_out=64, ratio=10.0, w_pow=0.0)
    q, int4 = formats.get("quartz"), formats.get("int4", group=64)
    e_q, e_int4 = _errors(x, w, q), _errors(x, w, int4)
    assert e_q < 0.75 * e_int4, (e_q, e_int4)  # measured 0.040 vs 0.067
    res = permute.search(x, w, weights=q, acts=q)
    assert res.accepted and res.err_permuted < 0.8 * e_q, (e_q, res)


def test_residual_rounding_vs_truncation_on_gaussian_layers():
    """Why "quartz" rounds the residual: flooring it (quartz_trunc) is biased and has 4x the
    error variance; on a plain Gaussian layer it is 4x worse than rounding and than int4 g64."""
    x, w, _ = outlier_layer(0, tokens=128, d_in=256, d_out=64, ratio=1.0, w_pow=0.0)
    e = {n: _errors(x, w, formats.get(n)) for n in ("quartz", "quartz_trunc")}
    e["int4_g64"] = _errors(x, w, formats.get("int4", group=64))
    assert e["quartz_trunc"] > 3 * e["quartz"], e  # measured 0.100 vs 0.0245
    assert e["quartz"] < 1.05 * e["int4_g64"], e  # 0.0252


def test_quartz_config_and_method_guard():
    cfg = quartz_config(pqjax.QuantConfig(weights="int4", acts="int4", group=64))
    assert (cfg.weights, cfg.acts, cfg.method, cfg.group) == ("quartz", "quartz", "quartz", None)
    assert isinstance(cfg.weight_format(), QuartzFormat) and cfg.label == "W4A4 quartz"
    a16 = quartz_config(pqjax.QuantConfig(acts=None), "quartz3_trunc")
    assert a16.weights == "quartz3_trunc" and a16.acts is None
    with pytest.raises(ValueError, match="not a quartz format"):
        quartz_config(name="int4")
    # the method cannot change the formats quantize() uses: a config naming it with other
    # formats is refused when it is built, before any work
    with pytest.raises(ValueError, match="quartz_config"):
        pqjax.QuantConfig(method="quartz", weights="nvfp4", acts="nvfp4")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["quartz", "rtn", "permuquant"])
def test_end_to_end(method):
    """QuantConfig(weights="quartz", acts="quartz") works with any method; packed storage is
    the quartz layout and both XLA backends agree bit for bit."""
    model, calib, data = tiny_flux()
    cfg = dataclasses.replace(quartz_config(), method=method)
    qmodel, report = pqjax.quantize(model, calib, cfg)
    out = np.asarray(forward(qmodel, data[1]))
    assert np.isfinite(out).all()
    assert len(report.layers) == len(quantizable(model, cfg))
    for row in report.layers:
        assert np.isfinite(row["err_rtn"]) and row["err"] <= row["err_rtn"] + 1e-12, row
    q = permute.module_at(qmodel, "transformer_blocks.0.ff.net.2")  # d_in 256: 16 subgroups
    assert isinstance(q.weight_fmt, QuartzFormat) and q.codes[...].shape == (64, 128 + 6)
    pqjax.set_backend(qmodel, "xla_packed")
    np.testing.assert_array_equal(np.asarray(forward(qmodel, data[1])), out)
