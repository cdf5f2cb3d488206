"""Building blocks shared by the U-Nets and transformers.

Every parameter is created through `nn.with_logical_partitioning` with the logical names of
`unclip_jax.parallel`, so a config's `mesh.rules` decides how it is sharded. Dims that are often
not divisible by a mesh axis (image channels, vocab-free vectors) are left unpartitioned (None).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any


def dtype_of(name) -> jnp.dtype:
    """'float32' / 'bfloat16' / a dtype -> jnp dtype, with an error naming the config field."""
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"config.model.dtype/param_dtype: unknown dtype {name!r}") from e


def _init(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def zeros_init():
    return nn.initializers.zeros_init()


class Dense(nn.Module):
    """nn.Dense with logical axes (in_axis, out_axis) on the kernel and (out_axis,) on the bias."""
    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    zero_init: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kinit = zeros_init() if self.zero_init else nn.initializers.lecun_normal()
        return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=_init(kinit, self.axes),
                        bias_init=_init(zeros_init(), (self.axes[1],)))(x)


class Conv(nn.Module):
    """NHWC conv with kernel axes (None, None, in_axis, out_axis).

    `upsample=True` computes the SAME conv of `upsample_nearest2(x)` from x itself
    (`upsample_conv`): the same parameters and result, 2.25x fewer FLOPs.
    """
    features: int
    kernel_size: int = 3
    axes: tuple[str | None, str | None] = ("conv_in", "conv_out")
    zero_init: bool = False
    upsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kinit = zeros_init() if self.zero_init else nn.initializers.lecun_normal()
        k = self.kernel_size
        if self.upsample and k != 3:
            raise ValueError(f"Conv(upsample=True) is written for 3x3 kernels, got {k}x{k}")
        extra = dict(conv_general_dilated=upsample_conv) if self.upsample else {}
        return nn.Conv(self.features, (k, k), padding=[(k // 2, k // 2)] * 2, dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       kernel_init=_init(kinit, (None, None) + tuple(self.axes)),
                       bias_init=_init(zeros_init(), (self.axes[1],)), **extra)(x)


# Which of the 3 kernel taps along an axis land on low-res pixel (a-1, a) for output phase 0 and
# on (a, a+1) for phase 1, when the conv runs over a 2x nearest-upsampled input: [phase, tap, k].
_UPSAMPLE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_conv(lhs, rhs, window_strides=(1, 1), padding=((1, 1), (1, 1)), *, lhs_dilation=None,
                  rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                  precision=None, preferred_element_type=None):
    """SAME 3x3 conv of `upsample_nearest2(lhs)` with rhs [3, 3, C, O], without upsampling.

    Output pixel (2a+p, 2b+q) sees low-res rows a-1..a (p=0) or a..a+1 (p=1), and the same for
    columns, so each of the four output phases is a 2x2 conv of lhs with summed kernel taps:
    16 taps per low-res pixel instead of 36, no 4x larger input to write, read and (in the
    backward pass) sum back. Results differ from the plain path by rounding only (test). Takes
    `lax.conv_general_dilated`'s arguments (flax's `nn.Conv(conv_general_dilated=...)` hook);
    only the NHWC / HWIO, stride-1, SAME case that `Conv(upsample=True)` makes is accepted.
    """
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if (rhs.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1)
            or [tuple(p) for p in padding] != [(1, 1), (1, 1)]
            or lhs_dilation not in (None, (1, 1)) or rhs_dilation not in (None, (1, 1))
            or feature_group_count != 1
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != dn):
        raise ValueError("upsample_conv: only a SAME, stride-1, NHWC 3x3 conv is supported")
    return _upsample_conv_phases(lhs, rhs, precision=precision,
                                 preferred_element_type=preferred_element_type)


# A named jit (inlined by XLA) so that `unclip_jax.tools.flops` can count the architecture's conv here.
@functools.partial(jax.jit, static_argnames=("precision", "preferred_element_type"))
def _upsample_conv_phases(lhs, rhs, precision=None, preferred_element_type=None):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    n, h, w, _ = lhs.shape
    side = [(1, 0), (0, 1)]                      # low-res padding for phase 0 / 1 along an axis
    out = []
    for p in range(2):
        row = []
        for q in range(2):
            # Tap sums in float32, rounded once to the compute dtype.
            k = jnp.einsum("ai,bj,ijco->abco", _UPSAMPLE_TAPS[p], _UPSAMPLE_TAPS[q], rhs,
                           preferred_element_type=jnp.float32).astype(rhs.dtype)
            row.append(lax.conv_general_dilated(
                lhs, k, (1, 1), (side[p], side[q]), dimension_numbers=dn, precision=precision,
                preferred_element_type=preferred_element_type))
        out.append(jnp.stack(row, axis=3))      # [n, h, w, 2 (q), O]
    # Four separate convs rather than one with 4*O outputs: the single conv's slices made
    # XLA:CPU run its backward as a naive loop (~40x slower).
    y = jnp.stack(out, axis=2)                   # [n, h, 2 (p), w, 2 (q), O]
    return y.reshape(n, 2 * h, 2 * w, y.shape[-1])


def _per_channel(x, v):
    """[B, C] -> broadcastable against x [B, ..., C]."""
    return v.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


# GroupNorm's two big passes with hand-written backward passes. Autodiff of the same code left
# XLA:CPU a slow backward (GroupNorm was a large share of the CPU U-Net train step);
# written out, each backward is one elementwise pass plus the [B, C] sums.
@jax.custom_vjp
def _spatial_moments(x):
    """Per-(batch, channel) sums of x and x^2 over the spatial axes, float32 [B, C] each."""
    red = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    return jnp.sum(xf, axis=red), jnp.sum(xf * xf, axis=red)


def _spatial_moments_fwd(x):
    return _spatial_moments(x), x


def _spatial_moments_bwd(x, grads):
    d1, d2 = grads
    dx = _per_channel(x, d1) + 2.0 * x.astype(jnp.float32) * _per_channel(x, d2)
    return (dx.astype(x.dtype),)


_spatial_moments.defvjp(_spatial_moments_fwd, _spatial_moments_bwd)


@jax.custom_vjp
def _channel_affine(x, a, b):
    """x * a + b with a, b [B, C] (float32) broadcast over the spatial axes, in x's dtype."""
    return x * _per_channel(x, a).astype(x.dtype) + _per_channel(x, b).astype(x.dtype)


def _channel_affine_fwd(x, a, b):
    return _channel_affine(x, a, b), (x, a)


def _channel_affine_bwd(res, dy):
    x, a = res
    red = tuple(range(1, x.ndim - 1))
    dyf = dy.astype(jnp.float32)
    da = jnp.sum(dyf * x.astype(jnp.float32), axis=red)
    db = jnp.sum(dyf, axis=red)
    return dy * _per_channel(x, a).astype(dy.dtype), da.astype(a.dtype), db.astype(a.dtype)


_channel_affine.defvjp(_channel_affine_fwd, _channel_affine_bwd)


class GroupNorm(nn.Module):
    """GroupNorm over channels-last inputs [B, ..., C], optionally with an AdaGN scale/shift.

    Written for speed on XLA:CPU (see jax-notes): reductions are sums over the spatial axes to
    [B, C] (x and x^2, float32), then a tiny per-group sum; var = E[x^2] - E[x]^2. The
    normalisation, affine and the optional AdaGN `(1 + scale), shift` ([B, C] each) fold into one
    per-(batch, channel) multiply-add over the activation. Both full-size passes carry their own
    backward (`_spatial_moments`, `_channel_affine`); gradients match flax's nn.GroupNorm (test).
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        c = x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {g} groups "
                             "(config.model.norm_groups)")
        gamma = self.param("scale", _init(nn.initializers.ones_init(), ("norm",)), (c,),
                           self.param_dtype)
        beta = self.param("bias", _init(zeros_init(), ("norm",)), (c,), self.param_dtype)
        n = math.prod(x.shape[1:-1]) * (c // g)
        s1c, s2c = _spatial_moments(x)
        s1 = s1c.reshape(x.shape[0], g, c // g).sum(-1)                         # [B, G]
        s2 = s2c.reshape(x.shape[0], g, c // g).sum(-1)
        mean = s1 / n
        var = jnp.maximum(s2 / n - mean * mean, 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon)
        # Group -> channel by a tiny matmul with a one-hot [G, C] matrix rather than jnp.repeat:
        # XLA:CPU fused repeat's reshape into the full-size multiply-add below and redid its
        # index arithmetic per element (that pass ran ~10x slower than a plain multiply-add).
        onehot = (jnp.arange(c)[None, :] // (c // g) == jnp.arange(g)[:, None]).astype(
            jnp.float32)
        inv_c = jnp.dot(inv, onehot, precision=jax.lax.Precision.HIGHEST)          # [B, C]
        mean_c = jnp.dot(mean, onehot, precision=jax.lax.Precision.HIGHEST)
        a = gamma.astype(jnp.float32) * inv_c
        b = beta.astype(jnp.float32) - mean_c * a
        if scale is not None:
            a = a * (1.0 + scale.astype(jnp.float32))
            b = b * (1.0 + scale.astype(jnp.float32))
        if shift is not None:
            b = b + shift.astype(jnp.float32)
        # The multiply-add stays in the compute dtype: one pass over the activation.
        return _channel_affine(x.astype(self.dtype), a, b)


class LayerNorm(nn.Module):
    """nn.LayerNorm (float32 statistics) with logical axes on scale and bias."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                            use_fast_variance=False,
                            scale_init=_init(nn.initializers.ones_init(), ("norm",)),
                            bias_init=_init(zeros_init(), ("norm",)))(x)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim] float32 (ADM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def avg_pool2(x):
    """2x2 average pooling, NHWC."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"downsampling needs even spatial size, got {h}x{w}")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@jax.custom_vjp
def upsample_nearest2(x):
    """2x nearest-neighbour upsampling, NHWC."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, h * 2, w * 2, c)


def _upsample_fwd(x):
    return upsample_nearest2(x), None


def _upsample_bwd(_, dy):
    # The gradient sums each 2x2 block. Written as four strided slices rather than a reduce so
    # that XLA:CPU does not fuse the sum with the convolution producing dy (the BigGAN up block's
    # conv): the fused pair ran at well under half the speed the convolution's FLOPs allow at
    # the CPU's matmul peak (profiled with jax.profiler).
    return (dy[:, 0::2, 0::2] + dy[:, 1::2, 0::2] + dy[:, 0::2, 1::2] + dy[:, 1::2, 1::2],)


upsample_nearest2.defvjp(_upsample_fwd, _upsample_bwd)


def constrain(x, axes: Sequence[str | None]):
    """Logical sharding constraint on an activation (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))
