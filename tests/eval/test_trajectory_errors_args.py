"""benchmarks/trajectory_errors.py: bad arguments are named before any work; the error
measures and the table's rank correlations on made-up rows."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.trajectory_errors import ERRORS, METHODS, parse_args, relative, tables


def test_unknown_method_is_named(capsys):
    """--seeds and --settings go through calib_draws' checks (tests/eval/test_calib_draws_args)."""
    with pytest.raises(SystemExit):
        parse_args(["--methods", "rtn,permuquant_x"])
    assert "--methods: unknown ['permuquant_x']" in capsys.readouterr().err


def test_defaults():
    args = parse_args([])
    assert args.methods == list(METHODS) and args.seeds == [0, 1, 2]
    assert args.name == "trajectory_errors"


def test_relative_is_per_image():
    ref = np.ones((2, 3, 4))
    got = ref.copy()
    got[1] *= 1.5  # image 1 off by half its norm, image 0 exact
    np.testing.assert_allclose(relative(got, ref), [0.0, 0.5])


def test_rank_correlation_follows_the_images():
    """An error that grows as PSNR falls correlates +1 with -PSNR; one that shrinks, -1."""
    rows = [{"setting": "S", "seed": 0, "method": f"m{i}", "psnr": 30.0 - i,
             "layer": 0.1 * i, "one_step": 1.0 - 0.1 * i, "open_loop": 0.2 * i,
             "closed_loop": 0.3 * i} for i in range(4)]
    md = tables(rows)
    assert "layer +1.00, one step -1.00, open loop +1.00, closed loop +1.00" in md
    assert md.count("| 0 | m") == 4 and set(ERRORS) <= set(rows[0])
