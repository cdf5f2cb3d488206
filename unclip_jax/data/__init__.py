"""Input data: the built-in shapes dataset, real dataset readers and CLIP embedding caches.

The one entry point for stages is `make_iterator`; data config fields and defaults are in
`unclip_jax.data.config` (`default_data_config(name)`).
"""
from __future__ import annotations

from typing import Sequence

from unclip_jax.data.config import NAMES, default_data_config
from unclip_jax.data.loader import BatchIterator
from unclip_jax.data.preprocess import normalize, random_crop, resize_center_crop

__all__ = ["NAMES", "BatchIterator", "default_data_config", "make_iterator", "normalize",
           "random_crop", "resize_center_crop"]


def make_iterator(data_config, *, split: str, process_index: int, process_count: int,
                  local_batch_size: int, seed: int, fields: Sequence[str] | None = None,
                  shuffle: bool | None = None, num_epochs: int | None = None,
                  drop_remainder: bool | None = None, postprocess=None) -> BatchIterator:
    """A resumable iterator of this process's local batches (a stages.base.DataIterator).

    Endless (num_epochs=None, training): this process's rows of one global order of examples
    that does not depend on the process count (global batch = local_batch_size *
    process_count), so a run resumes exactly on another count (`BatchIterator.seek`; see
    unclip_jax.data.loader). Finite (embedding, evaluation): this process's own part of the
    data, one pass.

    Batches are dicts of numpy arrays: "image" float32 [B, R, R, 3] in [-1, 1] (R =
    data_config.resolution), "caption" object array of str, "index" int64 (example id in the
    source), plus reader extras (shapes: background, num_objects, obj_*; embed_cache: embeddings
    and tokens). `fields` keeps only those keys (leaving out "image" skips image decoding).
    Defaults: shuffled (per seed and epoch) only for split "train"; epochs repeat forever
    (num_epochs=None) and the last partial batch is dropped unless num_epochs is finite.
    `postprocess(batch) -> batch` runs on each batch (how a stage adds its host-side columns).
    """
    from unclip_jax.data import sources

    stream = num_epochs is None
    # The training stream slices global batches itself: it reads the source as one process.
    if stream:
        sources.index_shards(data_config, split, process_index, process_count)
    source = sources.open_source(data_config, split, *((0, 1) if stream else
                                                       (process_index, process_count)))
    if drop_remainder is None:
        drop_remainder = num_epochs is None
    return BatchIterator(
        source, resolution=int(data_config.resolution), local_batch_size=local_batch_size,
        seed=seed, fields=fields, shuffle=(split == "train") if shuffle is None else shuffle,
        num_epochs=num_epochs, drop_remainder=drop_remainder,
        num_threads=int(data_config.num_threads), prefetch=int(data_config.prefetch),
        postprocess=postprocess, process_index=process_index if stream else 0,
        process_count=process_count if stream else 1)
