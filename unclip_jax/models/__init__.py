"""Flax models: ADM/GLIDE U-Nets (decoder, upsamplers), the caption encoder, a generic transformer.

`decoder_model_config()` / `upsampler_model_config()` give `config.model` defaults (small, CPU
sized); experiments override fields. `model_from_config(config.model)` builds the module.
"""
from __future__ import annotations

import ml_collections

from unclip_jax.models.layers import GroupNorm, timestep_embedding
from unclip_jax.models.text_encoder import TextEncoder
from unclip_jax.models.transformer import Transformer
from unclip_jax.models.unet import Decoder, UNet, Upsampler, model_from_config


def _common(**kw) -> ml_collections.ConfigDict:
    c = dict(
        dtype="float32",             # compute dtype; "bfloat16" on accelerators
        param_dtype="float32",
        remat=False,                 # rematerialise res blocks / transformer blocks
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
    c.update(kw)
    return ml_collections.ConfigDict(c)


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


__all__ = ["Decoder", "GroupNorm", "TextEncoder", "Transformer", "UNet", "Upsampler",
           "decoder_model_config", "model_from_config", "timestep_embedding",
           "upsampler_model_config"]
