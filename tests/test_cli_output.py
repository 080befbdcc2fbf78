"""Where `pqjax generate` writes: one file per prompt (folder or {i} pattern) or one joined
file (--grid), each written atomically. Synthetic images: no model needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqjax.cli_images import UsageError, image_paths, save_images

IMAGES = np.random.default_rng(0).uniform(-0.1, 1.1, (3, 4, 6))  # (b, H, W), clipped on save


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def test_folder_gets_one_native_size_png_per_image(tmp_path):
    paths = image_paths(str(tmp_path / "imgs"), 3, grid=False)
    assert paths == [tmp_path / "imgs" / f"{i}.png" for i in range(3)]
    save_images(IMAGES, paths, scale=1, grid=False)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["0.png", "1.png", "2.png"]
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), _u8(IMAGES[i]))


def test_folder_names_sort_in_order(tmp_path):
    paths = image_paths(str(tmp_path) + "/", 12, grid=False)
    assert [p.name for p in paths][:2] == ["00.png", "01.png"] and paths[-1].name == "11.png"


def test_pattern_and_scale(tmp_path):
    paths = image_paths(str(tmp_path / "d_{i}.jpg"), 2, grid=False)
    assert paths == [tmp_path / "d_0.jpg", tmp_path / "d_1.jpg"]
    rgb = np.stack([IMAGES[:2]] * 3, axis=-1)  # (2, 4, 6, 3)
    save_images(rgb, paths, scale=3, grid=False)
    assert Image.open(paths[1]).size == (18, 12) and Image.open(paths[1]).format == "JPEG"


def test_grid_joins_side_by_side(tmp_path):
    paths = image_paths(str(tmp_path / "grid.png"), 3, grid=True)
    save_images(IMAGES, paths, scale=2, grid=True)
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (8, 36)
    np.testing.assert_array_equal(img[::2, ::2], np.concatenate(list(_u8(IMAGES)), axis=1))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left


def test_a_single_file_for_a_single_prompt(tmp_path):
    assert image_paths(str(tmp_path / "seven.png"), 1, grid=False) == [tmp_path / "seven.png"]


@pytest.mark.parametrize(
    "out,n,grid,match",
    [
        ("x.png", 2, False, r"one file for 2 prompts.*x_\{i\}\.png.*--grid"),
        ("missing/x.png", 1, False, "does not exist"),
        ("missing/{i}.png", 2, False, "does not exist"),
        ("missing/deeper/", 2, False, "does not exist"),
        ("grid", 2, True, "with --grid"),
        ("g_{i}.png", 2, True, "with --grid"),
        ("x.txt", 1, False, r"\.txt is not an image format"),
        ("x_{i}", 2, False, "no extension"),
        ("x_{i}_{j}.png", 2, False, r"only hold \{i\}"),
    ],
)
def test_bad_out_is_refused(tmp_path, monkeypatch, out, n, grid, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=match):
        image_paths(out, n, grid)
    assert list(Path(tmp_path).iterdir()) == []
