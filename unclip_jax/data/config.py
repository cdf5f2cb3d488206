"""Data config fields and their defaults (`config.data` of an experiment).

Common to every reader:
  name            "shapes" | "tfds" | "webdataset" | "folder" | "embed_cache"
  resolution      images are resized (shorter side) and centre-cropped to this square size
  data_dir        where tfds datasets live / are built; "" -> $UNCLIP_DATA_DIR or
                  ~/.cache/unclip_jax/tfds
  num_threads     grain reader threads (decoding); 0 reads in the calling thread
  prefetch        examples grain buffers ahead
shapes:           shapes.num_train / num_test / seed / image_size (the rendered size)
tfds:             tfds_name ("name" or "name/config:version"), image_key, caption_key
webdataset:       path: glob of tar shards (comma-separated globs allowed; "{split}" is
                  replaced by the split name)
folder:           path: folder holding captions.jsonl and the images ("{split}" replaced)
embed_cache:      cache_dir (the --out of `unclip_jax.embed`; split s is read from
                  <cache_dir>/<s>/), join_images (also read each example's image back, by index,
                  from the source dataset recorded in the cache manifest; an optional
                  data.source sub-config overrides that source, e.g. when paths moved),
                  token_dtype (the dtype the cache must store token_embeddings in, as
                  embed.token_dtype wrote them: "bfloat16" or "float32"; read as float32)
"""
from __future__ import annotations

import ml_collections

NAMES = ("shapes", "tfds", "webdataset", "folder", "embed_cache")


def default_data_config(name: str = "shapes") -> ml_collections.ConfigDict:
    if name not in NAMES:
        raise ValueError(f"unknown data name {name!r}; expected one of {NAMES}")
    c = ml_collections.ConfigDict(dict(
        name=name, resolution=64, data_dir="", num_threads=4, prefetch=64))
    if name == "shapes":
        c.shapes = ml_collections.ConfigDict(dict(
            num_train=20_000, num_test=2_000, seed=0, image_size=64))
    elif name == "tfds":
        c.tfds_name = ""
        c.image_key = "image"
        c.caption_key = "caption"
    elif name in ("webdataset", "folder"):
        c.path = ""
    elif name == "embed_cache":
        c.cache_dir = ""
        c.join_images = False
        c.token_dtype = "bfloat16"
        c.source = None     # a data config overriding the manifest's source (join_images)
    return c
