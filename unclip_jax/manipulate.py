"""Image manipulations with the bipartite latent (z_i, x_T) (paper section 3).

x_T comes from DDIM inversion of the decoder conditioned on z_i (no caption: the learned null
caption), so decoding (z_i, x_T) with DDIM eta = 0 reconstructs the image.
  variations     decode (z_i, x_T) with eta > 0: same semantics, new details
  interpolate    slerp between two images' z_i, x_T fixed (first image's) or slerped too
  text_diff      z_d = normalise(z_t(to) - z_t(from)), scaled to |z_i| (1 for our normalised
                 embeddings; Karlo's are unnormalised); decode slerp(z_i, z_d, theta), x_T fixed
All take a Pipeline (or a karlo.KarloPipeline) and return images [n, H, W, 3] in [-1, 1] at the decoder's resolution, or
after the upsamplers with upsample=True.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from unclip_jax.inference import Pipeline, SampleSettings, slerp


def _ddim(settings: SampleSettings, eta: float = 0.0) -> SampleSettings:
    # Inversion is DDIM by construction; decoding must use the same respaced schedule and, like
    # the inversion, no x0 clipping, or eta = 0 would not give the image back.
    return dataclasses.replace(settings, decoder_method="ddim", decoder_eta=float(eta),
                               decoder_clip=False)


def _as_batch(image) -> np.ndarray:
    image = np.asarray(image, np.float32)
    return image[None] if image.ndim == 3 else image


def _finish(pipe: Pipeline, images, upsample: bool, seed: int, settings) -> np.ndarray:
    return pipe.upsample(images, seed=seed, settings=settings) if upsample else np.asarray(images)


def invert(pipe: Pipeline, image, settings: SampleSettings = SampleSettings()):
    """(z_i [1, D], x_T [1, h, w, 3]) of one image [H, W, 3] in [-1, 1]."""
    img = _as_batch(image)
    z = pipe.encode_images(img)
    return z, pipe.invert(img, z, settings=_ddim(settings))


def variations(pipe: Pipeline, image, *, num: int = 4, eta: float = 1.0, seed: int = 0,
               settings: SampleSettings = SampleSettings(), upsample: bool = False):
    z, x_T = invert(pipe, image, settings)
    s = _ddim(settings, eta)
    out = pipe.decode(np.repeat(z, num, 0), x_T=np.repeat(x_T, num, 0), seed=seed, settings=s)
    return _finish(pipe, out, upsample, seed, s)


def interpolate(pipe: Pipeline, image_a, image_b, thetas, *, x_T_mode: str = "fixed",
                seed: int = 0, settings: SampleSettings = SampleSettings(),
                upsample: bool = False):
    if x_T_mode not in ("fixed", "slerp"):
        raise ValueError(f"x_T_mode must be 'fixed' or 'slerp', got {x_T_mode!r}")
    za, xa = invert(pipe, image_a, settings)
    zb, xb = invert(pipe, image_b, settings)
    th = np.asarray(thetas, np.float32)
    z = np.asarray(slerp(np.repeat(za, len(th), 0), np.repeat(zb, len(th), 0), th))
    if x_T_mode == "fixed":
        x_T = np.repeat(xa, len(th), 0)
    else:
        flat = lambda x: np.repeat(x.reshape(1, -1), len(th), 0)  # noqa: E731
        x_T = np.asarray(slerp(flat(xa), flat(xb), th)).reshape((len(th),) + xa.shape[1:])
    s = _ddim(settings)
    return _finish(pipe, pipe.decode(z, x_T=x_T, seed=seed, settings=s), upsample, seed, s)


def text_diff_embedding(z_t_from, z_t_to):
    d = np.asarray(z_t_to, np.float64) - np.asarray(z_t_from, np.float64)
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    if np.any(n < 1e-8):
        raise ValueError("the two captions have the same CLIP text embedding: no direction")
    return (d / n).astype(np.float32)


def text_diff(pipe: Pipeline, image, caption_from: str, caption_to: str, thetas, *,
              seed: int = 0, settings: SampleSettings = SampleSettings(),
              upsample: bool = False):
    """Decode slerp(z_i, z_d, theta) for each theta (0 reproduces the plain reconstruction)."""
    z, x_T = invert(pipe, image, settings)
    zt = pipe.encode_text([caption_from, caption_to])["text_embedding"]
    # On the sphere of z_i's radius: slerp interpolates the norms too, and an unnormalised z_i
    # (Karlo's) would otherwise shrink towards the unit z_d.
    z_d = text_diff_embedding(zt[:1], zt[1:]) * np.linalg.norm(z, axis=-1, keepdims=True)
    th = np.asarray(thetas, np.float32)
    zs = np.asarray(slerp(np.repeat(z, len(th), 0), np.repeat(z_d, len(th), 0), th))
    s = _ddim(settings)
    out = pipe.decode(zs, x_T=np.repeat(x_T, len(th), 0), seed=seed, settings=s)
    return _finish(pipe, out, upsample, seed, s)
