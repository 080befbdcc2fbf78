"""pqjax.quantize end to end on tiny random SANA and Z-Image models: RTN and PermuQuant at
W4A4 NVFP4 and W3A3 INT3 (group 64), the per-layer report, 16-bit depthwise convs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from pqjax import permute
from pqjax.calibrate import linears
from pqjax.layers import QuantLinear
from pqjax.models.conv import Conv2d
from pqjax.models.sana import SanaConfig, SanaTransformer2DModel
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from pqjax.quantize import quantizable
from pqjax.report import QuantReport
from tests.parity import random_nnx

SANA = SanaConfig(
    in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=32, num_layers=2,
    num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128,
    caption_channels=64, mlp_ratio=2.5, sample_size=8, qk_norm="rms_norm_across_heads",
)  # Mix-FFN hidden 320 = 5 groups of 64
ZIMAGE = ZImageConfig(
    dim=128, n_heads=4, n_kv_heads=4, n_layers=1, n_refiner_layers=1, cap_feat_dim=64,
    axes_dims=(8, 12, 12), axes_lens=(64, 32, 32), in_channels=4,
)
FORMATS = {"W4A4 nvfp4": ("nvfp4", None), "W3A3 int3 g64": ("int3", 64)}
# Relative output error ||y_q - y|| / ||y|| of the quantized model on a held-out batch, measured
# (rtn / permuquant): SANA 0.19 / 0.19 (nvfp4), 0.41 / 0.48 (int3); Z-Image 0.38 / 0.38,
# 0.91 / 0.86. Per-layer errors compound over the blocks; at W3A3 (per-layer relative squared
# error ~0.15) the tiny random models keep only a rough likeness. Bounds: about 1.4x margin.
BOUND = {("sana", "W4A4 nvfp4"): 0.3, ("sana", "W3A3 int3 g64"): 0.7,
         ("zimage", "W4A4 nvfp4"): 0.55, ("zimage", "W3A3 int3 g64"): 1.3}


def sana_batch(seed: int) -> dict[str, jax.Array]:
    """latents `(2, 8, 8, 8)` (64 tokens), a 16-token caption (second one padded)."""
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32),
        "encoder_hidden_states": jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32),
        "encoder_attention_mask": jnp.asarray(np.arange(16)[None] < [[16], [11]], jnp.int32),
        "timestep": jnp.asarray(rng.uniform(50.0, 950.0, 2), jnp.float32),
    }


def zimage_batch(seed: int) -> dict[str, jax.Array]:
    """latents `(2, 4, 1, 16, 16)` (64 tokens), 32 caption rows with lengths 32 and 20."""
    rng = np.random.default_rng(seed)
    return {
        "latents": jnp.asarray(rng.standard_normal((2, 4, 1, 16, 16)), jnp.float32),
        "timestep": jnp.asarray(rng.uniform(0.05, 0.95, 2), jnp.float32),
        "cap_feats": jnp.asarray(rng.standard_normal((2, 32, 64)), jnp.float32),
        "cap_lens": jnp.asarray([32, 20], jnp.int32),
    }


def zimage_forward(m: nnx.Module, **kw: jax.Array) -> jax.Array:
    return m.forward_batch(**kw)


def sana_forward(m: nnx.Module, **kw: jax.Array) -> jax.Array:
    return m(**kw)


CASES: dict[str, tuple[type, Any, float, Callable, Callable]] = {
    "sana": (SanaTransformer2DModel, SANA, 0.08, sana_batch, sana_forward),
    "zimage": (ZImageTransformer2DModel, ZIMAGE, 0.07, zimage_batch, zimage_forward),
}


class Calibrated:
    """A tiny random model, its calibration, a held-out batch and its full-precision output;
    `run(label, method)` quantizes once per (format, method) and caches the result."""

    def __init__(self, name: str):
        cls, config, std, batch, forward = CASES[name]
        self.name = name
        self.model = random_nnx(cls, config, std, channel_gains=True)
        # one compilation per model structure (eager dispatch of the tiny ops is slower on CPU)
        self.forward = nnx.jit(lambda m, kw: forward(m, **kw))
        # n_rows above every Linear's row count (<= 576): each layer keeps all its rows, so
        # RTN and PermuQuant measure their errors on the same rows
        self.calib = pqjax.calibrate(
            self.model, [batch(s) for s in range(3)], n_rows=640, forward=forward,
            progress=False,
        )
        self.held_out = batch(10)
        self.ref = np.asarray(self.forward(self.model, self.held_out))
        self._runs: dict[tuple[str, str], tuple[nnx.Module, QuantReport, float]] = {}

    def run(self, label: str, method: str) -> tuple[nnx.Module, QuantReport, float]:
        """(quantized model, report, relative output error on the held-out batch)."""
        if (label, method) not in self._runs:
            weights, group = FORMATS[label]
            cfg = pqjax.QuantConfig(
                weights=weights, acts=weights, group=group, method=method
            )
            assert cfg.label == label
            qmodel, report = pqjax.quantize(self.model, self.calib, cfg)
            err = rel_output_error(np.asarray(self.forward(qmodel, self.held_out)), self.ref)
            self._runs[label, method] = qmodel, report, err
        return self._runs[label, method]


@pytest.fixture(scope="module", params=sorted(CASES))
def calibrated(request) -> Calibrated:
    return Calibrated(request.param)


def rel_output_error(out: np.ndarray, ref: np.ndarray) -> float:
    assert out.shape == ref.shape and np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("label", sorted(FORMATS))
def test_permuquant_and_rtn(calibrated, label, tmp_path):
    c = calibrated
    reports = {}
    for method in ("rtn", "permuquant"):
        qmodel, report, err = c.run(label, method)
        targets = quantizable(c.model, pqjax.QuantConfig())
        assert {r["layer"] for r in report.layers} == set(targets)
        assert all(isinstance(permute.module_at(qmodel, t), QuantLinear) for t in targets)
        # quantized for real, and still close to full precision
        assert 1e-2 < err < BOUND[c.name, label], f"{c.name} {method} {label}: {err:.3f}"
        reports[method] = report
    rtn, pq = reports["rtn"].summary, reports["permuquant"].summary
    # Within PermuQuant's report RTN and the accepted orders are measured on the same rows,
    # and the acceptance rule makes no layer worse.
    assert pq["layers_not_worse_than_rtn"] == pq["n_layers"] == rtn["n_layers"]
    assert pq["mean_err"] < pq["mean_err_rtn"]
    assert pq["sites_accepted"] > 0  # the log-normal channel gains leave orders to find
    # Against the RTN method: with every row kept, both measure RTN on the same rows.
    assert pq["mean_err_rtn"] == pytest.approx(rtn["mean_err"], rel=1e-5)
    assert pq["mean_err"] <= rtn["mean_err"]
    # the report says what stayed 16-bit, and the saved report keeps it
    kept = {k["module"]: k["reason"] for k in reports["permuquant"].kept_16bit}
    assert kept and all("skip pattern" in r or "conv" in r for r in kept.values()), kept
    reports["permuquant"].save(tmp_path, plot=False)
    loaded = QuantReport.load(tmp_path / "report.json")
    assert loaded.kept_16bit == reports["permuquant"].kept_16bit


def test_sana_depthwise_convs_stay_16bit(calibrated):
    if calibrated.name != "sana":
        pytest.skip("SANA only")
    model = calibrated.model
    qmodel, report, _ = calibrated.run("W4A4 nvfp4", "permuquant")
    kept = {k["module"]: k["reason"] for k in report.kept_16bit}
    for i in range(SANA.num_layers):
        path = f"transformer_blocks.{i}.ff.conv_depth"
        conv = permute.module_at(qmodel, path)
        assert type(conv) is Conv2d and conv.kernel[...].dtype == jnp.float32
        assert kept[path] == "depthwise conv (per-channel filter)"
        # the 1x1 convs around it are quantized
        for pw in ("conv_inverted", "conv_point"):
            assert isinstance(permute.module_at(qmodel, f"transformer_blocks.{i}.ff.{pw}"),
                              QuantLinear)
    assert kept["patch_embed.proj"] == "convolution"
    assert kept["proj_out"] == "skip pattern 'proj_out'"
    assert kept["time_embed.linear"] == "skip pattern 'time_embed.*'"
    # nothing quantized is listed, nothing 16-bit is missing
    targets = set(quantizable(model, pqjax.QuantConfig()))
    assert targets.isdisjoint(kept)
    assert {p for p, _ in linears(model)} - targets <= set(kept)


def test_smoothquant_plan_is_exact_with_glu_gates(calibrated):
    """SmoothQuant on models whose FFN hidden is a GLU: per-channel scales fold into the value
    half only (the gate half is permuted, never scaled), and the plan keeps the function."""
    from pqjax.methods import get_method
    from tests.baselines.conftest import plan_model

    cfg = pqjax.QuantConfig(weights="nvfp4", acts="nvfp4", method="smoothquant")
    plan = get_method("smoothquant")(
        calibrated.model, calibrated.calib, cfg, quantizable(calibrated.model, cfg)
    )
    assert any(row["folded"] for row in plan.sites.values())
    out = np.asarray(calibrated.forward(plan_model(plan), calibrated.held_out))
    assert rel_output_error(out, calibrated.ref) < 1e-5


def test_pallas_backend_on_cpu_is_the_xla_path(calibrated):
    """The "pallas" backend where the kernels do not run (CPU) gives the "xla" backend's output
    bit for bit, fused norms included: Z-Image's norms and SANA's norm1 quantize for their
    consumers; SANA's norm2 output is reshaped to an image first, and the plan says so."""
    from pqjax.backends import fusion

    qmodel, _, _ = calibrated.run("W4A4 nvfp4", "permuquant")
    want = np.asarray(calibrated.forward(qmodel, calibrated.held_out))
    pqjax.set_backend(qmodel, "pallas")
    try:
        plan = fusion.plan(qmodel)
        got = np.asarray(calibrated.forward(qmodel, calibrated.held_out))
    finally:
        pqjax.set_backend(qmodel, "xla")
    np.testing.assert_array_equal(got, want)
    assert plan, plan
    for path, reason in plan.items():
        if path.endswith("norm2"):  # SANA's Mix-FFN input
            assert "transformed" in reason, plan
        else:
            assert reason is None, plan


def test_pallas_kernels_in_the_model_match_xla(calibrated, monkeypatch):
    """The kernels in the whole model, run by the Pallas interpreter on CPU, with no XLA
    fallback; every consumer of a fused norm reads the norm's codes instead of quantizing its
    input; every layer's kernel output matches the "xla" backend's on the same input (a fused
    norm's consumer: XLA's product of the same codes) within 1e-4 of that output's scale:
    given equal inputs the activation codes are bit-exact, so only the float32 accumulation
    order differs (K <= 512: ~512 u = 3e-5).

    Per layer on the same input, not the model's output against the "xla" model's: there a
    float32 ulp of accumulation order can move one activation across an FP4 rounding
    boundary, and one code flipped in the time-embedding path moves every token of that
    image (measured on Z-Image: 4% of the output norm on an Intel Xeon; within 1e-4 of the
    output's scale on the CI machine before it).
    The fused norms' codes are checked against their reference in tests/pallas_kernels."""
    import warnings

    from pqjax.backends import dispatch, fusion, register_linear_route
    from tests.pallas_kernels.helpers import record_calls

    qmodel, _, _ = calibrated.run("W4A4 nvfp4", "permuquant")
    monkeypatch.setenv(dispatch.ENV_INTERPRET, "1")
    calls = record_calls(monkeypatch, dispatch, "quantize_activations", lambda x, *a, **k: x.shape)
    gaps: list = []  # (max |kernel - xla|, max |xla|) per layer fed its own input, traced

    def checked(qlin, x, xq=None, **kw):  # xq: a fused norm's codes, XLA's product of them
        y = dispatch.quant_linear(qlin, x, xq, **kw)
        want = qlin.xla_forward(x, xq).astype(jnp.float32)
        gaps.append((jnp.max(jnp.abs(y.astype(jnp.float32) - want)), jnp.max(jnp.abs(want))))
        return y

    forward = CASES[calibrated.name][4]
    pqjax.set_backend(qmodel, "pallas")
    register_linear_route("pallas", checked)
    try:
        fused = [p for p, reason in fusion.plan(qmodel).items() if reason is None]
        with warnings.catch_warnings():
            warnings.simplefilter("error", dispatch.PallasFallbackWarning)
            got, gaps = nnx.jit(lambda m, kw: (forward(m, **kw), gaps))(qmodel,
                                                                          calibrated.held_out)
    finally:
        register_linear_route("pallas", dispatch.quant_linear)
        pqjax.set_backend(qmodel, "xla")
    n_layers = sum(isinstance(m, QuantLinear) for _, m in nnx.iter_graph(qmodel))
    fed = sum(len(s.consumers) for s in permute.sites(qmodel) if set(s.norms) & set(fused))
    assert fused and fed  # SANA: 2 norm1 -> 6 layers; Z-Image: 6 norms -> 15 layers
    assert len(calls) == n_layers - fed, (len(calls), n_layers, fed)
    assert len(gaps) == n_layers and np.isfinite(np.asarray(got)).all()
    ratios = [float(d) / float(m) for d, m in gaps]
    print(calibrated.name, "max |kernel - xla| / scale per layer:", max(ratios))
    assert max(ratios) <= 1e-4, ratios
