"""The strict shape check (shapes_eval.shape_ious / SHAPE_IOU_MIN): every shape the dataset draws
is read right, at the report's size (64) and the decoder's (32); near-shapes are read as none."""
import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from unclip_jax.data import preprocess, shapes, shapes_eval


def _renders(size):
    """One render of every background x colour x shape x size x position, each at a corner of
    the position's jitter square (cycled), as the dataset draws them (64 px, resized like the
    training data for smaller sizes)."""
    corners = itertools.cycle([(-1, -1), (1, 1), (-1, 1), (1, -1)])
    for bg, col, shp, sz, pos in itertools.product(shapes.BACKGROUND_NAMES, shapes.COLOUR_NAMES,
                                                   shapes.SHAPES, shapes.SIZES, shapes.POSITIONS):
        (ax, ay), r, (dx, dy) = shapes.ANCHORS[pos], shapes.HALF_EXTENT[sz], next(corners)
        x = float(np.clip(ax + dx * shapes.JITTER, r + 0.01, 1 - r - 0.01))
        y = float(np.clip(ay + dy * shapes.JITTER, r + 0.01, 1 - r - 0.01))
        image = shapes.render({"background": bg, "objects": [
            {"shape": shp, "colour": col, "size": sz, "position": pos, "x": x, "y": y}]}, 64)
        yield shp, preprocess.resize_center_crop(image, size) if size != 64 else image


@pytest.mark.parametrize("size", [64, 32])
def test_every_rendered_shape_is_read_right(size):
    ious, n = {s: [] for s in shapes.SHAPES}, 0
    for shape, image in _renders(size):
        seen = shapes_eval.classify(image)
        assert seen["shape"] == shape, (shape, seen)
        ious[shape].append(seen["iou"][shape])
        n += 1
    assert n == 540
    # Calibration: the renders stay clear of the threshold (min IoU 0.97 at 32 px, 0.98 at 64).
    assert min(min(v) for v in ious.values()) >= shapes_eval.SHAPE_IOU_MIN + 0.04


def test_slightly_soft_edges_are_tolerated():
    """A sampler's edges are rarely as crisp as a render's: renders blurred by a Gaussian of
    sigma 0.7 px (at 64 px) or put through a 2x nearest-neighbour upsampling from 32 px are
    still read right."""
    from scipy import ndimage
    for k, (shape, image) in enumerate(_renders(32)):
        if k % 9:
            continue        # 60 of the 540
        big = np.repeat(np.repeat(image, 2, 0), 2, 1)
        soft = ndimage.gaussian_filter(big.astype(np.float32), (0.7, 0.7, 0))
        for im in (big, np.clip(soft, 0, 255).astype(np.uint8)):
            assert shapes_eval.classify(im)["shape"] == shape


def _near_shape(kind, size, half):
    """A red near-shape on black, centred, drawn like shapes.render (4x supersampled)."""
    ss = 4
    s, r = size * ss, half * size * ss
    img = Image.new("RGB", (s, s), shapes.BACKGROUNDS["black"])
    d, c, fill = ImageDraw.Draw(img), s / 2, shapes.COLOURS["red"]
    if kind == "blob":          # a lumpy disc: radius varies by +-10% and +-5% around it
        th = np.linspace(0, 2 * np.pi, 200, endpoint=False)
        rr = r * (1 + 0.1 * np.cos(2 * th) + 0.05 * np.sin(3 * th + 1))
        d.polygon(list(zip(c + rr * np.cos(th), c + rr * np.sin(th))), fill=fill)
    elif kind == "rounded square":   # corner radius 0.35 of the side
        d.rounded_rectangle((c - r, c - r, c + r, c + r), radius=0.7 * r, fill=fill)
    elif kind == "pentagon":
        d.regular_polygon((c, c, r), 5, fill=fill)
    elif kind == "ellipse":          # a circle squashed to 85% height
        d.ellipse((c - r, c - 0.85 * r, c + r, c + 0.85 * r), fill=fill)
    return np.asarray(img.reduce(ss))


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("kind", ["blob", "rounded square", "pentagon", "ellipse"])
def test_near_shapes_are_no_shape(kind, size):
    for half in shapes.HALF_EXTENT.values():
        seen = shapes_eval.classify(_near_shape(kind, size, half))
        assert seen["colour"] == "red" and seen["shape"] is None, (kind, half, seen)
        assert seen["shape_fill"] in ("circle", "square")   # what the fill ratio reads them as
        assert max(seen["iou"].values()) < shapes_eval.SHAPE_IOU_MIN - 0.02, seen["iou"]


def test_ideal_shapes_match_themselves_exactly():
    """shape_ious of an ideal drawn by the check itself is 1 for that shape and the analytic
    IoU of two ideals in the same box for another (circle in square: pi / 4)."""
    size, half, cx, cy = 64, 10.0, 30.0, 33.0
    for shape in shapes.SHAPES:
        # The triangle's box centre lies a sixth of the side above its centroid.
        alpha = shapes_eval._ideal(shape, cx, cy, half, 0, 0, size, size)
        ious = shapes_eval.shape_ious(alpha)
        assert ious[shape] == pytest.approx(1.0, abs=0.01), (shape, ious)
        if shape == "square":
            assert ious["circle"] == pytest.approx(np.pi / 4, abs=0.01)
