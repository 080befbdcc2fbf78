"""benchmarks/calib_draws.py refuses bad arguments before loading or calibrating anything, and
names the argument."""

from __future__ import annotations

import pytest

from benchmarks.calib_draws import KEYS, parse_args
from benchmarks.compare_methods import SETTINGS


def test_every_setting_key_names_a_compare_methods_setting():
    assert set(KEYS.values()) <= {s[0] for s in SETTINGS}


@pytest.mark.parametrize("argv, message", [
    (["--settings", "nvfp4,fp8"], "--settings: unknown ['fp8']"),
    (["--seeds", "0,one"], "--seeds: integers separated by commas"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults():
    args = parse_args([])
    assert args.seeds == [0, 1, 2] and args.settings == ["nvfp4", "int4"]


def test_the_option_reaches_permuquant_h_only():
    from benchmarks.calib_draws import configs

    out = configs(SETTINGS[0], "yes")
    assert [c.method for c in out] == ["permuquant", "hadamard", "permuquant_h"]
    for c in out:
        want = "yes" if c.method == "permuquant_h" else None
        assert dict(c.options).get("rotate_per_image") == want, c
    assert out[2].option("rotate_per_image") == "yes"
    with pytest.raises(SystemExit):
        parse_args(["--rotate-per-image", "sometimes"])
