"""Write a CLIP embedding cache of a dataset, for the priors and the decoder.

  python -m unclip_jax.embed --config=cfg.py --out=DIR [--config.x.y=v]

The config has `data` (the source dataset, see unclip_jax.data.config) and `embed`:
  embed.encoder     "module:factory"; factory(config) returns an object with
                    encode_images(images [B,H,W,3] float32 in [-1,1]) -> [B,D] and
                    encode_texts(list[str]) -> {"text_embedding" [B,D], "tokens" [B,L] int32,
                    optional "token_embeddings" [B,L,W]}
  embed.splits      splits to encode (default ("train", "test"))
  embed.batch_size  examples per encoder call (default 64)
  embed.shard_size  rows per written shard (default 8192)
Each process encodes its own slice (--process_index / --process_count, default: jax's) and
writes its own shards under DIR/<split>/ (layout in unclip_jax.data.cache). Read the result
with data.name="embed_cache", data.cache_dir=DIR; fit PCA with `python -m unclip_jax.models.pca`.
"""
from __future__ import annotations

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

import importlib


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
    from unclip_jax.data import cache  # imports JAX

    encoder = build_encoder(config)
    e = config.embed
    return {split: cache.write_cache(
                encoder, config.data, split=split, out_dir=out_dir, process_index=process_index,
                process_count=process_count, batch_size=int(e.get("batch_size", 64)),
                shard_size=int(e.get("shard_size", 8192)), log=log)
            for split in tuple(e.get("splits", ("train", "test")))}


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
