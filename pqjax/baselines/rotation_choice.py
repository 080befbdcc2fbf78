"""Which rotations a rotation method may choose: the methods' options, the fixed transform of
`hadamard` / `convrot`, and `permuquant_h`'s candidates per layer and per site.

    candidates = site_candidates(config, site)   # -> permute.search(..., rotate=candidates)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pqjax import permute, rotate
from pqjax.methods import Option

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


# The options of the rotation methods (`QuantConfig.options`).
ROTATION_OPTIONS = {
    "block": Option((int, type(None)), None, "rotation block size (None: from the group)",
                    positive=True),
    "seed": Option((int, type(None)), None, "random signs on the rotation (None: none)"),
}
JOINT_OPTIONS = {
    **ROTATION_OPTIONS,
    "rotations": Option(str, "search", "'search' (joint choice), 'rotated' or 'fixed'",
                        choices=("search", "rotated", "fixed")),
    "max_block": Option((int, type(None)), None, "widest rotation block among the candidates",
                        positive=True),
    "refine": Option(int, 0, "rounds of greedy swaps between groups", nonnegative=True),
    "bias_correction": Option(bool, True, "subtract each quantized layer's mean output error "
                              "on its calibration rows from its bias (see "
                              "pqjax.baselines.bias_correction)"),
    "rotate_per_image": Option(str, "yes", "rotation candidates at per-image sites "
                               "(Site.per_image): 'yes', 'no', or 'auto' (not with NVFP4 "
                               "activations)", choices=("yes", "no", "auto")),
}


def finest_group(config: QuantConfig) -> int | None:
    """The smaller group size of the weight and activation formats (None: per row in both)."""
    groups = [f.group_size for f in (config.weight_format(), config.act_format()) if f]
    return min((g for g in groups if g), default=None)


def transform_for(config: QuantConfig, d_in: int, kind: str) -> str:
    """The transform name of a layer with d_in inputs: block from the format's group
    (`finest_group`), or QuantConfig option "block"; option "seed" adds signs."""
    block = rotate.block_for(finest_group(config), d_in, kind, config.option("block"))
    return rotate.transform_name(kind, block, config.option("seed"))


def rotation_candidates(config: QuantConfig, d_in: int) -> tuple[str | None, ...]:
    """permuquant_h's rotation candidates for a d_in-channel input (QuantConfig option
    "rotations"): "search" (default) None then every legal kind and block from the group up
    (`rotate.candidates`, capped by option "max_block"); "rotated" the same without None (a
    rotation on every layer that has a legal block, its kind and block chosen); "fixed" the
    in-group block Hadamard (`transform_for`), as before the joint choice. Option "seed"
    puts its random signs on every candidate."""
    mode = config.option("rotations")
    if mode == "fixed" or config.option("block") is not None:
        fixed = transform_for(config, d_in, "hadamard")
        return (fixed,) if mode == "fixed" else (None, fixed)
    names = rotate.candidates(finest_group(config), d_in, max_block=config.option("max_block"),
                              seed=config.option("seed"))
    # "rotated": None stays only where no block is legal (e.g. d_in not a multiple of 16)
    return names if mode == "search" or len(names) == 1 else names[1:]


def site_candidates(config: QuantConfig, site: permute.Site) -> tuple[str | None, ...]:
    """`rotation_candidates` of the site, but None alone (the order alone, as PermuQuant) at a
    per-image site (`Site.per_image`) in the "search" mode where option "rotate_per_image"
    says so: "no", or "auto" with NVFP4 activations; "yes" (the default) changes nothing
    (what each does, measured: `pqjax.baselines.hadamard`'s docstring)."""
    candidates = rotation_candidates(config, site.dim)
    mode, afmt = config.option("rotate_per_image"), config.act_format()
    nvfp4 = afmt is not None and afmt.name == "nvfp4"
    if (site.per_image and candidates[0] is None and config.option("rotations") == "search"
            and (mode == "no" or (mode == "auto" and nvfp4))):
        return (None,)
    return candidates
