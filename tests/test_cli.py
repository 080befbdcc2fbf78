"""The `pqjax` command on the embedded model: quantize -> report -> generate, and bad input.

Small settings (few calibration rows, no image comparison) keep this to about a minute; `pqjax
demo` itself is the README's first command and runs the full comparison.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import pqjax
from pqjax.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "int4"
    rc = main(["quantize", "--out", str(out), "--weights", "int4", "--acts", "int4",
               "--group", "64", "--rows", "32", "--no-compare"])
    assert rc == 0
    return out


def test_quantize_writes_a_checkpoint_with_its_report(checkpoint, capsys):
    report = json.loads((checkpoint / "report" / "report.json").read_text())
    assert report["method"] == "permuquant"
    assert report["summary"]["mean_err"] <= report["summary"]["mean_err_rtn"]
    assert report["sizes"]["compression_vs_bf16"] > 2.0
    assert main(["report", str(checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "permuquant" in printed and "layer_errors.png" in printed


def test_generate_matches_the_restored_pipeline(checkpoint, tmp_path):
    png = tmp_path / "seven.png"
    assert main(["generate", str(checkpoint), "a handwritten digit 7", "3",
                 "--out", str(png), "--seed", "5", "--scale", "2"]) == 0
    img = np.asarray(Image.open(png))
    assert img.shape == (32, 64)  # two 16x16 digits side by side, upscaled 2x
    expected = pqjax.restore(checkpoint).generate(["a handwritten digit 7", "3"], seed=5)
    tiles = np.concatenate(list(np.clip(expected, 0, 1)), axis=1)  # (16, 32) grayscale
    want = (tiles * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(img[::2, ::2], want)


def test_report_on_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_unknown_prompt_names_the_prompt(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="'a cat'"):
        main(["generate", str(checkpoint), "a cat", "--out", str(tmp_path / "x.png")])


def test_unknown_format_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--out", "x", "--weights", "int17"])
    assert "int17" in capsys.readouterr().err
