"""Every registered method, block by block in memory and streamed from disk, on tiny FLUX,
SANA and Z-Image: the same quantized model, bit for bit.

Both paths run the same engine (`pqjax.engine.run`) on the same calibration batches: the
in-memory one takes its blocks from the model, the streamed one reads them from an exported
diffusers folder (sharded safetensors) and keeps finished blocks on disk. Each block and the
model stage then run the same compiled programs on the same arrays, so every stored array
(codes, scales, 16-bit parameters, absorbed orders) must be equal, bit for bit: exact
equality is what the arithmetic guarantees here, on any CPU, since no value is computed by
two different programs. The reports must agree too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convert
import pqjax
from pqjax import engine
from pqjax.baselines.quartz import quartz_config
from pqjax.engine.stages import Stages
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.models.paths import module_at
from pqjax.models.sana import SanaTransformer2DModel
from pqjax.models.zimage import ZImageTransformer2DModel
from tests.engine.tiny import FLUX, SANA, ZIMAGE, flux_batch, sana_batch, zimage_batch
from tests.parity import random_nnx

# Small option values: the paths must agree whatever the options; these keep CI fast.
OPTIONS: dict[str, dict[str, Any]] = {
    "omniquant_lwc": {"steps": 3},
    "permuquant_hr": {"refine": 1},
    "svdquant": {"rank": 4, "alphas": (0.4, 0.6)},
    "smoothquant": {"alphas": (0.4, 0.6)},
    "permuquant_h": {"max_block": 32},
    "permuquant_hs": {"max_block": 32, "alphas": (0.5,), "online": True},  # every scale kind
}
CASES = {
    "flux": (FluxTransformer2DModel, FluxConfig(**FLUX), flux_batch),
    "sana": (SanaTransformer2DModel, SANA, sana_batch),
    "zimage": (ZImageTransformer2DModel, ZIMAGE, zimage_batch),
}
KW = dict(n_rows=32, progress=False)


def config_for(method: str) -> pqjax.QuantConfig:
    if method == "quartz":  # its own 4-bit format
        return quartz_config()
    return pqjax.QuantConfig(method=method, options=tuple(OPTIONS.get(method, {}).items()))


def arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(model)):
        a = np.asarray(v.get_value())
        out[".".join(map(str, path))] = a.view(np.uint8) if a.dtype.itemsize == 1 else a
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> tuple[str, nnx.Module, Any, list[dict[str, Any]]]:
    """(family, model, its exported folder, two calibration batches)."""
    name = request.param
    cls, config, batch = CASES[name]
    model = random_nnx(cls, config, 0.2, channel_gains=True)
    folder = tmp_path_factory.mktemp(f"{name}_transformer")
    convert.export_model(model, folder, max_shard_bytes=64 << 10)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, as real checkpoints are
    return name, model, folder, [batch(0), batch(1)]


@pytest.mark.parametrize("method", pqjax.method_names())
def test_streamed_equals_in_memory(case, method, tmp_path):
    name, model, folder, batches = case
    config = config_for(method)
    mem, mem_report = engine.quantize_blocks(model, batches, config, **KW)
    disk, disk_report = engine.stream_quantize(folder, batches, config, tmp_path / "w",
                                               dtype=jnp.float32, **KW)
    a, b = arrays(mem), arrays(disk)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {method}: {key}")
    assert mem_report.layers == disk_report.layers
    assert mem_report.sites == disk_report.sites
    assert mem_report.perms.keys() == disk_report.perms.keys()
    quantized = {".".join(map(str, p)) for p, m in nnx.iter_graph(mem)
                 if isinstance(m, pqjax.QuantLinear)}
    assert quantized and quantized == {r["layer"] for r in mem_report.layers}
    if method == "permuquant_hs" and name != "zimage":  # option online: scales applied by
        # the layers compared too (Z-Image's SwiGLU hidden site folds into w3: none kept)
        assert any(m.input_scale is not None for _, m in nnx.iter_graph(mem)
                   if isinstance(m, pqjax.QuantLinear))


def test_model_stage_decides_the_sites_that_span_blocks(case):
    """The site every block reads (FLUX's temb, SANA's caption norm, Z-Image's t-embedding)
    is decided in the model stage, and its readers inside the blocks are quantized there."""
    name, model, _, batches = case
    stages = Stages.of(model, pqjax.QuantConfig())
    site = {"flux": "temb", "sana": "caption_norm", "zimage": "adaln"}[name]
    assert [s.name for s in stages.model_sites] == [site]
    assert stages.deferred and stages.deferred <= set(stages.targets[""])
    qmodel, report = engine.quantize_blocks(model, batches, pqjax.QuantConfig(), **KW)
    assert site in {r["site"] for r in report.sites}
    for path in stages.deferred:
        assert isinstance(module_at(qmodel, path), pqjax.QuantLinear), path
        assert report_row(report, path)["site"] == site


def report_row(report: Any, path: str) -> dict[str, Any]:
    return next(r for r in report.layers if r["layer"] == path)


def test_runtime_switches_are_not_config():
    """progress and backend are arguments of the calls, not fields of the config, so a run
    resumed with other settings is the same work."""
    fields = {f.name for f in dataclasses.fields(pqjax.QuantConfig)}
    assert "progress" not in fields and "backend" not in fields
