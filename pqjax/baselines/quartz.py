"""QuaRTZ baseline as a method: RTN with the "quartz" format (pqjax.formats.quartz).

The format is what QuaRTZ contributes (INT8 min-max per row, leading-zero suppression to 4-bit
codes per 16 channels, the residual below them rounded off); the method is plain RTN with it,
and the format composes with every other method too (QuantConfig(weights="quartz",
acts="quartz", method="permuquant")).

Interface limit: `pqjax.quantize` builds every QuantLinear with config.weight_format() /
config.act_format(); a Plan cannot change the formats. So method "quartz" needs a config whose
weights and acts are quartz formats (or None): `quartz_config(config)` makes one from any
config. With another format the method raises and says so, rather than silently quantizing
with e.g. nvfp4 under the name "quartz".
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from flax import nnx

from pqjax import formats, permute
from pqjax.calibrate import Calibration
from pqjax.formats.quartz import QuartzFormat
from pqjax.methods import Plan, register_method, rtn

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


def quartz_config(config: QuantConfig | None = None, name: str = "quartz") -> QuantConfig:
    """`config` (default QuantConfig()) with quartz weights and acts and method "quartz";
    a side left in 16 bits (None) stays so. name: "quartz", "quartz3", "quartz_trunc", ..."""
    from pqjax.quantize import QuantConfig

    if not isinstance(formats.get(name), QuartzFormat):
        raise ValueError(f"quartz_config: {name!r} is not a quartz format")
    config = config or QuantConfig()
    return dataclasses.replace(
        config,
        weights=None if config.weights is None else name,
        acts=None if config.acts is None else name,
        group=None,  # QuantConfig.group applies to int formats only
        method="quartz",
    )


def quartz_formats(config: QuantConfig) -> None:
    """The check of method "quartz": both quantized sides name quartz formats."""
    for side, fmt in (("weights", config.weight_format()), ("acts", config.act_format())):
        if fmt is not None and not isinstance(fmt, QuartzFormat):
            raise ValueError(
                f"method 'quartz' quantizes with the quartz format, but QuantConfig.{side} is "
                f"{fmt.name!r}; a method cannot change formats in pqjax.quantize. Use "
                "pqjax.baselines.quartz.quartz_config(config), or weights='quartz', "
                "acts='quartz'."
            )


@register_method("quartz", check=quartz_formats)
def quartz(model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
           sites: list[permute.Site] | None = None) -> Plan:
    """Round-to-nearest with the quartz format (the config must name quartz formats)."""
    return rtn(model, calib, config, targets, sites)
