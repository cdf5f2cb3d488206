"""Small generated datasets in the formats real data comes in, for smoke runs and tests.

    write_webdataset_shards("W/data/train", num_examples=64, shard_size=16, image_size=64)
    # -> W/data/train/00000.tar, ... ; pattern "W/data/train/*.tar"

Examples are `shapes` scenes (rendered shapes with their captions), written as img2dataset
writes web data: per example KEY.jpg, KEY.txt (the caption) and KEY.json ({"key", "caption"}),
so the readers see what a download of LAION or CC3M would give them.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

from PIL import Image

from unclip_jax.data import shapes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_shards(directory: str, *, num_examples: int, shard_size: int,
                            image_size: int = 64, seed: int = 0, split: str = "train",
                            quality: int = 95) -> str:
    """Write `num_examples` shapes scenes as img2dataset tar shards; returns the glob pattern."""
    os.makedirs(directory, exist_ok=True)
    for start in range(0, num_examples, shard_size):
        path = os.path.join(directory, f"{start // shard_size:05d}.tar")
        with tarfile.open(path + ".tmp", "w") as tar:
            for i in range(start, min(start + shard_size, num_examples)):
                _, caption, image = shapes.example(seed, shapes.SPLIT_IDS[split], i, size=image_size)
                key = f"{i:09d}"
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=quality)
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
        os.replace(path + ".tmp", path)  # a killed run leaves no half-written shard
    return os.path.join(directory, "*.tar")
