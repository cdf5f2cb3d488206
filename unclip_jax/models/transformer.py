"""A generic pre-LN transformer (GPT-2 / CLIP style), reused by the text encoder, CLIP and priors.

`Transformer(width, depth, heads)(x [B, L, W], mask=None)`: causal or bidirectional self-attention,
an optional key padding mask [B, L] (True = real token), attention through
`jax.nn.dot_product_attention` so fused kernels run on GPU/TPU, logically partitioned parameters,
`remat` to recompute each block in the backward pass, and `scan` to run the blocks as one
`nn.scan` over stacked parameters (leading "layers" axis): the compiled program holds one block
instead of `depth`, which keeps compile time and compile memory of deep paper-scale models down.

Incremental decoding (`decode=True`, causal models, as flax's own attention does it): each
attention layer keeps its keys and values in the "cache" collection ([B, L_max, heads, head_dim]
and the next write index); a call with n new positions appends theirs and attends to every
position written so far, so sampling a token costs one position, not the whole prefix. The cache
is created (zeros, index 0) by a call on the full-length sequence with "cache" mutable (under
`jax.eval_shape`, nothing runs); `mask` is then the key mask over all L_max positions.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import Dense, LayerNorm, constrain

Dtype = Any
ACT = ("batch", "length", "act_embed")


def attention_mask(mask, causal: bool, length: int):
    """Boolean [B or 1, 1, L, L] mask for dot_product_attention, or None when nothing is masked."""
    m = None
    if mask is not None:
        m = mask[:, None, None, :].astype(bool)
    if causal:
        c = jnp.tril(jnp.ones((length, length), bool))[None, None]
        m = c if m is None else m & c
    return m


class SelfAttention(nn.Module):
    width: int
    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, decode: bool = False):
        b, length, _ = x.shape
        if self.width % self.heads:
            raise ValueError(f"transformer: width {self.width} not divisible by heads {self.heads}")
        hd = self.width // self.heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Output laid out [heads, (q, k, v), head_dim] so a contiguous 'heads' shard is whole heads.
        qkv = Dense(3 * self.width, axes=("embed", "heads"), name="qkv", **kw)(x)
        q, k, v = jnp.split(qkv.reshape(b, length, self.heads, 3 * hd), 3, axis=-1)
        if decode and self.has_variable("cache", "key"):
            k, v, m = self._extend_cache(k, v, mask)
        else:
            if decode:  # the creating call: the cache takes this (full-length) call's shapes
                self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
                self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
                self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            m = attention_mask(mask, self.causal, length)
        out = jax.nn.dot_product_attention(q, k, v, mask=m)
        out = out.reshape(b, length, self.width)
        return Dense(self.width, axes=("heads", "embed"), name="out", **kw)(out)

    def _extend_cache(self, k, v, mask):
        """Write k, v [B, n, H, hd] at the cache index; the keys, values and mask [B, 1, n, L_max]
        to attend with (written positions only, causal among them)."""
        ck, cv = self.variable("cache", "key"), self.variable("cache", "value")
        ci = self.variable("cache", "index")
        i, n, total = ci.value, k.shape[1], ck.value.shape[1]
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
        ci.value = i + n
        key_pos, query_pos = jnp.arange(total)[None, :], i + jnp.arange(n)[:, None]
        m = key_pos <= query_pos if self.causal else jnp.broadcast_to(key_pos < i + n, (n, total))
        m = m[None, None]
        if mask is not None:
            m = m & mask[:, None, None, :].astype(bool)
        return ck.value, cv.value, m


class MLP(nn.Module):
    width: int
    hidden: int
    gelu_approximate: bool = True   # False: exact erf GELU (diffusers' PriorTransformer)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.hidden, axes=("embed", "mlp"), name="fc", **kw)(x)
        h = nn.gelu(h, approximate=self.gelu_approximate)
        return Dense(self.width, axes=("mlp", "embed"), name="proj", **kw)(h)


class Block(nn.Module):
    width: int
    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    dropout: float = 0.0
    gelu_approximate: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False, decode: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = SelfAttention(self.width, self.heads, self.causal, name="attn", **kw)(
            LayerNorm(name="ln_1", **kw)(x), mask, decode)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
        h = MLP(self.width, int(self.width * self.mlp_ratio), self.gelu_approximate, name="mlp",
                **kw)(
            LayerNorm(name="ln_2", **kw)(x))
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
        return constrain(x, ACT)


def _block_class(remat: bool):
    # static_argnums counts `self` as 0: (x=1, mask=2, train=3, decode=4).
    return nn.remat(Block, static_argnums=(3, 4)) if remat else Block


class _ScanBlock(nn.Module):
    """`Block` as an nn.scan body: (carry, mask) -> (carry, None); `train` is static."""
    width: int
    heads: int
    mlp_ratio: float
    causal: bool
    dropout: float
    train: bool
    remat: bool
    gelu_approximate: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, mask):
        block = _block_class(self.remat)(self.width, self.heads, self.mlp_ratio, self.causal,
                                         self.dropout, self.gelu_approximate, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name="block")
        return block(x, mask, self.train, False), None  # remat's static args are all passed


class Transformer(nn.Module):
    """Stack of `depth` pre-LN blocks; `final_norm` adds a last LayerNorm.

    Parameters are `block_{i}/...` per block, or with `scan=True` one `blocks/block/...` tree whose
    leaves have a leading [depth] axis (logical name "layers", replicated); both compute the same
    function (tests/models/test_transformer.py)."""
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    dropout: float = 0.0
    final_norm: bool = False
    remat: bool = False
    scan: bool = False
    gelu_approximate: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False, decode: bool = False):
        """decode: incremental decoding with the key/value cache (module docstring)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x.astype(self.dtype), ACT)
        if decode and self.scan:
            raise ValueError("transformer: decode=True (key/value cache) needs scan=False")
        if self.scan:
            stack = nn.scan(_ScanBlock, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(self.width, self.heads, self.mlp_ratio, self.causal, self.dropout, train,
                         self.remat, self.gelu_approximate, name="blocks", **kw)(x, mask)
        else:
            block = _block_class(self.remat)
            for i in range(self.depth):
                x = block(self.width, self.heads, self.mlp_ratio, self.causal, self.dropout,
                          self.gelu_approximate, name=f"block_{i}", **kw)(x, mask, train, decode)
        if self.final_norm:
            x = LayerNorm(name="ln_final", **kw)(x)
        return x
