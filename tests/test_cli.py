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


@pytest.fixture(scope="module", autouse=True)
def no_compile_cache():
    """The CLI turns jax's persistent cache on; a test run leaves the user's cache alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PQJAX_COMPILE_CACHE", "0")
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, no_compile_cache):
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


@pytest.fixture(scope="module")
def expected(checkpoint):
    return pqjax.restore(checkpoint).generate(["a handwritten digit 7", "3"], seed=5)


def test_generate_grid_matches_the_restored_pipeline(checkpoint, expected, tmp_path):
    png = tmp_path / "seven.png"
    assert main(["generate", str(checkpoint), "a handwritten digit 7", "3",
                 "--out", str(png), "--seed", "5", "--scale", "2", "--grid"]) == 0
    img = np.asarray(Image.open(png))
    assert img.shape == (32, 64)  # two 16x16 digits side by side, upscaled 2x
    tiles = np.concatenate(list(np.clip(expected, 0, 1)), axis=1)  # (16, 32) grayscale
    want = (tiles * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(img[::2, ::2], want)


def test_generate_writes_one_native_size_image_per_prompt(checkpoint, expected, tmp_path):
    out = tmp_path / "digits"
    assert main(["generate", str(checkpoint), "a handwritten digit 7", "3",
                 "--out", str(out), "--seed", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]  # no temporary files
    for i, image in enumerate(expected):
        want = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i}.png")), want)


def test_generate_seeds_keep_their_high_bits(checkpoint, expected, tmp_path):
    """2**32 + 5 is not seed 5 (jax keys hold 32 bits; pqjax folds the rest in)."""
    out = tmp_path / "img_{i}.png"
    assert main(["generate", str(checkpoint), "a handwritten digit 7", "3",
                 "--out", str(out), "--seed", str(2**32 + 5)]) == 0
    img = np.asarray(Image.open(tmp_path / "img_0.png"))
    want = (np.clip(expected[0], 0, 1) * 255).round().astype(np.uint8)
    assert not np.array_equal(img, want)


def test_report_on_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_unknown_prompt_names_the_prompt(checkpoint, tmp_path, capsys):
    assert main(["generate", str(checkpoint), "a cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "'a cat'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
