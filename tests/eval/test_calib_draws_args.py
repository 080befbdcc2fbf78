"""benchmarks/calib_draws.py refuses bad arguments before loading or calibrating anything, and
names the argument."""

from __future__ import annotations

import pytest

from benchmarks.calib_draws import KEYS, parse_args
from benchmarks.compare_methods import SETTINGS, configs_for


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

    out = configs(SETTINGS[0], "auto")
    assert [c.method for c in out] == ["permuquant", "hadamard", "permuquant_h"]
    for c in out:
        want = "auto" if c.method == "permuquant_h" else None
        assert dict(c.options).get("rotate_per_image") == want, c
    assert out[2].option("rotate_per_image") == "auto"
    assert parse_args([]).rotate_per_image == configs_for(SETTINGS[0], ["permuquant_h"])[
        0].option("rotate_per_image")  # the benchmark's default is the method's
    with pytest.raises(SystemExit):
        parse_args(["--rotate-per-image", "sometimes"])


def test_against_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """--against names the file and what it lacks: absent, no per-image PSNR, other seeds,
    a setting this run has and it has not."""
    import json

    import benchmarks.calib_draws as cd

    monkeypatch.setattr(cd, "RESULTS", tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"seeds": [0, 1, 2], "psnr": {}}))
    (tmp_path / "two.json").write_text(json.dumps({"seeds": [0, 1], "per_image": {}}))
    (tmp_path / "int4.json").write_text(json.dumps(
        {"seeds": [0, 1, 2], "per_image": {KEYS["int4"]: {}}}))
    for name, message in [("gone", "gone.json does not exist"),
                          ("old", "old.json holds no per-image PSNR"),
                          ("two", "two.json has seeds [0, 1], this run [0, 1, 2]"),
                          ("int4", "int4.json has no settings ['nvfp4']")]:
        with pytest.raises(SystemExit):
            parse_args(["--against", name])
        assert f"--against: {tmp_path}/{message}" in capsys.readouterr().err, name
    args = parse_args(["--against", "int4", "--settings", "int4"])
    assert args.against_runs == {KEYS["int4"]: {}}


def test_against_pairs_images_draw_by_draw():
    from benchmarks.calib_draws import against_lines

    title = KEYS["nvfp4"]
    here = {title: {"permuquant_h": [[30.0, 31.0, 32.0], [30.0, 30.0, 30.0]]}}
    there = {title: {"permuquant_h": [[29.0, 30.0, 31.0], [30.5, 29.5, 30.0]]}}
    lines = against_lines("calib_draws", "yes", [0, 1], here, there)
    row = next(line for line in lines if line.startswith(f"| {title} |"))
    # draw 0: +1 on every image (interval 0: better); draw 1: mean 0 (not distinguishable)
    assert "| +1.00 ± 0.00 (better) | +0.00 ±" in row and "(n.s.)" in row, row
