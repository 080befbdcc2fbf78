"""SVDQuant: smoothing migrates activation outliers into the weights, a 16-bit low-rank branch
absorbs the weights' dominant part, and only the residual is quantized.

    qmodel, report = pqjax.quantize(model, calib, QuantConfig(method="svdquant",
                                                             options=(("rank", 32),)))

Per site, for each migration strength a in `config.option("alphas")` (default 0.3..0.8):
    s_j = max|x_j|^a / max|W_j|^(1-a)          (rescaled so max|x / s| = max|x|, see smoothing)
    W^ = diag(s) W = U S V^T;  L1 = U_r S_r^(1/2) (d_in, r),  L2 = S_r^(1/2) V_r^T (r, d_out)
    R = W^ - L1 L2
    y = Q(x / s) Q(R) + (x / s) L1 L2
and the a with the lowest summed output error of the site's quantized consumers is kept. r is
`config.option("rank", 32)`, clipped to min(d_in, d_out). The scale folds into the producers
where the site is scalable, otherwise it is `input_scale` = 1 / s online; the branch reads the
scaled input either way (`QuantLinear` applies input_scale first). Plan.kernels holds R,
Plan.extras["low_rank"] holds (L1, L2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import nnx

from pqjax import permute
from pqjax.baselines.smoothing import ALPHAS, alpha_candidates, alpha_grid, smoothing_plan
from pqjax.calibrate import Calibration
from pqjax.methods import Option, Plan, register_method

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig

DEFAULT_RANK = 32


@register_method("svdquant", options={
    "alphas": ALPHAS,
    "rank": Option(int, DEFAULT_RANK, "rank of the 16-bit low-rank branch", positive=True),
})
def svdquant(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """Smoothing (a searched per site) + top-rank SVD branch in 16 bits + quantized residual."""
    rank = int(config.option("rank"))
    plan = smoothing_plan(
        model, calib, config, targets, alpha_candidates(alpha_grid(config)), rank=rank,
        sites=sites,
    )
    for path, row in plan.layers.items():
        lr = plan.extras.get(path, {}).get("low_rank")
        row["rank"] = 0 if lr is None else int(lr[0].shape[1])
    return plan
