"""Train-time corruption of the upsamplers' conditioning image, as jax functions.

They run on device inside the loss (fresh randomness each step from the rng passed in). Images are
NHWC floats in [-1, 1]. `degrade(rng, x, kind)` dispatches on the stage config's `degrade` field:
  "none"  identity
  "blur"  gaussian blur, kernel 3, sigma 0.6 (unCLIP 64->256)
  "bsr"   BSR-style (unCLIP 256->1024): random gaussian blur, random down- and re-upscale,
          gaussian noise and JPEG-like quantisation (8x8 block DCT in YCbCr, random quality).
          Simplified from BSRGAN: fixed order, isotropic blur, no chroma subsampling.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel1d(size: int, sigma):
    """Normalised 1-D gaussian taps [size] (sigma may be traced)."""
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    k = jnp.exp(-0.5 * (r / jnp.maximum(sigma, 1e-6)) ** 2)
    return k / k.sum()


def _sep_filter(x, taps):
    """Separable filter with reflect padding; taps [size] or per-example [B, size]."""
    taps = jnp.asarray(taps, jnp.float32)
    size = taps.shape[-1]
    taps = jnp.broadcast_to(taps, (x.shape[0], size))[:, :, None, None, None]
    p = size // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    y = sum(taps[:, i] * xp[:, i:i + h] for i in range(size))          # vertical
    return sum(taps[:, i] * y[:, :, i:i + w] for i in range(size))       # horizontal


def gaussian_blur(x, sigma=0.6, size: int = 3):
    """Gaussian blur of NHWC x; sigma a scalar or per-example [B]."""
    sigma = jnp.asarray(sigma, jnp.float32)
    taps = jax.vmap(lambda s: gaussian_kernel1d(size, s))(jnp.broadcast_to(sigma, x.shape[:1]))
    return _sep_filter(x.astype(jnp.float32), taps).astype(x.dtype)


def resize(x, size: int, method: str = "linear"):
    """Square resize of NHWC x to size x size (antialiased when shrinking)."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method, antialias=True)


def random_rescale(rng, x, factors=(1.0, 1.5, 2.0, 3.0, 4.0)):
    """Downscale each image by a random factor from `factors` and resize back (static shapes:
    every factor is computed and one is selected per example)."""
    h, w = x.shape[1:3]
    outs = []
    for f in factors:
        small = jax.image.resize(x, (x.shape[0], max(1, round(h / f)), max(1, round(w / f)),
                                     x.shape[3]), "linear", antialias=True)
        outs.append(jax.image.resize(small, x.shape, "linear"))
    idx = jax.random.randint(rng, (x.shape[0],), 0, len(factors))
    return jnp.take_along_axis(jnp.stack(outs, 1), idx[:, None, None, None, None], 1)[:, 0]


# Standard JPEG (ITU T.81 Annex K) quantisation tables.
_Q_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69,
    56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104,
    113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    np.float32).reshape(8, 8)
_Q_CHROMA = np.full((8, 8), 99.0, np.float32)
_Q_CHROMA[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                              [47, 66, 99, 99]], np.float32)


def _dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix D: coefficients = D @ block @ D.T."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.astype(np.float32)


def jpeg_quantise(x, quality):
    """JPEG-like compression of NHWC RGB x in [-1, 1]; quality [B] (or scalar) in [1, 100].

    RGB -> YCbCr (0..255), 8x8 block DCT, quantise by the IJG-scaled standard tables, back.
    """
    b, h, w, _ = x.shape
    q = jnp.clip(jnp.broadcast_to(jnp.asarray(quality, jnp.float32), (b,)), 1.0, 100.0)
    scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)                  # IJG formula
    tables = jnp.stack([jnp.asarray(_Q_LUMA), jnp.asarray(_Q_CHROMA), jnp.asarray(_Q_CHROMA)])
    tables = jnp.maximum(jnp.floor((tables[None] * scale[:, None, None, None] + 50) / 100), 1.0)
    rgb = (x.astype(jnp.float32) + 1.0) * 127.5
    m = jnp.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                   [0.5, -0.418688, -0.081312]], jnp.float32)
    ycc = rgb @ m.T - jnp.array([128.0, 0.0, 0.0])
    ph, pw = (-h) % 8, (-w) % 8
    ycc = jnp.pad(ycc, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    hb, wb = ycc.shape[1] // 8, ycc.shape[2] // 8
    blocks = ycc.reshape(b, hb, 8, wb, 8, 3).transpose(0, 1, 3, 5, 2, 4)     # [B,hb,wb,3,8,8]
    d = jnp.asarray(_dct_matrix())
    coef = d @ blocks @ d.T
    t = tables[:, None, None]                                                 # [B,1,1,3,8,8]
    blocks = d.T @ (jnp.round(coef / t) * t) @ d
    ycc = blocks.transpose(0, 1, 4, 2, 5, 3).reshape(b, hb * 8, wb * 8, 3)[:, :h, :w]
    rgb = (ycc + jnp.array([128.0, 0.0, 0.0])) @ jnp.linalg.inv(m).T
    return jnp.clip(rgb / 127.5 - 1.0, -1.0, 1.0).astype(x.dtype)


def bsr_degrade(rng, x, *, blur_sigma=(0.1, 2.0), blur_size: int = 7,
                rescale_factors=(1.0, 1.5, 2.0, 3.0, 4.0), noise_sigma=(0.0, 0.1),
                jpeg_quality=(30.0, 95.0)):
    """BSR-style degradation with per-example random strengths; output clipped to [-1, 1]."""
    b = x.shape[0]
    k1, k2, k3, k4, k5 = jax.random.split(rng, 5)
    u = lambda k, lo_hi: jax.random.uniform(k, (b,), minval=lo_hi[0], maxval=lo_hi[1])  # noqa
    y = gaussian_blur(x.astype(jnp.float32), u(k1, blur_sigma), blur_size)
    y = random_rescale(k2, y, rescale_factors)
    y = y + u(k3, noise_sigma)[:, None, None, None] * jax.random.normal(k4, y.shape)
    y = jpeg_quantise(jnp.clip(y, -1.0, 1.0), u(k5, jpeg_quality))
    return y.astype(x.dtype)


def degrade(rng, x, kind: str):
    """Corrupt the conditioning image according to `kind` ("none", "blur" or "bsr")."""
    if kind == "none":
        return x
    if kind == "blur":
        return jnp.clip(gaussian_blur(x, 0.6, 3), -1.0, 1.0)
    if kind == "bsr":
        return bsr_degrade(rng, x)
    raise ValueError(f"config.diffusion.degrade: unknown corruption {kind!r} "
                     "(expected 'none', 'blur' or 'bsr')")
