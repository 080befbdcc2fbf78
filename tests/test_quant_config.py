"""QuantConfig: every field checked when it is built; activations follow the weights unless
given; the label names the formats actually used."""

from __future__ import annotations

import pytest

import pqjax
from pqjax import formats
from pqjax.permute import criteria
from pqjax.quantize import QuantConfig


def test_acts_follow_weights_unless_given():
    cfg = QuantConfig(weights="int4", group=64)  # the package docstring's example
    assert cfg.acts == "int4"
    assert cfg.act_format() == formats.get("int4", group=64) == cfg.weight_format()
    assert cfg.label == "W4A4 int4 g64"
    assert QuantConfig().acts == "nvfp4"
    assert QuantConfig(weights="int3", acts=None, group=128).act_format() is None


@pytest.mark.parametrize(
    "kwargs,label",
    [
        (dict(), "W4A4 nvfp4"),
        (dict(weights="int3", group=64), "W3A3 int3 g64"),
        (dict(weights="int4", acts=None, group=128), "W4A16 int4 g128"),
        (dict(weights="int4", acts="nvfp4", group=64), "W4A4 int4 g64 + nvfp4 acts"),
        (dict(weights="mxfp4", acts="fp8"), "W4A8 mxfp4 + fp8 acts"),
        (dict(weights="nvfp4", acts="int8"), "W4A8 nvfp4 + int8 g64 acts"),
    ],
)
def test_label_names_what_is_used(kwargs, label):
    cfg = QuantConfig(**kwargs)
    assert cfg.label == label
    # the label's formats are the ones quantize uses
    for fmt in (cfg.weight_format(), cfg.act_format()):
        if fmt is not None:
            assert fmt.name in cfg.label


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(group=64), r"group=64.*nvfp4 has a fixed group of 16"),
        (dict(weights="mxfp4", group=16), r"mxfp4 has a fixed group of 32"),
        (dict(weights="fp8", group=64), r"fp8 has no group"),
        (dict(weights="int4", group=7), r"int4.*7"),
        (dict(method="bogus"), r"unknown method 'bogus'.*permuquant"),
        (dict(criterion="bad"), r"unknown criterion 'bad'.*joint_second_moment"),
        (dict(criterion=("activation", "bad")), r"unknown criterion 'bad'"),
        (dict(criterion=()), r"criterion must be"),
        (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]"),
        (dict(alpha="abc"), r"alpha"),
        (dict(alpha=float("nan")), r"alpha"),
        (dict(tau=float("nan")), r"tau must be a finite number"),
        (dict(seed=1.5), r"seed must be an int"),
        (dict(skip="proj_out"), r"skip must be a tuple"),
        (dict(method="svdquant", options=(("rnak", 32),)),
         r"unknown option 'rnak' for method 'svdquant'.*rank"),
        (dict(method="svdquant", options=(("rank", 3.5),)), r"rank=3.5 is not a valid int"),
        (dict(method="svdquant", options=(("rank", 0),)), r"rank=0 must be > 0"),
        (dict(method="omniquant_lwc", options=(("steps", True),)), r"steps=True"),
        (dict(method="omniquant_lwc", options=(("lr", float("inf")),)), r"lr=inf must be fin"),
        (dict(method="smoothquant", options=(("alphas", (0.3, 2.0)),)), r"alphas.*\[0, 1\]"),
        (dict(method="svdquant", options=(("rank", 8), ("rank", 16))),
         r"'rank' is given twice"),
        (dict(options=("rank",)), r"not a \(name, value\) pair"),
        # typed per method: an option of another method is refused, not ignored
        (dict(method="permuquant", options=(("rank", 32),)),
         r"unknown option 'rank' for method 'permuquant'; it takes no options"),
        (dict(method="hadamard", options=(("refine", 2),)),
         r"unknown option 'refine' for method 'hadamard'.*\['block', 'seed'\]"),
        (dict(method="permuquant_h", options=(("rotations", "all"),)),
         r"rotations='all' must be one of \['search', 'rotated', 'fixed'\]"),
        (dict(method="permuquant_hr", options=(("refine", -1),)), r"refine=-1 must be >= 0"),
        # and the formats a method can use
        (dict(method="quartz"), r"method 'quartz' quantizes with the quartz format"),
        (dict(method="gptq", weights=None, acts="nvfp4"), r"'gptq' rounds weights"),
    ],
)
def test_bad_fields_are_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_good_fields_pass():
    QuantConfig(weights="int4", acts="nvfp4", group=64)  # the group serves the int side
    QuantConfig(criterion=("activation", "zigzag"), alpha=(0.25, 0.75), tau=-0.1)
    QuantConfig(method="svdquant", options=(("rank", 16), ("alphas", [0.3, 0.5])))
    QuantConfig(method="hadamard", options=(("block", None), ("seed", 3)))
    QuantConfig(method="permuquant_hr", options=(("refine", 0), ("max_block", 64)))
    # every registered method (with formats it can use) and criterion is accepted
    for name in pqjax.method_names():
        QuantConfig(method=name, **({"weights": "quartz"} if name == "quartz" else {}))
    for name in pqjax.permute.criterion_names():
        QuantConfig(criterion=name)


def test_a_new_criterion_is_accepted_once_registered():
    name = "test_quant_config_score"
    with pytest.raises(ValueError, match=name):
        QuantConfig(criterion=name)

    @pqjax.permute.register_criterion(name)
    def score(stats, alpha):
        return stats.act_mean_sq

    try:
        assert QuantConfig(criterion=name).criterion == name
    finally:  # the registry is process-wide: other tests list every criterion
        criteria._CRITERIA.pop(name)


def test_an_option_takes_the_methods_declared_default():
    assert QuantConfig(method="svdquant").option("rank") == 32
    assert QuantConfig(method="svdquant", options=(("rank", 8),)).option("rank") == 8
    assert QuantConfig(method="permuquant_hr").option("refine") == 8
    assert QuantConfig(method="permuquant_h").option("refine") == 0
    assert QuantConfig().option("rank", "none") == "none"  # not declared by permuquant


def test_from_dict_reads_configs_of_older_checkpoints():
    """Checkpoints written before the runtime switches left the config still restore."""
    import dataclasses

    raw = {**dataclasses.asdict(QuantConfig(method="svdquant", options=(("rank", 8),))),
           "backend": "xla", "progress": True}
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}
    raw["options"] = [list(p) for p in raw["options"]]
    assert QuantConfig.from_dict(raw) == QuantConfig(method="svdquant", options=(("rank", 8),))
