"""Image files and pictures: float images in [-1, 1] to and from uint8 and PNG files, sample
grids, and the small line plot of an evaluation sweep (PIL only, no plotting library)."""
from __future__ import annotations

import io
import math
import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (clipped) to uint8 [0, 255]."""
    return ((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).round().astype(np.uint8)


def from_uint8(images) -> np.ndarray:
    """uint8 images to float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def read_image(path: str) -> np.ndarray:
    """An image file as [H, W, 3] float32 in [-1, 1]; a clear error if it can't be read."""
    from PIL import Image, UnidentifiedImageError

    from unclip_jax import paths
    if not paths.path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(io.BytesIO(paths.path(path).read_bytes())) as im:
            arr = np.asarray(im.convert("RGB"), np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path} cannot be read ({e})") from e
    return arr / 127.5 - 1.0


def write_image(image: np.ndarray, path: str):
    """Save one image [H, W, 3] in [-1, 1] as a PNG (or any format PIL infers from the name)."""
    from PIL import Image
    _save(Image.fromarray(to_uint8(image)), path)


def _save(img, path: str):
    """A PIL image to a local path or URL, whole (paths.atomic_write), in the format the
    name's extension says."""
    from PIL import Image

    from unclip_jax import paths
    ext = os.path.splitext(str(path))[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"{path}: no image format for the extension {ext!r} (use .png)")
    with paths.atomic_write(path) as f:
        img.save(f, format=fmt)


def save_grid(images: np.ndarray, path: str, cols: int, labels=None):
    """Save images [N, H, W, 3] in [-1, 1] as one PNG grid, `cols` per row."""
    from PIL import Image
    imgs = to_uint8(images)
    n, h, w, _ = imgs.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = im
    _save(Image.fromarray(grid), path)
    if labels is not None:
        from unclip_jax import paths
        paths.write_text(os.path.splitext(path)[0] + ".txt", "\n".join(labels) + "\n")


def plot_sweep(points: list[tuple[float, float]], path: str, ylabel: str, title: str,
               note: str = ""):
    """A small line plot (PIL only): axes with ticks, points joined by lines, labels."""
    from PIL import Image, ImageDraw, ImageFont
    w, h, left, right, top, bottom = 640, 440, 80, 30, 50, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for p in points]
    ys = [p[1] for p in points if math.isfinite(p[1])]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    xpad = (x1 - x0) * 0.06  # keep the first / last point off the axes
    x0, x1 = x0 - xpad, x1 + xpad
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y1 - y0) * 0.1 or max(abs(y0) * 0.1, 1e-3)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black", width=2)
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yy = px(x0, yv)
        d.line([(left - 5, yy), (left, yy)], fill="black")
        d.text((5, yy - 6), f"{yv:.4g}", fill="black", font=font)
    for xv in xs:
        xx, _ = px(xv, y0)
        d.line([(xx, h - bottom), (xx, h - bottom + 5)], fill="black")
        d.text((xx - 10, h - bottom + 8), f"{xv:g}", fill="black", font=font)
    finite = [px(x, y) for x, y in points if math.isfinite(y)]
    if len(finite) > 1:
        d.line(finite, fill=(31, 119, 180), width=2)
    for (xx, yy), (_, yv) in zip(finite, [p for p in points if math.isfinite(p[1])]):
        d.ellipse([xx - 4, yy - 4, xx + 4, yy + 4], fill=(214, 39, 40), outline="black")
        d.text((xx + 6, yy - 16), f"{yv:.4g}", fill="black", font=font)
    d.text((left + (w - left - right) // 2 - 80, h - 30), "decoder guidance scale", fill="black",
           font=font)
    d.text((5, top - 20), ylabel, fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    if note:
        d.text((left, 24), note, fill=(160, 0, 0), font=font)
    _save(img, path)
