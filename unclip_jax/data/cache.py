"""CLIP embedding caches: written once per split by `unclip_jax.embed`, read as data "embed_cache".

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
from typing import Any, Callable, Protocol

import ml_collections
import numpy as np

from unclip_jax.data import sources as sources_lib

EMBED_FIELDS = ("image_embedding", "text_embedding", "tokens", "token_embeddings")


class Encoder(Protocol):
    def encode_images(self, images: np.ndarray) -> np.ndarray: ...
    def encode_texts(self, captions: list[str]) -> dict[str, np.ndarray]: ...


def _shard_name(process_index: int, shard: int) -> str:
    return f"p{process_index:04d}.s{shard:05d}"


def write_cache(encoder: Encoder, data_config, *, split: str, out_dir: str, process_index: int = 0,
                process_count: int = 1, batch_size: int = 64, shard_size: int = 8192,
                log: Callable[[str], None] | None = None) -> dict:
    """Encode this process's examples of `split` and write them as shards; returns the manifest.

    Rows keep the source order (no shuffling, one pass); skipped source examples (corrupt,
    no caption) are absent and counted in the manifest's "source_stats".
    """
    from unclip_jax.data import make_iterator

    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    it = make_iterator(data_config, split=split, process_index=process_index,
                       process_count=process_count, local_batch_size=batch_size, seed=0,
                       fields=("image", "caption", "index"), shuffle=False, num_epochs=1,
                       drop_remainder=False)
    buffers: dict[str, list] = {}
    shards, fields = [], {}

    def flush():
        if not buffers.get("index"):
            return
        name = _shard_name(process_index, len(shards))
        count = 0
        for key, chunks in buffers.items():
            if key == "caption":
                with open(os.path.join(split_dir, f"caption.{name}.json"), "w") as f:
                    json.dump([c for chunk in chunks for c in chunk], f)
                continue
            arr = np.concatenate(chunks)
            fields[key] = {"shape": list(arr.shape[1:]), "dtype": str(arr.dtype)}
            np.save(os.path.join(split_dir, f"{key}.{name}.npy"), arr)
            count = len(arr)
        shards.append({"name": name, "count": count})
        buffers.clear()

    rows = 0
    for batch in it:
        out = {"image_embedding": np.asarray(encoder.encode_images(batch["image"]), np.float32)}
        texts = encoder.encode_texts([str(c) for c in batch["caption"]])
        missing = {"text_embedding", "tokens"} - set(texts)
        if missing:
            raise ValueError(f"encode_texts must return {sorted(missing)} (got {sorted(texts)})")
        out["text_embedding"] = np.asarray(texts["text_embedding"], np.float32)
        out["tokens"] = np.asarray(texts["tokens"], np.int32)
        if texts.get("token_embeddings") is not None:
            out["token_embeddings"] = np.asarray(texts["token_embeddings"], np.float32)
        out["index"] = batch["index"]
        n = len(batch["index"])
        for key, arr in out.items():
            if len(arr) != n:
                raise ValueError(f"encoder returned {len(arr)} rows of {key} for a batch of {n}")
            buffers.setdefault(key, []).append(arr)
        buffers.setdefault("caption", []).append(list(map(str, batch["caption"])))
        rows += n
        if sum(len(a) for a in buffers["index"]) >= shard_size:
            flush()
        if log:
            log(f"{split}: {rows} examples encoded")
    flush()
    cfg = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    manifest = {"split": split, "process_index": process_index, "process_count": process_count,
                "num_examples": rows, "shards": shards, "fields": fields, "source": cfg,
                "source_stats": it.stats()}
    tmp = os.path.join(split_dir, f".manifest.p{process_index:04d}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    # The manifest appears last and atomically: its presence means the shards are complete.
    os.replace(tmp, os.path.join(split_dir, f"manifest.p{process_index:04d}.json"))
    return manifest


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


class CacheSource:
    """Rows of an embedding cache, split across processes (row r goes to process r % count)."""

    base_fields = ("caption", "index")

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        if not cfg.cache_dir:
            raise ValueError("data.cache_dir must be set for data.name='embed_cache'")
        self.path, manifests = load_manifests(cfg.cache_dir, split)
        self.extra_fields = tuple(f for f in EMBED_FIELDS if f in manifests[0]["fields"])
        self._arrays: dict[str, list[np.ndarray]] = {f: [] for f in self.extra_fields + ("index",)}
        self._captions: list[list[str]] = []
        counts = []
        for m in manifests:
            for s in m["shards"]:
                for f in self._arrays:
                    self._arrays[f].append(
                        np.load(os.path.join(self.path, f"{f}.{s['name']}.npy"), mmap_mode="r"))
                with open(os.path.join(self.path, f"caption.{s['name']}.json")) as fh:
                    self._captions.append(json.load(fh))
                counts.append(s["count"])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._starts[-1])
        if total == 0:
            raise ValueError(f"embedding cache {self.path!r} holds no examples")
        self._pi, self._pc = process_index, process_count
        self._len = len(range(process_index, total, process_count))
        if self._len == 0:
            raise ValueError(f"embedding cache {self.path!r} has {total} rows, fewer than the "
                             f"{process_count} processes reading it")
        self._join = None
        if cfg.get("join_images", False):
            src_cfg = cfg.get("source") or ml_collections.ConfigDict(manifests[0]["source"])
            self._join = sources_lib.open_source(src_cfg, split, 0, 1)
            self.base_fields = ("image",) + self.base_fields

    def __len__(self) -> int:
        return self._len

    def read_row(self, row: int) -> dict[str, Any]:
        shard = int(np.searchsorted(self._starts, row, side="right") - 1)
        k = row - int(self._starts[shard])
        out = {f: np.array(self._arrays[f][shard][k]) for f in self.extra_fields}
        out["index"] = int(self._arrays["index"][shard][k])
        out["caption"] = self._captions[shard][k]
        if self._join is not None:
            joined = self._join.read(out["index"])
            out["image"] = joined.get("image")
            if joined.get("missing"):
                out["missing"] = joined["missing"]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read_row(self._pi + i * self._pc)
