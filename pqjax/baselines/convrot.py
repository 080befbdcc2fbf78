"""ConvRot (Huang et al., 2025): group-wise REGULAR Hadamard rotation, then 4-bit RTN per group.

Every quantized Linear gets T = "regular_hadamard:<b>" on its input channels: R_b / sqrt(b)
with R_b = R_4^(x k), R_4 = J - 2I, a Hadamard matrix whose rows and columns all sum to sqrt(b)
(construction and rationale in `pqjax.rotate`). b is the largest power of four dividing the
quantization group (16 for nvfp4 and int g16 / g32, 64 for int g64 / g128); QuantConfig
option "block" overrides it. Unlike a Sylvester block, R_b maps a channel offset shared by the
group (the positive mean of post-GELU inputs) to the same offset on every output channel
instead of a sqrt(b)-times larger column outlier at position 0, so the rotation does not
create a column outlier out of a shared offset, while channel outliers are spread over the
group as by any Hadamard.

Fusion: ConvRot's kernel rotates, quantizes and multiplies group by group in one pass (the
rotation is a b x b block that never leaves the group). That is a kernel-level property of
the schedule, not of the result: per group, Q(x_g R) Q(R^T W_g) summed over groups is the
same number whether the three steps are fused or not. In XLA this method computes exactly
that math unfused: the rotation is folded offline into the weights (Plan.kernels) and applied
online to the activations (QuantLinear.input_transform) before the per-group quantizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import nnx

from pqjax import permute
from pqjax.baselines.hadamard import rotation_plan
from pqjax.baselines.rotation_choice import ROTATION_OPTIONS
from pqjax.calibrate import Calibration
from pqjax.methods import Plan, register_method

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


@register_method("convrot", options=ROTATION_OPTIONS)
def convrot(model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
            sites: list[permute.Site] | None = None) -> Plan:
    """Regular block Hadamard per group, folded into the weights and applied online, then RTN."""
    return rotation_plan(model, calib, config, targets, "regular_hadamard")
