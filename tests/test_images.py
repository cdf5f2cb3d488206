"""images.save_grid: image placement, value mapping, and a missing output folder."""
import os

import numpy as np
from PIL import Image

from unclip_jax.images import save_grid


def test_save_grid_places_images_and_creates_the_folder(tmp_path):
    # Three 2x2 images in [-1, 1], two per row; a report-only run writes into samples/ before
    # anything else has created it, so the folder must not need to exist.
    images = np.stack([np.full((2, 2, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    path = os.path.join(tmp_path, "samples", "grid.png")
    save_grid(images, path, cols=2, labels=["a", "b", "c"])
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 4, 2 * 4, 3)               # 1-pixel white border around each
    np.testing.assert_array_equal(grid[1:3, 1:3], 0)      # -1 -> 0
    np.testing.assert_array_equal(grid[1:3, 5:7], 128)    # 0 -> 127.5, rounded
    np.testing.assert_array_equal(grid[5:7, 1:3], 255)    # 1 -> 255
    np.testing.assert_array_equal(grid[5:7, 5:7], 255)    # the empty slot stays white
    np.testing.assert_array_equal(grid[0], 255)
    with open(os.path.join(tmp_path, "samples", "grid.txt")) as f:
        assert f.read().split() == ["a", "b", "c"]
