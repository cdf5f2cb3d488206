"""The CLIP embedding cache format: written once per split by `unclip_jax.embed`
(`embed.write_cache`), read as data "embed_cache" (`sources.CacheSource`).

Layout of `<out>/<split>/` (each process writes only its own files, no coordination):
  manifest.p0000.json          process 0's shards, the source data config, field shapes / dtypes
  image_embedding.p0000.s00000.npy, text_embedding..., tokens..., [token_embeddings...],
  index.p0000.s00000.npy       source example index of every row (rows follow the source order)
  caption.p0000.s00000.json    the captions, as a JSON list
The reader concatenates processes in order, then shards in order; all processes' manifests must
be present (each records process_count), so a partly written cache is an error, not a silent
subset.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

EMBED_FIELDS = ("image_embedding", "text_embedding", "tokens", "token_embeddings")


def load_manifests(cache_dir: str, split: str) -> tuple[str, list[dict]]:
    """The split directory and its process manifests (in process order); checks completeness."""
    split_dir = os.path.join(cache_dir, split)
    paths = sorted(glob.glob(os.path.join(split_dir, "manifest.p*.json")))
    if not paths:
        raise FileNotFoundError(f"no embedding cache for split {split!r} in {split_dir!r} "
                                f"(expected manifest.p*.json written by unclip_jax.embed)")
    manifests = []
    for p in paths:
        with open(p) as f:
            manifests.append(json.load(f))
    count = manifests[0]["process_count"]
    if sorted(m["process_index"] for m in manifests) != list(range(count)):
        raise ValueError(f"embedding cache {split_dir!r} is incomplete: written by {count} "
                         f"processes, manifests found for "
                         f"{sorted(m['process_index'] for m in manifests)}")
    return split_dir, manifests


def load_field(cache_dir: str, split: str, field: str, mmap: bool = True) -> np.ndarray:
    """One field of the whole split as a single array (e.g. every image embedding, for PCA)."""
    split_dir, manifests = load_manifests(cache_dir, split)
    parts = [np.load(os.path.join(split_dir, f"{field}.{s['name']}.npy"),
                     mmap_mode="r" if mmap else None)
             for m in manifests for s in m["shards"]]
    if not parts:
        raise ValueError(f"embedding cache {split_dir!r} holds no examples")
    return np.concatenate(parts)
