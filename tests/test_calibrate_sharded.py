"""Data-parallel calibration over 8 host devices equals one device (subprocess: XLA_FLAGS)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import logging, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    from flax import nnx
    from pqjax import calibrate
    from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
    from tests.models.test_flux import make_inputs
    from tests.parity import to_jax

    cfg = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
               axes_dims_rope=(4, 6, 6), in_channels=8)
    model = FluxTransformer2DModel(FluxConfig(**cfg), rngs=nnx.Rngs(0))
    batches = [{k: to_jax(v) for k, v in make_inputs(cfg, 8, 4, 4, 6, seed=s).items()}
               for s in range(3)]
    out = {"n_devices": len(jax.devices())}
    compiles = []  # the calibration step's XLA compilations, from jax's compile log


    class StepCompiles(logging.Handler):
        def emit(self, record):
            message = record.getMessage()  # the single-device step, the sharded one
            if "compilation of jit(_observed)" in message or "compilation of jit(step)" in message:
                compiles.append(record)


    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(StepCompiles())
    for mode in sys.argv[2:]:
        compiles.clear()
        mesh = None if mode == "single" else Mesh(np.array(jax.devices()), ("data",))
        calib = calibrate(model, batches, n_rows=40, progress=False, mesh=mesh,
                          shard_weights=(mode == "fsdp"))
        for path, st in calib.items():
            out[f"{mode}:{path}/mean_sq"] = np.asarray(st.mean_sq)
            out[f"{mode}:{path}/absmax"] = np.asarray(st.absmax)
            out[f"{mode}:{path}/rows"] = np.asarray(st.rows)
            out[f"{mode}:{path}/count"] = np.asarray(st.count)
        out[f"{mode}:step_compilations"] = np.asarray(len(compiles))
    np.savez(sys.argv[1], **out)
    """
)


def run(devices: int, out: Path, *modes: str) -> dict[str, np.ndarray]:
    """Calibrate in one subprocess with `devices` host devices, once per mode."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", PROBE, str(out), *modes], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _by_mode(res: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    return {k.split(":", 1)[1]: v for k, v in res.items() if k.startswith(mode + ":")}


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """One device, then 8 devices data-parallel and FSDP: two subprocesses (one per device
    count, XLA_FLAGS is read at start-up), the model built and compiled once in each."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("sharded_calib")
    one = run(1, folder / "one.npz", "single")
    many = run(8, folder / "many.npz", "data", "fsdp")
    assert int(one.pop("n_devices")) == 1 and int(many.pop("n_devices")) == 8
    return {"single": _by_mode(one, "single"), **{m: _by_mode(many, m) for m in ("data", "fsdp")}}


@pytest.mark.parametrize("mode", ["data", "fsdp"])
def test_eight_devices_equal_one(calibrations, mode):
    one, many = dict(calibrations["single"]), dict(calibrations[mode])
    # three batches of one shape: one compilation of the step, because the state it returns
    # keeps the placement it was given (a changed sharding would compile the step again)
    assert int(one.pop("step_compilations")) == 1
    assert int(many.pop("step_compilations")) == 1, f"{mode}: the step compiled again"
    assert one and one.keys() == many.keys()
    for key in one:
        if key.endswith("/count"):
            np.testing.assert_array_equal(many[key], one[key], err_msg=key)
        else:
            # Sharded matmuls accumulate in another order, so activations (hence sums, maxima
            # and the sampled rows' values) agree to float rounding; a different choice of
            # sampled rows would differ by O(1).
            np.testing.assert_allclose(many[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
