"""Stage `ar_prior`: train the autoregressive prior on PCA-quantised image embeddings.

Config (experiments/ar_prior_shapes.py, experiments/paper/ar_prior.py):
  model.{embed_dim, pca_components (k), num_buckets, text_ctx, vocab_size (0: token_embeddings,
         text_dim wide), enc_width/depth/heads, dec_width/depth/heads, mlp_ratio, dropout,
         drop_prob, text_scale (z_t is fed times this; default sqrt(embed_dim))}
  model.codec_path  npz of the ARCodec (PCA + buckets); fitted from the training embeddings
                    (synthetic set, or the cache's train split streamed: PCA statistics merged
                    over processes, buckets from the gathered coordinates) and written there if
                    absent
  data.*            as the diffusion prior ("embed_cache" or "synthetic")
Batches: ar_tokens [B, k + 1] (computed on the host), text_embedding, tokens or
token_embeddings, token_mask.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from unclip_jax.models.ar_prior import (ARCodec, ARPrior, ar_loss, fit_codec,
                                        fit_codec_streaming)
from unclip_jax.stages.base import Stage
from unclip_jax.stages.diffusion_prior import batch_keys, prior_data, synthetic_pairs


def build_ar_prior(m) -> ARPrior:
    return ARPrior(int(m.num_buckets), int(m.pca_components) + 1, int(m.text_ctx),
                   int(m.vocab_size), int(m.enc_width), int(m.enc_depth),
                   int(m.enc_heads), int(m.dec_width), int(m.dec_depth), int(m.dec_heads),
                   float(m.mlp_ratio), float(m.dropout),
                   bool(m.remat), np.dtype(str(m.dtype)))


def fit_training_codec(config) -> ARCodec:
    """The codec of the training embeddings: the synthetic set, or the cache's train split
    streamed, each process reading its own shards (a collective: all processes call it)."""
    d, m = config.data, config.model
    k, nb = int(m.pca_components), int(m.num_buckets)
    if d.name == "synthetic":
        a = synthetic_pairs(int(d.num_examples), int(m.embed_dim), int(m.text_ctx),
                            int(m.vocab_size) or 64, int(d.seed))
        return fit_codec(a["image_embedding"], a["text_embedding"], k, nb)
    import jax

    from unclip_jax.data import cache

    def batches():
        for start, f in cache.iter_rows(str(d.cache_dir), "train",
                                        ("image_embedding", "text_embedding"),
                                        jax.process_index(), jax.process_count()):
            yield start, f["image_embedding"], f["text_embedding"]
    return fit_codec_streaming(batches, int(m.embed_dim), k, nb)


def _exists_on_process_0(path: str) -> bool:
    """Whether `path` exists, as process 0 sees it (all processes then fit, or none)."""
    import jax

    from unclip_jax.distributed import written
    if jax.process_count() == 1:
        return written(path)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(written(path))))


@functools.lru_cache(maxsize=4)
def _load_codec(path: str, mtime: float) -> ARCodec:
    return ARCodec.load(path)


def get_codec(config) -> ARCodec:
    m = config.model
    path = str(m.codec_path)
    if not path:
        raise ValueError("config.model.codec_path must be set (the PCA codec is saved there)")
    if not _exists_on_process_0(path):
        from unclip_jax.distributed import write_once
        codec = fit_training_codec(config)   # every process takes part; process 0 writes it
        write_once(path, codec.save)
    from unclip_jax import paths
    mtime = paths.path(path).stat().mtime if paths.is_url(path) else os.path.getmtime(path)
    codec = _load_codec(path, mtime)
    if codec.k != int(m.pca_components) or codec.num_buckets != int(m.num_buckets):
        raise ValueError(f"codec {path!r} has k={codec.k}, {codec.num_buckets} buckets; config."
                         f"model.pca_components={m.pca_components}, num_buckets={m.num_buckets}")
    return codec


def text_scale(config) -> float:
    return float(config.model.text_scale or np.sqrt(int(config.model.embed_dim)))


def ar_batch(codec: ARCodec, b: dict) -> dict:
    """Adds ar_tokens (from image_embedding and text_embedding) and drops image_embedding."""
    b = dict(b)
    b["ar_tokens"] = codec.encode(b.pop("image_embedding"), b["text_embedding"])
    return b


class ARPriorStage(Stage):
    name = "ar_prior"

    def validate(self, config):
        m = config.model
        for f in ("embed_dim", "pca_components", "num_buckets", "text_ctx", "enc_width",
                  "enc_depth", "enc_heads", "dec_width", "dec_depth", "dec_heads"):
            if f not in m:
                raise ValueError(f"config.model.{f} is required by the ar_prior stage")
        if not 0 < int(m.pca_components) <= int(m.embed_dim):
            raise ValueError(f"config.model.pca_components {m.pca_components} must be in "
                             f"[1, embed_dim={m.embed_dim}]")
        for w, h in (("enc_width", "enc_heads"), ("dec_width", "dec_heads")):
            if int(m[w]) % int(m[h]):
                raise ValueError(f"config.model.{w} {m[w]} not divisible by config.model.{h}")
        if int(m.vocab_size) <= 0 and int(m.text_dim) <= 0:
            raise ValueError("config.model: set vocab_size (token ids) or text_dim (token "
                             "encodings from the cache)")

    def build_model(self, config):
        return build_ar_prior(config.model)

    def example_batch(self, config, batch_size):
        m = config.model
        ctx, d = int(m.text_ctx), int(m.embed_dim)
        b = {"ar_tokens": np.zeros((batch_size, int(m.pca_components) + 1), np.int32),
             "text_embedding": np.zeros((batch_size, d), np.float32),
             "token_mask": np.ones((batch_size, ctx), bool)}
        if int(m.vocab_size) > 0:
            b["tokens"] = np.zeros((batch_size, ctx), np.int32)
        else:
            b["token_embeddings"] = np.zeros((batch_size, ctx, int(m.text_dim)), np.float32)
        return b

    def init(self, model, rng, batch):
        from unclip_jax.models.ar_prior import _cond
        cond = _cond(batch)
        cond["drop"] = np.zeros((batch["ar_tokens"].shape[0],), bool)
        return model.init({"params": rng}, batch["ar_tokens"], cond)

    def loss(self, model, params, batch, rng, config):
        return ar_loss(model, params, batch, rng, text_scale(config),
                       float(config.model.drop_prob))

    def make_data(self, config, *, split, process_index, process_count, local_batch_size, seed):
        return prior_data(config, batch_keys(config), split=split, process_index=process_index,
                          process_count=process_count, local_batch_size=local_batch_size,
                          seed=seed, postprocess=functools.partial(ar_batch, get_codec(config)))
