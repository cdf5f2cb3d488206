"""Judge shapes images from their pixels alone: background, objects, and whether a caption holds.

Used by the data tests (an independent check of the generator) and by the end-to-end evaluation
of generated samples (64x64 or smaller). Each pixel is explained as a mix of the background and
one palette colour: its coverage `alpha` is its position on the segment background -> colour.
Object size and shape then come from coverage sums, which are robust to antialiasing:
  area = sum(alpha); width = sum over columns of the column's max alpha (height likewise).
Shape (strict): the object's coverage is compared with the ideal circle, square and upright
triangle drawn antialiased in the square box it spans (side max(width, height), placed so that
the ideal's centroid is the object's), both slightly blurred: the soft IoU sum(min) / sum(max)
of the best must reach SHAPE_IOU_MIN, else the object is no shape (None: a blob, a rounded
square, a pentagon...).
The fill ratio area / (width * height) (circle ~0.785, square ~1.0, triangle ~0.5) is kept as
`shape_fill`: it reads any blob of circle-like fill as a circle, so it overstates shape accuracy.
"""
from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from unclip_jax.data import shapes

_BG_NAMES = shapes.BACKGROUND_NAMES
_BG_RGB = np.array([shapes.BACKGROUNDS[n] for n in _BG_NAMES], np.float32)
_COL_NAMES = shapes.COLOUR_NAMES
_COL_RGB = np.array([shapes.COLOURS[n] for n in _COL_NAMES], np.float32)

# Fill-ratio boundaries halfway between triangle (0.5), circle (pi/4) and square (1.0).
_FILL_TRIANGLE_CIRCLE = (0.5 + np.pi / 4) / 2
_FILL_CIRCLE_SQUARE = (np.pi / 4 + 1.0) / 2
# Strict shape check: see the module docstring; calibrated in data/test_shapes_eval.py.
SHAPE_IOU_MIN = 0.92
_SUPERSAMPLE = 8
_BLUR = 1 / 64      # sigma of the blur both sides get, as a fraction of the image side
_SIZE_BOUNDARY = shapes.HALF_EXTENT["small"] + shapes.HALF_EXTENT["large"]  # on the full extent


def to_rgb255(image: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] or float in [-1, 1] -> float32 [H,W,3] in [0, 255]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    return ((np.clip(image.astype(np.float32), -1, 1) + 1) * 127.5)


def background(image: np.ndarray) -> str:
    """The palette background nearest to most border pixels (objects never cover the border)."""
    rgb = to_rgb255(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    nearest = np.argmin(((border[:, None] - _BG_RGB[None]) ** 2).sum(-1), axis=1)
    return _BG_NAMES[np.bincount(nearest, minlength=len(_BG_NAMES)).argmax()]


def coverage(image: np.ndarray, bg: str) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index of the palette colour explaining it, and its coverage in [0, 1].

    Pixels closest to pure background get coverage 0 (colour index is then meaningless).
    """
    rgb = to_rgb255(image)
    b = np.asarray(shapes.BACKGROUNDS[bg], np.float32)
    d = _COL_RGB - b                                             # [C, 3]
    t = np.einsum("hwk,ck->hwc", rgb - b, d) / (d * d).sum(-1)   # position on bg->colour
    t = np.clip(t, 0.0, 1.0)
    resid = ((rgb[:, :, None, :] - (b + t[..., None] * d)) ** 2).sum(-1)
    idx = resid.argmin(-1)
    alpha = np.take_along_axis(t, idx[..., None], -1)[..., 0]
    return idx, alpha


def _ideal(shape: str, cx: float, cy: float, half: float, x0: int, y0: int, h: int,
           w: int) -> np.ndarray:
    """Coverage [h, w] of pixels [y0, y0+h) x [x0, x0+w) by the ideal `shape` of half side `half`
    centred (box centre) at (cx, cy), in pixel units (pixel j covers [j, j+1)), supersampled."""
    offs = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    u = (x0 + np.arange(w)[:, None] + offs).reshape(-1) - cx      # [w * S]
    v = (y0 + np.arange(h)[:, None] + offs).reshape(-1) - cy      # [h * S]
    u, v = u[None, :], v[:, None]
    if shape == "circle":
        inside = u * u + v * v <= half * half
    elif shape == "square":
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    else:   # upright triangle: apex (0, -half), base corners (+-half, half)
        inside = (v <= half) & (2 * np.abs(u) <= v + half)
    return inside.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean((1, 3))


def shape_ious(alpha: np.ndarray) -> dict[str, float]:
    """Soft IoU of one object's coverage map (zeros elsewhere) with each ideal shape fitted to
    it: the square box of side max(width, height) (coverage extents; for the triangle, the side
    a triangle of the object's area has where that is longer), placed so that the ideal's
    centroid is the coverage centroid (the triangle's lies a sixth of the side below its box
    centre). Both are blurred alike first (Gaussian, sigma 1/64 of the image side): a sampler's
    slightly soft edges then cost little, a wrong outline (corners, lumps) still does."""
    alpha = np.asarray(alpha, np.float64)
    area = alpha.sum()
    if area <= 0:
        return {s: 0.0 for s in shapes.SHAPES}
    n_rows, n_cols = alpha.shape
    extent = max(alpha.max(0).sum(), alpha.max(1).sum())
    gx = ((alpha.sum(0) * (np.arange(n_cols) + 0.5)).sum() / area)
    gy = ((alpha.sum(1) * (np.arange(n_rows) + 0.5)).sum() / area)
    sigma = _BLUR * max(n_rows, n_cols)
    blurred = ndimage.gaussian_filter(alpha, sigma, mode="constant")
    out = {}
    for shape in shapes.SHAPES:
        # Coverage extents miss a triangle's thin tips (apex rows, base corners): its side is
        # the one its area implies where that is longer.
        half = (max(extent, np.sqrt(2 * area)) if shape == "triangle" else extent) / 2
        cy = gy - (half / 3 if shape == "triangle" else 0.0)
        x0, y0 = max(int(np.floor(gx - half)) - 1, 0), max(int(np.floor(cy - half)) - 1, 0)
        x1 = min(int(np.ceil(gx + half)) + 1, n_cols)
        y1 = min(int(np.ceil(cy + half)) + 1, n_rows)
        ideal = np.zeros_like(alpha)
        ideal[y0:y1, x0:x1] = _ideal(shape, gx, cy, half, x0, y0, y1 - y0, x1 - x0)
        ideal = ndimage.gaussian_filter(ideal, sigma, mode="constant")
        inter = np.minimum(blurred, ideal).sum()
        out[shape] = float(inter / (blurred.sum() + ideal.sum() - inter))
    return out


def _describe(alpha: np.ndarray, colour_idx: int) -> dict:
    """Shape, size and position of one object from its coverage map (zeros elsewhere)."""
    size = alpha.shape[0]
    cols, rows = alpha.max(0), alpha.max(1)
    width, height, area = cols.sum(), rows.sum(), alpha.sum()
    fill = float(area / max(width * height, 1e-6))
    if fill >= _FILL_CIRCLE_SQUARE:
        shape_fill = "square"
    elif fill >= _FILL_TRIANGLE_CIRCLE:
        shape_fill = "circle"
    else:
        shape_fill = "triangle"
    ious = shape_ious(alpha)
    best = max(ious, key=ious.get)
    shape = best if ious[best] >= SHAPE_IOU_MIN else None
    # Bounding-box centre as a fraction of the side (pixel j covers [j, j+1)).
    x = float((cols * (np.arange(size) + 0.5)).sum() / max(width, 1e-6) / size)
    y = float((rows * (np.arange(size) + 0.5)).sum() / max(height, 1e-6) / size)
    extent = float(max(width, height) / size)
    position = min(shapes.ANCHORS, key=lambda p: (shapes.ANCHORS[p][0] - x) ** 2
                   + (shapes.ANCHORS[p][1] - y) ** 2)
    return {"colour": _COL_NAMES[colour_idx], "shape": shape, "shape_fill": shape_fill,
            "fill": fill, "iou": ious,
            "size": "large" if extent >= _SIZE_BOUNDARY else "small", "extent": extent,
            "position": position, "x": x, "y": y}


def analyse(image: np.ndarray, min_area: float = 4.0) -> dict:
    """Background and every object (connected regions of one palette colour) of a clean image."""
    bg = background(image)
    idx, alpha = coverage(image, bg)
    objects = []
    for c in range(len(_COL_NAMES)):
        a = np.where(idx == c, alpha, 0.0)
        labels, n = ndimage.label(a > 0.02, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            comp = np.where(labels == k, a, 0.0)
            if comp.sum() >= min_area:
                objects.append(_describe(comp, c))
    objects.sort(key=lambda o: (o["y"], o["x"]))
    return {"background": bg, "objects": objects}


def classify(image: np.ndarray) -> dict:
    """Background, and colour / shape / size / position of the dominant object.

    For generated samples (possibly noisy, 64x64 or smaller): the dominant colour is the palette
    colour with the most coverage; the object is its largest connected region.
    """
    bg = background(image)
    idx, alpha = coverage(image, bg)
    mass = np.array([alpha[idx == c].sum() for c in range(len(_COL_NAMES))])
    c = int(mass.argmax())
    a = np.where(idx == c, alpha, 0.0)
    labels, n = ndimage.label(a > 0.5, structure=np.ones((3, 3)))
    if n == 0:
        return {"background": bg, "colour": None, "shape": None, "shape_fill": None, "size": None,
                "position": None}
    # Keep the largest solid region plus its soft (antialiased) rim.
    sizes = ndimage.sum(np.ones_like(a), labels, range(1, n + 1))
    core = labels == (int(np.argmax(sizes)) + 1)
    a = np.where(ndimage.binary_dilation(core, np.ones((3, 3))), a, 0.0)
    out = _describe(a, c)
    out["background"] = bg
    return out


# ---------------------------------------------------------------- captions
_OBJ = (r"an? (?:(?P<size{i}>small|large) )?(?P<colour{i}>{colours}) (?P<shape{i}>{shapes})"
        r"(?: (?P<pos{i}>{positions}))?")
_POS_PHRASES = {p: pos for pos, ps in shapes.POSITION_PHRASES.items() for p in ps}


def _obj_re(i: int) -> str:
    alt = lambda xs: "|".join(sorted(map(re.escape, xs), key=len, reverse=True))
    return _OBJ.format(i=i, colours=alt(_COL_NAMES), shapes=alt(shapes.SHAPES),
                       positions=alt(_POS_PHRASES))


_CAPTION_RE = re.compile(
    rf"^{_obj_re(0)}(?: (?P<link>and|{'|'.join(shapes.RELATIONS)}) {_obj_re(1)})?"
    rf"(?: on an? (?P<bg>{'|'.join(_BG_NAMES)}) background)?$")


def parse_caption(text: str) -> dict:
    """Parse a shapes caption into {"objects": [...], "relation": str|None, "background": ...}.

    Each object is {"colour", "shape", "size" (or None), "position" (or None)}.
    Raises ValueError for text outside the caption grammar.
    """
    m = _CAPTION_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    g = m.groupdict()
    objects = []
    for i in (0, 1):
        if g.get(f"colour{i}"):
            pos = g[f"pos{i}"]
            objects.append({"colour": g[f"colour{i}"], "shape": g[f"shape{i}"],
                            "size": g[f"size{i}"], "position": _POS_PHRASES.get(pos)})
    link = g["link"]
    return {"objects": objects, "relation": None if link in (None, "and") else link,
            "background": g["bg"]}


def parse_single(text: str) -> tuple[str, str]:
    """(colour, shape) of a one-object caption such as "a small red circle on the left"."""
    parsed = parse_caption(text)
    if len(parsed["objects"]) != 1:
        raise ValueError(f"expected a one-object caption, got {text!r}")
    obj = parsed["objects"][0]
    return obj["colour"], obj["shape"]


def caption_errors(image: np.ndarray, text: str) -> list[str]:
    """Claims of the caption that the pixels contradict (empty list: the caption is true)."""
    parsed = parse_caption(text)
    seen = analyse(image)
    errors = []
    if parsed["background"] and parsed["background"] != seen["background"]:
        errors.append(f"background {parsed['background']} but pixels say {seen['background']}")
    if len(seen["objects"]) != len(parsed["objects"]):
        errors.append(f"{len(parsed['objects'])} objects named, {len(seen['objects'])} seen")
    matched = []
    for claim in parsed["objects"]:
        hits = [o for o in seen["objects"]
                if (o["colour"], o["shape"]) == (claim["colour"], claim["shape"])]
        if not hits:
            errors.append(f"no {claim['colour']} {claim['shape']} in "
                          f"{[(o['colour'], o['shape'], round(o['fill'], 2)) for o in seen['objects']]}")
            continue
        obj = hits[0]
        matched.append(obj)
        for key in ("size", "position"):
            if claim[key] and claim[key] != obj[key]:
                errors.append(f"{claim['colour']} {claim['shape']}: {key} {claim[key]} "
                              f"but pixels say {obj[key]}")
    if parsed["relation"] and len(matched) == 2:
        if parsed["relation"] not in shapes.relations(*matched):
            errors.append(f"relation {parsed['relation']!r} does not hold")
    return errors
