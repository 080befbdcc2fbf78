"""PTQ4DiT: Channel-wise Salience Balancing (CSB) with Spearman's rho-guided Salience
Calibration (SSC) over timesteps.

    calib = pqjax.calibrate(model, batches, track_batches=n_timesteps)   # one batch per step
    qmodel, report = pqjax.quantize(model, calib, QuantConfig(method="ptq4dit"))

Our reading of the method (only the abstract is available: "CSB leverages the complementarity
property of channel magnitudes to redistribute the extremes ... SSC extends this approach by
dynamically adjusting the balanced salience to capture the temporal variations in activation"):

- salience of channel j: s(X_j) = max|X_j| (activation), s(W_j) = max|W_j| over row j of every
  consumer's kernel (weight);
- per timestep t, rho_t = Spearman rank correlation over channels between s(X^(t)) (the
  calibration batch absmax of step t) and s(W);
- timestep weights eta_t = exp(-rho_t) / sum_tau exp(-rho_tau): steps where activation and
  weight extremes are complementary (low, or negative, rho) are where balancing redistributes
  the most, so they weigh more;
- calibrated activation salience s_rho(X_j) = sum_t eta_t s(X_j^(t));
- CSB balancing b_j = sqrt(s_rho(X_j) / s(W_j)); x' = x / b, W' = diag(b) W, so both sides get
  salience sqrt(s_rho(X_j) s(W_j)) (SmoothQuant's alpha = 1/2 on the calibrated salience).

b folds offline into the producers (the paper's re-parameterization) where the site is
scalable, and is an online `input_scale` = 1 / b after a nonlinearity. Without per-timestep
statistics (`batch_absmax` None) the aggregate absmax is used and the site reports
"ssc": "aggregate".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

from pqjax.baselines.smoothing import smoothing_plan
from pqjax.calibrate import Calibration, LayerStats
from pqjax.methods import Plan, register_method
from pqjax.permute.sites import Site

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig

_EPS = 1e-5


def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n of v `(n,)`, ties sharing their average rank (as Spearman's rho needs)."""
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v), np.float64)
    r[order] = np.arange(1, len(v) + 1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of a and b `(n,)`: Pearson correlation of their ranks (0 if constant)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / den) if den > 0 else 0.0


def timestep_weights(batch_absmax: np.ndarray, w_absmax: np.ndarray) -> tuple[np.ndarray, ...]:
    """(rho `(T,)`, eta `(T,)`) from per-timestep activation salience `(T, d)` and s(W) `(d,)`."""
    rho = np.array([spearman(row, w_absmax) for row in np.asarray(batch_absmax)])
    logits = -rho
    eta = np.exp(logits - logits.max())
    return rho, eta / eta.sum()


def csb_scales(act_salience: np.ndarray, w_absmax: np.ndarray) -> np.ndarray:
    """b_j = sqrt(s(X_j) / s(W_j)), `(d,)` float32."""
    a = np.maximum(np.asarray(act_salience, np.float64), _EPS)
    w = np.maximum(np.asarray(w_absmax, np.float64), _EPS)
    return np.sqrt(a / w).astype(np.float32)


def ssc_candidates(
    site: Site, act_absmax: np.ndarray, w_absmax: np.ndarray, stats: list[LayerStats]
) -> list[tuple[dict[str, Any], np.ndarray]]:
    """One candidate per site: CSB on the Spearman-weighted salience (or the aggregate)."""
    per_step = [st.batch_absmax for st in stats if st.batch_absmax is not None]
    if not per_step or len(per_step[0]) == 0:
        return [({"ssc": "aggregate"}, csb_scales(act_absmax, w_absmax))]
    # every quantized consumer of a site reads the same input: any one's statistics will do
    steps = np.max(np.stack([np.asarray(b) for b in per_step]), axis=0)  # (T, d)
    rho, eta = timestep_weights(steps, w_absmax)
    info = {
        "ssc": "spearman",
        "timesteps": len(eta),
        "rho": rho.tolist(),
        "eta": eta.tolist(),
        "rho_mean": float(rho.mean()),
    }
    return [(info, csb_scales(eta @ steps, w_absmax))]


@register_method("ptq4dit")
def ptq4dit(model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
            sites: list[Site] | None = None) -> Plan:
    """CSB balancing b = sqrt(s_rho(X) / s(W)) per site with SSC timestep weighting."""
    return smoothing_plan(model, calib, config, targets, ssc_candidates, sites=sites)
