"""ADM / GLIDE U-Nets: the unCLIP decoder (64x64) and the convolution-only upsamplers.

`UNet` is the ADM backbone (AdaGN res blocks, BigGAN up/down res blocks, multi-head attention
with optional context K/V, zero-initialised output layers). `Decoder` adds GLIDE's caption
encoder and unCLIP's CLIP-embedding conditioning; `Upsampler` concatenates the resized low-res
image with x. `model_from_config(config.model)` builds either from a config.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import (Conv, Dense, GroupNorm, LayerNorm, avg_pool2, constrain,
                                      dtype_of, timestep_embedding, upsample_nearest2)
from unclip_jax.models.text_encoder import TextEncoder

Dtype = Any
IMG = ("batch", "height", "width", "act_embed")


class ResBlock(nn.Module):
    """ADM res block: GN-SiLU-(resample)-conv, AdaGN(emb), SiLU, dropout, zero-init conv; skip.
    `scale_shift=False`: the projected emb is added before the second GN instead of AdaGN
    (ADM without use_scale_shift_norm; diffusers' resnet_time_scale_shift="default")."""
    out_channels: int
    resample: str | None = None       # None, "up" or "down" (BigGAN: on both paths)
    dropout: float = 0.0
    norm_groups: int = 32
    scale_shift: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.norm_groups, name="norm_in", **kw)(x))
        if self.resample not in (None, "up", "down"):
            raise ValueError("ResBlock.resample must be None, 'up' or 'down', "
                             f"got {self.resample!r}")
        if self.resample == "down":
            h, x = avg_pool2(h), avg_pool2(x)
        elif self.resample == "up":
            x = upsample_nearest2(x)     # h is upsampled inside conv_in (same result, fewer FLOPs)
        h = Conv(self.out_channels, 3, upsample=self.resample == "up", name="conv_in", **kw)(h)
        ss = Dense((2 if self.scale_shift else 1) * self.out_channels, axes=("embed", "mlp"),
                   name="emb_proj", **kw)(nn.silu(emb))
        if self.scale_shift:
            scale, shift = jnp.split(ss, 2, axis=-1)
            h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h, scale, shift))
        else:
            h = h + ss[:, None, None, :].astype(h.dtype)
            h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = Conv(self.out_channels, 3, zero_init=True, name="conv_out", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, name="skip", **kw)(x)
        return constrain(x + h, IMG)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels; `context` [B, Lc, Wc] is projected to K/V and put in
    front of the image K/V (GLIDE); `context_mask` [B, Lc] (True = attend) masks context keys
    (Karlo's padded caption tokens). Zero-initialised output projection."""
    head_channels: int = 64
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        b, hgt, wid, c = x.shape
        if c % self.head_channels:
            raise ValueError(f"attention: {c} channels not divisible by "
                             f"config.model.head_channels={self.head_channels}")
        heads, hd = c // self.head_channels, self.head_channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.norm_groups, name="norm", **kw)(x).reshape(b, hgt * wid, c)
        # [heads, (q, k, v), head_dim] layout: a contiguous 'heads' shard holds whole heads.
        qkv = Dense(3 * c, axes=("embed", "heads"), name="qkv", **kw)(h)
        q, k, v = jnp.split(qkv.reshape(b, hgt * wid, heads, 3 * hd), 3, axis=-1)
        if context is not None:
            ekv = Dense(2 * c, axes=("embed", "heads"), name="context_kv", **kw)(
                context.astype(self.dtype))
            ek, ev = jnp.split(ekv.reshape(b, context.shape[1], heads, 2 * hd), 2, axis=-1)
            k, v = jnp.concatenate([ek, k], axis=1), jnp.concatenate([ev, v], axis=1)
        mask = None
        if context is not None and context_mask is not None:
            keys = jnp.concatenate([context_mask.astype(bool), jnp.ones((b, hgt * wid), bool)], 1)
            mask = keys[:, None, None, :]
        out = _attention(q, k, v, mask).reshape(b, hgt * wid, c)
        out = Dense(c, axes=("heads", "embed"), zero_init=True, name="proj_out", **kw)(out)
        return constrain(x + out.reshape(x.shape), IMG)


# Query rows per block of the CPU attention below: its [B, heads, 128, S] logits stay in cache.
_QUERY_BLOCK = 128


def _attention(q, k, v, mask):
    """Softmax attention of q [B, T, N, H] over k, v [B, S, N, H] (`mask` [B, 1, 1, S] or None).
    Compiled for XLA:CPU with many pixels: a lax.map over blocks of query rows
    (`_blocked_attention`); jax.nn.dot_product_attention materialises the whole [B, N, T, S]
    logits and ran the decoder's 32x32 attention about 2x slower there (and slower than
    diffusers' SDPA). Elsewhere, and for short sequences, jax.nn.dot_product_attention. The
    choice is made when lowering, for the platform compiled for: an ahead-of-time plan for TPU
    made on a CPU host takes jax.nn.dot_product_attention."""
    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    t = q.shape[1]
    if t < 4 * _QUERY_BLOCK or t % _QUERY_BLOCK:
        return fused(q, k, v)
    return jax.lax.platform_dependent(
        q, k, v, cpu=lambda q, k, v: _blocked_attention(q, k, v, mask), default=fused)


def _blocked_attention(q, k, v, mask):
    b, t, n, h = q.shape
    scale = jnp.asarray(h ** -0.5, q.dtype)
    k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k, v))                  # [B, N, S, H]
    blocks = jnp.transpose(q * scale, (0, 2, 1, 3)).reshape(
        b, n, t // _QUERY_BLOCK, _QUERY_BLOCK, h).transpose(2, 0, 1, 3, 4)

    def one(qb):                                                              # [B, N, blk, H]
        s = jnp.einsum("bnth,bnsh->bnts", qb, k, preferred_element_type=jnp.float32)
        if mask is not None:
            s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
        e = jnp.exp(s - s.max(-1, keepdims=True))
        o = jnp.einsum("bnts,bnsh->bnth", e.astype(v.dtype), v,
                       preferred_element_type=jnp.float32)
        return (o / e.sum(-1, keepdims=True)).astype(q.dtype)
    out = jax.lax.map(one, blocks)                                            # [T/blk, B, N, blk, H]
    return jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, t, n, h)


def _res_class(remat: bool):
    # static_argnums counts `self` as 0: (x=1, emb=2, train=3).
    return nn.remat(ResBlock, static_argnums=(3,)) if remat else ResBlock


class _ScanBlock(nn.Module):
    """A res block (+ attention) as an nn.scan body over the same-shaped blocks of one level:
    (h, skip) -> (h, h); on the up path the skip is concatenated first. `train` is static."""
    channels: int
    attention: bool
    concat: bool
    head_channels: int
    dropout: float
    norm_groups: int
    scale_shift: bool
    train: bool
    remat: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h, skip, emb, context, context_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.concat:
            h = jnp.concatenate([h, skip], axis=-1)
        res = _res_class(self.remat)(self.channels, dropout=self.dropout,
                                     norm_groups=self.norm_groups, scale_shift=self.scale_shift,
                                     name="res", **kw)
        h = res(h, emb, self.train)
        if self.attention:
            h = AttentionBlock(self.head_channels, self.norm_groups, name="attn", **kw)(
                h, context, context_mask)
        return h, h


def _scan_range(same_shape: list[bool], enabled: bool) -> tuple[int, int]:
    """[a, b): the blocks of a level to run as one scan, the longest run of blocks whose input
    and output shapes agree; empty ([n, n)) when disabled or shorter than 2."""
    n = len(same_shape)
    best, start = (n, n), None
    for i, f in enumerate(same_shape + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    return best if enabled and best[1] - best[0] >= 2 else (n, n)


class UNet(nn.Module):
    """ADM U-Net backbone: x [B, H, W, Cin], t [B] -> [B, H, W, out_channels (x2 if learn_sigma)].

    `emb_add` [B, 4*base] is added to the timestep embedding (GLIDE/unCLIP conditioning);
    `context` [B, Lc, Wc] is attended to by every attention layer (keys masked by
    `context_mask` [B, Lc] when given).
    """
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_ds: Sequence[int] = ()     # downsampling factors (image_size // resolution)
    head_channels: int = 64
    dropout: float = 0.0
    out_channels: int = 3
    learn_sigma: bool = False
    norm_groups: int = 32
    scale_shift: bool = True           # False: additive time embedding in the res blocks
    remat: bool = False
    # Run each level's same-shaped res blocks (+ attention) as one nn.scan over stacked params
    # ("layers" axis): a smaller program to compile at paper scale, the same function.
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _scan(self, n, channels, attention, concat, train, name):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stack = nn.scan(_ScanBlock, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(channels, attention, concat, self.head_channels, self.dropout,
                     self.norm_groups, self.scale_shift, train, self.remat, name=name, **kw)

    @nn.compact
    def __call__(self, x, t, emb_add=None, context=None, train: bool = False, context_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rb = dict(dropout=self.dropout, norm_groups=self.norm_groups,
                  scale_shift=self.scale_shift, **kw)
        Res = _res_class(self.remat)
        attn = lambda name: AttentionBlock(self.head_channels, self.norm_groups,  # noqa: E731
                                           name=name, **kw)
        base, ed = self.base_channels, 4 * self.base_channels
        emb = timestep_embedding(t, base).astype(self.dtype)
        emb = Dense(ed, axes=("embed", "mlp"), name="time_fc1", **kw)(emb)
        emb = Dense(ed, axes=("mlp", "embed"), name="time_fc2", **kw)(nn.silu(emb))
        if emb_add is not None:
            emb = emb + emb_add.astype(self.dtype)

        # Input conv: image channels (3, 6) rarely divide a mesh axis, so only outputs shard.
        h = Conv(base * self.channel_mult[0], 3, axes=(None, "conv_out"), name="conv_in",
                 **kw)(constrain(x.astype(self.dtype), IMG))
        skips, ds = [h], 1
        for level, mult in enumerate(self.channel_mult):
            ch, n = base * mult, self.num_res_blocks
            a, b = _scan_range([i > 0 or h.shape[-1] == ch for i in range(n)], self.scan_blocks)
            i = 0
            while i < n:
                if i == a and b > a:
                    h, hs = self._scan(b - a, ch, ds in self.attention_ds, False, train,
                                       f"down_{level}_scan")(h, None, emb, context, context_mask)
                    skips.extend(hs)   # one skip per scanned block
                    i = b
                    continue
                h = Res(ch, name=f"down_{level}_{i}", **rb)(h, emb, train)
                if ds in self.attention_ds:
                    h = attn(f"down_{level}_{i}_attn")(h, context, context_mask)
                skips.append(h)
                i += 1
            if level != len(self.channel_mult) - 1:
                h = Res(h.shape[-1], "down", name=f"down_{level}_resample", **rb)(h, emb, train)
                skips.append(h)
                ds *= 2
        h = Res(h.shape[-1], name="mid_0", **rb)(h, emb, train)
        if self.attention_ds:
            h = attn("mid_attn")(h, context, context_mask)
        h = Res(h.shape[-1], name="mid_1", **rb)(h, emb, train)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            ch, n = base * mult, self.num_res_blocks + 1
            skip_ch = [skips[-1 - i].shape[-1] for i in range(n)]
            a, b = _scan_range([(i > 0 or h.shape[-1] == ch) and skip_ch[i] == ch
                                for i in range(n)], self.scan_blocks)
            i = 0
            while i < n:
                if i == a and b > a:
                    xs = jnp.stack([skips.pop() for _ in range(b - a)])
                    h, _ = self._scan(b - a, ch, ds in self.attention_ds, True, train,
                                      f"up_{level}_scan")(h, xs, emb, context, context_mask)
                    i = b
                    continue
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = Res(ch, name=f"up_{level}_{i}", **rb)(h, emb, train)
                if ds in self.attention_ds:
                    h = attn(f"up_{level}_{i}_attn")(h, context, context_mask)
                i += 1
            if level:
                h = Res(h.shape[-1], "up", name=f"up_{level}_resample", **rb)(h, emb, train)
                ds //= 2
        h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        out_ch = self.out_channels * (2 if self.learn_sigma else 1)
        out = Conv(out_ch, 3, axes=("conv_in", None), zero_init=True, name="conv_out", **kw)(h)
        return out.astype(jnp.float32)


def _unet_kwargs(m, dtype, param_dtype) -> dict:
    image_size = int(m.image_size)
    for r in m.attention_resolutions:
        if image_size % int(r):
            raise ValueError(f"config.model.attention_resolutions: {r} does not divide "
                             f"config.model.image_size={image_size}")
    return dict(
        base_channels=int(m.base_channels), channel_mult=tuple(int(c) for c in m.channel_mult),
        num_res_blocks=int(m.num_res_blocks),
        attention_ds=tuple(image_size // int(r) for r in m.attention_resolutions),
        head_channels=int(m.head_channels), dropout=float(m.dropout),
        out_channels=int(m.out_channels), learn_sigma=bool(m.learn_sigma),
        norm_groups=int(m.norm_groups), scale_shift=bool(m.get("scale_shift", True)),
        remat=bool(m.remat),
        scan_blocks=bool(m.scan_blocks),
        dtype=dtype, param_dtype=param_dtype)


class Decoder(nn.Module):
    """unCLIP decoder: GLIDE text-conditional U-Net + CLIP image embedding conditioning.

    z_i (or the learned null z_i where `drop_image_emb` or image_emb is None) is projected and
    added to the timestep embedding and projected into `clip_tokens` context tokens in front of
    the caption encoder's output sequence. A dropped (or absent) caption is the all-padding
    caption, whose padding embeddings are learned (GLIDE's null caption). `clip_dim=0` or
    `text_depth=0` disable either branch.

    `clip_text_width > 0` replaces the caption encoder by a frozen CLIP text encoder's outputs
    (Karlo; diffusers' UnCLIPTextProjModel): `text_emb` [B, clip_dim] is projected and added to
    the timestep embedding, and `text_states` [B, L, clip_text_width] are projected to
    `context_dim` and layer-normed behind the CLIP tokens; `token_mask` masks their padding.
    The unconditional input is then given explicitly (null z_i and the encoding of "").
    """
    unet: dict
    clip_dim: int = 0
    clip_tokens: int = 4
    text_vocab: int = 0
    text_ctx: int = 0
    text_width: int = 0
    text_depth: int = 0
    text_heads: int = 1
    text_scan: bool = False
    clip_text_width: int = 0
    context_dim: int = 0       # attention context width; 0: text_width or 4 * base_channels

    @nn.compact
    def __call__(self, x, t, image_emb=None, tokens=None, token_mask=None, drop_image_emb=None,
                 drop_text=None, train: bool = False, text_emb=None, text_states=None,
                 conditioning_only: bool = False):
        """`conditioning_only`: return (emb_add, context, context_mask) without the U-Net."""
        u = self.unet
        kw = dict(dtype=u["dtype"], param_dtype=u["param_dtype"])
        b, ed = x.shape[0], 4 * u["base_channels"]
        ctx_width = self.context_dim or (self.text_width if self.text_depth else ed)
        emb_add, ctx, ctx_mask = [], [], None
        if self.clip_dim:
            null = self.param("null_image_emb", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), (None,)), (self.clip_dim,), u["param_dtype"])
            z = jnp.broadcast_to(null, (b, self.clip_dim)) if image_emb is None else image_emb
            if drop_image_emb is not None:
                z = jnp.where(drop_image_emb[:, None], null[None], z)
            z = z.astype(u["dtype"])
            emb_add.append(Dense(ed, axes=("embed", "mlp"), name="clip_emb_proj", **kw)(z))
            tok = Dense(self.clip_tokens * ctx_width, axes=("embed", "mlp"),
                        name="clip_tok_proj", **kw)(z)
            ctx.append(tok.reshape(b, self.clip_tokens, ctx_width))
        if self.clip_text_width:
            if text_emb is None or text_states is None or token_mask is None:
                raise ValueError("decoder: clip_text_width > 0 needs text_emb, text_states and "
                                 "token_mask (the CLIP text encoder's outputs)")
            emb_add.append(Dense(ed, axes=("embed", "mlp"), name="clip_text_emb_proj", **kw)(
                text_emb.astype(u["dtype"])))
            seq = Dense(ctx_width, axes=("embed", "mlp"), name="clip_text_seq_proj", **kw)(
                text_states.astype(u["dtype"]))
            ctx.append(LayerNorm(name="clip_text_seq_norm", **kw)(seq))
            ctx_mask = jnp.concatenate([jnp.ones((b, self.clip_tokens if self.clip_dim else 0),
                                                 bool), token_mask.astype(bool)], axis=1)
        elif self.text_depth:
            if tokens is None:
                tokens = jnp.zeros((b, self.text_ctx), jnp.int32)
                token_mask = jnp.zeros((b, self.text_ctx), bool)
            elif token_mask is None:
                raise ValueError("decoder: tokens given without token_mask")
            if drop_text is not None:
                token_mask = token_mask & ~drop_text[:, None]
            pooled, seq = TextEncoder(self.text_vocab, self.text_ctx, self.text_width,
                                      self.text_depth, self.text_heads, remat=u["remat"],
                                      scan=self.text_scan, name="text_encoder", **kw)(
                                          tokens, token_mask, train)
            emb_add.append(Dense(ed, axes=("embed", "mlp"), name="text_emb_proj", **kw)(pooled))
            ctx.append(seq)
        emb_add = sum(emb_add) if emb_add else None
        ctx = jnp.concatenate(ctx, axis=1) if ctx else None
        if conditioning_only:
            return emb_add, ctx, ctx_mask
        return UNet(**u, name="unet")(x, t, emb_add, ctx, train, ctx_mask)


class Upsampler(nn.Module):
    """Convolution-only super-resolution U-Net: x [B, H, W, 3] and low_res [B, h, w, 3] (any
    size; resized to H x W: bilinearly as ADM/GLIDE, or `resize="cubic"` with antialiasing as
    Karlo / torch's bicubic antialias=True) concatenated on channels; timestep only.
    Fully convolutional: the same params apply to crops and to full-size images."""
    unet: dict
    resize: str = "linear"

    @nn.compact
    def __call__(self, x, t, low_res, train: bool = False):
        if low_res.shape[1:3] != x.shape[1:3]:
            # jax's antialiased cubic is torch's bicubic with antialias=True (Keys a = -0.5,
            # weights renormalised at the border), not torch's plain bicubic (a = -0.75).
            low_res = jax.image.resize(low_res, x.shape[:3] + low_res.shape[3:], self.resize)
        h = jnp.concatenate([x, low_res.astype(x.dtype)], axis=-1)
        return UNet(**self.unet, name="unet")(h, t, None, None, train)


def model_from_config(m) -> nn.Module:
    """Build `Decoder` (m.kind == "decoder") or `Upsampler` (m.kind == "upsampler")."""
    u = _unet_kwargs(m, dtype_of(m.dtype),
                     dtype_of(m.param_dtype))
    kind = m.kind
    if kind == "upsampler":
        if tuple(m.attention_resolutions):
            raise ValueError("config.model.attention_resolutions must be empty for the "
                             "convolution-only upsampler (it is applied at other sizes)")
        return Upsampler(unet=u)
    if kind != "decoder":
        raise ValueError(f"config.model.kind: {kind!r} is not 'decoder' or 'upsampler'")
    return Decoder(unet=u, clip_dim=int(m.clip_dim),
                   clip_tokens=int(m.clip_tokens),
                   text_vocab=int(m.text_vocab), text_ctx=int(m.text_ctx),
                   text_width=int(m.text_width), text_depth=int(m.text_depth),
                   text_heads=int(m.text_heads),
                   text_scan=bool(m.text_scan))
