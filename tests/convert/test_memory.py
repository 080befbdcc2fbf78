"""Converting a sharded checkpoint holds about one copy of the weights (peak RSS, subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: imports and the abstract model are set up first, then the peak
# RSS counter is reset (Linux clear_refs), so the peak measures the load alone.
PROBE = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    import convert

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    folder = sys.argv[1]
    jax.numpy.zeros(1).block_until_ready()  # start the CPU client before the baseline
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = convert.load_transformer(folder)
    peak = status("VmHWM:")
    nbytes = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(json.dumps({"base": base, "peak": peak, "model_bytes": nbytes}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_sharded_conversion_peak_memory(tmp_path):
    torch.manual_seed(0)
    cfg = dict(
        num_layers=3,
        num_single_layers=3,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=256,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(32, 48, 48),
        in_channels=64,
    )
    model = diffusers.FluxTransformer2DModel(**cfg)
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 4
    ckpt_bytes = sum(p.stat().st_size for p in shards)
    del model

    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(result.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    assert r["model_bytes"] >= 0.95 * ckpt_bytes  # float32 in, float32 out: same size
    # One copy of the weights plus the largest tensor in flight (~6% measured: temporaries are
    # page-mapped, so they leave no heap slack between the weights); loading every shard first
    # and converting afterwards would need two copies.
    assert growth < 1.2 * r["model_bytes"], (
        f"peak RSS grew by {growth / 2**20:.0f} MiB for a {r['model_bytes'] / 2**20:.0f} MiB model"
    )
