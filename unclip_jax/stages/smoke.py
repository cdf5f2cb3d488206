"""Tiny input data for a stage config's `:smoke` variant, made the way its docstring tells a user.

A smoke config carries `smoke_data` (the paper configs' `:smoke`, experiments/paper/*.py):
  num_examples, shard_size, image_size   img2dataset-style webdataset shards of shapes scenes
                                         (data.synthetic.write_webdataset_shards), train split
  clip                                   {} for image-only stages (upsamplers: data.path is set
                                         to the shards); else write_random_hf_clip's keyword
                                         arguments: a random CLIP in the Hugging Face layout,
                                         then `unclip_jax.embed` with its importer
                                         (clip_import:encoder) writes the embedding cache that
                                         data.cache_dir, tokenizer.dir and (AR prior) an empty
                                         model.codec_path are pointed at
Everything goes under <workdir>/smoke_data/, each part written once (`distributed.write_once`),
so a second run on the same workdir resumes with the same data.
"""
from __future__ import annotations

import os

import ml_collections

HF_CLIP_ENCODER = "unclip_jax.models.clip_import:encoder"


def _caption_words(splits: dict[str, int]) -> list[str]:
    """Every word of the smoke captions: single BPE tokens in the random CLIP's vocabulary, so
    captions stay well inside CLIP's 77-token context."""
    from unclip_jax.data import shapes
    words = set()
    for split, n in splits.items():
        for i in range(n):
            words.update(shapes.example(0, shapes.SPLIT_IDS[split], i, size=8)[1].split())
    return sorted(words)


def write_inputs(root: str, *, splits: dict[str, int], shard_size: int, image_size: int,
                 clip: dict | None = None) -> tuple[str, str | None]:
    """Webdataset shards of each split (`splits`: split -> examples) under root/web/<split>/
    and, when `clip` (write_random_hf_clip's keyword arguments) is given, a random HF CLIP in
    root/hf_clip, each written once for all processes. Returns (the shards' pattern with
    "{split}" left for the reader, the CLIP folder or None). The paper configs' :smoke and the
    web-data recipe's :smoke (recipes/webdata.py) both make their inputs here."""
    from unclip_jax.data.synthetic import write_webdataset_shards
    from unclip_jax.distributed import write_once

    for split, n in splits.items():
        write_once(os.path.join(root, "web", split), lambda tmp, split=split, n=n:
                   write_webdataset_shards(tmp, num_examples=n, shard_size=shard_size,
                                           image_size=image_size, split=split))
    clip_dir = None
    if clip:
        from unclip_jax.models.clip_import import write_random_hf_clip
        clip_dir = os.path.join(root, "hf_clip")
        write_once(clip_dir, lambda tmp: write_random_hf_clip(
            tmp, words=_caption_words(splits), **clip))
    return os.path.join(root, "web", "{split}", "*.tar"), clip_dir


def prepare(config, workdir: str) -> ml_collections.ConfigDict:
    """`config` with its data paths pointing at smoke data made under `workdir` (a copy)."""
    from unclip_jax.data import default_data_config
    from unclip_jax.distributed import write_once

    from unclip_jax import paths
    s = config.smoke_data
    paths.check_bucket(workdir)   # before making any input
    root = str(paths.path(workdir) / "smoke_data")   # a gs:// workdir: the data goes there too
    pattern, clip_dir = write_inputs(
        root, splits={"train": int(s.num_examples)}, shard_size=int(s.shard_size),
        image_size=int(s.image_size), clip=s.clip.to_dict())
    c = config.copy_and_resolve_references()
    with c.unlocked():
        if not s.clip.to_dict():
            c.data.path = pattern
            return c
        from unclip_jax import embed
        web = default_data_config("webdataset")
        web.path = pattern
        web.resolution = int(s.image_size)
        web.num_threads = 0
        cache_dir = os.path.join(root, "embed_cache")
        embed_config = ml_collections.ConfigDict(dict(data=web, embed=embed.embed_config(
            encoder=HF_CLIP_ENCODER, clip_dir=clip_dir, splits=("train",),
            batch_size=int(s.shard_size))))
        write_once(cache_dir, lambda tmp: embed.embed(embed_config, tmp, log=lambda _: None))
        c.data.cache_dir = cache_dir
        if "tokenizer" in c:
            c.tokenizer.dir = clip_dir
        if "codec_path" in c.model and not c.model.codec_path:
            c.model.codec_path = os.path.join(root, "ar_codec.npz")
    return c


def smoke_variant(c, *, image_size: int, clip: dict | None = None, num_examples: int = 32,
                  batch_size: int = 8) -> None:
    """Turn a stage config (widths already shrunk by its file) into its `:smoke` run in place:
    2 steps of `batch_size` on CPU (data-parallel mesh), with smoke data as above."""
    c.smoke_data = ml_collections.ConfigDict(dict(
        num_examples=num_examples, shard_size=num_examples // 2, image_size=image_size,
        clip=dict(clip or {})))
    c.train.update(batch_size=batch_size, num_steps=2, log_every=1, ckpt_every=2,
                   async_checkpoint=False, init_prng="rbg")  # init compiles ~3x faster
    c.optim.update(warmup_steps=0)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    # float32 (bfloat16 is no faster on CPU); no remat: a memory trade tiny widths don't need,
    # at twice the compile time.
    c.model.update(dtype="float32", remat=False)
    c.aot.topology = ""


# The random HF CLIP of the prior / decoder smoke runs: projection 16 (z_i, z_t), text width 32.
SMOKE_CLIP = dict(text_width=32, text_depth=1, text_heads=2, context_length=77, image_size=32,
                  patch=8, vision_width=24, vision_depth=1, vision_heads=2, projection_dim=16)
