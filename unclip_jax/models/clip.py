"""CLIP in Flax: causal text transformer, ViT image encoder, contrastive loss.

Layout follows OpenAI CLIP / Hugging Face `CLIPModel` so pretrained weights import exactly
(`unclip_jax.models.clip_import`). The attention is `models.transformer.SelfAttention` (fused qkv;
the importer interleaves HF's separate q/k/v); the block is written here rather than reusing
`transformer.Block` because CLIP needs quick_gelu and a configurable LayerNorm epsilon.

Images enter in [-1, 1] (our data convention); `to_clip_pixels` is the one place they are mapped to
CLIP's input normalisation ((x + 1) / 2 - mean) / std.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.layers import Dense, LayerNorm
from unclip_jax.models.transformer import SelfAttention

Dtype = Any
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


def to_clip_pixels(images):
    """[-1, 1] images [B, H, W, 3] -> CLIP's normalised input (HF CLIPImageProcessor's mean/std
    applied to [0, 1] pixels)."""
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    return (x - CLIP_MEAN) / CLIP_STD


def _p(module, name, init, axes, shape, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class CLIPBlock(nn.Module):
    width: int
    heads: int
    mlp_dim: int
    causal: bool = False
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype)
        x = x + SelfAttention(self.width, self.heads, self.causal, name="attn", **kw)(
            LayerNorm(self.eps, name="ln_1", **kw)(x))
        h = LayerNorm(self.eps, name="ln_2", **kw)(x)
        h = Dense(self.mlp_dim, axes=("embed", "mlp"), name="fc", **kw)(h)
        h = Dense(self.width, axes=("mlp", "embed"), name="proj", **kw)(ACTIVATIONS[self.act](h))
        return x + h


class CLIPStack(nn.Module):
    width: int
    depth: int
    heads: int
    mlp_dim: int
    causal: bool = False
    act: str = "quick_gelu"
    eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"clip: unknown activation {self.act!r}; known {sorted(ACTIVATIONS)}")
        block = nn.remat(CLIPBlock) if self.remat else CLIPBlock
        for i in range(self.depth):
            x = block(self.width, self.heads, self.mlp_dim, self.causal, self.act, self.eps,
                      self.dtype, name=f"block_{i}")(x)
        return x


class CLIPText(nn.Module):
    """tokens [B, L] -> (pooled [B, W], sequence [B, L, W]) after the final LayerNorm.

    Pooling: `eos_token_id < 0` takes the position of the highest token id (OpenAI CLIP, and HF
    when config.eos_token_id == 2); otherwise the first position holding eos_token_id (HF)."""
    vocab_size: int
    ctx: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    eos_token_id: int = -1
    act: str = "quick_gelu"
    eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        b, length = tokens.shape
        if length > self.ctx:
            raise ValueError(f"clip text: {length} tokens > context {self.ctx}")
        tab = _p(self, "token_embedding", nn.initializers.normal(0.02), ("vocab", "embed"),
                 (self.vocab_size, self.width), jnp.float32)
        pos = _p(self, "positional_embedding", nn.initializers.normal(0.01), (None, "embed"),
                 (self.ctx, self.width), jnp.float32)
        x = (jnp.take(tab, tokens, axis=0) + pos[None, :length]).astype(self.dtype)
        x = CLIPStack(self.width, self.depth, self.heads, self.mlp_dim, True, self.act, self.eps,
                      self.remat, self.dtype, name="transformer")(x)
        x = LayerNorm(self.eps, dtype=self.dtype, name="ln_final")(x)
        if self.eos_token_id < 0:
            idx = jnp.argmax(tokens, axis=-1)
        else:
            idx = jnp.argmax(tokens == self.eos_token_id, axis=-1)
        return x[jnp.arange(b), idx], x


class CLIPVision(nn.Module):
    """ViT: patchify conv (no bias), class token, pre-LN ("pre_layrnorm"), blocks, post-LN on
    the class token. images are CLIP-normalised [B, H, W, 3] -> pooled [B, W]."""
    image_size: int
    patch: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        b, h, w, _ = pixels.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"clip vision: images are {h}x{w}, model expects "
                             f"{self.image_size}x{self.image_size} (config image_size)")
        x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                    padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embed",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, None, "embed")))(pixels)
        x = x.reshape(b, -1, self.width)
        n = x.shape[1] + 1
        cls = _p(self, "class_embedding", nn.initializers.normal(self.width ** -0.5), ("norm",),
                 (self.width,), jnp.float32)
        pos = _p(self, "positional_embedding", nn.initializers.normal(0.02), (None, "embed"),
                 (n, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], 1)
        x = (x + pos[None]).astype(self.dtype)
        x = LayerNorm(self.eps, dtype=self.dtype, name="ln_pre")(x)
        x = CLIPStack(self.width, self.depth, self.heads, self.mlp_dim, False, self.act, self.eps,
                      self.remat, self.dtype, name="transformer")(x)
        return LayerNorm(self.eps, dtype=self.dtype, name="ln_post")(x[:, 0])


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
    """`encode_text(tokens)` / `encode_image(images in [-1, 1])` -> dict with "embedding"
    (L2-normalised [B, E]) and "features" (projected, unnormalised); text also gives
    "token_encodings" [B, L, W_text]. `__call__` -> (image_emb, text_emb, logit_scale)."""
    embed_dim: int
    text: dict
    vision: dict
    logit_scale_init: float = math.log(1 / 0.07)
    normalize_pixels: bool = True   # False: images are already CLIP-normalised
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(remat=self.remat, dtype=self.dtype)
        self.text_model = CLIPText(**self.text, **kw)
        self.vision_model = CLIPVision(**self.vision, **kw)
        self.text_projection = Dense(self.embed_dim, axes=("embed", None), use_bias=False,
                                     dtype=self.dtype)
        self.visual_projection = Dense(self.embed_dim, axes=("embed", None), use_bias=False,
                                       dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(
                lambda k, s: jnp.full(s, self.logit_scale_init, jnp.float32), ()), ())

    def encode_text(self, tokens):
        pooled, seq = self.text_model(tokens)
        feats = self.text_projection(pooled).astype(jnp.float32)
        return {"features": feats, "embedding": l2_normalize(feats), "token_encodings": seq}

    def encode_image(self, images):
        pixels = to_clip_pixels(images) if self.normalize_pixels else images
        feats = self.visual_projection(self.vision_model(pixels.astype(self.dtype)))
        feats = feats.astype(jnp.float32)
        return {"features": feats, "embedding": l2_normalize(feats)}

    def __call__(self, images, tokens):
        return (self.encode_image(images)["embedding"], self.encode_text(tokens)["embedding"],
                self.logit_scale)


def clip_loss(image_emb, text_emb, logit_scale, max_scale: float = 100.0):
    """Symmetric InfoNCE over the batch; logits = exp(logit_scale) (capped at `max_scale`, as
    OpenAI clamps the temperature) * image_emb @ text_emb.T. Returns (loss, metrics)."""
    scale = jnp.minimum(jnp.exp(logit_scale), max_scale)
    logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    li = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[labels, labels])
    lt = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[labels, labels])
    acc = 0.5 * (jnp.mean(jnp.argmax(logits, 1) == labels) + jnp.mean(jnp.argmax(logits, 0) == labels))
    return 0.5 * (li + lt), {"i2t_loss": li, "t2i_loss": lt, "accuracy": acc, "temperature_inv": scale}


def clip_from_config(m, vocab_size: int | None = None, eos_token_id: int = -1) -> CLIP:
    """Build CLIP from config.model fields: embed_dim, image_size, patch, vision_{width,depth,
    heads}, text_{ctx,width,depth,heads}, mlp_ratio, act, vocab_size."""
    r = float(m.mlp_ratio)
    act = str(m.act)
    text = dict(vocab_size=int(vocab_size or m.vocab_size), ctx=int(m.text_ctx),
                width=int(m.text_width), depth=int(m.text_depth), heads=int(m.text_heads),
                mlp_dim=int(r * int(m.text_width)), eos_token_id=int(eos_token_id), act=act)
    vision = dict(image_size=int(m.image_size), patch=int(m.patch), width=int(m.vision_width),
                  depth=int(m.vision_depth), heads=int(m.vision_heads),
                  mlp_dim=int(r * int(m.vision_width)), act=act)
    return CLIP(int(m.embed_dim), text, vision, remat=bool(m.remat),
                dtype=jnp.dtype(str(m.dtype)))
