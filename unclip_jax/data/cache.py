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

Dtypes: each manifest records every field's dtype ("fields": {name: {"shape", "dtype"}}).
token_embeddings are stored in bfloat16 by default (embed.token_dtype; half the disk of float32,
which dominates the cache: 77 x 1024 values per example for ViT-H), as the raw 16-bit patterns in
uint16 .npy files (numpy has no bfloat16 of its own); readers return float32. A field whose
recorded dtype is missing or disagrees with its files is an error naming the manifest.
"""
from __future__ import annotations

import json
import os

import numpy as np

from unclip_jax import paths

EMBED_FIELDS = ("image_embedding", "text_embedding", "tokens", "token_embeddings")
TOKEN_DTYPES = ("bfloat16", "float32")   # what token_embeddings may be stored in
_STORED = {"bfloat16": np.dtype(np.uint16)}  # dtype -> the .npy dtype it is stored as


def encode(arr: np.ndarray, dtype: str) -> np.ndarray:
    """`arr` as stored in a cache file for the recorded `dtype` (bfloat16: rounded to nearest
    even, kept as its uint16 bit patterns)."""
    if dtype == "bfloat16":
        import ml_dtypes
        return np.asarray(arr, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(arr, dtype)


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """What `encode` stored, as float32 for the bfloat16 fields (the stages' input dtype)."""
    if dtype == "bfloat16":
        import ml_dtypes
        return np.asarray(stored).view(ml_dtypes.bfloat16).astype(np.float32)
    return stored


def field_dtype(manifest: dict, field: str, where: str) -> str:
    """The dtype `field` is recorded in (error if the manifest records none)."""
    rec = manifest.get("fields", {}).get(field)
    if not isinstance(rec, dict) or not rec.get("dtype"):
        raise ValueError(f"embedding cache {where!r}: its manifest records no dtype for field "
                         f"{field!r}; re-create the cache with python -m unclip_jax.embed")
    return str(rec["dtype"])


def load_shard(split_dir: str, field: str, shard: str, dtype: str,
               mmap: bool = True) -> np.ndarray:
    """One shard's stored array of `field`, checked against the recorded dtype (not decoded)."""
    path = os.path.join(split_dir, f"{field}.{shard}.npy")
    # Object storage: memory-mapped from a local copy (paths.local_file), downloaded once.
    arr = np.load(paths.local_file(path), mmap_mode="r" if mmap else None)
    want = _STORED.get(dtype, np.dtype(dtype))
    if arr.dtype != want:
        raise ValueError(f"embedding cache file {path!r} holds {arr.dtype}, but its manifest "
                         f"records {field} as {dtype} (stored as {want}): the cache is corrupt "
                         f"or mixes two embed runs")
    return arr


def load_manifests(cache_dir: str, split: str) -> tuple[str, list[dict]]:
    """The split directory and its process manifests (in process order); checks completeness."""
    split_dir = os.path.join(cache_dir, split)
    files = paths.glob(os.path.join(split_dir, "manifest.p*.json"))
    if not files:
        raise FileNotFoundError(f"no embedding cache for split {split!r} in {split_dir!r} "
                                f"(expected manifest.p*.json written by unclip_jax.embed)")
    manifests = []
    for p in files:
        manifests.append(json.loads(paths.path(p).read_text()))
    count = manifests[0]["process_count"]
    if sorted(m["process_index"] for m in manifests) != list(range(count)):
        raise ValueError(f"embedding cache {split_dir!r} is incomplete: written by {count} "
                         f"processes, manifests found for "
                         f"{sorted(m['process_index'] for m in manifests)}")
    return split_dir, manifests


def load_field(cache_dir: str, split: str, field: str, mmap: bool = True) -> np.ndarray:
    """One field of the whole split as a single array (e.g. every image embedding, for PCA)."""
    split_dir, manifests = load_manifests(cache_dir, split)
    dtype = field_dtype(manifests[0], field, split_dir)
    parts = [load_shard(split_dir, field, s["name"], dtype, mmap)
             for m in manifests for s in m["shards"]]
    if not parts:
        raise ValueError(f"embedding cache {split_dir!r} holds no examples")
    return decode(np.concatenate(parts), dtype)


def iter_rows(cache_dir: str, split: str, fields, process_index: int = 0,
              process_count: int = 1, batch: int = 65536):
    """This process's part of a split, streamed: (first global row, {field: decoded [b, ...]})
    per chunk of at most `batch` rows. Shard j (in row order) is read by process
    j % process_count, so the processes together read every row exactly once."""
    split_dir, manifests = load_manifests(cache_dir, split)
    dtypes = {f: field_dtype(manifests[0], f, split_dir) for f in fields}
    start = 0
    for j, s in enumerate(sh for m in manifests for sh in m["shards"]):
        if j % process_count == process_index:
            arrays = {f: load_shard(split_dir, f, s["name"], dtypes[f]) for f in fields}
            for i in range(0, int(s["count"]), batch):
                yield start + i, {f: decode(np.array(a[i:i + batch]), dtypes[f])
                                  for f, a in arrays.items()}
        start += int(s["count"])
