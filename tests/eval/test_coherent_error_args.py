"""benchmarks/coherent_error.py: bad arguments are named before any work; the DC share, the
joint methods run without their correction, and the table's paired columns on made-up rows."""

from __future__ import annotations

import numpy as np
import pytest

import pqjax
from benchmarks.coherent_error import METHODS, dc_share, parse_args, tables, uncorrected


def test_bad_methods_are_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--methods", "rtn,permuquant_x"])
    assert "--methods: unknown ['permuquant_x']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--methods", "rtn,hadamard"])
    assert "--methods: needs permuquant" in capsys.readouterr().err


def test_defaults():
    args = parse_args([])
    assert args.methods == list(METHODS) and args.seeds == [0, 1, 2]
    assert args.settings == ["nvfp4", "int4"] and args.name == "coherent_error"


def test_dc_share_splits_an_image_wide_offset_from_the_rest():
    z = np.zeros((3, 1, 4, 4))
    offset = z + 0.5                                       # one offset: all of the error
    pattern = z + np.where(np.arange(16).reshape(1, 1, 4, 4) % 2, 1.0, -1.0)  # mean zero
    np.testing.assert_allclose(dc_share(offset, z), [1.0] * 3)
    np.testing.assert_allclose(dc_share(pattern, z), [0.0] * 3, atol=1e-12)
    # offset 1 and a +-1 pattern: equal energies, half the error is the offset
    np.testing.assert_allclose(dc_share(pattern + 1.0, z), [0.5] * 3)


def test_joint_methods_run_without_their_correction():
    cfg = pqjax.QuantConfig(method="permuquant_h", weights="nvfp4", acts="nvfp4")
    assert dict(uncorrected(cfg).options)["bias_correction"] is False
    plain = pqjax.QuantConfig(method="permuquant", weights="nvfp4", acts="nvfp4")
    assert uncorrected(plain) is plain  # no such option: unchanged


def test_paired_columns_are_against_permuquant_of_the_same_draw():
    base = np.full(50, 30.0)
    rows = [
        {"setting": "S", "seed": 0, "method": "permuquant", "closed_loop": 0.1,
         "dc_share": 0.02, "psnr": base.tolist(), "psnr_bc": (base + 0.5).tolist()},
        {"setting": "S", "seed": 0, "method": "permuquant_h", "closed_loop": 0.1,
         "dc_share": 0.2, "psnr": (base - 1).tolist(), "psnr_bc": (base + 1.5).tolist()},
    ]
    md = tables(rows)
    assert "| 0 | permuquant | 0.1000 | 0.020 | 30.00 | 30.50 | +0.50 ± 0.00 | – | – |" in md
    assert ("| 0 | permuquant_h | 0.1000 | 0.200 | 29.00 | 31.50 | +2.50 ± 0.00 | "
            "-1.00 ± 0.00 | +1.00 ± 0.00 |") in md
