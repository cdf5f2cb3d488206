"""Flax models: ADM/GLIDE U-Nets (decoder, upsamplers), the caption encoder, a generic transformer.

`config.model` of each stage starts from its builder here, which holds every default the stage
reads: `decoder_model_config()` / `upsampler_model_config()` (small, CPU sized),
`clip_model_config()`, `diffusion_prior_model_config()`, `ar_prior_model_config()` (the
architecture sizes have no default: experiments pass them). `model_from_config(config.model)`
builds the U-Nets.
"""
from __future__ import annotations

import ml_collections

from unclip_jax.models.layers import GroupNorm, timestep_embedding
from unclip_jax.models.text_encoder import TextEncoder
from unclip_jax.models.transformer import Transformer
from unclip_jax.models.unet import Decoder, UNet, Upsampler, model_from_config


def _config(defaults: dict, kw: dict) -> ml_collections.ConfigDict:
    c = dict(
        dtype="float32",             # compute dtype; "bfloat16" on accelerators
        remat=False,                 # rematerialise res blocks / transformer blocks
    )
    c.update(defaults)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def _common(**kw) -> ml_collections.ConfigDict:
    c = dict(
        param_dtype="float32",
        scan_blocks=False,           # each level's same-shaped U-Net blocks as one nn.scan
        image_size=32,               # resolution the model is trained at (attention uses it)
        out_channels=3,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),  # in pixels; () for none
        head_channels=32,            # channels per attention head (64 in ADM/GLIDE)
        norm_groups=8,               # GroupNorm groups (32 in ADM)
        dropout=0.0,
        learn_sigma=False,
    )
    return _config(c, kw)


def decoder_model_config(**kw) -> ml_collections.ConfigDict:
    """`config.model` for the decoder stage (kind="decoder")."""
    c = _common(kind="decoder", learn_sigma=True, clip_dim=64, clip_tokens=4,
                text_vocab=264, text_ctx=32, text_width=64, text_depth=2, text_heads=2,
                image_emb_source="auto", tokens_source="auto", image_emb_scale=1.0,
                text_pad_id=0,
                text_scan=False)      # caption encoder blocks as one nn.scan (paper scale)
    c.update(kw)
    return c


def upsampler_model_config(**kw) -> ml_collections.ConfigDict:
    """`config.model` for the upsampler stage (kind="upsampler"): no attention, no text."""
    # image_size: the target (full) resolution; low_res_size: the conditioning image's.
    c = _common(kind="upsampler", image_size=64, attention_resolutions=(), low_res_size=32)
    c.update(kw)
    return c


def clip_model_config(**kw) -> ml_collections.ConfigDict:
    """`config.model` for the clip stage; pass embed_dim, image_size, patch, vision_{width,
    depth,heads}, text_{ctx,width,depth,heads}, vocab_size."""
    return _config(dict(mlp_ratio=4.0, act="quick_gelu"), kw)


def _prior_defaults() -> dict:
    return dict(
        vocab_size=0,       # > 0: caption token ids; 0: token_embeddings (text_dim wide)
        text_dim=0,
        mlp_ratio=4.0,
        dropout=0.0,
        drop_prob=0.1,      # classifier-free guidance: caption dropped this often
    )


def diffusion_prior_model_config(**kw) -> ml_collections.ConfigDict:
    """`config.model` for the diffusion_prior stage; pass embed_dim, width, depth, heads,
    text_ctx."""
    return _config(dict(
        _prior_defaults(),
        scale_mode="fixed",  # "fixed": embeddings times `scale`; "standardize": stats_path
        scale=17.2,          # the paper's
        stats_path="",       # npz of embedding statistics (written from the cache if absent)
        clamp=10.0,          # standardize: clip the standardized values to +-clamp
    ), kw)


def ar_prior_model_config(**kw) -> ml_collections.ConfigDict:
    """`config.model` for the ar_prior stage; pass embed_dim, pca_components, num_buckets,
    text_ctx, enc_{width,depth,heads}, dec_{width,depth,heads}."""
    return _config(dict(
        _prior_defaults(),
        codec_path="",       # npz of the PCA codec (fitted and written there if absent)
        text_scale=0.0,      # z_t is fed times this; 0: sqrt(embed_dim)
    ), kw)


__all__ = ["Decoder", "GroupNorm", "TextEncoder", "Transformer", "UNet", "Upsampler",
           "ar_prior_model_config", "clip_model_config", "decoder_model_config",
           "diffusion_prior_model_config", "model_from_config", "timestep_embedding",
           "upsampler_model_config"]
