"""The CLIP embedding cache that the paper's priors and decoder train on (`unclip_jax.embed`).

  python -m unclip_jax.embed --config=experiments/paper/embed.py --out=CACHE \
      --config.embed.clip_dir=CLIP --config.data.path='/data/web/{split}/*.tar'

CLIP is a local Hugging Face CLIP directory (config.json, model.safetensors and the tokenizer
files; ViT-H/14 in the paper, any CLIP architecture works; nothing is downloaded), imported by
`unclip_jax.models.clip_import:encoder`. The data are img2dataset webdataset shards (or
--config.data.name=folder --config.data.path=DIR with captions.jsonl). CACHE/<split>/ then holds
per example z_i, z_t, CLIP's caption token ids and their per-token encodings (bfloat16 on disk,
embed.token_dtype); the stage configs read it with --config.data.cache_dir=CACHE
--config.tokenizer.dir=CLIP. Multi-host: each process encodes its own part.
"""
from unclip_jax.data import default_data_config
from unclip_jax.embed import embed_config
from unclip_jax.stages.smoke import HF_CLIP_ENCODER

import ml_collections


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"experiments/paper/embed.py: unknown variant {arg!r}")
    c = ml_collections.ConfigDict()
    c.data = default_data_config("webdataset")
    c.data.resolution = 256   # the CLIP resizes to its own input size
    c.embed = embed_config(encoder=HF_CLIP_ENCODER, clip_dir="", splits=("train", "test"),
                           batch_size=256)
    return c
