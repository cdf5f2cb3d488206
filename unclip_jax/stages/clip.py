"""Stage `clip`: contrastive CLIP training from scratch on captioned images.

Config (see experiments/clip_shapes.py):
  model.{embed_dim, image_size, patch, vision_width/depth/heads, text_ctx, text_width/depth/heads,
         mlp_ratio, act, vocab_size}
  data.*            an `unclip_jax.data` config (images in [-1, 1], captions)
  tokenizer.dir     tokenizer directory; built from `tokenizer.num_captions` training captions
                    (BPE with model.vocab_size entries) and saved there if absent
Captions are tokenised on the host inside make_data; batches hold "image" and "tokens".
"""
from __future__ import annotations

import functools

import numpy as np

from unclip_jax.models.clip import CLIP, clip_from_config, clip_loss
from unclip_jax.stages.base import Stage
from unclip_jax.data.tokenizer import Tokenizer


def get_tokenizer(config, captions_fn=None) -> Tokenizer:
    """Load config.tokenizer.dir, or train one from captions_fn() and save it there."""
    t = config.tokenizer
    path = str(t.dir)
    if not path:
        raise ValueError("config.tokenizer.dir must be set (the tokenizer is saved there)")
    ctx = int(config.model.text_ctx)
    from unclip_jax.distributed import write_once, written
    if written(path):
        return Tokenizer.load(path, context_length=ctx)
    if captions_fn is None:
        raise FileNotFoundError(f"config.tokenizer.dir {path!r} holds no tokenizer")

    write_once(path, lambda tmp: Tokenizer.train(
        captions_fn(), vocab_size=int(config.model.vocab_size), context_length=ctx).save(tmp))
    return Tokenizer.load(path, context_length=ctx)


def training_captions(config, n: int) -> list[str]:
    from unclip_jax.data import make_iterator

    it = make_iterator(config.data, split="train", process_index=0, process_count=1,
                       local_batch_size=min(n, 256), seed=0, fields=("caption",), shuffle=False,
                       num_epochs=1)
    out: list[str] = []
    for b in it:
        out.extend(map(str, b["caption"]))
        if len(out) >= n:
            break
    return out[:n]


def tokenize_batch(tokenizer: Tokenizer, b: dict) -> dict:
    """A data batch -> the CLIP stage's: int32 "tokens" of the captions (host side)."""
    tokens, _ = tokenizer.encode(list(b["caption"]))
    return {"image": b["image"], "tokens": tokens,
            "caption": b["caption"]}   # the trainer drops the str captions


class ClipStage(Stage):
    name = "clip"

    def validate(self, config):
        m = config.model
        for f in ("embed_dim", "image_size", "patch", "vision_width", "vision_depth",
                  "vision_heads", "text_ctx", "text_width", "text_depth", "text_heads",
                  "vocab_size"):
            if f not in m:
                raise ValueError(f"config.model.{f} is required by the clip stage")
        if int(m.image_size) % int(m.patch):
            raise ValueError(f"config.model.image_size {m.image_size} is not divisible by "
                             f"config.model.patch {m.patch}")
        if int(config.data.resolution) != int(m.image_size):
            raise ValueError(f"config.data.resolution {config.data.resolution} must equal "
                             f"config.model.image_size {m.image_size}")
        for w, h in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if int(m[w]) % int(m[h]):
                raise ValueError(f"config.model.{w} {m[w]} not divisible by config.model.{h}")

    def _tokenizer(self, config):
        n = int(config.tokenizer.num_captions)
        return get_tokenizer(config, lambda: training_captions(config, n))

    def build_model(self, config) -> CLIP:
        tok = self._tokenizer(config)
        if tok.vocab_size > int(config.model.vocab_size):
            raise ValueError(f"tokenizer in {config.tokenizer.dir!r} has {tok.vocab_size} "
                             f"entries > config.model.vocab_size {config.model.vocab_size}")
        return clip_from_config(config.model, eos_token_id=tok.eos_id)

    def example_batch(self, config, batch_size):
        m = config.model
        return {"image": np.zeros((batch_size, int(m.image_size), int(m.image_size), 3), np.float32),
                "tokens": np.zeros((batch_size, int(m.text_ctx)), np.int32)}

    def init(self, model, rng, batch):
        return model.init({"params": rng}, batch["image"], batch["tokens"])

    def loss(self, model, params, batch, rng, config):
        img, txt, scale = model.apply({"params": params}, batch["image"], batch["tokens"])
        return clip_loss(img, txt, scale)

    def make_data(self, config, *, split, process_index, process_count, local_batch_size, seed):
        from unclip_jax.data import make_iterator

        tok = self._tokenizer(config)
        return make_iterator(config.data, split=split, process_index=process_index,
                             process_count=process_count, local_batch_size=local_batch_size,
                             seed=seed, fields=("image", "caption"),
                             postprocess=functools.partial(tokenize_batch, tok))
