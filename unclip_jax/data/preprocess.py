"""Image decoding and preprocessing shared by every reader (numpy / PIL, no TensorFlow)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


class CorruptImage(Exception):
    """The bytes are not a decodable image (counted and skipped by the readers)."""


def decode(data: bytes | np.ndarray) -> np.ndarray:
    """Image bytes (PNG / JPEG / WebP / ...) or an array -> uint8 [H, W, 3] RGB."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # force the full decode, so truncated files fail here
                arr = np.asarray(img.convert("RGB"))
        except Exception as e:  # PIL raises many types for bad data
            raise CorruptImage(f"{type(e).__name__}: {e}") from e
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CorruptImage(f"unexpected image shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8, copy=False)


def resize_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize so the shorter side is `resolution` (antialiased), then crop the centre square."""
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        # BICUBIC with reducing_gap: PIL box-reduces first when shrinking a lot (antialiasing).
        image = np.asarray(Image.fromarray(image).resize(
            (nw, nh), Image.BICUBIC, reducing_gap=3.0 if scale < 1 else None))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return image[top:top + resolution, left:left + resolution]


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def denormalize(image: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def random_crop(rng: np.random.Generator, images: np.ndarray, size: int) -> np.ndarray:
    """An independent random size x size crop of each image in a batch [B, H, W, C]."""
    b, h, w = images.shape[:3]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the images ({h}x{w})")
    ys = rng.integers(0, h - size + 1, b)
    xs = rng.integers(0, w - size + 1, b)
    return np.stack([img[y:y + size, x:x + size] for img, y, x in zip(images, ys, xs)])
