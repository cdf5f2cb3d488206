"""The zero-shot MS-COCO caption draw (GLIDE / DALL-E 2 protocol): `num_samples` validation
images drawn without replacement with a fixed seed, one of each image's captions drawn at random.

Captions per image come from either
  - tfds `coco_captions` records (feature "captions" = {"text": [...], "id": [...]}; the 2014
    validation images are its splits val + test + restval, 40,504 images), or
  - a folder's captions.jsonl (local or gs://), one line per image: {"file": "x.jpg", "captions": [...]}
    (a "caption" string or list is accepted too).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def caption_texts(record: dict, key: str = "captions") -> list[str]:
    """All captions of one tfds record as str (tfds gives bytes, in a dict for Sequence({...}))."""
    value = record.get(key)
    if isinstance(value, dict):
        value = value.get("text")
    if value is None:
        raise KeyError(f"record has no captions under {key!r} (keys {sorted(record)})")
    if isinstance(value, (str, bytes, np.bytes_)):
        value = [value]
    out = [v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in value]
    return [c.strip() for c in out if c and c.strip()]


def read_folder_captions(folder: str) -> list[tuple[str, list[str]]]:
    """(file, captions) per line of <folder>/captions.jsonl (a local folder or a URL)."""
    from unclip_jax import paths
    path = os.path.join(folder, "captions.jsonl")
    paths.refresh(path)
    if not paths.path(path).is_file():
        raise FileNotFoundError(f"no captions.jsonl in {folder!r}: expected one JSON line per "
                                f"image, {{\"file\": ..., \"captions\": [...]}}")
    out = []
    for i, line in enumerate(paths.path(path).read_text().split("\n")):
        if not line.strip():
            continue
        entry = json.loads(line)
        caps = entry.get("captions", entry.get("caption"))
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        if "file" not in entry or not caps:
            raise ValueError(f"{path} line {i + 1}: needs \"file\" and captions")
        out.append((entry["file"], [str(c).strip() for c in caps]))
    return out


def draw_captions(captions_per_image: Sequence[Sequence[str]], num_samples: int = 30_000,
                  seed: int = 0) -> list[tuple[int, str]]:
    """(image index, caption) pairs: `num_samples` distinct images in a seeded random order, and
    one uniformly drawn caption for each. Deterministic in (captions, num_samples, seed)."""
    n = len(captions_per_image)
    if num_samples > n:
        raise ValueError(f"draw_captions: {num_samples} samples asked from {n} images (one "
                         f"caption per image)")
    rng = np.random.default_rng(seed)
    images = rng.choice(n, num_samples, replace=False)
    out = []
    for i in images:
        caps = captions_per_image[int(i)]
        if not caps:
            raise ValueError(f"draw_captions: image {int(i)} has no captions")
        out.append((int(i), caps[int(rng.integers(len(caps)))]))
    return out
