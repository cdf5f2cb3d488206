"""GLIDE-style caption encoder.

Tokens [B, L] -> token + position embeddings; positions where `token_mask` is False (padding, or a
dropped caption) take a learned per-position padding embedding instead (GLIDE's `xf_padding`), so
the empty caption is a learned null input. A bidirectional transformer without an attention mask
(as GLIDE) and a final LayerNorm follow. Returns the last position's output [B, W] (GLIDE's
`xf_proj` input) and the whole sequence [B, L, W] (projected to K/V in every U-Net attention).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models.layers import LayerNorm
from unclip_jax.models.transformer import Transformer

Dtype = Any


class TextEncoder(nn.Module):
    vocab_size: int
    ctx: int
    width: int
    depth: int
    heads: int
    remat: bool = False
    scan: bool = False            # nn.scan over the blocks (compile size of deep encoders)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, token_mask, train: bool = False):
        b, length = tokens.shape
        if length != self.ctx:
            raise ValueError(f"text encoder: tokens have length {length}, "
                             f"config.model.text_ctx is {self.ctx}")
        p = lambda init, axes, shape: self.param(  # noqa: E731
            init[0], nn.with_logical_partitioning(init[1], axes), shape, self.param_dtype)
        emb_init = nn.initializers.normal(0.02)
        tok_table = p(("token_embedding", emb_init), ("vocab", "embed"),
                      (self.vocab_size, self.width))
        pos = p(("positional_embedding", nn.initializers.normal(0.01)), (None, "embed"),
                (self.ctx, self.width))
        pad = p(("padding_embedding", nn.initializers.normal(0.01)), (None, "embed"),
                (self.ctx, self.width))
        x = jnp.take(tok_table, tokens, axis=0) + pos[None]
        x = jnp.where(token_mask[..., None], x, pad[None])
        x = Transformer(self.width, self.depth, self.heads, causal=False, remat=self.remat,
                        scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="transformer")(x.astype(self.dtype), None, train)
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_ln")(x)
        return x[:, -1], x
