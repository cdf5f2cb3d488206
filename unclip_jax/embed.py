"""Write a CLIP embedding cache of a dataset, for the priors and the decoder.

  python -m unclip_jax.embed --config=cfg.py --out=DIR [--config.x.y=v]

The config has `data` (the source dataset, see unclip_jax.data.config) and `embed`:
  embed.encoder     "module:factory"; factory(config) returns an object with
                    encode_images(images [B,H,W,3] float32 in [-1,1]) -> [B,D] and
                    encode_texts(list[str]) -> {"text_embedding" [B,D], "tokens" [B,L] int32,
                    optional "token_embeddings" [B,L,W]}
  embed.splits      splits to encode
  embed.batch_size  examples per encoder call
  embed.shard_size  rows per written shard
  embed.token_dtype what token_embeddings are stored in: "bfloat16" (half the disk) or "float32"
(defaults in `embed_config()`).
Each process encodes its own slice (--process_index / --process_count, default: jax's) and
writes its own shards under DIR/<split>/ (layout in unclip_jax.data.cache). Read the result
with data.name="embed_cache", data.cache_dir=DIR; fit PCA with `python -m unclip_jax.models.pca`.
"""
from __future__ import annotations

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

import importlib
import json
import os
from typing import Callable, Protocol

import ml_collections
import numpy as np


def embed_config(**kw) -> ml_collections.ConfigDict:
    """`config.embed`: what `python -m unclip_jax.embed` encodes, and how."""
    c = ml_collections.ConfigDict(dict(encoder="", splits=("train", "test"), batch_size=64,
                                       shard_size=8192, token_dtype="bfloat16"))
    c.update(kw)
    return c


class Encoder(Protocol):
    def encode_images(self, images: np.ndarray) -> np.ndarray: ...
    def encode_texts(self, captions: list[str]) -> dict[str, np.ndarray]: ...


def _shard_name(process_index: int, shard: int) -> str:
    return f"p{process_index:04d}.s{shard:05d}"


def write_cache(encoder: Encoder, data_config, *, split: str, out_dir: str, process_index: int = 0,
                process_count: int = 1, batch_size: int = 64, shard_size: int = 8192,
                token_dtype: str = "bfloat16", log: Callable[[str], None] | None = None) -> dict:
    """Encode this process's examples of `split` and write them as shards; returns the manifest.

    Rows keep the source order (no shuffling, one pass); skipped source examples (corrupt,
    no caption) are absent and counted in the manifest's "source_stats".
    """
    from unclip_jax.data import cache, make_iterator  # imports JAX

    if token_dtype not in cache.TOKEN_DTYPES:
        raise ValueError(f"embed.token_dtype {token_dtype!r} must be one of {cache.TOKEN_DTYPES}")
    from unclip_jax import paths
    split_dir = os.path.join(out_dir, split)
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
                paths.write_text(os.path.join(split_dir, f"caption.{name}.json"),
                                 json.dumps([c for chunk in chunks for c in chunk]))
                continue
            arr = np.concatenate(chunks)
            dtype = token_dtype if key == "token_embeddings" else str(arr.dtype)
            fields[key] = {"shape": list(arr.shape[1:]), "dtype": dtype}
            paths.save_npy(os.path.join(split_dir, f"{key}.{name}.npy"), arr)
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
            # Rounded as they arrive: the buffered shard is then held at the stored width too.
            out["token_embeddings"] = cache.encode(texts["token_embeddings"], token_dtype)
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
    # The manifest appears last and atomically: its presence means the shards are complete.
    paths.write_text(os.path.join(split_dir, f"manifest.p{process_index:04d}.json"),
                     json.dumps(manifest, indent=1))
    return manifest


def check_cache_tokens(cache_dir: str, tokenizer, tokenizer_dir: str, *, split: str = "train",
                       n: int = 16) -> None:
    """Raise unless `tokenizer` gives the cached token ids for the first n cached captions:
    stages that read the cache's tokens (the priors' token mask, the decoder's caption) and
    sampling (which tokenises prompts) must use the tokenizer the cache was written with."""
    import warnings

    from unclip_jax import paths
    from unclip_jax.data.cache import load_manifests
    split_dir, manifests = load_manifests(cache_dir, split)
    shard = next((s["name"] for m in manifests for s in m["shards"] if s["count"]), None)
    if shard is None:
        return
    cached = paths.np_load(os.path.join(split_dir, f"tokens.{shard}.npy"))[:n]
    captions = json.loads(paths.path(os.path.join(split_dir, f"caption.{shard}.json"))
                          .read_text())[:len(cached)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # truncation is checked by the comparison itself
        tokens, _ = tokenizer.encode(captions)
    if tokens.shape[1] != cached.shape[1]:
        raise ValueError(f"the embedding cache {split_dir} holds {cached.shape[1]}-token captions "
                         f"but the tokenizer in {tokenizer_dir} makes {tokens.shape[1]}: the cache "
                         "was written with another CLIP; delete the cache to re-embed, or use "
                         "the CLIP it was made with")
    bad = np.flatnonzero((tokens != cached).any(1))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"the tokenizer in {tokenizer_dir} does not give the token ids cached in "
                         f"{split_dir} (caption {captions[i]!r}: cached "
                         f"{cached[i][:8].tolist()}..., tokenizer {tokens[i][:8].tolist()}...): "
                         "the cache was written with another CLIP; delete the cache to re-embed, "
                         "or use the CLIP it was made with")


def build_encoder(config):
    """The encoder named by config.embed.encoder ("module:factory")."""
    spec = config.embed.encoder
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"embed.encoder must be 'module:factory', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load encoder factory {spec!r}: {e}") from e
    return factory(config)


def embed(config, out_dir: str, *, process_index: int = 0, process_count: int = 1,
          log=print) -> dict[str, dict]:
    """Encode every configured split; returns this process's manifest per split."""
    encoder = build_encoder(config)
    e = config.embed
    return {split: write_cache(
                encoder, config.data, split=split, out_dir=out_dir, process_index=process_index,
                process_count=process_count, batch_size=int(e.batch_size),
                shard_size=int(e.shard_size), token_dtype=str(e.get("token_dtype", "bfloat16")),
                log=log)
            for split in tuple(e.splits)}


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    pi, pc = f.process_index, f.process_count
    if pi < 0 or pc < 1:
        import jax
        pi, pc = jax.process_index(), jax.process_count()
    manifests = embed(f.config, f.out, process_index=pi, process_count=pc,
                      log=lambda s: None)
    for split, m in manifests.items():
        print(f"{split}: {m['num_examples']} examples in {len(m['shards'])} shards "
              f"(source stats {m['source_stats']})")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file with `data` and `embed` fields "
                                    "(see above).", lock_config=True)
    flags.DEFINE_string("out", None, "Output directory of the cache.")
    flags.DEFINE_integer("process_index", -1, "This process (default: jax.process_index()).")
    flags.DEFINE_integer("process_count", 0, "Number of processes (default: jax's).")
    flags.mark_flags_as_required(["config", "out"])
    from unclip_jax import console
    console.run_app(main)
